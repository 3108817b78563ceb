"""Deploy, tear down and inspect an im-actors deployment on a Ray cluster (DESIGN.md section 8).

Every actor is named by :func:`im_actors.ids.actor_name` in the ``im`` namespace. Deployment order
follows the dependencies: store writers (they create the indexes), group, conversation and session
shards, push workers, hubs, and last the router, which then heartbeats the hubs.

Lifecycle: :func:`restart_hub` drains one hub (the router stops handing it out, its clients are
closed with 1001 spread over ``drain_window_s`` and reconnect elsewhere), replaces its process and
waits until it answers ``GET /ready``; :func:`restart_hubs` does so one hub at a time.
:func:`list_deployments` finds deployments by listing the ``im`` namespace, so that tearing one
down needs only its name; the router keeps the configuration it was made with
(:func:`running_config`).
"""

from __future__ import annotations

import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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
    "status_table",
    "init_local_ray",
    "init_local_cluster",
    "add_local_node",
    "actor_nodes",
    "actor_records",
    "metrics_endpoints",
    "role_cpus",
    "bundle_cpus",
    "ray_env",
    "list_deployments",
    "running_config",
    "config_differences",
    "drain_hub",
    "restart_hub",
    "restart_hubs",
    "hub_ready",
    "PLACEMENT_GROUP_NOTE",
    "ray_logging",
    "connect",
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


def ray_logging(config: Config) -> Any:
    """The ``ray.LoggingConfig`` of the deployment's actors (issue 11 item 4): ``config.log_format``
    ``json`` is Ray's JSON encoding, one object per line with Ray's ``job_id``, ``worker_id``,
    ``node_id``, ``actor_id`` and ``task_name`` and the ids our log calls pass as ``extra``
    (``user``, ``device``, ``conv``, ``cmid``, ``request_id``); ``text`` is Ray's text encoding with the same
    fields after the message. ``config.log_level`` is the level of the actors' root logger. Ray hands
    it to every worker of the job that deploys, detached actors and their restarts included."""
    return ray.LoggingConfig(encoding="JSON" if config.log_format == "json" else "TEXT", log_level=config.log_level)


