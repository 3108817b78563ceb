"""Chaos mode: faults injected on a schedule while real traffic flows (DESIGN.md sections 4 and 10).

A :class:`ChaosMonkey` runs beside a workload in the deploying process (it needs Ray and the local
services). It injects one fault every ``interval_s``, cycling through the requested kinds:

=========  =======================================================================================
kind       fault
=========  =======================================================================================
hub        a hub actor killed (Ray restarts it empty; its clients reconnect elsewhere and sync)
drain      the busiest hub drained and replaced, as one step of ``im-actors restart hubs``
           (:func:`im_actors.cluster.restart_hub`): the router stops handing it out, its clients
           are closed with 1001 spread over ``drain_window_s`` and reconnect elsewhere, its
           process is replaced and it serves again once ``GET /ready`` answers 200. The fault
           record carries the drain's figures (``drain``) and the reconnect spread
           (``reconnect_spread_s``: from the first client closed to the last); it counts as
           recovered no sooner than the hub is ready again
conv       a conversation shard killed (sequencers re-activate from storage)
session    a session shard killed (hubs re-announce their connections to it)
store      a store writer killed (the commit is retried once on another writer, else unavailable)
push       a push worker killed (RabbitMQ hands its unacked jobs out again)
mongodb    the MongoDB-wire server stopped for ``outage_s`` and started again on its data
           (only when this run started it: a given ``mongo_url`` is never touched)
mongodb-   every MongoDB reply delayed by ``slow_ms`` (default 500 ms) for ``outage_s``, through
slow       the run's TCP proxy in front of the server (:mod:`drivers.tcpproxy`; works in front
           of a given ``mongo_url`` too: the server itself is never touched). Sends answer
           slowly or ``unavailable``, within the bound below. The record carries ``proxy``:
           ``delay_ms``, ``window_s``, ``delayed`` (replies held back). Its recovery is the
           first probe through the slow storage: the service goes on, slowly
mongodb-   every connection to MongoDB cut mid-reply for ``outage_s`` (through the same proxy:
cut        the client gets half of a reply, then both sockets close; reconnects are cut at
           their first reply too, and succeed again after the window). A cut write may have
           been carried out: the commit's read-back settles it, or the send answers
           ``unavailable`` and its resend with the same cmid answers the stored seq. The
           record's ``proxy`` carries ``cuts`` (connections cut) and ``window_s``; recovery
           is the window plus pymongo's reconnect (under a second, measured)
redis      every Redis key of this deployment deleted (a flush, as the deployment sees it; the
           shared Redis itself is never flushed or restarted)
redis-     the Redis server restarted, every key lost (only a private Redis this run started:
restart    ``ensure_services(private=["redis"])``; the demo does so when this kind is asked for)
rabbitmq   the RabbitMQ broker restarted on its data (only a private broker this run started,
           as for redis-restart): publishers keep jobs in their outbox, consumers reconnect
node       a whole Ray node removed, killed without warning (only on a local multi-node cluster,
           :func:`im_actors.cluster.init_local_cluster`): a fresh node joins first, so capacity
           stays; Ray restarts the lost node's actors elsewhere (DESIGN.md section 4, last row)
=========  =======================================================================================

**Bounded time under slow storage.** Every MongoDB operation ends within ``mongo_timeout_ms``
(5 s by default; pymongo's ``timeoutMS``: retries and server selection included), a commit makes
at most three in a row (:mod:`im_actors.store`), and a hub answers ``unavailable`` itself when its
call to the conversation shard passes :data:`im_actors.refs.DEFAULT_CALL_TIMEOUT_S` (30 s); a send
waits for at most one batch of its hub to that shard to end first (past ``hub_send_queue_max`` it
is refused at once). So every send is answered, ack or ``unavailable``, within 2 x 30 s of reaching its
hub, and an ack is only ever sent for a commit MongoDB confirmed. A ``mongodb-slow`` delay under
``mongo_timeout_ms`` makes slow successes; one over it makes ``unavailable`` answers.

Recovery is measured by probes: a few probe clients (at least one per hub) in a probe group, one
of which sends a probe message every ``probe_interval_s``. A fault's recovery time is the time from
the fault until a probe message *sent after it* has been acknowledged and delivered to every probe
client. The worst delivery latency of probe messages sent during the recovery window (for the
kinds that last ``outage_s``, the whole window) is reported too, and for those kinds the worst
ack latency of the probes sent in it (``worst_ack_latency_ms``: resends included, as a client sees it).

Every random choice (which actor of a role is killed, ties between the busiest hubs) is drawn from
``rng``, and each fault records the target index it chose (``index``) and its planned offset
(``planned_at_s``): :mod:`drivers.faultplan` writes them down and ``--replay`` passes them back to
:meth:`ChaosMonkey.run` as ``(at_s, kind, index)``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
import redis

from im_actors import ids
from im_actors.client import Client
from im_actors.config import Config, mask_url
from im_actors.services import LocalServices

if TYPE_CHECKING:
    from drivers.tcpproxy import TcpProxy

__all__ = [
    "KINDS",
    "PRIVATE_SERVICE_KINDS",
    "PROXY_KINDS",
    "ChaosSpec",
    "Fault",
    "ChaosMonkey",
    "summarize",
    "pick_index",
]

log = logging.getLogger(__name__)

#: Every fault kind, in the order ``all`` cycles through them.
KINDS = (
    "hub",
    "drain",
    "conv",
    "session",
    "store",
    "push",
    "mongodb",
    "mongodb-slow",
    "mongodb-cut",
    "redis",
    "redis-restart",
    "rabbitmq",
    "node",
)
#: Kinds that need a server of this run's own (never the machine's shared one).
PRIVATE_SERVICE_KINDS = {"mongodb": "mongodb", "redis-restart": "redis", "rabbitmq": "rabbitmq"}
#: Kinds that need the MongoDB proxy of :mod:`drivers.tcpproxy` between the deployment and the server.
PROXY_KINDS = ("mongodb-slow", "mongodb-cut")
_ACTOR_KINDS = {"hub": "hub", "conv": "conv", "session": "session", "store": "store", "push": "push"}


@dataclass(frozen=True)
class ChaosSpec:
    """Which faults, how often: parsed from ``all``, ``hub,conv`` or ``all:15`` (interval in s)."""

    kinds: tuple[str, ...]
    interval_s: float | None = None

    @classmethod
    def parse(cls, spec: str) -> ChaosSpec:
        """Parse ``KINDS[:INTERVAL_S]``; raises ValueError naming an unknown kind."""
        names, _, interval = spec.partition(":")
        kinds = KINDS if names.strip() in ("", "all") else tuple(k.strip() for k in names.split(",") if k.strip())
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(KINDS)} or all")
        return cls(kinds, float(interval) if interval else None)

    def schedule(self, start_s: float, end_s: float, rounds: int = 2) -> list[tuple[float, str]]:
        """Times (s from the run's start) and kinds: every kind ``rounds`` times within the window,
        unless an explicit interval is given (then as many as fit)."""
        span = max(0.0, end_s - start_s)
        if self.interval_s:
            n = max(1, int(span // self.interval_s))
            step = self.interval_s
        else:
            n = len(self.kinds) * rounds
            step = span / n if n else span
        return [(start_s + i * step, self.kinds[i % len(self.kinds)]) for i in range(n)]


@dataclass
class Fault:
    """One injected fault and what it cost."""

    kind: str
    target: str
    at_s: float
    #: When it was injected, ms since the epoch (the report's plots place it on the run's timeline).
    at_ms: float = 0.0
    recovery_s: float | None = None
    worst_latency_ms: float | None = None
    error: str | None = None
    #: Seconds after the fault before which it cannot count as recovered (for ``rabbitmq``: until
    #: every push publisher and worker has reconnected), None when only the probes decide.
    floor_s: float | None = None
    #: For ``drain``: the figures of :func:`im_actors.cluster.restart_hub` (connections closed,
    #: window, first and last close, spread, drain and ready times in s).
    drain: dict[str, Any] | None = None
    #: The target index chosen within its role (an actor kind, ``drain``), None when there was no choice.
    index: int | None = None
    #: The schedule's offset for it (s since :meth:`ChaosMonkey.start`); ``at_s`` is when it happened.
    planned_at_s: float | None = None
    #: How long the fault lasted (s), for the kinds that hold for ``outage_s`` (``mongodb-slow``, ``-cut``).
    window_s: float | None = None
    #: For the proxy kinds: ``delay_ms``, ``window_s`` and the proxy's counts during the window
    #: (``delayed`` replies, ``cuts``, ``refused`` connections).
    proxy: dict[str, Any] | None = None
    #: Worst ack latency (ms) of the probes sent during ``window_s`` (proxy kinds only).
    worst_ack_latency_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the report."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "target": self.target,
            "at_s": round(self.at_s, 3),
            "at_ms": round(self.at_ms, 1),
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 3),
            "worst_delivery_latency_ms": self.worst_latency_ms,
            "error": self.error,
        }
        if self.drain is not None:
            out["drain"] = self.drain
            out["reconnect_spread_s"] = self.drain.get("spread_s")
        if self.index is not None:
            out["index"] = self.index
        if self.planned_at_s is not None:
            out["planned_at_s"] = round(self.planned_at_s, 3)
        if self.proxy is not None:
            out["proxy"] = self.proxy
            out["worst_ack_latency_ms"] = self.worst_ack_latency_ms
        return out


@dataclass
class _Probe:
    sent: float
    acked: float | None = None
    received: dict[str, float] = field(default_factory=dict)


class ChaosMonkey:
    """Injects the faults of ``spec`` into the deployment of ``config`` and measures recovery.

    ``services`` is what the run started locally (for the ``mongodb`` fault). Use as::

        monkey = ChaosMonkey(config, router_url, spec, services)
        await monkey.start()
        task = asyncio.create_task(monkey.run(schedule))
        ... run the workload ...
        faults = await monkey.finish()
    """

    def __init__(
        self,
        config: Config,
        router_url: str,
        spec: ChaosSpec,
        services: LocalServices | None,
        outage_s: float = 10.0,
        probe_interval_s: float = 0.2,
        probes: int = 4,
        rng: random.Random | None = None,
        cluster: Any = None,
        client_ping_s: float | None = 20.0,
        mongo_proxy: TcpProxy | None = None,
        slow_ms: float = 500.0,
    ) -> None:
        self.config = config
        #: The proxy between the deployment and MongoDB (the proxy kinds), and their delay (ms).
        self.mongo_proxy = mongo_proxy
        self.slow_ms = slow_ms
        #: WebSocket ping interval of the probe clients (s; the client library's default): how soon a
        #: probe client notices a connection whose peer vanished without a close (a host cut off).
        self.client_ping_s = client_ping_s
        self.router_url = router_url
        self.spec = spec
        self.services = services
        self.outage_s = outage_s
        self.probe_interval_s = probe_interval_s
        self.n_probes = max(2, probes)
        self.rng = rng or random.Random()
        self.cluster = cluster  # a ray.cluster_utils.Cluster, for the node kind
        self.faults: list[Fault] = []
        self._t0 = time.monotonic()
        self._probes: dict[int, _Probe] = {}
        self._clients: list[Client] = []
        self._conv = ""
        self._sender_task: asyncio.Task[None] | None = None
        self._stopping = False

    def now(self) -> float:
        """Seconds since :meth:`start`."""
        return time.monotonic() - self._t0

    # --- probes ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the probe clients (at least one on every hub when possible) and start probing."""
        self._t0 = time.monotonic()
        prefix = f"probe{secrets.token_hex(3)}"
        for i in range(self.n_probes + self.config.hubs):
            name = f"{prefix}-{i}"
            client = Client(
                self.router_url,
                name,
                on_msg=self._on_msg(name),
                send_deadline_s=120.0,
                ping_interval_s=self.client_ping_s,
            )
            await client.connect()
            self._clients.append(client)
            if len(self._clients) >= self.n_probes and len({c.hub for c in self._clients}) >= self.config.hubs:
                break
        _, self._conv = await self._clients[0].group_create("chaos probes", [c.user for c in self._clients[1:]])
        self._sender_task = asyncio.get_running_loop().create_task(self._send_probes())

    def _on_msg(self, user: str) -> Callable[[dict[str, Any]], None]:
        def record(msg: dict[str, Any]) -> None:
            meta = msg.get("meta") or {}
            probe = self._probes.get(meta.get("probe", -1)) if msg.get("conv") == self._conv else None
            if probe is not None:
                probe.received.setdefault(user, self.now())

        return record

    async def _send_probes(self) -> None:
        sender = self._clients[0]
        n = 0
        while not self._stopping:
            n += 1
            probe = self._probes[n] = _Probe(self.now())
            asyncio.get_running_loop().create_task(self._send_one(sender, n, probe))
            await asyncio.sleep(self.probe_interval_s)

    async def _send_one(self, sender: Client, n: int, probe: _Probe) -> None:
        try:
            await sender.send(self._conv, f"probe {n}", cmid=f"probe-{n}", meta={"probe": n})
            probe.acked = self.now()
        except Exception as exc:  # noqa: BLE001 - a probe that never commits just never counts
            log.info("probe %d not committed: %s", n, exc)

    # --- faults ------------------------------------------------------------------------------

    async def run(self, schedule: Sequence[tuple[float, str] | tuple[float, str, int | None]]) -> None:
        """Inject the faults of ``schedule`` one after another: ``[(at_s, kind)]`` or, replaying a
        plan, ``[(at_s, kind, index)]`` (times since :meth:`start`; ``index`` the target within its
        role, None to choose with ``rng``)."""
        for at_s, kind, *rest in schedule:
            await asyncio.sleep(max(0.0, at_s - self.now()))
            if self._stopping:
                return
            await self.inject(kind, rest[0] if rest else None, planned_at_s=at_s)

    async def inject(self, kind: str, index: int | None = None, planned_at_s: float | None = None) -> Fault:
        """Inject one fault of ``kind`` now, on target ``index`` of its role when given (actor
        kinds, ``drain``; one out of range is chosen again); returns its record (recovery filled
        in by :meth:`finish`)."""
        fault = Fault(kind, "", self.now(), at_ms=time.time() * 1000.0, planned_at_s=planned_at_s)
        self.faults.append(fault)
        try:
            if kind in _ACTOR_KINDS:
                fault.target, fault.index = self._kill_actor(_ACTOR_KINDS[kind], index)
            elif kind == "drain":
                await self._drain_hub(fault, index)
            elif kind in PROXY_KINDS:
                await self._storage_fault(fault)
            elif kind == "mongodb":
                fault.target = "mongodb"
                mongo = self.services.mongo if self.services else None
                if mongo is None or mongo.proc is None:
                    raise RuntimeError("mongo_url was given: this run does not own the MongoDB server")
                await asyncio.to_thread(mongo.stop)
                await asyncio.sleep(self.outage_s)
                # Spawned from this (long-lived) thread: the server dies with the thread that made it.
                mongo.start(wait=False)
                await asyncio.to_thread(mongo.wait)
            elif kind == "redis":
                fault.target = f"redis keys {self.config.key_prefix}*"
                await asyncio.to_thread(self._flush_prefix)
            elif kind == "node":
                fault.target = await self._remove_node(fault)
            elif kind == "redis-restart":
                server = self.services.redis if self.services else None
                if server is None:
                    raise RuntimeError("this run uses a shared Redis, which is never restarted")
                fault.target = mask_url(server.url)
                await asyncio.to_thread(server.stop)
                server.start(wait=False)  # from this long-lived thread, see PrivateRedis
                await asyncio.to_thread(server.wait)
            elif kind == "rabbitmq":
                broker = self.services.rabbitmq if self.services else None
                if broker is None:
                    raise RuntimeError("this run uses a shared RabbitMQ, which is never restarted")
                fault.target = mask_url(broker.url)
                before = await self._amqp_connects()
                await asyncio.to_thread(broker.stop)
                broker.start(wait=False)
                await asyncio.to_thread(broker.wait)
                fault.floor_s = await self._amqp_reconnected(before, fault.at_s)
                if fault.floor_s is None:
                    fault.floor_s = math.inf  # never counts as recovered
                    raise RuntimeError("push publishers and workers did not reconnect within 60 s")
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            fault.error = f"{type(exc).__name__}: {exc}"
            log.warning("fault %s not injected: %s", kind, fault.error)
        log.warning("chaos: %s %s at %.1f s", kind, fault.target, fault.at_s)
        return fault

    def _kill_actor(self, role: str, index: int | None = None) -> tuple[str, int]:
        count = {
            "hub": self.config.hubs,
            "conv": self.config.conv_shards,
            "session": self.config.session_shards,
            "store": self.config.store_writers,
            "push": self.config.push_workers,
        }[role]
        if count == 0:
            raise RuntimeError(f"the deployment has no {role} actors")
        chosen = pick_index(count, index, self.rng)
        name = ids.actor_name(role, chosen, self.config.actor_prefix)
        ray.kill(ray.get_actor(name, namespace=ids.NAMESPACE), no_restart=False)
        return name, chosen

    async def _storage_fault(self, fault: Fault) -> None:
        """``mongodb-slow`` or ``mongodb-cut`` for ``outage_s`` through the proxy, then healed
        (also when the run ends meanwhile: nothing after the workload goes through a broken proxy)."""
        proxy = self.mongo_proxy
        if proxy is None:
            raise RuntimeError(f"{fault.kind} needs the MongoDB proxy (drivers/tcpproxy.py) in front of the server")
        before = proxy.stats.as_dict()
        fault.window_s = self.outage_s
        if fault.kind == "mongodb-slow":
            fault.target = f"mongodb replies +{self.slow_ms:g} ms"
            proxy.slow(self.slow_ms)
        else:
            fault.target = "mongodb connections cut mid-reply"
            proxy.cut()
        try:
            await asyncio.sleep(self.outage_s)
        finally:
            proxy.heal()
            after = proxy.stats.as_dict()
            fault.proxy = {
                "delay_ms": self.slow_ms if fault.kind == "mongodb-slow" else 0.0,
                "window_s": self.outage_s,
                **{k: after[k] - before[k] for k in ("delayed", "cuts", "refused", "connections")},
            }

    async def _drain_hub(self, fault: Fault, index: int | None = None) -> None:
        """Drain and replace the hub with the most connections, ties at random, or hub ``index``
        when given (a replay) (:func:`im_actors.cluster.restart_hub`): a hub just replaced is empty,
        and draining it again would show nothing. The fault cannot count as recovered before the
        hub is ready again."""
        from im_actors.cluster import restart_hub

        loads: list[int] = []
        for i in range(self.config.hubs):
            name = ids.actor_name("hub", i, self.config.actor_prefix)
            try:
                load = await ray.get_actor(name, namespace=ids.NAMESPACE).load.remote()
                loads.append(int(load.get("connections", 0)))
            except Exception:  # noqa: BLE001 - a hub that does not answer is not drained
                loads.append(-1)
        most = max(loads)
        busiest = [i for i, n in enumerate(loads) if n == most]
        if index is None or not 0 <= index < self.config.hubs:
            index = self.rng.choice(busiest)
        fault.index = index
        fault.target = ids.actor_name("hub", index, self.config.actor_prefix)
        fault.floor_s = math.inf  # until the hub is back
        fault.drain = await asyncio.to_thread(restart_hub, self.config, index)
        fault.floor_s = self.now() - fault.at_s

    async def _remove_node(self, fault: Fault) -> str:
        """Add a fresh node, then remove the worker node holding the most of this deployment's
        actors (never the head, nor the router's node: the router's URL is what clients know).
        Sets ``fault.floor_s`` to when every actor of that node was alive on another one."""
        from im_actors.cluster import actor_nodes, add_local_node

        if self.cluster is None:
            raise RuntimeError("the node kind needs a local multi-node cluster (im-actors demo --nodes 3)")
        placed = await asyncio.to_thread(actor_nodes, self.config)
        router = placed.get(ids.actor_name("router", 0, self.config.actor_prefix))
        load = {n.node_id: sum(1 for node in placed.values() if node == n.node_id) for n in self.cluster.worker_nodes}
        candidates = [n for n in self.cluster.worker_nodes if n.node_id != router]
        if not candidates:
            raise RuntimeError("no worker node without the router to remove")
        victim = max(candidates, key=lambda n: load.get(n.node_id, 0))
        add_local_node(self.cluster)  # on this (long-lived) thread: Ray's processes share its fate
        moved = [name for name, node in placed.items() if node == victim.node_id]
        fault.at_s = self.now()
        self.cluster.remove_node(victim, allow_graceful=False)
        deadline = self.now() + 60
        while self.now() < deadline:
            now = await asyncio.to_thread(actor_nodes, self.config)
            if all(now.get(name) not in (None, victim.node_id) for name in moved):
                fault.floor_s = self.now() - fault.at_s
                break
            await asyncio.sleep(0.1)
        else:
            fault.floor_s = math.inf
            raise RuntimeError(f"actors of the removed node not alive elsewhere within 60 s: {moved}")
        return f"node {victim.node_id[:12]} ({len(moved)} actors)"

    async def _amqp_connects(self) -> dict[str, int]:
        """``{actor name: AMQP connections opened}`` for every push publisher (in the session
        shards) and push worker; an actor that does not answer is left out."""
        names = [ids.actor_name("session", i, self.config.actor_prefix) for i in range(self.config.session_shards)]
        names += [ids.actor_name("push", i, self.config.actor_prefix) for i in range(self.config.push_workers)]
        out: dict[str, int] = {}
        for name in names:
            try:
                stats = await ray.get_actor(name, namespace=ids.NAMESPACE).stats.remote()
            except Exception:  # noqa: BLE001 - restarting: left out
                continue
            stats = stats.get("push", stats)  # a session shard nests its publisher's stats
            if "connects" in stats:
                out[name] = int(stats["connects"]) if stats.get("connected") else -1
        return out

    async def _amqp_reconnected(self, before: dict[str, int], since_s: float, timeout_s: float = 60.0) -> float | None:
        """Wait until every AMQP client of ``before`` is connected again on a new connection;
        returns the seconds since ``since_s`` (None after ``timeout_s``)."""
        deadline = self.now() + timeout_s
        while self.now() < deadline:
            now = await self._amqp_connects()
            if all(now.get(name, -1) > max(count, 0) for name, count in before.items()):
                return self.now() - since_s
            await asyncio.sleep(0.1)
        return None

    def _flush_prefix(self) -> None:
        client = redis.Redis.from_url(self.config.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.config.key_prefix}*", count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i : i + 500])
        finally:
            client.close()

    # --- results -----------------------------------------------------------------------------

    async def finish(self, settle_s: float = 30.0) -> list[dict[str, Any]]:
        """Wait (up to ``settle_s``) until every fault has recovered, stop probing, close the
        probe clients, and return the faults as plain data."""
        deadline = self.now() + settle_s
        while self.now() < deadline and any(self._recovery(f) is None for f in self.faults):
            await asyncio.sleep(0.2)
        self._stopping = True
        if self._sender_task is not None:
            self._sender_task.cancel()
        for fault in self.faults:
            fault.recovery_s = self._recovery(fault)
            fault.worst_latency_ms = self._worst_latency(fault)
            if fault.window_s is not None:
                fault.worst_ack_latency_ms = self._worst_ack_latency(fault)
        await asyncio.gather(*(c.close() for c in self._clients), return_exceptions=True)
        return [f.as_dict() for f in self.faults]

    def in_progress(self) -> list[str]:
        """The faults injected and not recovered yet, as ``"<kind> <seconds since>s"`` (the live view)."""
        now = self.now()
        return [f"{f.kind} {now - f.at_s:.0f}s" for f in self.faults if f.error is None and self._recovery(f) is None]

    def _complete(self, probe: _Probe) -> float | None:
        if probe.acked is None or len(probe.received) < len(self._clients):
            return None
        return max(probe.acked, *probe.received.values())

    def _recovery(self, fault: Fault) -> float | None:
        for n in sorted(self._probes):
            probe = self._probes[n]
            if probe.sent < fault.at_s:
                continue
            done = self._complete(probe)
            if done is not None:
                recovered = max(done - fault.at_s, fault.floor_s or 0.0)
                return None if math.isinf(recovered) else recovered
        return None

    def _worst_latency(self, fault: Fault) -> float | None:
        end = fault.at_s + max(fault.recovery_s or 0.0, fault.window_s or 0.0) + self.probe_interval_s
        lat = [
            (done - p.sent) * 1000
            for p in self._probes.values()
            if fault.at_s - self.probe_interval_s <= p.sent <= end and (done := self._complete(p)) is not None
        ]
        return round(max(lat), 1) if lat else None

    def _worst_ack_latency(self, fault: Fault) -> float | None:
        """Worst ack latency (ms) of the probes sent within the fault's window; a probe sent then
        and never acked counts as acked when the probing stopped (it waited at least that long)."""
        end = fault.at_s + (fault.window_s or 0.0)
        now = self.now()
        lat = [
            ((p.acked if p.acked is not None else now) - p.sent) * 1000
            for p in self._probes.values()
            if fault.at_s <= p.sent <= end
        ]
        return round(max(lat), 1) if lat else None


def pick_index(count: int, index: int | None, rng: random.Random) -> int:
    """The target index within a role of ``count`` actors: ``index`` when it is one (a replayed
    plan), else drawn from ``rng``. Raises ValueError when ``count`` < 1."""
    if count < 1:
        raise ValueError("no target to choose from")
    if index is not None and 0 <= index < count:
        return index
    return rng.randrange(count)


def summarize(faults: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind: how many faults, how many recovered, median and worst recovery (s)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(f["kind"] for f in faults):
        rec = sorted(f["recovery_s"] for f in faults if f["kind"] == kind and f["recovery_s"] is not None)
        n = sum(1 for f in faults if f["kind"] == kind)
        out[kind] = {
            "injected": n,
            "recovered": len(rec),
            "median_recovery_s": round(statistics.median(rec), 3) if rec else None,
            "worst_recovery_s": rec[-1] if rec else None,
        }
        spreads = [f["reconnect_spread_s"] for f in faults if f["kind"] == kind and "reconnect_spread_s" in f]
        if spreads:
            out[kind]["reconnect_spread_s"] = spreads
        acks = [f["worst_ack_latency_ms"] for f in faults if f["kind"] == kind and f.get("worst_ack_latency_ms")]
        if acks:
            out[kind]["worst_ack_latency_ms"] = max(acks)
        proxied = [f["proxy"] for f in faults if f["kind"] == kind and f.get("proxy")]
        if proxied:
            out[kind]["proxy"] = {k: sum(p[k] for p in proxied) for k in ("delayed", "cuts", "refused")}
    return out
