"""Resources of a run: every role's memory over time, and what was left open when the run was over.

A :class:`ResourceSampler` runs beside a workload in the deploying process (``im-actors demo`` starts
one, ``--sample-every``). Every ``every_s`` seconds it samples each actor of the deployment by name
and each storage server the run started (SecantusDB, a private Redis or RabbitMQ; a shared server
is not this run's):

- from outside, with psutil, the actor's worker process (its pid from Ray's GCS,
  :func:`im_actors.cluster.actor_records`; a server's whole process tree): ``rss_bytes`` and
  ``uss_bytes`` (memory only this process holds), ``fds`` (open file descriptors), ``tcp`` (TCP
  sockets not listening: client connections, Ray's own, the storage clients') and ``close_wait``
  (sockets whose peer closed and this process did not: the classic connection leak);
- from inside, with :meth:`im_actors.vitals.Vitals.vitals`: ``tasks`` (asyncio tasks on the actor's
  event loop), ``threads`` and ``py_blocks`` (the memory blocks the interpreter holds: Python's own
  objects and buffers); on hubs also ``ws`` (client WebSocket connections, ``load``).

An actor that Ray restarted (chaos killed it, its node was removed) has a new pid: the series stays
per actor name, each sample carries the incarnation (how many times the name got a new process
since the first sample) and ``restarts_at_s`` lists when one was first seen.

**Memory slope** (:func:`memory_slope`): per role, the least-squares slope of RSS over time in MB
(10^6 bytes) per minute, one slope shared by every process of the role with an intercept of its own
for each incarnation (a restarted process starts lower: a single line through the drop would read as
memory given back). Samples in the first ``warmup_s`` (60 s, at most a third of the fitted span),
in the ``restart_settle_s`` (30 s) after a restart of that actor, and after the send phase (the
demo's final catch-up, every client syncing at once, is a step of its own, not a trend) are left
out: a process fills its caches and imports first. It is a per-process figure (what one hub grows
by), not the role's sum. The first, last and peak RSS cover every sample. Beside it, the same fit of
``py_blocks`` (blocks per minute): RSS that climbs while the interpreter's blocks stay flat is not
Python objects piling up (a high-water mark of the allocator after a burst, native memory).

**Heap trace** (``heap_trace``, the demo's ``--heap-trace``): tracemalloc starts in every actor
after the "before" snapshot (:meth:`im_actors.vitals.Vitals.heap_growth`; allocations cost about a
third more meanwhile) and the "after" snapshot asks each actor which source lines' live allocations
grew most since: ``resources.heap_growth`` ``{actor: [line, ...]}`` (None for an actor restarted
meanwhile: its tracing began at the "after" call). Samples then carry ``heap_bytes``.

**Leaks** (:func:`count_leaks`): the counts ``tasks``, ``fds`` and ``connections`` of each actor
(:func:`leak_count`), taken once before the workload (the least of :data:`SNAPSHOTS` snapshots one
second apart, ``before_settle_s`` after the deployment is ready) and once after it finished and every
client closed (the same way, ``settle_s`` later). ``fds`` and ``connections`` (TCP sockets) leave out
the ``pooled`` sockets to the storage servers: those belong to the MongoDB and Redis clients' pools,
which open connections as concurrency asks and keep them (bounded by the pool, reported as
``pooled`` and per peer, not a leak); a client made and never closed shows in ``tasks`` (a pymongo
client runs five monitor tasks). A leak is what an actor's count grew by beyond :data:`ALLOWANCE`,
which covers what a warm process holds and a cold one does not: the lazily made MongoDB client's
tasks, Ray's channels to the peers it has called since. A real leak grows with the work and the
faults (hundreds of connections, tens of faults in a soak) and stands far above it. The storage
servers' counts are reported, never counted (their sockets are the actors' clients).

The run fails on these figures only through thresholds (:mod:`drivers.verdict`):
``mem_slope_mb_per_min`` (the steepest role's slope), ``leaked_fds``, ``leaked_tasks``,
``leaked_connections`` (the excess summed over actors); a run without these sections reads NaN,
which breaks every threshold on them.

:func:`summary_lines` is what the demo prints. No Ray import at module level: the figures are
plain functions over plain data, unit-tested on synthetic samples.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from im_actors import ids
from im_actors.config import Config

__all__ = [
    "ALLOWANCE",
    "LEAK_COUNTS",
    "SNAPSHOTS",
    "ResourceSampler",
    "count_leaks",
    "leak_count",
    "memory_slope",
    "peer_ports",
    "pooled_slope",
    "resources_section",
    "role_totals",
    "send_phase_end_ms",
    "summary_lines",
]

log = logging.getLogger(__name__)

#: The counts a leak is looked for in (``connections`` is the sample's ``tcp``).
LEAK_COUNTS = ("fds", "tasks", "connections")
#: How much each count of one actor may grow between the idle process before the workload and after
#: it without counting as a leak (see the module docstring).
ALLOWANCE: dict[str, int] = {"fds": 16, "tasks": 8, "connections": 12}
#: Snapshots taken one second apart for each of "before" and "after"; each count is their least
#: (a call in flight, a reconnect under way is a moment, a leak stays).
SNAPSHOTS = 3
#: The roles whose slopes and leaks count (the storage servers' memory holds the run's data).
ACTOR_ROLES = ids.ROLES
#: Storage servers sampled when the run started them: report name -> attribute of LocalServices.
SERVERS = ("mongodb", "redis", "rabbitmq")
_SERVICE_ATTR = {"mongodb": "mongo", "redis": "redis", "rabbitmq": "rabbitmq"}
#: Keys of one sample (columns of an actor's series).
COLUMNS = (
    "rss_bytes",
    "uss_bytes",
    "fds",
    "tcp",
    "pooled",
    "close_wait",
    "tasks",
    "threads",
    "ws",
    "py_blocks",
    "heap_bytes",
)
#: What each leak count reads from a sample: file descriptors and TCP sockets other than the pooled
#: ones to the storage servers (see the module docstring).
_LEAK_SOURCE = {"fds": ("fds", "pooled"), "tasks": ("tasks", None), "connections": ("tcp", "pooled")}
_MB = 1e6
#: Lines of each actor's heap growth the demo prints (the report keeps what the actor answered).
HEAP_LINES_PRINTED = 5


# --- figures (plain functions) -----------------------------------------------------------------


def pooled_slope(segments: Iterable[Sequence[tuple[float, float]]]) -> float | None:
    """The least-squares slope shared by ``segments`` of ``(x, y)`` points, each with its own intercept
    (the within-segment estimator): ``sum((x - mean_x_seg) * (y - mean_y_seg)) / sum((x - mean_x_seg)^2)``
    over every point of every segment. Units: y per unit of x. None when no segment has two distinct x."""
    sxx = sxy = 0.0
    for seg in segments:
        if len(seg) < 2:
            continue
        mx = sum(x for x, _ in seg) / len(seg)
        my = sum(y for _, y in seg) / len(seg)
        sxx += sum((x - mx) ** 2 for x, _ in seg)
        sxy += sum((x - mx) * (y - my) for x, y in seg)
    return sxy / sxx if sxx > 0 else None


@dataclass(frozen=True)
class SlopeFit:
    """A memory slope: ``mb_per_min`` (None: too few samples), from ``samples`` samples in ``segments``
    incarnation segments."""

    mb_per_min: float | None
    samples: int
    segments: int


def _segments(
    series: Mapping[str, Sequence[Any]],
    key: str,
    skip_before_s: float,
    restart_settle_s: float,
    until_s: float | None = None,
) -> list[list[tuple[float, float]]]:
    """The ``(t_s, value)`` points of one actor's ``series`` per incarnation, without samples before
    ``skip_before_s``, after ``until_s``, within ``restart_settle_s`` after a restart, or missing."""
    values = series.get(key)
    if not values:  # a column never read (USS where the kernel does not tell)
        return []
    restarts = list(series.get("restarts_at_s") or [])
    by_incarnation: dict[int, list[tuple[float, float]]] = {}
    for t, inc, value in zip(series["t_s"], series["incarnation"], values, strict=True):
        if value is None or inc is None or t < skip_before_s or (until_s is not None and t > until_s):
            continue
        if any(r <= t < r + restart_settle_s for r in restarts):
            continue
        by_incarnation.setdefault(int(inc), []).append((float(t), float(value)))
    return list(by_incarnation.values())


def memory_slope(
    actors: Iterable[Mapping[str, Sequence[Any]]],
    warmup_s: float,
    restart_settle_s: float,
    key: str = "rss_bytes",
    until_s: float | None = None,
    unit: float = _MB,
) -> SlopeFit:
    """The memory slope (MB per minute, 10^6 bytes; ``key`` units per minute / ``unit`` for another
    column) shared by the series of ``actors`` (each a mapping with ``t_s``, ``incarnation``,
    ``restarts_at_s`` and ``key`` columns, as :class:`ResourceSampler` records them), each
    incarnation its own intercept; samples before ``warmup_s``, after ``until_s`` (None: none) and
    within ``restart_settle_s`` after a restart are left out (see the module docstring)."""
    segments = [seg for a in actors for seg in _segments(a, key, warmup_s, restart_settle_s, until_s) if len(seg) >= 2]
    slope = pooled_slope(segments)
    return SlopeFit(
        None if slope is None else round(slope * 60.0 / unit, 3), sum(len(s) for s in segments), len(segments)
    )


def count_leaks(
    before: Mapping[str, Mapping[str, Any]],
    after: Mapping[str, Mapping[str, Any]],
    allowance: Mapping[str, int] = ALLOWANCE,
    roles: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The leak section: ``before`` and ``after`` are ``{name: {"fds", "tasks", "tcp", "pooled", ...}}``
    (None for a count not read; samples or settled rows of :class:`ResourceSampler`); ``roles``
    ``{name: role}`` (names not in it, or whose role is not an actor role, are reported and never
    counted).

    Returns ``{"allowance", "actors": {name: {"role", "before", "after", "diff", "leaked"}},
    "roles": {role: {"before", "after", "diff"}}, "leaked": {"fds", "tasks", "connections"},
    "leaking": [name, ...]}``: ``before`` and ``after`` hold the leak counts and ``pooled`` (reported,
    never counted), ``diff`` is after - before for each count read both times, ``leaked``
    its excess over ``allowance`` (0 when within it), summed over actors in ``leaked``. Where the
    snapshots have them, an actor also gets ``tasks_by_coro_grown`` (coroutine name -> how many
    more tasks run it) and ``tcp_peers_grown`` (peer -> how many more sockets to it)."""
    roles = roles or {}
    actors: dict[str, Any] = {}
    by_role: dict[str, dict[str, dict[str, int]]] = {}
    totals = dict.fromkeys(LEAK_COUNTS, 0)
    leaking: list[str] = []
    for name in sorted(set(before) | set(after)):
        b = {**{k: _leak_value(before.get(name) or {}, k) for k in LEAK_COUNTS}, "pooled": _pooled(before.get(name))}
        a = {**{k: _leak_value(after.get(name) or {}, k) for k in LEAK_COUNTS}, "pooled": _pooled(after.get(name))}
        role = roles.get(name, name)
        diff = {k: a[k] - b[k] for k in b if a[k] is not None and b[k] is not None}  # type: ignore[operator]
        counted = role in ACTOR_ROLES
        leaked = {k: max(0, diff[k] - int(allowance.get(k, 0))) if counted else 0 for k in LEAK_COUNTS if k in diff}
        actors[name] = {"role": role, "before": b, "after": a, "diff": diff, "leaked": leaked}
        for key in ("tasks_by_coro", "tcp_peers"):
            grown = _grown((before.get(name) or {}).get(key), (after.get(name) or {}).get(key))
            if grown:
                actors[name][f"{key}_grown"] = grown
        if any(leaked.values()):
            leaking.append(name)
        for k, n in leaked.items():
            totals[k] += n
        agg = by_role.setdefault(role, {"before": {}, "after": {}, "diff": {}})
        for part, values in (("before", b), ("after", a), ("diff", diff)):
            for k, v in values.items():
                if v is not None:
                    agg[part][k] = agg[part].get(k, 0) + v
    return {"allowance": dict(allowance), "actors": actors, "roles": by_role, "leaked": totals, "leaking": leaking}


