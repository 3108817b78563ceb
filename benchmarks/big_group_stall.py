"""Does one big operation stall everyone else? (issue 14, defect 2)

Deploys im-actors on a local Ray (push configured, so a fan-out also looks up push tokens), lets a
direct-message pair ping every ``--interval-ms`` (alice sends, bob receives), and measures each
ping's ack latency (send to ack, at alice) and delivery latency (send to bob's ``msg``), first
while nothing else happens (``idle``, ``--idle-s`` seconds), then while alice creates a group of
``--members`` members and for ``--after-s`` seconds after it was answered (``big group``). It
prints, per phase, the pings and the p50 / max of both latencies (ms), and how long the
``group.create`` took. ``--trace`` samples every ping (``trace_sample = 1``) and prints, for the
slowest deliveries of the big-group phase, the time spent in each step of the path
(:mod:`drivers.stages`: ``hub_in`` ... ``received``, ms), so a stall is pinned to its step.
Latencies on a loaded 2-core machine are noisy: compare the phases of one run, and runs of two
trees on the same machine.

    python benchmarks/big_group_stall.py --members 9999
    python benchmarks/big_group_stall.py --members 9999 --trace
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.stages import STAGES, step_times  # noqa: E402
from im_actors import ids  # noqa: E402
from im_actors.client import Client  # noqa: E402
from im_actors.cluster import deploy, init_local_ray, teardown  # noqa: E402
from im_actors.config import load_config  # noqa: E402
from im_actors.services import describe_services, ensure_services, purge_deployment  # noqa: E402


class Pings:
    """Ack and delivery latencies (ms) of the pings sent in one phase."""

    def __init__(self) -> None:
        self.ack_ms: list[float] = []
        self.delivery_ms: list[float] = []
        self.sent = 0
        #: (delivery ms, {step: ms}) of each traced delivery (``--trace``)
        self.steps: list[tuple[float, dict[str, float]]] = []


async def _run(router_url: str, members: int, interval_s: float, idle_s: float, after_s: float) -> dict[str, Any]:
    run = secrets.token_hex(3)
    a, b = f"bg{run}-alice", f"bg{run}-bob"
    phases = {"idle": Pings(), "big group": Pings()}
    phase = phases["idle"]
    sent_at: dict[str, tuple[Pings, float, float]] = {}  # cmid -> (phase, perf_counter, epoch ms)

    def on_msg(msg: dict[str, Any]) -> None:
        got = sent_at.pop(str(msg.get("cmid")), None)
        if got is not None:
            delivery_ms = (time.perf_counter() - got[1]) * 1000
            got[0].delivery_ms.append(delivery_ms)
            if "trace" in msg:
                got[0].steps.append((delivery_ms, step_times(msg["trace"], got[2], time.time() * 1000)))

    # a big group.create may take longer than the default 10 s request timeout on a loaded machine
    alice, bob = Client(router_url, a, request_timeout_s=120.0), Client(router_url, b, on_msg=on_msg)
    await alice.connect()
    await bob.connect()
    conv = ids.direct_conv(a, b)
    stop = asyncio.Event()
    pending: set[asyncio.Task[None]] = set()

    async def ping(n: int, into: Pings) -> None:
        cmid = f"p{n}"
        started = time.perf_counter()
        sent_at[cmid] = (into, started, time.time() * 1000)
        into.sent += 1
        await alice.send(conv, f"ping {n}", cmid=cmid)
        into.ack_ms.append((time.perf_counter() - started) * 1000)

    async def pinger() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            task = asyncio.create_task(ping(n, phase))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(interval_s)

    try:
        await alice.send(conv, "warm up")  # activates the pair's sequencer and the hubs' routes
        pinging = asyncio.create_task(pinger())
        await asyncio.sleep(idle_s)
        phase = phases["big group"]
        started = time.perf_counter()
        await alice.group_create("big", [f"bg{run}-m{i}" for i in range(members - 1)])
        create_ms = (time.perf_counter() - started) * 1000
        await asyncio.sleep(after_s)
        stop.set()
        await pinging
        await asyncio.wait_for(asyncio.gather(*pending), 60)
        deadline = time.monotonic() + 30
        while sent_at and time.monotonic() < deadline:  # the last deliveries
            await asyncio.sleep(0.05)
        return {"phases": phases, "create_ms": create_ms, "undelivered": len(sent_at)}
    finally:
        await alice.close()
        await bob.close()


def _row(name: str, p: Pings) -> str:
    def cols(ms: list[float]) -> str:
        return f"{statistics.median(ms):>8.1f} {max(ms):>8.1f}" if ms else f"{'-':>8} {'-':>8}"

    return f"{name:<10} {p.sent:>6} {cols(p.ack_ms)} {cols(p.delivery_ms)}"


def _slowest(p: Pings, n: int = 3) -> list[str]:
    """Lines giving the steps (ms) of the ``n`` slowest traced deliveries of ``p``."""
    rows = sorted(p.steps, key=lambda r: r[0], reverse=True)[:n]
    head = f"{'delivery':>9} " + " ".join(f"{s:>10}" for s in STAGES)
    return [head] + [
        f"{d:>9.1f} " + " ".join(f"{steps.get(s, float('nan')):>10.1f}" for s in STAGES) for d, steps in rows
    ]


def main(argv: list[str] | None = None) -> int:
    """Run once and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=9999, help="members of the big group, its creator included")
    ap.add_argument("--interval-ms", type=float, default=100.0, help="time between two pings of the pair (ms)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="pinging before the group is created (s)")
    ap.add_argument("--after-s", type=float, default=5.0, help="pinging after group.create was answered (s)")
    ap.add_argument("--no-push", action="store_true", help="no push workers (a fan-out then looks up no push tokens)")
    ap.add_argument("--trace", action="store_true", help="trace every ping; print the steps of the slowest deliveries")
    args = ap.parse_args(argv)
    cfg = load_config(
        dev_login=True,
        jwt_secret=secrets.token_hex(32),
        router_port=0,
        deployment=f"bg{secrets.token_hex(3)}",
        push_workers=0 if args.no_push else None,
        trace_sample=1.0 if args.trace else None,
    )
    cfg, services = ensure_services(cfg)
    try:
        init_local_ray(cfg)
        server = describe_services(cfg)["mongodb"]
        dep = deploy(cfg)
        try:
            out = asyncio.run(_run(dep.router_url, args.members, args.interval_ms / 1000, args.idle_s, args.after_s))
        finally:
            teardown(cfg)
            purge_deployment(cfg)
    finally:
        ray.shutdown()
        services.stop()
    push = "no push" if args.no_push else "push on"
    mongo = f"{server.get('server')} {server.get('version')}"
    print(f"# a DM pair pinging every {args.interval_ms:g} ms ({push}); MongoDB: {mongo}")
    print(f"# group.create of {args.members} members answered in {out['create_ms']:.0f} ms")
    print(f"{'phase':<10} {'pings':>6} {'ack p50':>8} {'ack max':>8} {'dlv p50':>8} {'dlv max':>8}")
    for name, p in out["phases"].items():
        print(_row(name, p))
    if args.trace:
        print("# slowest deliveries of the big-group phase: ms in each step (drivers/stages.py)")
        print("\n".join(_slowest(out["phases"]["big group"])))
    print(f"undelivered pings: {out['undelivered']}")
    return 0 if out["undelivered"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