def _init_keeping_driver_logging(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``; Ray's logging config also configures this process's root logger, and the
    driver (the CLI, a test) keeps its own: only the actors get it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        ray.init(**kwargs)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def connect(address: str, config: Config | None = None) -> None:
    """Connect this process to the Ray cluster at ``address`` in the ``im`` namespace; with ``config``,
    the actors this process creates log as :func:`ray_logging` says. Raises ``ConnectionError`` when
    no cluster answers there."""
    kwargs: dict[str, Any] = {"address": address, "namespace": ids.NAMESPACE, "logging_level": logging.WARNING}
    if config is not None:
        kwargs["logging_config"] = ray_logging(config)
    _init_keeping_driver_logging(**kwargs)


def init_local_ray(config: Config, num_cpus: int | None = None) -> None:
    """Start a one-machine Ray cluster (GCS on a free port, never Redis's 6379).

    Our own listeners (router, hubs) bind ``config.host`` (loopback by default). Ray 2.60's own gRPC
    ports bind every interface whatever the node IP (Ray turns 127.0.0.1 into the node's address);
    its token authentication, on by default, is what guards them.
    """
    os.environ.update(ray_env(config))
    _init_keeping_driver_logging(
        address="local",  # always a new cluster, even when a stale or running one is recorded in /tmp/ray
        num_cpus=num_cpus or os.cpu_count() or 2,
        include_dashboard=False,  # the metrics agent runs without it (ray[default]); see metrics_endpoints
        namespace=ids.NAMESPACE,
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
        logging_config=ray_logging(config),
    )


#: Object store of each node of a local multi-node cluster (bytes): frames are small, and three
#: nodes' default stores would claim a large share of the machine's memory.
_LOCAL_NODE_STORE_BYTES = 256 * 1024 * 1024


def init_local_cluster(config: Config, nodes: int) -> Any:
    """Start a local cluster of ``nodes`` Ray nodes on this machine (a head and workers, each its own
    raylet and object store; ``ray.cluster_utils.Cluster``) and connect to it; returns the cluster.

    This is how the demo and the tests lose a whole node (``cluster.remove_node``) without a second
    machine. Each node offers one CPU (the default ``*_num_cpus`` of the actors fit in it). Stop it
    with ``ray.shutdown()``, then ``cluster.shutdown()``.
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
    _init_keeping_driver_logging(
        address=cluster.address,
        namespace=ids.NAMESPACE,
        logging_level=logging.WARNING,
        log_to_driver=True,
        logging_config=ray_logging(config),
    )
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


def metrics_endpoints() -> list[str]:
    """The Prometheus endpoint of every alive Ray node, ``http://<node ip>:<port>/metrics``: Ray's metrics
    agent serves the ``ray_im_*`` series of the actors on that node there (and Ray's own ``ray_*``). The
    port is the node's ``MetricsExportPort`` (random unless ``ray start --metrics-export-port`` fixes
    it); it needs ``ray[default]``, not the dashboard."""
    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


@dataclass
class Deployment:
    """Handles of one deployment's actors, by name, and the router's URL."""

    config: Config
    actors: dict[str, Any] = field(default_factory=dict)
    router_url: str = ""
    hub_urls: dict[str, str] = field(default_factory=dict)


#: The least CPU a bundle of the spread placement group reserves: a bundle must hold some resource
#: to be placed on a node, even when the actors placed in it ask for none (``*_num_cpus = 0``).
_BUNDLE_CPU = 0.001

#: The roles placed in the spread group's bundles (the i-th of each in bundle i, round robin).
_SPREAD_ROLES = ("hub", "session", "conv")


def role_cpus(config: Config, role: str) -> float:
    """The CPUs an actor of ``role`` asks Ray for (``config.<role>_num_cpus``; issue 11 item 5)."""
    return float(getattr(config, f"{role}_num_cpus"))


def _role_counts(config: Config) -> dict[str, int]:
    return {
        "router": 1,
        "hub": config.hubs,
        "push": config.push_workers,
        "session": config.session_shards,
        "conv": config.conv_shards,
        "group": config.group_shards,
        "store": config.store_writers,
    }


def bundle_cpus(config: Config, bundles: int) -> list[float]:
    """The CPU of each of ``bundles`` bundles: the sum of what the hubs, session and conversation shards
    placed in it ask for (the i-th actor of each role goes to bundle ``i % bundles``), at least
    :data:`_BUNDLE_CPU`. An actor in a bundle takes its CPU from the bundle, so the scheduler and the
    autoscaler see the demand and every bundle still lands on its own node."""
    out = [0.0] * bundles
    counts = _role_counts(config)
    for role in _SPREAD_ROLES:
        for i in range(counts[role]):
            out[i % bundles] += role_cpus(config, role)
    return [max(_BUNDLE_CPU, round(cpu, 6)) for cpu in out]


def _spread_group(config: Config, detached: bool) -> Any:
    """The deployment's placement group: one bundle per alive node, strategy SPREAD (or the one
    already made, found by name), once it is ready.

    Why a placement group: Ray's SPREAD strategy and soft node affinity are best effort (tried here on
    a three-node cluster with actors that asked for no CPU: three hubs landed on two nodes, or all on
    one), while bundles of a SPREAD group go to distinct nodes when there are enough. Each bundle
    carries the CPU of the actors placed in it (:func:`bundle_cpus`). When a node dies, Ray places its
    bundle on another node with room for it and restarts the bundle's actors there (about 3 s here
    with the fast health checks of :func:`ray_env`).
    """
    name = ids.placement_group_name(config.actor_prefix)
    try:
        group = ray.util.get_placement_group(name)
    except ValueError:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= _BUNDLE_CPU]
        group = placement_group(
            [{"CPU": cpu} for cpu in bundle_cpus(config, max(1, len(nodes)))],
            strategy="SPREAD",
            name=name,
            lifetime="detached" if detached else None,
        )
    ray.get(group.ready(), timeout=_READY_TIMEOUT_S)
    return group


#: What Ray's warning "Scheduling a restartable detached actor with a placement group is not
#: recommended ..." is about, and why it does not apply (the warning is filtered out at ``up``).
PLACEMENT_GROUP_NOTE = (
    "hubs and shards are detached actors placed through the deployment's placement group (one bundle "
    "per node, to spread them). Ray restarts them as usual (max_restarts=-1), also on another node when "
    "theirs dies; it could not only once the group is removed, and only `im-actors down` removes it, "
    "after it has removed the actors."
)


class _DropPlacementGroupWarning(logging.Filter):
    """Drops Ray's warning about restartable detached actors in a placement group (see
    :data:`PLACEMENT_GROUP_NOTE`): it is printed once per actor and reads as if they will not restart."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Scheduling a restartable detached actor with a placement group")


