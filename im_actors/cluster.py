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

from im_actors import ids
from im_actors.config import Config
from im_actors.conversation import ConversationShardActor
from im_actors.errors import ConfigError
from im_actors.groups import GroupShardActor
from im_actors.hub import HubActor
from im_actors.router import RouterActor
from im_actors.session import SessionShardActor
from im_actors.store import StoreWriter

__all__ = ["Deployment", "deploy", "teardown", "status", "init_local_ray", "ray_env"]

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


@dataclass
class Deployment:
    """Handles of one deployment's actors, by name, and the router's URL."""

    config: Config
    actors: dict[str, Any] = field(default_factory=dict)
    router_url: str = ""
    hub_urls: dict[str, str] = field(default_factory=dict)


def _options(config: Config, name: str, detached: bool, spread: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": name, "namespace": ids.NAMESPACE, "get_if_exists": True}
    if detached:
        opts["lifetime"] = "detached"
    if spread and config.placement == "spread":
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def deploy(config: Config, detached: bool = False) -> Deployment:
    """Create every actor of ``config`` (or find it running) and wait until all are ready.

    ``detached`` actors outlive the driver (``im-actors up``); otherwise they go with it.
    Raises :class:`ConfigError` for a missing secret or service URL, and
    ``ray.exceptions.GetTimeoutError`` when an actor is not ready within 120 s.
    """
    if config.jwt_algorithm == "HS256" and len(config.jwt_secret) < 16:
        raise ConfigError("jwt_secret must be set (at least 16 characters): it signs every client token")
    for key in ("mongo_url", "redis_url", "rabbitmq_url"):
        if not getattr(config, key):
            raise ConfigError(f"{key} must be set (im_actors.services.ensure_services fills it for local runs)")
    p = config.actor_prefix
    dep = Deployment(config)

    def make(cls: Any, role: str, index: int, *args: Any, spread: bool = False) -> Any:
        name = ids.actor_name(role, index, p)
        handle = cls.options(**_options(config, name, detached, spread)).remote(config, *args)
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
    return killed


def status(config: Config) -> dict[str, Any]:
    """Every expected actor with ``"up"``, its stats (or the error) and the router's URL."""
    out: dict[str, Any] = {"actors": {}, "router_url": None}
    for name in _names(config):
        try:
            handle = ray.get_actor(name, namespace=ids.NAMESPACE)
        except ValueError:
            out["actors"][name] = {"up": False}
            continue
        role, _ = ids.parse_actor_name(name, config.actor_prefix)
        entry: dict[str, Any] = {"up": True}
        try:
            if role == "router":
                out["router_url"] = ray.get(handle.ready.remote(), timeout=5)
                entry["hubs"] = ray.get(handle.hubs.remote(), timeout=5)
            elif hasattr(handle, "stats"):
                entry["stats"] = ray.get(handle.stats.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = str(exc)
        out["actors"][name] = entry
    return out
