"""Message-pipeline benchmark: throughput and latency of the whole send -> commit -> fan-out path.

Starts the backing services it must and one local Ray cluster, then for every combination of the
swept knobs deploys im-actors afresh, drives a synthetic workload through real WebSocket clients,
checks every delivery with the oracle, tears the deployment down and prints one row per run.

    python benchmarks/pipeline.py --rate 100 300 --store-writers 0 2 --group-size 0 20 --duration 20

Every row names the MongoDB-wire server it ran on (SecantusDB commits far slower than mongod).
Output: a table on stdout and, with ``--json FILE``, every report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.run import run_workload  # noqa: E402
from drivers.synthetic import SyntheticWorkload  # noqa: E402
from im_actors.cluster import deploy, init_local_ray, teardown  # noqa: E402
from im_actors.config import load_config  # noqa: E402
from im_actors.services import describe_services, ensure_services, purge_deployment  # noqa: E402


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; exit status 1 when any run failed the oracle."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--rate", type=float, nargs="+", default=[200.0], help="offered load (msgs/s)")
    ap.add_argument("--users", type=int, default=100, help="simulated users (one client each)")
    ap.add_argument("--group-size", type=int, nargs="+", default=[0], help="0: direct messages only")
    ap.add_argument("--duration", type=float, default=20.0, help="send phase per run (s)")
    ap.add_argument("--store-writers", type=int, nargs="+", default=[0], help="store writer actors")
    ap.add_argument("--hubs", type=int, nargs="+", default=[2], help="hub actors")
    ap.add_argument("--shards", type=int, nargs="+", default=[1], help="session and conversation shards")
    ap.add_argument("--batch-ms", type=float, nargs="+", default=[0.0], help="hub and fan-out batch windows (ms)")
    ap.add_argument(
        "--fanout-via",
        nargs="+",
        default=["conv"],
        choices=["conv", "session"],
        help="who routes fan-out to the hubs: conversation shards (one hop) or session shards (two)",
    )
    ap.add_argument(
        "--hub-inflight", type=int, nargs="+", default=[1], help="send batches in flight per hub and conversation shard"
    )
    ap.add_argument("--processes", type=int, default=1, help="driver processes")
    ap.add_argument(
        "--trace-sample",
        type=float,
        default=0.0,
        help="share of sends traced through every stage (0..1); prints each run's stage breakdown",
    )
    ap.add_argument("--json", type=Path, help="write every report here")
    args = ap.parse_args(argv)

    base = load_config(dev_login=True, jwt_secret=secrets.token_hex(32), router_port=0, push_workers=0)
    base, services = ensure_services(base)
    reports: list[dict[str, Any]] = []
    failed = False
    try:
        init_local_ray(base)
        server = describe_services(base)["mongodb"]
        print(
            f"# MongoDB-wire server: {server.get('server')} {server.get('version')}; 2-core machine; "
            f"Ray {ray.__version__}",
            flush=True,
        )
        header = (
            "rate",
            "group",
            "writers",
            "hubs",
            "shards",
            "batch_ms",
            "via",
            "inflight",
            "acked/s",
            "deliv/s",
            "ack_p50",
            "ack_p99",
            "dlv_p50",
            "dlv_p99",
            "lost",
            "dup",
            "order",
        )
        print(" ".join(f"{h:>8}" for h in header), flush=True)
        for rate, group, writers, hubs, shards, batch, via, inflight in itertools.product(
            args.rate,
            args.group_size,
            args.store_writers,
            args.hubs,
            args.shards,
            args.batch_ms,
            args.fanout_via,
            args.hub_inflight,
        ):
            cfg = base.model_copy(
                update={
                    "deployment": f"bench{secrets.token_hex(3)}",
                    "store_writers": writers,
                    "hubs": hubs,
                    "session_shards": shards,
                    "conv_shards": shards,
                    "hub_batch_ms": batch,
                    "fanout_batch_ms": batch,
                    "trace_sample": args.trace_sample,
                    "fanout_via": via,
                    "hub_inflight": inflight,
                }
            )
            dep = deploy(cfg)
            try:
                workload = SyntheticWorkload(users=args.users, rate=rate, duration_s=args.duration, group_size=group)
                rep = run_workload(dep.router_url, workload, processes=args.processes, progress=False)
            finally:
                teardown(cfg)
                purge_deployment(cfg)
            rep["config"] = cfg.knobs()
            rep["services"] = {"mongodb": server}
            reports.append(rep)
            bad = (
                rep["lost"]
                or rep["duplicates"]
                or rep["order_violations"]
                or rep["delivered"] != rep["expected_deliveries"]
            )
            failed = failed or bool(bad)
            a, d = rep["ack_latency_ms"], rep["delivery_latency_ms"]
            row = (
                rate,
                group,
                writers,
                hubs,
                shards,
                batch,
                via,
                inflight,
                round(rep["throughput_msgs_per_s"], 1),
                round(rep["deliveries_per_s"], 1),
                a["p50"],
                a["p99"],
                d["p50"],
                d["p99"],
                rep["lost"],
                rep["duplicates"],
                rep["order_violations"],
            )
            print(" ".join(f"{v:>8}" for v in row), flush=True)
            steps = rep.get("stages", {}).get("steps") or {}
            if steps:
                print("   stages p50/p99 ms: " + "  ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in steps.items()))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        services.stop()
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