def _options(config: Config, name: str, detached: bool, group: Any, index: int) -> dict[str, Any]:
    role, _ = ids.parse_actor_name(name, config.actor_prefix)
    opts: dict[str, Any] = {
        "name": name,
        "namespace": ids.NAMESPACE,
        "get_if_exists": True,
        "num_cpus": role_cpus(config, role),
    }
    if detached:
        opts["lifetime"] = "detached"
    if group is not None:
        bundle = index % len(group.bundle_specs)
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
    return opts


def deploy(config: Config, detached: bool = False, replace: bool = False) -> Deployment:
    """Create every actor of ``config`` (or find it running) and wait until all are ready.

    ``detached`` actors outlive the driver (``im-actors up``); otherwise they go with it. When the
    deployment is already running with a different configuration, raises :class:`ConfigError`
    naming the keys that differ, unless ``replace``: then the running one is torn down first (its
    hubs drained over ``drain_window_s``, ``TimeoutError`` when its actors are not gone within 120 s)
    and deployed anew; its data stays.
    Raises :class:`ConfigError` for a missing secret or service URL, and
    ``ray.exceptions.GetTimeoutError`` when an actor is not ready within 120 s.
    """
    if config.jwt_algorithm == "HS256" and len(config.jwt_secret) < 16:
        raise ConfigError("jwt_secret must be set (at least 16 characters): it signs every client token")
    for key in ("mongo_url", "redis_url", "rabbitmq_url") if config.push_workers else ("mongo_url", "redis_url"):
        if not getattr(config, key):
            raise ConfigError(f"{key} must be set (im_actors.services.ensure_services fills it for local runs)")
    running = running_config(config.deployment)
    if running is not None:
        differ = config_differences(running, config)
        if differ and not replace:
            raise ConfigError(
                f"deployment {config.deployment or '(unnamed)'} is running with a different configuration "
                f"({', '.join(differ)}); `im-actors up --replace` replaces it, `im-actors down` removes it"
            )
        if differ:
            log.warning("replacing deployment %s (changed: %s)", config.deployment, ", ".join(differ))
            teardown(running, drain_window_s=running.drain_window_s)
            deadline = time.monotonic() + _READY_TIMEOUT_S
            while config.deployment in list_deployments():  # names free only once the kills are done
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the actors of {config.deployment} were not gone within {_READY_TIMEOUT_S} s")
                time.sleep(0.1)
    dep = Deployment(config)
    group = _spread_group(config, detached) if config.placement == "spread" else None
    ray_actor_log = logging.getLogger("ray.actor")
    quiet = _DropPlacementGroupWarning()
    ray_actor_log.addFilter(quiet)
    try:
        _create(config, detached, group, dep)
    finally:
        ray_actor_log.removeFilter(quiet)
    return dep


def _create(config: Config, detached: bool, group: Any, dep: Deployment) -> None:
    p = config.actor_prefix

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
    shards += [make(ConversationShardActor, "conv", i, i, spread=True) for i in range(config.conv_shards)]
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


def _names(config: Config) -> list[str]:
    p = config.actor_prefix
    counts = _role_counts(config)
    return [ids.actor_name(role, i, p) for role, n in counts.items() for i in range(n)]


def teardown(config: Config, drain_window_s: float = 0.0) -> list[str]:
    """Kill every actor of the deployment: the ones ``config`` names and every other actor of its
    name found in the namespace (a deployment made with more hubs or shards). Hubs drain first,
    all at once, each closing its clients with 1001 spread over ``drain_window_s`` s.

    Returns the names of the actors that were found and killed.
    """
    names = list(dict.fromkeys([*_names(config), *list_deployments().get(config.deployment, [])]))
    handles: dict[str, Any] = {}
    for name in names:
        try:
            handles[name] = ray.get_actor(name, namespace=ids.NAMESPACE)
        except ValueError:
            continue
    hubs = {n: h for n, h in handles.items() if ids.parse_actor_name(n, config.actor_prefix)[0] == "hub"}
    drains = {n: h.drain.remote(drain_window_s) for n, h in hubs.items()}
    for name, ref in drains.items():
        try:
            ray.get(ref, timeout=drain_window_s + 15)
        except Exception as exc:  # noqa: BLE001 - best effort before the kill
            log.warning("%s did not drain cleanly: %s", name, exc)
    killed = []
    for name, handle in handles.items():
        role, _ = ids.parse_actor_name(name, config.actor_prefix)
        try:
            if role == "session":
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


