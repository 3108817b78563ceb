"""Prometheus metrics of every role through ``ray.util.metrics`` (issue 11 item 1).

Ray's metrics agent on each node serves them on the node's Prometheus endpoint (the port is
``MetricsExportPort`` in ``ray.nodes()``; ``ray start --metrics-export-port`` fixes it). Ray puts
``ray_`` in front of every application metric, and ``_total`` after a counter's name, so
``im_hub_frames_in`` is scraped as ``ray_im_hub_frames_in_total``, and the histogram
``im_conv_commit_ms`` as ``ray_im_conv_commit_ms_bucket`` / ``_sum`` / ``_count``. Every series
carries the tags ``deployment`` (``config.deployment``, ``default`` when empty) and ``actor`` (its name);
Ray adds ``NodeAddress``, ``WorkerId``, ``SessionName``. Histograms are in milliseconds (or entries,
for batch sizes: the name says which).

What the hot path pays::

    counters, gauges   nothing: every actor already counts into plain dicts (its ``stats()``);
                       an :class:`ActorMetrics` task in the actor copies them every
                       ``config.metrics_interval_s`` (increments -> Counter.inc, values -> Gauge.set)
    histograms         one Ray ``observe`` (about 2 us measured here) per commit batch or per
                       delivered entry, at the places that measure already:
                       :class:`IncrementProbe` turns the existing ``stats["commit_ms_total"] += ms``
                       of a conversation shard (and the store's mongo/redis times, the committed
                       count) into samples without a line in the core; the hub shell measures
                       delivery latency from the entry's ``ts``

:data:`SERIES` is the one table of everything exported; ``deploy/grafana/im-actors.json`` queries
only names from it (a test checks). A restarted actor starts its counters from zero under a new
``WorkerId``: Prometheus' ``rate()`` and ``increase()`` treat that as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from im_actors.config import Config

__all__ = [
    "SERIES",
    "Series",
    "ActorMetrics",
    "IncrementProbe",
    "MetricBackend",
    "RayBackend",
    "exported_names",
    "for_actor",
    "delivery_latency_ms",
    "LATENCY_BOUNDS_MS",
    "BATCH_BOUNDS",
]

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]

#: Bucket bounds of latency histograms (ms): 0.25 ms to 10 s, about x2 apart.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
)  # fmt: skip
#: Bucket bounds of batch-size histograms (entries): up to store_batch_max's default of 512.
BATCH_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Series:
    """One exported metric.

    ``role``: the actor role that exports it (``"*"``: every role). ``path``: where its value is in the
    role's ``stats()`` map (``("push", "published")`` is ``stats["push"]["published"]``); empty for
    histograms and for :data:`UP`. ``by``: the tag whose values are the keys of the map at ``path``
    (one series per key: errors by code, queue depths by queue). ``bounds``: histogram buckets.
    """

    name: str
    kind: Kind
    role: str
    description: str
    path: tuple[str, ...] = ()
    by: str = ""
    bounds: tuple[float, ...] = ()

    @property
    def tag_keys(self) -> tuple[str, ...]:
        """The series' tags: deployment, actor, and ``by`` when set."""
        return ("deployment", "actor", self.by) if self.by else ("deployment", "actor")


def _c(name: str, role: str, description: str, *path: str, by: str = "") -> Series:
    return Series(name, "counter", role, description, path or (name.split("_", 2)[2],), by)


def _g(name: str, role: str, description: str, *path: str, by: str = "") -> Series:
    return Series(name, "gauge", role, description, path or (name.split("_", 2)[2],), by)