def _grown(before: Mapping[str, int] | None, after: Mapping[str, int] | None) -> dict[str, int]:
    """``{key: after - before}`` for the keys of two counters that grew (where to look at a leak)."""
    if before is None or after is None:
        return {}
    return {k: n - before.get(k, 0) for k, n in sorted(after.items()) if n > before.get(k, 0)}


def _pooled(row: Mapping[str, Any] | None) -> int | None:
    value = (row or {}).get("pooled")
    return None if value is None else int(value)


def _leak_value(row: Mapping[str, Any], key: str) -> int | None:
    """A settled row carries each leak count already (``leak_fds``...); a plain sample is computed."""
    settled = row.get(f"leak_{key}")
    return int(settled) if settled is not None else leak_count(row, key)


def leak_count(sample: Mapping[str, Any], key: str) -> int | None:
    """The leak count ``key`` (:data:`LEAK_COUNTS`) of one sample: ``tasks``; ``fds`` and
    ``connections`` (``tcp``) less the ``pooled`` sockets to the storage servers. None if not read."""
    column, less = _LEAK_SOURCE[key]
    value = sample.get(column)
    if value is None:
        return None
    return int(value) - int(sample.get(less) or 0) if less else int(value)


def resources_section(
    actors: Mapping[str, Mapping[str, Any]],
    every_s: float,
    start_ms: float,
    warmup_s: float = 60.0,
    restart_settle_s: float = 30.0,
    fit_until_s: float | None = None,
) -> dict[str, Any]:
    """The report's ``resources`` section from the per-actor series ``actors`` (``{name: {"role",
    "t_s", "incarnation", "restarts_at_s", "rss_bytes", ...}}``): the series themselves, each
    actor's and each role's memory slope (MB/min) with the first, last and peak RSS (bytes; a role's
    are of the sum over its processes, :func:`role_totals`), and
    ``mem_slope_mb_per_min`` / ``mem_slope_role``: the steepest actor role (None when none could be
    fitted). Slopes are fitted up to ``fit_until_s`` (s since sampling began; None: every sample):
    the end of the send phase, as the demo passes it. ``warmup_s`` is capped at a third of the
    fitted span."""
    span = max((max(a["t_s"], default=0.0) for a in actors.values()), default=0.0)
    if fit_until_s is not None:
        span = min(span, fit_until_s)
    warmup = min(warmup_s, span / 3.0)
    out_actors: dict[str, Any] = {}
    for name, series in actors.items():
        fit = memory_slope([series], warmup, restart_settle_s, until_s=fit_until_s)
        rss = [v for v in series["rss_bytes"] if v is not None]
        out_actors[name] = {
            **series,
            "mem_slope_mb_per_min": fit.mb_per_min,
            "first_rss_bytes": rss[0] if rss else None,
            "last_rss_bytes": rss[-1] if rss else None,
            "peak_rss_bytes": max(rss) if rss else None,
        }
    roles: dict[str, Any] = {}
    for role in dict.fromkeys(a["role"] for a in actors.values()):
        members = [a for a in actors.values() if a["role"] == role]
        fit = memory_slope(members, warmup, restart_settle_s, until_s=fit_until_s)
        uss = memory_slope(members, warmup, restart_settle_s, key="uss_bytes", until_s=fit_until_s)
        blocks = memory_slope(members, warmup, restart_settle_s, key="py_blocks", until_s=fit_until_s, unit=1.0)
        totals = role_totals(members)
        roles[role] = {
            "processes": len(members),
            "mem_slope_mb_per_min": fit.mb_per_min,
            "uss_slope_mb_per_min": uss.mb_per_min,
            "py_blocks_per_min": blocks.mb_per_min,
            "last_py_blocks": _last(members, "py_blocks"),
            "fitted_samples": fit.samples,
            "first_rss_bytes": totals[0][1] if totals else None,
            "last_rss_bytes": totals[-1][1] if totals else None,
            "peak_rss_bytes": max(v for _, v in totals) if totals else None,
            "restarts": sum(len(a.get("restarts_at_s") or []) for a in members),
        }
    fitted = {r: v["mem_slope_mb_per_min"] for r, v in roles.items() if r in ACTOR_ROLES}
    fitted = {r: s for r, s in fitted.items() if s is not None}
    steepest = max(fitted, key=lambda r: fitted[r]) if fitted else None
    return {
        "sample_every_s": every_s,
        "start_ms": round(start_ms, 1),
        "warmup_s": round(warmup, 1),
        "restart_settle_s": restart_settle_s,
        "fit_until_s": None if fit_until_s is None else round(fit_until_s, 1),
        "mem_slope_mb_per_min": fitted[steepest] if steepest else None,
        "mem_slope_role": steepest,
        "roles": roles,
        "actors": out_actors,
    }