def list_deployments() -> dict[str, list[str]]:
    """``{deployment name: [actor name, ...]}`` of every im-actors actor in the ``im`` namespace
    (``""`` for an unnamed deployment), from Ray's GCS; needs a connected driver."""
    out: dict[str, list[str]] = {}
    entries: list[dict[str, str]] = ray.util.list_named_actors(all_namespaces=True)  # type: ignore[assignment]
    for entry in entries:
        if entry["namespace"] != ids.NAMESPACE:
            continue
        deployment = _deployment_of(entry["name"])
        if deployment is not None:
            out.setdefault(deployment, []).append(entry["name"])
    return {k: sorted(v) for k, v in sorted(out.items())}


def _deployment_of(name: str) -> str | None:
    """The deployment an actor name belongs to (``""`` unnamed), None for other names."""
    start = 0
    while (at := name.find("im-", start)) >= 0:
        prefix = name[:at]
        if prefix == "" or prefix.endswith("-"):
            try:
                ids.parse_actor_name(name, prefix)
            except ValueError:
                pass
            else:
                return prefix[:-1]
        start = at + 1
    return None


def running_config(deployment: str, timeout_s: float = 10.0) -> Config | None:
    """The configuration the running deployment ``deployment`` was made with (its router keeps it),
    or None when it has no router (or one that is dead). Raises ``ray.exceptions.GetTimeoutError``
    when the router does not answer within ``timeout_s``."""
    name = ids.actor_name("router", 0, f"{deployment}-" if deployment else "")
    try:
        router = ray.get_actor(name, namespace=ids.NAMESPACE)
    except ValueError:
        return None
    try:
        method: Any = router.deployment_config
    except AttributeError:  # a router of a version that does not keep it
        return None
    try:
        config: Any = ray.get(method.remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError:  # killed a moment ago (a teardown): not running
        return None
    return config if isinstance(config, Config) else None


def config_differences(running: Config, new: Config) -> list[str]:
    """Names of the knobs whose values differ between two configurations (values never shown:
    some are secrets)."""
    a, b = running.model_dump(), new.model_dump()
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def hub_ready(url: str, timeout_s: float = 2.0) -> bool:
    """True when the hub at WebSocket ``url`` answers ``GET /ready`` with 200 (``ws://h:p/v1/ws``
    is probed at ``http://h:p/ready``; ``wss`` at ``https``, without certificate checks: this
    asks the hub's own process whether it serves, it sends nothing secret)."""
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0]
    probe = f"{'https' if scheme == 'wss' else 'http'}://{hostport}/ready"
    context = ssl._create_unverified_context() if scheme == "wss" else None  # noqa: S323
    try:
        with urllib.request.urlopen(probe, timeout=timeout_s, context=context) as resp:  # noqa: S310
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def drain_hub(config: Config, index: int, window_s: float | None = None) -> dict[str, Any]:
    """Drain hub ``index``: the router stops handing it out, then its clients are closed with 1001
    spread over ``window_s`` s (default ``drain_window_s``) and it stops listening; the actor stays,
    empty. Returns the figures of :meth:`im_actors.hub.Hub.drain`. Raises ``ValueError`` for a
    hub that is not running."""
    window = config.drain_window_s if window_s is None else window_s
    name = ids.actor_name("hub", index, config.actor_prefix)
    hub = ray.get_actor(name, namespace=ids.NAMESPACE)
    router = ray.get_actor(ids.actor_name("router", 0, config.actor_prefix), namespace=ids.NAMESPACE)
    ray.get(router.drain.remote(name), timeout=10)
    result: dict[str, Any] = ray.get(hub.drain.remote(window), timeout=window + 30)
    return result


