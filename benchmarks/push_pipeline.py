"""Push-pipeline benchmark: jobs/s end to end and publish-to-provider latency, with a flaky provider.

One process: a :class:`~im_actors.push.publisher.PushPublisher` (confirmed publishing from its outbox),
``--workers`` :class:`~im_actors.push.worker.PushWorker` consumers with the Redis job ledger, RabbitMQ
between them (the machine's broker, or ``--rabbitmq-url``), and a webhook "provider" on loopback that
answers 503 to ``--fail`` of its calls at random (transient: the job goes through the retry queue with
backoff ``--retry-base-ms`` and comes back). Every job is published at ``--rate`` jobs/s (0: all at
once) and counted when the provider accepts it.

    python benchmarks/push_pipeline.py --jobs 5000 --rate 0 --workers 1 2 --prefetch 64

Prints, per run: jobs, jobs/s end to end (first publish to last acceptance), latency from publish to the
provider's acceptance (p50/p95/p99/max, ms; the jobs that failed once include their retry delay), the
503s answered, jobs retried, duplicates accepted and jobs lost (both must be 0), ledger errors (jobs
sent without deduplication), the servers it ran on and the machine's load average. The publisher,
the workers and the provider share this process and the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiormq
import redis.asyncio as aioredis
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from im_actors.config import Config, load_config  # noqa: E402
from im_actors.push.jobs import make_job  # noqa: E402
from im_actors.push.ledger import RedisLedger, ledger_redis  # noqa: E402
from im_actors.push.providers import WebhookProvider  # noqa: E402
from im_actors.push.publisher import PushPublisher  # noqa: E402
from im_actors.push.topology import delete_topology  # noqa: E402
from im_actors.push.worker import PushWorker  # noqa: E402
from im_actors.services import describe_services, ensure_services  # noqa: E402


class FlakyProvider:
    """The webhook receiver: 503 to a ``fail`` share of calls, else 200; records the first acceptance."""

    def __init__(self, fail: float, seed: int) -> None:
        self.fail = fail
        self.random = random.Random(seed)
        self.accepted: Counter[str] = Counter()
        self.accepted_at: dict[str, float] = {}
        self.failures = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        job_id = request.headers["X-Im-Job"]
        await request.read()
        if self.random.random() < self.fail:
            self.failures += 1
            return web.Response(status=503)
        self.accepted[job_id] += 1
        self.accepted_at.setdefault(job_id, time.time())
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run_once(base: Config, jobs: int, rate: float, workers: int, fail: float, seed: int) -> dict[str, Any]:
    """One run on a fresh deployment name; returns its figures."""
    config = base.model_copy(update={"deployment": f"bench{secrets.token_hex(3)}"})
    provider = FlakyProvider(fail, seed)
    await provider.start()
    redis = aioredis.from_url(config.redis_url)
    ledgers = [ledger_redis(config) for _ in range(workers)]  # one client per worker, as in the actors
    publisher = PushPublisher(config)
    pool = [
        PushWorker(config, {"webhook": WebhookProvider(config)}, _ignore, ledger=RedisLedger(client, config.key_prefix))
        for client in ledgers
    ]
    published_at: dict[str, float] = {}
    try:
        await publisher.start()
        for worker in pool:
            await worker.start()
        deadline = time.monotonic() + 30
        while not (publisher.stats()["connected"] and all(w.stats()["connected"] for w in pool)):
            if time.monotonic() > deadline:
                raise RuntimeError("RabbitMQ did not accept the connections within 30 s")
            await asyncio.sleep(0.05)
        started = time.time()
        for i in range(jobs):
            if rate > 0:
                delay = started + i / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            job = make_job(
                user=f"u{i % 1000}",
                device="phone",
                provider="webhook",
                token=provider.url,
                conv=f"g:{config.deployment}",
                seq=i + 1,
                sender="s",
                body="benchmark",
            )
            published_at[job["job_id"]] = time.time()
            publisher.publish(job)
        deadline = time.monotonic() + 120 + jobs / 100
        while len(provider.accepted) < jobs:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        finished = max(provider.accepted_at.values(), default=time.time())
        latencies = sorted((provider.accepted_at[j] - published_at[j]) * 1000 for j in provider.accepted_at)
        stats = [w.stats() for w in pool]
        return {
            "jobs": jobs,
            "rate": rate,
            "workers": workers,
            "prefetch": config.push_prefetch,
            "accepted": len(provider.accepted),
            "jobs_per_s": round(len(provider.accepted) / max(1e-9, finished - started), 1),
            "latency_ms": {
                "p50": round(_percentile(latencies, 0.50), 1),
                "p95": round(_percentile(latencies, 0.95), 1),
                "p99": round(_percentile(latencies, 0.99), 1),
                "max": round(latencies[-1], 1) if latencies else None,
            },
            "provider_503s": provider.failures,
            "retried": sum(s["retried"] for s in stats),
            "dead": sum(s["dead"] for s in stats),
            "ledger_errors": sum(s["ledger_errors"] for s in stats),
            "duplicates_accepted": sum(n - 1 for n in provider.accepted.values()),
            "publisher": publisher.stats(),
        }
    finally:
        for worker in pool:
            await worker.close(drain_s=2)
        await publisher.close()
        await provider.close()
        keys = [key async for key in redis.scan_iter(match=f"{config.deployment}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        for client in ledgers:
            await client.aclose()
        connection = await aiormq.connect(config.rabbitmq_url)
        try:
            await delete_topology(await connection.channel(), config)
        finally:
            await connection.close()


async def _ignore(job: dict[str, Any]) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    """Run every combination of ``--workers`` and ``--rate``; exit 1 when a job was lost or accepted twice."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--rate", type=float, nargs="+", default=[0.0], help="jobs/s offered (0: all at once)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="push workers (in this process)")
    ap.add_argument("--prefetch", type=int, default=64, help="push_prefetch")
    ap.add_argument("--fail", type=float, default=0.10, help="share of provider calls answered 503")
    ap.add_argument("--retry-base-ms", type=int, default=100, help="push_retry_base_ms")
    ap.add_argument("--rabbitmq-url", default="", help="default: the local broker")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    args = ap.parse_args(argv)

    base = load_config(
        rabbitmq_url=args.rabbitmq_url or None,
        mongo_url="mongodb://127.0.0.1:1",  # not used: no token ownership check here
        push_prefetch=args.prefetch,
        push_retry_base_ms=args.retry_base_ms,
        push_max_attempts=10,
        push_timeout_s=5.0,
        webhook_allow_private=True,  # the benchmark's provider listens on loopback
    )
    base, services = ensure_services(base)
    try:
        servers = describe_services(base)
        print(
            f"# RabbitMQ {servers['rabbitmq'].get('version')} at {servers['rabbitmq'].get('url')}; "
            f"{servers['redis'].get('server')} {servers['redis'].get('version')} (job ledger); "
            f"provider: aiohttp webhook on loopback failing {args.fail:.0%} of calls with 503; one process; "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
            flush=True,
        )
        print("workers  rate  jobs  jobs/s  p50_ms  p95_ms  p99_ms  max_ms  503s  retried  dup  lost  ledger_err")
        runs = []
        bad = False
        for workers in args.workers:
            for rate in args.rate:
                result = asyncio.run(run_once(base, args.jobs, rate, workers, args.fail, args.seed))
                runs.append(result)
                lat = result["latency_ms"]
                lost = result["jobs"] - result["accepted"]
                bad |= lost > 0 or result["duplicates_accepted"] > 0 or result["ledger_errors"] > 0
                print(
                    f"{workers:7d} {rate:5.0f} {result['jobs']:5d} {result['jobs_per_s']:7.1f} {lat['p50']:7.1f} "
                    f"{lat['p95']:7.1f} {lat['p99']:7.1f} {lat['max']:7.1f} {result['provider_503s']:5d} "
                    f"{result['retried']:8d} {result['duplicates_accepted']:4d} {lost:5d} "
                    f"{result['ledger_errors']:11d}  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        if args.json:
            args.json.write_text(json.dumps({"servers": servers, "runs": runs}, indent=2))
        return 1 if bad else 0
    finally:
        services.stop()


if __name__ == "__main__":
    sys.exit(main())