def _last(members: Sequence[Mapping[str, Any]], key: str) -> int | None:
    """The sum over ``members`` of each one's last ``key`` read (None: never read)."""
    lasts = []
    for m in members:
        read = [x for x in m.get(key) or [] if x is not None]
        if read:
            lasts.append(int(read[-1]))
    return sum(lasts) if lasts else None


def role_totals(members: Sequence[Mapping[str, Any]], key: str = "rss_bytes") -> list[tuple[float, int]]:
    """``[(t_s, sum)]``: the sum of the members' ``key`` at each sample time that has at least one."""
    sums: dict[float, int] = {}
    for m in members:
        for t, v in zip(m["t_s"], m.get(key) or [], strict=False):
            if v is not None:
                sums[t] = sums.get(t, 0) + int(v)
    return sorted(sums.items())


def send_phase_end_ms(report: Mapping[str, Any]) -> float | None:
    """When the send phase of a run report ended (epoch ms: its common start ``t0_s`` plus
    ``duration_s``, start to last ack), None when the report does not say."""
    t0, duration = report.get("t0_s"), report.get("duration_s")
    if t0 is None or duration is None:
        return None
    return (float(t0) + float(duration)) * 1000.0


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The lines the demo prints for the ``resources`` and ``leaks`` sections (none when absent)."""
    lines: list[str] = []
    res = report.get("resources")
    if isinstance(res, Mapping):
        until = res.get("fit_until_s")
        lines.append(
            f"  memory (RSS, sampled every {res['sample_every_s']:g} s; slope per process from "
            f"{res['warmup_s']:g} s to {'the end' if until is None else f'{until:g} s (the send phase)'}, "
            f"{res['restart_settle_s']:g} s after restarts left out)"
        )
        for role, row in res["roles"].items():
            slope = row["mem_slope_mb_per_min"]
            blocks = row.get("py_blocks_per_min")
            lines.append(
                f"    {role:9} x{row['processes']}  slope {'-' if slope is None else f'{slope:+.3f}'} MB/min  "
                f"first {_mb(row['first_rss_bytes'])}  last {_mb(row['last_rss_bytes'])}  "
                f"peak {_mb(row['peak_rss_bytes'])} MB  restarts {row['restarts']}"
                + ("" if blocks is None else f"  python blocks {blocks:+,.0f}/min of {row['last_py_blocks']:,}")
            )
        for name, top in (res.get("heap_growth") or {}).items():
            lines.append(
                f"    heap growth of {name}" + (": restarted, not traced" if top is None else ", largest first:")
            )
            lines += [f"      {line}" for line in (top or [])[:HEAP_LINES_PRINTED]]
    leaks = report.get("leaks")
    if isinstance(leaks, Mapping):
        allowance = "  ".join(f"{k} {v}" for k, v in leaks["allowance"].items())
        lines.append(
            f"  leaks (before -> {leaks['settle_s']:g} s after the workload; fds and connections without the "
            f"pooled storage sockets; allowed per actor: {allowance})"
        )
        for role, row in leaks["roles"].items():
            b, a = row["before"], row["after"]
            cells = "  ".join(f"{k} {b.get(k, '-')}->{a.get(k, '-')}" for k in (*LEAK_COUNTS, "pooled"))
            lines.append(f"    {role:9} {cells}")
        leaked = leaks["leaked"]
        named = ", ".join(leaks["leaking"]) or "none"
        lines.append(
            "    leaked beyond the allowance: "
            + "  ".join(f"{k} {leaked[k]}" for k in LEAK_COUNTS)
            + f"  (actors: {named})"
        )
    return lines


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / _MB:.1f}"


# --- sampling (Ray, psutil) --------------------------------------------------------------------


@dataclass
class _Series:
    """One actor's (or server's) columns, and its pid history."""

    role: str
    t_s: list[float] = field(default_factory=list)
    pid: list[int | None] = field(default_factory=list)
    incarnation: list[int | None] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=lambda: {k: [] for k in COLUMNS})
    restarts_at_s: list[float] = field(default_factory=list)
    last_pid: int | None = None
    incarnations: int = 0

    def add(self, t_s: float, sample: Mapping[str, Any] | None) -> None:
        pid = None if sample is None else sample.get("pid")
        if pid is not None and self.last_pid is not None and pid != self.last_pid:
            self.incarnations += 1
            self.restarts_at_s.append(round(t_s, 3))
        if pid is not None:
            self.last_pid = pid
        self.t_s.append(round(t_s, 3))
        self.pid.append(pid)
        self.incarnation.append(None if pid is None else self.incarnations)
        for key in COLUMNS:
            self.columns[key].append(None if sample is None else sample.get(key))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": self.role,
            "t_s": self.t_s,
            "pid": self.pid,
            "incarnation": self.incarnation,
            "restarts_at_s": self.restarts_at_s,
        }
        for key, values in self.columns.items():
            if any(v is not None for v in values):
                out[key] = values
        out.setdefault("rss_bytes", self.columns["rss_bytes"])
        return out


def peer_ports(config: Config) -> dict[int, str]:
    """``{port: "mongodb" | "redis" | "rabbitmq"}`` of the storage servers ``config`` names (to tell
    an actor's sockets to them from Ray's own and its clients')."""
    out: dict[int, str] = {}
    for key, peer in (("mongo_url", "mongodb"), ("redis_url", "redis"), ("rabbitmq_url", "rabbitmq")):
        for netloc in urlsplit(getattr(config, key) or "").netloc.rpartition("@")[2].split(","):
            port = netloc.rpartition(":")[2]
            if port.isdigit():
                out[int(port)] = peer
    return out


def _process_figures(pids: Sequence[int], ports: Mapping[int, str]) -> dict[str, Any] | None:
    """psutil figures summed over ``pids`` (a process and its children); None when none is alive (a
    zombie is not: it reads 0 bytes and 0 files, which would drag a slope down and hide a leak).
    ``tcp_peers`` counts the sockets by peer: ``ports``' name of the remote port, else ``other``;
    ``pooled`` is the sockets to a named peer (a storage server)."""
    import psutil

    out: dict[str, Any] = {"rss_bytes": 0, "uss_bytes": 0, "fds": 0, "tcp": 0, "pooled": 0, "close_wait": 0}
    peers: dict[str, int] = {}
    seen = False
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    continue  # killed, not reaped yet: no memory, no files (Ray may still list it alive)
                try:
                    mem = proc.memory_full_info()
                    out["rss_bytes"] += int(mem.rss)
                    out["uss_bytes"] += int(mem.uss)
                except psutil.AccessDenied:
                    out["rss_bytes"] += int(proc.memory_info().rss)
                out["fds"] += int(proc.num_fds())
                conns = proc.net_connections(kind="tcp")
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    continue
                out["tcp"] += 1
                out["close_wait"] += c.status == psutil.CONN_CLOSE_WAIT
                peer = ports.get(c.raddr.port, "other") if c.raddr else "other"
                peers[peer] = peers.get(peer, 0) + 1
                out["pooled"] += peer != "other"
            seen = True
        except psutil.Error:
            continue
    out["tcp_peers"] = peers
    return out if seen else None


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a server started through a shell script runs as its child)."""
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


class ResourceSampler:
    """Samples the deployment of ``config`` and the servers of ``services`` every ``every_s`` seconds
    in a thread of its own (Ray calls and psutil, never the caller's event loop). Use as::

        sampler = ResourceSampler(config, services, every_s=10.0)
        sampler.start()                  # the "before" snapshot, then sampling
        ... run the workload, close its clients ...
        report.update(sampler.finish())  # {"resources": ..., "leaks": ...}

    and :meth:`stop` in a ``finally`` (does nothing once finished). ``before_settle_s`` and
    ``settle_s``: the waits before the "before" snapshot (the deployment just started) and the
    "after" one (the clients just closed); ``answer_timeout_s``: how long a sample waits for
    the actors' answers (an actor that does not answer in time, restarting, has no ``tasks`` then).
    """

    #: Seconds between the :data:`SNAPSHOTS` snapshots of "before" and "after".
    snapshot_gap_s = 1.0

    def __init__(
        self,
        config: Config,
        services: Any = None,
        every_s: float = 10.0,
        settle_s: float = 5.0,
        before_settle_s: float = 2.0,
        answer_timeout_s: float = 3.0,
        warmup_s: float = 60.0,
        restart_settle_s: float = 30.0,
        allowance: Mapping[str, int] = ALLOWANCE,
        heap_trace: bool = False,
        heap_lines: int = 15,
    ) -> None:
        if every_s <= 0:
            raise ValueError("every_s must be > 0")
        self.config = config
        self.services = services
        self.every_s = every_s
        self.settle_s = settle_s
        self.before_settle_s = before_settle_s
        self.answer_timeout_s = answer_timeout_s
        self.warmup_s = warmup_s
        self.restart_settle_s = restart_settle_s
        self.allowance = dict(allowance)
        self.heap_trace = heap_trace
        self.heap_lines = heap_lines
        self._series: dict[str, _Series] = {}
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._start_ms = time.time() * 1000.0
        self._before: dict[str, dict[str, Any]] = {}
        self._peer_ports = peer_ports(config)
        self._roles: dict[str, str] = {}

    def now(self) -> float:
        """Seconds since :meth:`start`."""
        return time.monotonic() - self._t0

    def start(self) -> None:
        """Wait ``before_settle_s``, take the "before" snapshot, and start sampling every ``every_s``."""
        self._t0 = time.monotonic()
        self._start_ms = time.time() * 1000.0
        self._before = self._settled_snapshot(self.before_settle_s)
        if self.heap_trace:
            self.heap_growth()  # starts tracing in every actor
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()

    def finish(self, send_end_ms: float | None = None) -> dict[str, Any]:
        """Wait ``settle_s`` (sampling goes on), take the "after" snapshot, stop; returns
        ``{"resources": ..., "leaks": ...}`` (see :func:`resources_section`, :func:`count_leaks`).
        ``send_end_ms`` (epoch ms, :func:`send_phase_end_ms`): memory slopes are fitted up to then."""
        after = self._settled_snapshot(self.settle_s)
        heap = self.heap_growth() if self.heap_trace else None
        self.stop()
        leaks = count_leaks(self._before, after, self.allowance, self._roles)
        leaks["settle_s"] = self.settle_s
        leaks["snapshots"] = SNAPSHOTS
        with self._lock:
            series = {name: s.as_dict() for name, s in self._series.items()}
        until = None if send_end_ms is None else (send_end_ms - self._start_ms) / 1000.0
        resources = resources_section(
            series, self.every_s, self._start_ms, self.warmup_s, self.restart_settle_s, fit_until_s=until
        )
        if heap is not None:
            resources["heap_growth"] = heap
        return {"resources": resources, "leaks": leaks}

    def stop(self) -> None:
        """Stop sampling (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.answer_timeout_s + 30.0)

    # --- internals ---

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._record()

    def _record(self) -> dict[str, dict[str, Any]]:
        """Take one snapshot and append it to every series (a name missing now gets None)."""
        try:
            snap = self.snapshot()
        except Exception as exc:  # noqa: BLE001 - a sample lost, the run goes on
            log.warning("resource sample failed: %r", exc)
            return {}
        t = self.now()
        with self._lock:
            for name in set(snap) | set(self._series):
                series = self._series.get(name)
                if series is None:
                    series = self._series[name] = _Series(self._roles.get(name, name))
                series.add(t, snap.get(name))
        return snap

    def _settled_snapshot(self, settle_s: float) -> dict[str, dict[str, Any]]:
        """After ``settle_s``: :data:`SNAPSHOTS` snapshots a second apart (each one a sample of the
        series too), and per name each count's least value."""
        time.sleep(settle_s)
        snaps = []
        for i in range(SNAPSHOTS):
            if i:
                time.sleep(self.snapshot_gap_s)
            snaps.append(self._record())
        out: dict[str, dict[str, Any]] = {}
        for name in {n for s in snaps for n in s}:
            rows = [s[name] for s in snaps if name in s]
            out[name] = {
                k: min(vals) if (vals := [r[k] for r in rows if r.get(k) is not None]) else None for k in COLUMNS
            }
            for key in LEAK_COUNTS:  # each snapshot's own count first: fds and pooled move together
                counts = [c for r in rows if (c := leak_count(r, key)) is not None]
                out[name][f"leak_{key}"] = min(counts) if counts else None
            for key in ("tasks_by_coro", "tcp_peers"):  # the counters of the least busy snapshot
                with_key = [r for r in rows if r.get(key) is not None]
                if with_key:
                    out[name][key] = min(with_key, key=lambda r: sum(r[key].values()))[key]
        return out

    def heap_growth(self) -> dict[str, list[str] | None]:
        """Ask every alive actor :meth:`im_actors.vitals.Vitals.heap_growth` (``heap_lines`` lines):
        ``{actor: lines, or None when this call started its tracing}``; an actor that does not
        answer within ``answer_timeout_s`` is left out."""
        import ray

        from im_actors.cluster import actor_records

        asks: dict[Any, str] = {}
        for name, record in actor_records(self.config).items():
            if record.get("state") != "ALIVE":
                continue
            try:
                asks[self._handle(name).heap_growth.remote(self.heap_lines)] = name
            except ValueError:  # gone (a teardown)
                continue
        out: dict[str, list[str] | None] = {}
        if asks:
            # Comparing two snapshots of a large heap takes seconds: more time than a sample's answer.
            ready, _ = ray.wait(list(asks), num_returns=len(asks), timeout=self.answer_timeout_s + 60.0)
            for ref in ready:
                try:
                    out[asks[ref]] = ray.get(ref, timeout=0)
                except Exception:  # noqa: BLE001 - restarting or gone: no answer this time
                    continue
        return dict(sorted(out.items()))

    def _handle(self, name: str) -> Any:
        import ray

        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = ray.get_actor(name, namespace=ids.NAMESPACE)
        return handle

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """One sample of every alive actor and every server this run started:
        ``{name: {"pid", "rss_bytes", "uss_bytes", "fds", "tcp", "close_wait", "tcp_peers", "tasks",
        "threads", "tasks_by_coro", "ws"}}`` (a figure not read is None or absent)."""
        import ray

        from im_actors.cluster import actor_records

        records = actor_records(self.config)
        alive = {n: r for n, r in records.items() if r.get("state") == "ALIVE" and r.get("pid")}
        asks: dict[Any, tuple[str, str]] = {}
        for name in alive:
            role, _ = ids.parse_actor_name(name, self.config.actor_prefix)
            self._roles[name] = role
            try:
                handle = self._handle(name)
            except ValueError:  # gone (a teardown)
                continue
            asks[handle.vitals.remote()] = (name, "vitals")
            if role == "hub":
                asks[handle.load.remote()] = (name, "load")
        answers: dict[str, dict[str, Any]] = {}
        if asks:
            ready, _ = ray.wait(list(asks), num_returns=len(asks), timeout=self.answer_timeout_s)
            for ref in ready:
                name, what = asks[ref]
                try:
                    value = ray.get(ref, timeout=0)
                except Exception:  # noqa: BLE001 - restarting or gone: no answer this time
                    continue
                got = answers.setdefault(name, {})
                if what == "vitals":
                    got.update(
                        pid=value["pid"],
                        tasks=value["tasks"],
                        threads=value["threads"],
                        tasks_by_coro=value.get("tasks_by_coro"),
                        py_blocks=value.get("py_blocks"),
                        heap_bytes=value.get("heap_bytes"),
                    )
                else:
                    got["ws"] = value.get("connections")
        out: dict[str, dict[str, Any]] = {}
        for name, record in alive.items():
            pid = int(record["pid"])
            figures = _process_figures([pid], self._peer_ports)
            if figures is None:
                continue
            inside = answers.get(name, {})
            if inside.get("pid") not in (None, pid):  # answered from a newer process than the record
                inside = {k: v for k, v in inside.items() if k == "ws"}
            out[name] = {"pid": pid, **figures, **{k: v for k, v in inside.items() if k != "pid"}}
        for server in SERVERS:
            holder = getattr(self.services, _SERVICE_ATTR[server], None) if self.services is not None else None
            proc = getattr(holder, "proc", None)
            if proc is None or proc.poll() is not None:
                continue
            self._roles[server] = server
            figures = _process_figures(_tree(proc.pid), {})
            if figures is not None:
                out[server] = {"pid": proc.pid, **figures}
        return out