def restart_hub(config: Config, index: int, window_s: float | None = None) -> dict[str, Any]:
    """Drain hub ``index`` (:func:`drain_hub`), replace its process (Ray starts a new one under the
    same name, in the same placement bundle) and wait until the new one answers ``GET /ready`` and
    the router hands it out again.

    Returns the drain's figures plus ``drain_s`` (from the drain's start until its last client was
    closed and the hub stopped), ``ready_s`` (from the replacement until ready) and ``url``.
    Raises ``TimeoutError`` when the new process is not ready within ``hub_ready_timeout_s``.
    """
    name = ids.actor_name("hub", index, config.actor_prefix)
    hub = ray.get_actor(name, namespace=ids.NAMESPACE)
    router = ray.get_actor(ids.actor_name("router", 0, config.actor_prefix), namespace=ids.NAMESPACE)
    before: Any = ray.get(hub.load.remote(), timeout=10)
    old = before["incarnation"]
    began = time.monotonic()
    result = drain_hub(config, index, window_s)
    result["drain_s"] = round(time.monotonic() - began, 3)
    replaced = time.monotonic()
    ray.kill(hub, no_restart=False)
    deadline = replaced + config.hub_ready_timeout_s
    while time.monotonic() < deadline:
        try:
            load: Any = ray.get(hub.load.remote(), timeout=5)
            if load["url"] and load["incarnation"] != old and not load["draining"] and hub_ready(load["url"]):
                hubs: Any = ray.get(router.hubs.remote(), timeout=5)
                table = {h["name"]: h for h in hubs}
                entry = table.get(name, {})
                if entry.get("alive") and not entry.get("draining") and entry.get("incarnation") != old:
                    result["ready_s"] = round(time.monotonic() - replaced, 3)
                    result["url"] = load["url"]
                    return result
            # An empty url: the new process waits for the router's next heartbeat to start it.
        except (ray.exceptions.RayError, KeyError):
            pass  # restarting
        time.sleep(0.1)
    raise TimeoutError(f"{name} not ready within {config.hub_ready_timeout_s} s after its replacement")


