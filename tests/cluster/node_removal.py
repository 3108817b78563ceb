"""A Ray node removed from a three-node cluster while real traffic flows (DESIGN.md section 4, last row).

Run as its own process (``python -m tests.cluster.node_removal OUT.json``): a ``ray.cluster_utils.Cluster`` needs
a Ray of its own in the process, apart from the test session's local Ray. It starts a head and two
worker nodes on this machine (each node its own raylet and object store), deploys im-actors with hubs
and shards spread over them, removes a worker node that hosts a hub (and whatever else landed there)
in the middle of a synthetic workload, and prints one JSON line: the workload's report, the node of
each actor before and after, the removed node, and how long until every actor of that node was alive
on another one. The result goes to the file named by the first argument as JSON (Ray's own processes
write to stdout too); the pytest wrapper asserts on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from typing import Any

import ray
from ray.cluster_utils import Cluster

from drivers.run import run_workload_async
from drivers.synthetic import SyntheticWorkload
from im_actors import ids
from im_actors.cluster import _names, deploy, ray_env, teardown
from im_actors.config import Config, load_config
from im_actors.services import ensure_services, purge_deployment


def actor_nodes(config: Config) -> dict[str, str]:
    """``{actor name: node id}`` of the deployment's live actors (from the GCS, no dashboard needed)."""
    wanted = set(_names(config))
    out: dict[str, str] = {}
    for info in ray._private.state.actors().values():  # noqa: SLF001 - the one API without the dashboard
        name = info.get("Name", "")
        if name in wanted and info.get("State") == "ALIVE":
            out[name] = info["Address"]["NodeID"]
    return out


async def _run(config: Config, cluster: Cluster, remove_after_s: float) -> dict[str, Any]:
    dep = deploy(config)
    before = actor_nodes(config)
    assert cluster.head_node is not None
    head_id = cluster.head_node.node_id
    router_node = before[ids.actor_name("router", 0, config.actor_prefix)]
    victims = [
        node
        for node in cluster.worker_nodes
        if node.node_id != router_node
        and any(before.get(ids.actor_name("hub", i, config.actor_prefix)) == node.node_id for i in range(config.hubs))
    ]
    if not victims:
        raise RuntimeError(f"no worker node holds a hub without the router: {before}")
    victim = victims[0]
    workload = SyntheticWorkload(users=18, rate=30, duration_s=20, group_size=4, direct_share=0.3, seed=5)
    run = asyncio.create_task(run_workload_async(dep.router_url, workload, progress=False))
    await asyncio.sleep(remove_after_s)
    removed_at = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)
    moved = [name for name, node in before.items() if node == victim.node_id]
    deadline = removed_at + 60
    after = actor_nodes(config)
    while time.monotonic() < deadline and any(after.get(name) in (None, victim.node_id) for name in moved):
        await asyncio.sleep(0.1)
        after = await asyncio.to_thread(actor_nodes, config)
    actors_back_s = time.monotonic() - removed_at
    report = await run
    return {
        "report": report,
        "before": before,
        "after": after,
        "moved": moved,
        "removed_node": victim.node_id,
        "head_node": head_id,
        "nodes": sorted({n.node_id for n in cluster.worker_nodes} | {head_id, victim.node_id}),
        "actors_back_s": round(actors_back_s, 2),
    }


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
    os.environ.update(ray_env(cfg))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=ids.NAMESPACE, log_to_driver=False)
        try:
            result = asyncio.run(_run(cfg, cluster, remove_after_s=6.0))
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
            cluster.shutdown()
        finally:
            purge_deployment(cfg)
            services.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
