"""Deploy, tear down and inspect an im-actors deployment on a Ray cluster (DESIGN.md section 8).

Every actor is named by :func:`im_actors.ids.actor_name` in the ``im`` namespace. Deployment order
follows the dependencies: store writers (they create the indexes), group, conversation and session
shards, push workers, hubs, and last the router, which then heartbeats the hubs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from im_actors import ids
from im_actors.config import Config
from im_actors.conversation import ConversationShardActor
from im_actors.errors import ConfigError
from im_actors.groups import GroupShardActor
from im_actors.hub import HubActor
from im_actors.push.metrics import push_summary
from im_actors.router import RouterActor
from im_actors.session import SessionShardActor
from im_actors.store import StoreWriter

__all__ = [
    "Deployment",
    "deploy",
    "teardown",
    "status",
    "init_local_ray",
    "init_local_cluster",
    "add_local_node",
    "actor_nodes",
    "ray_env",
]

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 120.0


def ray_env(config: Config) -> dict[str, str]:
    """Environment for a local Ray with fast failure detection (DESIGN.md section 9)."""
    return {
        "RAY_health_check_period_ms": str(config.ray_health_check_period_ms),
        "RAY_health_check_failure_threshold": str(config.ray_health_check_failure_threshold),
        "RAY_health_check_timeout_ms": str(config.ray_health_check_timeout_ms),
        "RAY_worker_niceness": str(config.ray_worker_niceness),
    }


def init_local_ray(config: Config, num_cpus: int | None = None) -> None:
    """Start a one-machine Ray cluster (GCS on a free port, never Redis's 6379).

    Our own listeners (router, hubs) bind ``config.host`` (loopback by default). Ray 2.60's own gRPC
    ports bind every interface whatever the node IP (Ray turns 127.0.0.1 into the node's address);
    its token authentication, on by default, is what guards them.
    """
    os.environ.update(ray_env(config))
    ray.init(
        address="local",  # always a new cluster, even when a stale or running one is recorded in /tmp/ray
        num_cpus=num_cpus or os.cpu_count() or 2,
        include_dashboard=False,
        namespace=ids.NAMESPACE,
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )


#: Object store of each node of a local multi-node cluster (bytes): frames are small, and three
#: nodes' default stores would claim a large share of the machine's memory.
_LOCAL_NODE_STORE_BYTES = 256 * 1024 * 1024


def init_local_cluster(config: Config, nodes: int) -> Any:
    """Start a local cluster of ``nodes`` Ray nodes on this machine (a head and workers, each its own
    raylet and object store; ``ray.cluster_utils.Cluster``) and connect to it; returns the cluster.

    This is how the demo and the tests lose a whole node (``cluster.remove_node``) without a second
    machine. Each node offers one CPU (our actors ask for none). Stop it with ``ray.shutdown()``,
    then ``cluster.shutdown()``.
    """
    from ray.cluster_utils import Cluster

    if nodes < 2:
        raise ConfigError("a local multi-node cluster needs at least 2 nodes")
    os.environ.update(ray_env(config))  # the GCS and raylets read these when they start
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": _LOCAL_NODE_STORE_BYTES},
    )
    for _ in range(nodes - 1):
        add_local_node(cluster)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=ids.NAMESPACE, logging_level=logging.WARNING, log_to_driver=True)
    return cluster


def add_local_node(cluster: Any) -> Any:
    """Add one worker node to a cluster of :func:`init_local_cluster`; returns the node."""
    return cluster.add_node(num_cpus=1, object_store_memory=_LOCAL_NODE_STORE_BYTES)


def actor_nodes(config: Config) -> dict[str, str]:
    """``{actor name: node id}`` of the deployment's alive actors, from Ray's GCS (no dashboard needed)."""
    wanted = set(_names(config))
    out: dict[str, str] = {}
    for info in ray._private.state.actors().values():  # noqa: SLF001 - the one way without the dashboard
        name = info.get("Name", "")
        if name in wanted and info.get("State") == "ALIVE":
            out[name] = info["Address"]["NodeID"]
    return out


@dataclass
class Deployment:
    """Handles of one deployment's actors, by name, and the router's URL."""

    config: Config
    actors: dict[str, Any] = field(default_factory=dict)
    router_url: str = ""
    hub_urls: dict[str, str] = field(default_factory=dict)


#: The share of a CPU each bundle of the spread placement group reserves: a token, since the actors
#: ask for no CPU themselves; a bundle must hold some resource to be placed on a node.
_BUNDLE_CPU = 0.001


def _spread_group(config: Config, detached: bool) -> Any:
    """The deployment's placement group: one bundle per alive node, strategy SPREAD (or the one
    already made, found by name), once it is ready.

    Why a placement group: Ray's SPREAD strategy and soft node affinity are best effort for actors
    that ask for no CPU (tried here on a three-node cluster: three hubs landed on two nodes, or
    all on one), while bundles of a SPREAD group go to distinct nodes when there are enough. When a
    node dies, Ray places its bundle on another node and restarts the bundle's actors there
    (about 3 s here with the fast health checks of :func:`ray_env`).
    """
    name = ids.placement_group_name(config.actor_prefix)
    try:
        group = ray.util.get_placement_group(name)
    except ValueError:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= _BUNDLE_CPU]
        group = placement_group(
            [{"CPU": _BUNDLE_CPU}] * max(1, len(nodes)),
            strategy="SPREAD",
            name=name,
            lifetime="detached" if detached else None,
        )
    ray.get(group.ready(), timeout=_READY_TIMEOUT_S)
    return group


def _options(config: Config, name: str, detached: bool, group: Any, index: int) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": name, "namespace": ids.NAMESPACE, "get_if_exists": True}
    if detached:
        opts["lifetime"] = "detached"
    if group is not None:
        bundle = index % len(group.bundle_specs)
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
    return opts


def deploy(config: Config, detached: bool = False) -> Deployment:
    """Create every actor of ``config`` (or find it running) and wait until all are ready.

    ``detached`` actors outlive the driver (``im-actors up``); otherwise they go with it.
    Raises :class:`ConfigError` for a missing secret or service URL, and
    ``ray.exceptions.GetTimeoutError`` when an actor is not ready within 120 s.
    """
    if config.jwt_algorithm == "HS256" and len(config.jwt_secret) < 16:
        raise ConfigError("jwt_secret must be set (at least 16 characters): it signs every client token")
    for key in ("mongo_url", "redis_url", "rabbitmq_url") if config.push_workers else ("mongo_url", "redis_url"):
        if not getattr(config, key):
            raise ConfigError(f"{key} must be set (im_actors.services.ensure_services fills it for local runs)")
    p = config.actor_prefix
    dep = Deployment(config)
    group = _spread_group(config, detached) if config.placement == "spread" else None

    def make(cls: Any, role: str, index: int, *args: Any, spread: bool = False) -> Any:
        name = ids.actor_name(role, index, p)
        # "spread": the i-th hub (and session and conversation shard) in bundle i, round robin:
        # on the i-th node while there are enough nodes.
        handle = cls.options(**_options(config, name, detached, group if spread else None, index)).remote(config, *args)
        dep.actors[name] = handle
        return handle

    stores = [make(StoreWriter, "store", i) for i in range(config.store_writers)]
    if stores:
        ray.get([s.ready.remote() for s in stores], timeout=_READY_TIMEOUT_S)
    shards = [make(GroupShardActor, "group", i, i) for i in range(config.group_shards)]
    shards += [make(ConversationShardActor, "conv", i, spread=True) for i in range(config.conv_shards)]
    shards += [make(SessionShardActor, "session", i, i, spread=True) for i in range(config.session_shards)]
    waits = [s.ready.remote() for s in shards]
    if config.push_workers:
        from im_actors.push.worker import PushWorkerActor

        waits += [make(PushWorkerActor, "push", i).start.remote() for i in range(config.push_workers)]
    ray.get(waits, timeout=_READY_TIMEOUT_S)
    hubs = [make(HubActor, "hub", i, i, spread=True) for i in range(config.hubs)]
    urls = ray.get([h.ready.remote() for h in hubs], timeout=_READY_TIMEOUT_S)
    dep.hub_urls = {ids.actor_name("hub", i, p): url for i, url in enumerate(urls)}
    router = make(RouterActor, "router", 0)
    dep.router_url = ray.get(router.ready.remote(), timeout=_READY_TIMEOUT_S)
    for name, url in dep.hub_urls.items():
        router.register.remote(name, url)
    return dep


def _names(config: Config) -> list[str]:
    p = config.actor_prefix
    counts = {
        "router": 1,
        "hub": config.hubs,
        "push": config.push_workers,
        "session": config.session_shards,
        "conv": config.conv_shards,
        "group": config.group_shards,
        "store": config.store_writers,
    }
    return [ids.actor_name(role, i, p) for role, n in counts.items() for i in range(n)]


def teardown(config: Config) -> list[str]:
    """Kill every actor of the deployment (hubs drain first, closing clients with 1001).

    Returns the names of the actors that were found and killed.
    """
    killed = []
    for name in _names(config):
        try:
            handle = ray.get_actor(name, namespace=ids.NAMESPACE)
        except ValueError:
            continue
        role, _ = ids.parse_actor_name(name, config.actor_prefix)
        try:
            if role == "hub":
                ray.get(handle.drain.remote(), timeout=10)
            elif role == "session":
                ray.get(handle.flush_push.remote(5.0), timeout=10)
            elif role == "push":
                ray.get(handle.close.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - best effort before the kill
            log.warning("%s did not stop cleanly: %s", name, exc)
        ray.kill(handle, no_restart=True)
        killed.append(name)
    try:
        remove_placement_group(ray.util.get_placement_group(ids.placement_group_name(config.actor_prefix)))
    except ValueError:
        pass  # placement "pack", or already removed
    return killed


def status(config: Config) -> dict[str, Any]:
    """Every expected actor with ``"up"``, its role, its stats (or the error), the router's URL, and the
    summed push metrics under ``"push"`` (:func:`~im_actors.push.metrics.push_summary`)."""
    out: dict[str, Any] = {"actors": {}, "router_url": None}
    for name in _names(config):
        try:
            handle = ray.get_actor(name, namespace=ids.NAMESPACE)
        except ValueError:
            out["actors"][name] = {"up": False}
            continue
        role, _ = ids.parse_actor_name(name, config.actor_prefix)
        entry: dict[str, Any] = {"up": True, "role": role}
        try:
            if role == "router":
                out["router_url"] = ray.get(handle.ready.remote(), timeout=5)
                entry["hubs"] = ray.get(handle.hubs.remote(), timeout=5)
            elif hasattr(handle, "stats"):
                entry["stats"] = ray.get(handle.stats.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = str(exc)
        out["actors"][name] = entry
    out["push"] = push_summary(out["actors"])
    return out