def restart_hubs(
    config: Config, window_s: float | None = None, on_done: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Restart every hub of the deployment, one at a time (:func:`restart_hub`): at any moment at
    most one hub is out, so the others take its clients. ``on_done`` gets each hub's figures as
    soon as that hub is ready again. Returns them all. Raises ``TimeoutError`` (and stops there)
    when a hub does not come back."""
    out = []
    for index in range(config.hubs):
        result = restart_hub(config, index, window_s)
        if on_done is not None:
            on_done(result)
        out.append(result)
    return out


def _actor_table(names: set[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"state", "restarts", "node", "pid"}}`` of the named actors from Ray's GCS: the alive
    record of each name, else its newest (a name taken again after a kill has several records)."""
    out: dict[str, dict[str, Any]] = {}
    for info in ray._private.state.actors().values():  # noqa: SLF001 - the one way without the dashboard
        name = info.get("Name", "")
        if name not in names:
            continue
        prev = out.get(name)
        alive = info.get("State") == "ALIVE"
        if prev is not None and (prev["state"] == "ALIVE" or (not alive and prev["_start"] > info.get("StartTime", 0))):
            continue
        out[name] = {
            "state": info.get("State", "?"),
            "restarts": int(info.get("NumRestarts", 0)),
            "node": info.get("Address", {}).get("NodeID", ""),
            "pid": info.get("Pid", 0),
            "_start": info.get("StartTime", 0),
        }
    for entry in out.values():
        entry.pop("_start")
    return out


def actor_records(config: Config) -> dict[str, dict[str, Any]]:
    """``{actor name: {"state", "restarts", "node", "pid"}}`` of every actor the deployment of ``config``
    names, from Ray's GCS in one read (no dashboard, no call to the actors): the alive record of each
    name, else its newest; an actor never created is left out. ``restarts`` counts Ray's restarts of
    that name (a kill, a crash, a lost node), ``pid`` is its worker process on node ``node``."""
    return _actor_table(set(_names(config)))


def status(config: Config) -> dict[str, Any]:
    """Every expected actor with ``"up"``, its role, Ray's record of it (``state``, ``restarts``, ``node``
    id, ``pid``, the ``num_cpus`` it asks for), its stats (or the error), the router's URL, the
    nodes' Prometheus endpoints under ``"metrics"``, and the summed push metrics under ``"push"``
    (:func:`~im_actors.push.metrics.push_summary`)."""
    out: dict[str, Any] = {"actors": {}, "router_url": None}
    names = _names(config)
    table = _actor_table(set(names))
    for name in names:
        role, _ = ids.parse_actor_name(name, config.actor_prefix)
        try:
            handle = ray.get_actor(name, namespace=ids.NAMESPACE)
        except ValueError:
            out["actors"][name] = {"up": False, "role": role, **table.get(name, {})}
            continue
        entry: dict[str, Any] = {"up": True, "role": role, "num_cpus": role_cpus(config, role), **table.get(name, {})}
        try:
            if role == "router":
                out["router_url"] = ray.get(handle.ready.remote(), timeout=5)
                entry["hubs"] = ray.get(handle.hubs.remote(), timeout=5)
            if hasattr(handle, "stats"):
                entry["stats"] = ray.get(handle.stats.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = str(exc)
        out["actors"][name] = entry
    out["push"] = push_summary(out["actors"])
    out["metrics"] = metrics_endpoints()
    return out


def _avg(total: Any, count: Any) -> str:
    return f"{float(total) / float(count):.1f}" if count else "-"


def _load_and_counters(role: str, s: dict[str, Any]) -> tuple[str, str]:
    """The load column and the key counters of one actor's stats, for :func:`status_table`."""
    if role == "hub":
        answers = s.get("answers", {})
        errors = sum(v for k, v in answers.items() if k != "ack")
        return f"{s.get('connections', 0)} conns", (
            f"frames in {s.get('frames_in', 0)} out {s.get('frames_out', 0)}, sends {s.get('sends', 0)}, "
            f"acks {answers.get('ack', 0)}, errors {errors}, slow closed {s.get('slow_closed', 0)}, "
            f"queued {s.get('queued_bytes', 0)} B"
        )
    if role == "conv":
        return f"{s.get('active', 0)} sequencers", (
            f"committed {s.get('committed', 0)} in {s.get('commits', 0)} commits "
            f"(avg {_avg(s.get('commit_ms_total', 0), s.get('commits', 0))} ms), dups {s.get('dups', 0)}, "
            f"unavailable {s.get('unavailable', 0)}, activations {s.get('activations', 0)}"
        )
    if role == "session":
        push = s.get("push", {})
        return f"{s.get('users', 0)} users", (
            f"fanned out {s.get('fanout_entries', 0)}, deliveries {s.get('deliveries', 0)}, "
            f"push jobs {s.get('push_jobs', 0)}, published {push.get('published', 0)}, outbox {push.get('outbox', 0)}"
        )
    if role == "store":
        n = s.get("commits", 0)
        return f"{n} commits", (
            f"mongo avg {_avg(s.get('mongo_ms_total', 0), n)} ms, redis avg {_avg(s.get('redis_ms_total', 0), n)} ms"
        )
    if role == "push":
        q = s.get("queues", {})
        return f"{s.get('in_flight', 0)} in flight", (
            f"delivered {s.get('delivered', 0)}, retried {s.get('retried', 0)}, dead {s.get('dead', 0)}, "
            f"invalid {s.get('invalid', 0)}, queues jobs {q.get('jobs', '-')} retry {q.get('retry', '-')} "
            f"dead {q.get('dead', '-')}, connected {s.get('connected', '-')}"
        )
    if role == "router":
        return (
            f"{s.get('hubs_live', 0)}/{s.get('hubs', 0)} hubs live",
            f"clients on live hubs {s.get('connections', 0)}",
        )
    if role == "group":
        return f"{s.get('cached', 0)} groups cached", ""
    return "", ""


def status_table(out: dict[str, Any]) -> Any:
    """:func:`status` as a ``rich.table.Table``: one row per actor, grouped by role (actor, up, restarts,
    CPUs asked, load, key counters)."""
    from rich.table import Table

    table = Table(title=f"router {out.get('router_url') or '-'}", title_justify="left")
    for column in ("actor", "role", "up", "restarts", "cpus", "load", "key counters"):
        table.add_column(column, overflow="fold", no_wrap=column != "key counters")
    order = {role: i for i, role in enumerate(("router", "hub", "session", "conv", "group", "store", "push"))}
    rows = sorted(out["actors"].items(), key=lambda kv: (order.get(kv[1].get("role", ""), 99), kv[0]))
    for name, entry in rows:
        role = entry.get("role", "?")
        if not entry["up"]:
            up = "[red]no[/red]"
        elif "error" in entry:
            up = "[yellow]no answer[/yellow]"
        else:
            up = "[green]yes[/green]"
        load, counters = _load_and_counters(role, entry.get("stats") or {})
        if "error" in entry:
            counters = entry["error"][:200]
        cpus = entry.get("num_cpus")
        table.add_row(
            name, role, up, str(entry.get("restarts", "-")), "-" if cpus is None else f"{cpus:g}", load, counters
        )
    return table