def _h(name: str, role: str, description: str, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> Series:
    return Series(name, "histogram", role, description, bounds=bounds)


#: Every series, by role. Counter and gauge paths name keys of the role's ``stats()``.
SERIES: tuple[Series, ...] = (
    Series("im_up", "gauge", "*", "1 while the actor runs (set every metrics_interval_s); tag role", by="role"),
    # hub
    _g("im_hub_connections", "hub", "open client connections", "connections"),
    _c("im_hub_connects", "hub", "client connections opened (rate: connects/s)", "connections_total"),
    _c("im_hub_frames_in", "hub", "frames read from clients"),
    _c("im_hub_frames_out", "hub", "frames written to clients"),
    _c("im_hub_sends", "hub", "send requests"),
    _c("im_hub_acks", "hub", "sends acknowledged (ack frames)", "answers", "ack"),
    _c("im_hub_errors", "hub", "error frames answered, by code (PROTOCOL.md)", "answers", by="code"),
    _g("im_hub_queued_bytes", "hub", "bytes queued for sending, all connections (bytes)", "queued_bytes"),
    _g("im_hub_queued_bytes_max", "hub", "bytes queued on the fullest connection (bytes)", "queued_bytes_max"),
    _c("im_hub_slow_closed", "hub", "slow consumers closed with 4508", "slow_closed"),
    _c("im_hub_rate_limited", "hub", "requests answered rate_limited", "rate_limited"),
    _c("im_hub_overload_refused", "hub", "sends refused by admission control (unavailable, retry_after_ms)"),
    _c("im_hub_handshakes_refused", "hub", "WebSocket handshakes refused (per-address limits)", "handshakes_refused"),
    _c("im_hub_tokens_expired", "hub", "connections closed 4401 when their token ran out", "tokens_expired"),
    _h("im_hub_delivery_ms", "hub", "entry sequenced (its ts) to its frame queued at the hub: commit and fan-out (ms)"),
    # conversation shard
    _c("im_conv_committed", "conv", "entries committed"),
    _c("im_conv_commits", "conv", "commit batches"),
    _c("im_conv_dups", "conv", "sends answered as duplicates (known cmid)"),
    _c("im_conv_unavailable", "conv", "entries answered unavailable (commit failed)"),
    _c("im_conv_activations", "conv", "sequencers activated from storage"),
    _g("im_conv_active", "conv", "sequencers active now", "active"),
    _c("im_conv_deliveries", "conv", "deliveries handed to hubs by this shard (fanout_via = conv)"),
    _c("im_conv_answer_copies", "conv", "of those, copies carried in the sender hub's send answer (answer_copies)"),
    _g("im_conv_routes", "conv", "connections routed by this shard (fanout_via = conv)", "routes"),
    _h("im_conv_commit_ms", "conv", "commit of one batch: store call(s) until storage confirmed (ms)"),
    _h("im_conv_commit_batch", "conv", "entries committed per batch (entries)", BATCH_BOUNDS),
    # store writer (and a conversation shard that commits itself, store_writers = 0)
    _c("im_store_commits", "store", "commit batches written", "commits"),
    _h("im_store_mongo_ms", "store", "MongoDB part of a commit (ms)"),
    _h("im_store_redis_ms", "store", "Redis part of a commit (ms)"),
    # session shard, with its push planner and publisher
    _g("im_session_users", "session", "user sessions hosted", "users"),
    _c("im_session_fanout_entries", "session", "entries fanned out", "fanout_entries"),
    _c("im_session_deliveries", "session", "deliveries handed to hubs (one per device)", "deliveries"),
    _c("im_session_presence_events", "session", "presence changes announced", "presence_events"),
    _c("im_push_jobs", "session", "push jobs made for offline devices", "push_planner", "jobs"),
    _c("im_push_coalesced", "session", "entries folded into another push job", "push_planner", "coalesced"),
    _c("im_push_published", "session", "push jobs handed to RabbitMQ", "push", "published"),
    _c("im_push_confirmed", "session", "push jobs RabbitMQ confirmed", "push", "confirmed"),
    _c("im_push_dropped", "session", "push jobs dropped from a full outbox", "push", "dropped"),
    _g("im_push_outbox", "session", "push jobs not yet confirmed", "push", "outbox"),
    # push worker
    _c("im_push_delivered", "push", "push jobs a provider accepted", "delivered"),
    _c("im_push_retried", "push", "push jobs sent to the retry queue", "retried"),
    _c("im_push_dead", "push", "push jobs sent to the dead queue", "dead"),
    _c("im_push_invalid", "push", "invalid push tokens removed", "invalid"),
    _c("im_push_duplicates", "push", "copies of delivered jobs not sent again", "duplicates"),
    _g("im_push_in_flight", "push", "push jobs being handled", "in_flight"),
    _g(
        "im_push_queue_depth",
        "push",
        "ready messages in the push queues, by queue (jobs, retry, dead)",
        "queues",
        by="queue",
    ),  # noqa: E501
    # router and group shards
    _g("im_router_hubs_live", "router", "hubs the router hands out", "hubs_live"),
    _g("im_group_cached", "group", "group memberships cached", "cached"),
)

UP = SERIES[0]


def exported_names() -> set[str]:
    """Every name Prometheus sees for :data:`SERIES` (``ray_`` prefix; counters ``_total``; histograms
    ``_bucket``, ``_sum``, ``_count``), for dashboards and the tests that check them."""
    out: set[str] = set()
    for s in SERIES:
        base = f"ray_{s.name}"
        if s.kind == "counter":
            out.add(f"{base}_total")
        elif s.kind == "histogram":
            out.update({f"{base}_bucket", f"{base}_sum", f"{base}_count"})
        else:
            out.add(base)
    return out


class Metric(Protocol):
    """What :class:`ActorMetrics` calls on a metric (the subset of ``ray.util.metrics`` it uses)."""

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...
    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class MetricBackend(Protocol):
    """Makes the metric of a :class:`Series` with its default tags (tests pass a fake)."""

    def make(self, series: Series, default_tags: dict[str, str]) -> Any: ...


class RayBackend:
    """:class:`MetricBackend` of ``ray.util.metrics`` (Counter, Gauge, Histogram)."""

    def make(self, series: Series, default_tags: dict[str, str]) -> Any:
        """A Ray metric for ``series`` with ``default_tags`` (deployment, actor) set."""
        from ray.util import metrics

        metric: Any
        if series.kind == "counter":
            metric = metrics.Counter(series.name, series.description, series.tag_keys)
        elif series.kind == "gauge":
            metric = metrics.Gauge(series.name, series.description, series.tag_keys)
        else:
            metric = metrics.Histogram(series.name, series.description, list(series.bounds), series.tag_keys)
        return metric.set_default_tags(default_tags)


def _lookup(stats: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = stats
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


class ActorMetrics:
    """The metrics of one actor: mirrors its ``stats()`` into Ray's counters and gauges every
    ``config.metrics_interval_s`` and records histogram samples.

    ``role`` is one of :data:`im_actors.ids.ROLES`, ``actor`` the actor's name; ``snapshot`` returns the
    actor's stats map (its ``stats()``). Call :meth:`start` from the actor's event loop (an async
    ``__init__`` or method); :meth:`mirror` does one round by hand. With ``metrics_interval_s = 0``
    nothing is created or recorded. ``histograms_of``: roles whose histograms this actor records too
    (a conversation shard that commits itself records the store's). Never raises into the actor: a
    failed round is logged once per kind of error and tried again at the next interval.
    """

    def __init__(
        self,
        config: Config,
        role: str,
        actor: str,
        snapshot: Callable[[], Mapping[str, Any]],
        backend: MetricBackend | None = None,
        histograms_of: tuple[str, ...] = (),
    ) -> None:
        self.enabled = config.metrics_interval_s > 0
        self.interval_s = config.metrics_interval_s
        self.role = role
        self._snapshot = snapshot
        self._tags = {"deployment": config.deployment or "default", "actor": actor}
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, str], float] = {}  # (series, tag value) -> last counter value seen
        self._task: asyncio.Task[None] | None = None
        self._failures: set[str] = set()
        if self.enabled:
            backend = backend or RayBackend()
            for s in SERIES:
                if s.role in ("*", role) or (s.kind == "histogram" and s.role in histograms_of):
                    self._metrics[s.name] = backend.make(s, self._tags)
        self._series = [s for s in SERIES if s.name in self._metrics and s.path]

    def observe(self, name: str, value: float) -> None:
        """Record one sample of histogram ``name`` (one of :data:`SERIES`; ms or entries)."""
        metric = self._metrics.get(name)
        if metric is not None:
            metric.observe(float(value))

    def observer(self, name: str) -> Callable[[float], None]:
        """A callback recording samples of histogram ``name`` (for :class:`IncrementProbe`)."""
        return lambda value: self.observe(name, value)

    def probe(self, stats: Mapping[str, float], **histograms: str) -> IncrementProbe:
        """``stats`` as an :class:`IncrementProbe` whose key ``k`` feeds histogram ``histograms[k]``:
        ``core.stats = m.probe(core.stats, commit_ms_total="im_conv_commit_ms")``."""
        return IncrementProbe(stats, {key: self.observer(name) for key, name in histograms.items()})

    def start(self) -> None:
        """Start the mirroring task on the running event loop (idempotent; nothing when disabled)."""
        if self.enabled and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the mirroring task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            self.mirror()
            await asyncio.sleep(self.interval_s)

    def mirror(self) -> None:
        """One round: counters grow by what the stats grew since the last round (the whole value after
        a fall, which only a restart or a new incarnation of a map makes), gauges take the value."""
        if not self.enabled:
            return
        try:
            stats = self._snapshot()
            self._metrics[UP.name].set(1.0, {"role": self.role})
            for s in self._series:
                value = _lookup(stats, s.path)
                if s.by:
                    if isinstance(value, Mapping):
                        for key, v in value.items():
                            if s.name == "im_hub_errors" and key == "ack":
                                continue  # acks are im_hub_acks
                            self._record(s, float(v), str(key))
                elif isinstance(value, int | float):
                    self._record(s, float(value), "")
        except Exception as exc:  # noqa: BLE001 - metrics never break the actor
            kind = type(exc).__name__
            if kind not in self._failures:
                self._failures.add(kind)
                log.warning("metrics of %s not recorded: %r", self._tags["actor"], exc)

    def _record(self, s: Series, value: float, tag: str) -> None:
        metric = self._metrics[s.name]
        tags = {s.by: tag} if s.by else None
        if s.kind == "gauge":
            metric.set(value, tags)
            return
        last = self._last.get((s.name, tag), 0.0)
        delta = value - last if value >= last else value
        self._last[(s.name, tag)] = value
        if delta > 0:
            metric.inc(delta, tags)


