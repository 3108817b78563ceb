"""How long a non-member waits for ``forbidden``, for groups that exist and groups that do not.

PROTOCOL.md section 6 and issue 5: a non-member gets the same answer, fields and timing class whether
or not the conversation exists, so that probing cannot tell which group ids are real. This deploys
im-actors on a local Ray, creates ``--groups`` groups of two members, and times an outsider's ``sync``
on each kind of target (client side, request to answer, over loopback):

- ``existing, active``: a group whose sequencer is in memory, asked ``--probes`` times;
- ``existing, first access``: every group once after the conversation shards were restarted
  (sequencers re-activate from storage);
- ``made-up, first probe``: ``--probes`` distinct group ids that were never created;
- ``made-up, repeated``: one made-up id asked ``--probes`` times.

It prints p50 / p99 / max per kind (ms) and checks that every answer is the same frame apart from
its ``id``. Latencies on a loaded 2-core machine are noisy: compare the kinds of one run.

    python benchmarks/forbidden_timing.py --groups 200 --probes 200
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

from im_actors import ids  # noqa: E402
from im_actors.client import Client  # noqa: E402
from im_actors.cluster import deploy, init_local_ray, teardown  # noqa: E402
from im_actors.config import load_config  # noqa: E402
from im_actors.errors import Forbidden  # noqa: E402
from im_actors.services import describe_services, ensure_services, purge_deployment  # noqa: E402


async def _probe(client: Client, conv: str, answers: set[tuple[str, str, bool]]) -> float:
    started = time.perf_counter()
    try:
        await client.sync(conv, 0)
    except Forbidden as exc:
        answers.add((exc.code, exc.msg, exc.retry))
    else:
        raise AssertionError(f"an outsider was allowed to read {conv}")
    return (time.perf_counter() - started) * 1000


def _row(name: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return f"{name:<26} {len(ms):>6} {statistics.median(ms):>8.2f} {p99:>8.2f} {ms[-1]:>8.2f}"


async def _run(router_url: str, config: Any, groups: int, probes: int) -> tuple[dict[str, list[float]], set[Any]]:
    run = secrets.token_hex(3)
    owner = Client(router_url, f"fo{run}-owner")
    outsider = Client(router_url, f"fo{run}-outsider")
    await owner.connect()
    await outsider.connect()
    try:
        convs = [(await owner.group_create(f"g{i}", [f"fo{run}-m{i}"]))[1] for i in range(groups)]
        answers: set[tuple[str, str, bool]] = set()
        out: dict[str, list[float]] = {}
        out["existing, active"] = [await _probe(outsider, convs[0], answers) for _ in range(probes)]
        made_up = [ids.group_conv(ids.new_group_id()) for _ in range(probes)]
        out["made-up, first probe"] = [await _probe(outsider, conv, answers) for conv in made_up]
        out["made-up, repeated"] = [await _probe(outsider, made_up[0], answers) for _ in range(probes)]
        for i in range(config.conv_shards):  # Ray restarts them empty: every sequencer re-activates
            name = ids.actor_name("conv", i, config.actor_prefix)
            ray.kill(ray.get_actor(name, namespace=ids.NAMESPACE), no_restart=False)
        deadline = time.monotonic() + 60
        while True:  # back when the owner can read again (this activates only convs[-1])
            try:
                await owner.sync(convs[-1], 0)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        out["existing, first access"] = [await _probe(outsider, conv, answers) for conv in convs[:-1]]
        return out, answers
    finally:
        await owner.close()
        await outsider.close()


def main(argv: list[str] | None = None) -> int:
    """Run once and print the table; exit 1 when the answers differ between kinds."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=200, help="existing groups (first-access probes)")
    ap.add_argument("--probes", type=int, default=200, help="probes of each other kind")
    args = ap.parse_args(argv)
    cfg = load_config(
        dev_login=True,
        jwt_secret=secrets.token_hex(32),
        router_port=0,
        push_workers=0,
        deployment=f"fo{secrets.token_hex(3)}",
        rate_request_per_s=0,  # the outsider probes as fast as it can: no rate limit in the way
    )
    cfg, services = ensure_services(cfg)
    try:
        init_local_ray(cfg)
        server = describe_services(cfg)["mongodb"]
        dep = deploy(cfg)
        try:
            times, answers = asyncio.run(_run(dep.router_url, cfg, args.groups, args.probes))
        finally:
            teardown(cfg)
            purge_deployment(cfg)
    finally:
        ray.shutdown()
        services.stop()
    print(f"# forbidden answers to an outsider's sync; MongoDB: {server.get('server')} {server.get('version')}")
    print(f"{'target':<26} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name in ("existing, active", "existing, first access", "made-up, first probe", "made-up, repeated"):
        print(_row(name, times[name]))
    print(f"distinct answers (code, msg, retry): {sorted(answers)}")
    return 0 if len(answers) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
