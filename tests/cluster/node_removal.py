"""A Ray node removed from a three-node cluster while real traffic flows (DESIGN.md section 4, last row).

Run as its own process (``python -m tests.cluster.node_removal OUT.json``): a ``ray.cluster_utils.Cluster`` needs
a Ray of its own in the process, apart from the test session's local Ray. It starts a head and two
worker nodes on this machine (each node its own raylet and object store), deploys im-actors with hubs
and shards spread over them, removes a worker node that hosts a hub (and whatever else landed there)
twice in the middle of a synthetic workload (the ``node`` kind of :mod:`drivers.chaos`: a fresh node
joins first, and the fault counts as recovered once every actor of the removed node is alive on
another one and probe messages flow again). The workload's report, the faults and the node of each
actor go to the file named by the first argument as JSON (Ray's own processes write to stdout too);
the pytest wrapper asserts on them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from typing import Any

import ray

from drivers.chaos import ChaosMonkey, ChaosSpec
from drivers.run import run_workload_async
from drivers.synthetic import SyntheticWorkload
from im_actors.cluster import actor_nodes, deploy, init_local_cluster, teardown
from im_actors.config import Config, load_config
from im_actors.services import ensure_services, purge_deployment


async def _run(config: Config, cluster: Any) -> dict[str, Any]:
    dep = deploy(config)
    before = actor_nodes(config)
    spec = ChaosSpec(("node",))
    monkey = ChaosMonkey(config, dep.router_url, spec, services=None, cluster=cluster)
    await monkey.start()
    workload = SyntheticWorkload(users=18, rate=30, duration_s=24, group_size=4, direct_share=0.3, seed=5)
    run = asyncio.create_task(run_workload_async(dep.router_url, workload, progress=False))
    await monkey.run(spec.schedule(5.0, 19.0))  # two nodes removed, 7 s apart
    report = await run
    faults = await monkey.finish()
    return {"report": report, "faults": faults, "before": before, "after": actor_nodes(config)}


def main(out_path: str) -> int:
    """Start the cluster, run, write the JSON result to ``out_path``; exit 0 when the run completed."""
    name = f"n{secrets.token_hex(4)}"
    cfg = load_config(
        deployment=name,
        hubs=3,
        session_shards=3,
        conv_shards=3,
        store_writers=1,
        push_workers=0,
        dev_login=True,
        jwt_secret=secrets.token_hex(32),
        router_port=0,
        heartbeat_s=0.5,
        placement="spread",
    )
    cfg, services = ensure_services(cfg)
    cluster = None
    try:
        cluster = init_local_cluster(cfg, nodes=3)
        try:
            result = asyncio.run(_run(cfg, cluster))
            with open(out_path, "w") as out:
                json.dump(result, out, default=str)
            return 0
        finally:
            try:
                teardown(cfg)
            finally:
                ray.shutdown()
    finally:
        try:
            if cluster is not None:
                cluster.shutdown()
        finally:
            purge_deployment(cfg)
            services.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