def for_actor(
    config: Config, role: str, snapshot: Callable[[], Mapping[str, Any]], histograms_of: tuple[str, ...] = ()
) -> ActorMetrics:
    """:class:`ActorMetrics` of the calling Ray actor, tagged with its name from Ray's runtime context
    (``role`` outside an actor)."""
    import ray

    name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
    return ActorMetrics(config, role, name or role, snapshot, histograms_of=histograms_of)


class IncrementProbe(dict[str, float]):
    """A core's ``stats`` dict that also hands each increment of chosen keys to a callback.

    The cores already measure where it matters (``stats["commit_ms_total"] += ms`` after each commit,
    ``stats["committed"] += n``); an actor shell swaps the core's dict for a probe over it, and every
    such ``+=`` becomes one histogram sample of the increment, with no line in the core. ``watch`` maps
    a key to its callback; a key the dict does not have raises ``KeyError`` at once (a renamed counter
    is found when the actor starts, not by a silent empty histogram). Cost: one Python-level
    ``__setitem__`` per update of the dict, 0.2-0.4 us more than a plain dict's (measured here with
    ``timeit``), on dicts updated a few times per commit batch.
    """

    def __init__(self, stats: Mapping[str, float], watch: Mapping[str, Callable[[float], None]]) -> None:
        missing = [key for key in watch if key not in stats]
        if missing:
            raise KeyError(f"stats have no {', '.join(missing)} to watch")
        super().__init__(stats)
        self._watch = dict(watch)

    def __setitem__(self, key: str, value: float) -> None:
        hook = self._watch.get(key)
        if hook is not None:
            delta = value - self.get(key, 0)
            if delta > 0:
                hook(delta)
        super().__setitem__(key, value)


def delivery_latency_ms(entries: Any, now_ms: float | None = None) -> list[float]:
    """``now - entry["ts"]`` (ms, wall clock; never below 0) of each ``(entry, conn ids)`` item that has a
    ``ts``: the time since the conversation shard sequenced the entry. Across nodes it includes their
    clock offset."""
    now = time.time() * 1000 if now_ms is None else now_ms
    out = []
    for entry, _conns in entries:
        ts = entry.get("ts") if isinstance(entry, Mapping) else None
        if isinstance(ts, int | float):
            out.append(max(0.0, now - ts))
    return out
