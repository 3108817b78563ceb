"""Saturation benchmark: the highest offered rate im-actors carries, against the storage ceiling of the same run.

A ramp of steps (``--step-s`` seconds each, 10 by default) at rising offered rates, stopping after the
first step that fails. Each step deploys im-actors afresh on one local Ray cluster, drives the
synthetic workload through real WebSocket clients (``--processes`` driver processes), checks every
delivery with the oracle and tears the deployment down. The two workloads of issue 10:

    python benchmarks/saturation.py --users 200 --group-size 0 --rates 250 500 1000 2000   # 1:1
    python benchmarks/saturation.py --users 200 --group-size 200 --processes 2 --start 80 --factor 2  # group

1:1: every message from a random user to a random other user (the direct conversation of the pair);
group: one group of all ``--users``, every message from a random member, delivered to every member
(the sender's own device included). Bodies are ``--body-bytes`` (64) ASCII bytes.

**Load.** Open loop (as wrk2): every send is issued at its scheduled time, whatever is still waiting
for an ack (``--closed-loop`` gives the older driver, one send in flight per sender). Latency is
reported from the actual send and from the scheduled send time (coordinated-omission corrected),
with the schedule lag (actual - scheduled: what the load generator itself fell behind).

**The rule.** A step passes when nothing acked was lost (and nothing was duplicated or reordered),
delivery p99 measured from the schedule is under ``--p99-ms`` (1000), and acked msgs/s (the rate the
acks came in at: acked entries - 1 over the time from the first ack to the last, so that a constant
latency is not counted as lost throughput; sends never acked count against it) is at least
``--acked-ratio`` (0.95) x the offered rate. The table also shows ``thru/s``, acked entries over the
time from the step's start to its last ack (``throughput_msgs_per_s`` of drivers/run.py).
The saturation point is the highest offered rate of a passing step before the first failing one.

**The storage ceiling**, measured first in the same run: the same MongoDB-wire server, message
documents of the same shape and workload (``{conv, seq, sender, cmid, ts, kind, body, meta}``), both
unique indexes of ``im_actors/store.py`` (``(conv, seq)`` and ``(conv, sender, cmid)``), the store's
write concern (``mongo_write_concern``), ``insert_many(ordered=True)`` from one client in batches of
``--ceiling-batch`` documents (the store commits up to ``store_batch_max`` per call), in a database
of its own that is dropped afterwards. The saturation rate is printed as a ratio of it.

**Where the CPU goes.** During each step's send phase the CPU time of every deployment actor (by
role), of the MongoDB-wire server, of the driver processes and of the whole machine is sampled
(psutil) and printed in ms of CPU per acked message (machine: % of all cores busy; it includes
anything else running on the machine). With ``--stage-report`` a ``stages`` section of the run's
report (per-stage p50/p99, when the message path provides it) is printed too; ``--trace-sample
SHARE`` sets the deployment's ``trace_sample`` knob (where the message path has it) and prints them.

Every deployment knob not given (``--hubs``, ``--shards``, ``--store-writers``, ``--set KEY=VALUE``)
is the deployment's default (im_actors/config.py), printed at the start.

Every run names the MongoDB-wire server it ran on (SecantusDB commits far slower than a real
mongod). ``--json FILE`` writes everything: arguments, rule, ceiling, every step's full report and
CPU figures, the saturation point and its ratio to the ceiling. Exit status: 0 when the ramp found a
saturation point (or every step passed), 1 when the first step already failed or a run broke, 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
from pymongo.errors import PyMongoError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.run import run_workload  # noqa: E402
from drivers.synthetic import SyntheticWorkload  # noqa: E402
from drivers.workload import Plan  # noqa: E402
from im_actors import ids  # noqa: E402
from im_actors.cluster import deploy, init_local_ray, teardown  # noqa: E402
from im_actors.config import Config, ConfigError, load_config  # noqa: E402
from im_actors.services import LocalServices, describe_services, ensure_services, purge_deployment  # noqa: E402
from im_actors.store import CMID_INDEX, SEQ_INDEX, mongo_client  # noqa: E402

log = logging.getLogger("saturation")

#: Keys of the unique indexes of ``messages`` (im_actors/store.py, ``Store.setup``), by index name.
UNIQUE_INDEXES: dict[str, list[tuple[str, int]]] = {
    SEQ_INDEX: [("conv", 1), ("seq", 1)],
    CMID_INDEX: [("conv", 1), ("sender", 1), ("cmid", 1)],
}


# --- the rule ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRule:
    """When a step passes (issue 10): ``lost <= max_lost`` (0), no duplicates or order violations,
    delivery p99 from the schedule ``< p99_ms`` (ms), acked msgs/s ``>= acked_ratio`` x offered msgs/s."""

    max_lost: int = 0
    p99_ms: float = 1000.0
    acked_ratio: float = 0.95

    def judge(self, offered: float, report: Mapping[str, Any]) -> list[str]:
        """Why the step at ``offered`` msgs/s with this run ``report`` fails; empty when it passes."""
        why: list[str] = []
        if report["lost"] > self.max_lost:
            why.append(f"lost {report['lost']}")
        if report["duplicates"] or report["order_violations"]:
            why.append(f"duplicates {report['duplicates']}, order violations {report['order_violations']}")
        p99 = delivery_p99(report)
        if p99 >= self.p99_ms:
            why.append(f"delivery p99 {p99:.0f} ms >= {self.p99_ms:.0f}")
        acked = acked_rate(report)
        if acked < self.acked_ratio * offered:
            why.append(f"acked {acked:.0f}/s < {self.acked_ratio:g} x {offered:g}")
        if report["expected_deliveries"] == 0:
            why.append("nothing delivered")
        return why


def acked_rate(report: Mapping[str, Any]) -> float:
    """Acked msgs/s of a step: the rate the acks came in at, (acked - 1) / (last ack - first ack)
    (``acks_per_s``), so that a constant latency does not count as a loss of throughput; an older
    report without it gives acked / (start to last ack)."""
    if "acks_per_s" in report:
        return float(report["acks_per_s"])
    return float(report["throughput_msgs_per_s"])


def delivery_p99(report: Mapping[str, Any]) -> float:
    """Delivery p99 (ms) from the scheduled send time, or from the actual send for an older report."""
    sched = report.get("delivery_latency_from_schedule_ms") or {}
    if sched.get("count"):
        return float(sched["p99"])
    return float(report["delivery_latency_ms"]["p99"])


def ramp_rates(rates: Sequence[float] | None, start: float, factor: float, steps: int) -> list[float]:
    """The offered rates (msgs/s) of the ramp: ``rates`` as given (sorted), or ``start * factor**k`` for
    ``k < steps``. Raises ValueError for a rate <= 0, a factor <= 1 or steps < 1."""
    if rates:
        if any(r <= 0 for r in rates):
            raise ValueError("--rates must all be > 0")
        return sorted(float(r) for r in rates)
    if start <= 0 or factor <= 1 or steps < 1:
        raise ValueError("--start > 0, --factor > 1 and --steps >= 1 are required")
    return [round(start * factor**k, 3) for k in range(steps)]


def saturation_point(steps: Sequence[Mapping[str, Any]]) -> tuple[float | None, bool]:
    """``(rate, reached)`` of a ramp's steps (each ``{"rate", "passed"}``, in ramp order): the highest
    passing rate before the first failing step; ``reached`` is False when no step failed (the
    saturation lies above the last rate) and the rate is None when the first step failed."""
    best: float | None = None
    for s in steps:
        if not s["passed"]:
            return best, True
        best = float(s["rate"])
    return best, False


# --- the storage ceiling ----------------------------------------------------------------------------


def ceiling_documents(plan: Plan, now_ms: int) -> list[dict[str, Any]]:
    """Message documents of ``plan``'s sends as the store writes them: ``{conv, seq, sender, cmid, ts,
    kind, body, meta}``, seqs from 1 per conversation in plan order, group conversations named
    ``g:<group key>``, ``meta`` the driver's ``{"t", "s"}`` (ms)."""
    group_convs = {g.key: ids.group_conv(f"ceiling-{g.key}") for g in plan.groups}
    last: dict[str, int] = {}
    docs: list[dict[str, Any]] = []
    for s in plan.sends:
        conv = s.conv(group_convs)
        seq = last[conv] = last.get(conv, 0) + 1
        t = float(now_ms + int(s.at_s * 1000))
        docs.append(
            {
                "conv": conv,
                "seq": seq,
                "sender": s.sender,
                "cmid": f"c{s.index}",
                "ts": int(t),
                "kind": "text",
                "body": s.body,
                "meta": {"t": t, "s": t},
            }
        )
    return docs


async def measure_ceiling(config: Config, plan: Plan, batches: Sequence[int]) -> dict[str, Any]:
    """insert_many throughput (docs/s) of ``plan``'s documents on ``config``'s MongoDB, one client, with
    the store's write concern and unique indexes, for each batch size of ``batches``.

    Each batch size writes into a fresh collection of a database ``<mongo_db>_ceiling_<hex>``, dropped
    once measured (the database at the end). Returns ``{"docs_per_s" (the best), "by_batch": {size:
    docs/s}, "docs", "write_concern", "indexes", "drop_s": {size: s}, "slowest_batch_ms": {size: ms},
    "load_avg_1m"}``; raises pymongo's errors when
    the server fails.
    """
    # a long socket timeout: a stall of the server under load is part of its throughput, not a failure
    client = mongo_client(config.model_copy(update={"mongo_timeout_ms": max(config.mongo_timeout_ms, 120_000)}))
    db_name = f"{config.mongo_db}_ceiling_{secrets.token_hex(3)}"
    db = client[db_name]
    by_batch: dict[str, float] = {}
    drop_s: dict[str, float] = {}
    slowest_ms: dict[str, float] = {}
    indexes: dict[str, Any] = {}
    try:
        for size in batches:
            coll = db[f"messages_b{size}"]
            for name, keys in UNIQUE_INDEXES.items():
                await coll.create_index(keys, unique=True, name=name)
            docs = ceiling_documents(plan, int(time.time() * 1000))
            started = time.perf_counter()
            slowest = 0.0
            for i in range(0, len(docs), size):
                t = time.perf_counter()
                await coll.insert_many(docs[i : i + size], ordered=True)
                slowest = max(slowest, time.perf_counter() - t)
            elapsed = time.perf_counter() - started
            slowest_ms[str(size)] = round(slowest * 1000.0, 1)
            by_batch[str(size)] = round(len(docs) / elapsed, 1) if elapsed > 0 else 0.0
            indexes = {k: v for k, v in (await coll.index_information()).items() if k != "_id_"}
            started = time.perf_counter()
            try:
                await coll.drop()
            except PyMongoError as exc:  # the figure stands; the database is dropped at the end
                log.warning("could not drop %s.%s: %s", db_name, coll.name, exc)
            drop_s[str(size)] = round(time.perf_counter() - started, 3)
    finally:
        try:
            await client.drop_database(db_name)
        except PyMongoError as exc:  # the figures stand; the folder goes with the server at the end
            log.warning("could not drop %s: %s", db_name, exc)
        finally:
            await client.close()
    return {
        "docs_per_s": max(by_batch.values()) if by_batch else 0.0,
        "by_batch": by_batch,
        "docs": len(plan.sends),
        "write_concern": config.mongo_write_concern,
        "indexes": indexes,
        "drop_s": drop_s,
        "slowest_batch_ms": slowest_ms,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def index_keys(info: Mapping[str, Any]) -> dict[str, tuple[tuple[str, int], tuple[tuple[str, int], ...]]]:
    """``{name: (unique, keys)}`` of an ``index_information()`` answer, unique ones only, comparable."""
    return {
        name: (("unique", 1), tuple((str(k), int(d)) for k, d in spec["key"]))
        for name, spec in info.items()
        if spec.get("unique")
    }


async def deployment_indexes(config: Config) -> dict[str, Any]:
    """``index_information()`` of the deployment's ``messages`` collection (what the store made)."""
    client = mongo_client(config)
    try:
        return dict(await client[config.mongo_db]["messages"].index_information())
    finally:
        await client.close()


# --- CPU per process --------------------------------------------------------------------------------


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


class CpuSampler:
    """Samples cumulative CPU seconds of groups of processes every ``interval_s`` in a thread.

    ``groups()`` returns ``{group: [pid, ...]}`` (asked again at every sample: processes come and go);
    a process that exits keeps its last reading. ``"machine"`` is the whole machine's busy time
    (all cores). :meth:`window` gives each group's CPU seconds between two wall-clock times.
    """

    def __init__(self, groups: Callable[[], dict[str, list[int]]], interval_s: float = 0.2) -> None:
        self._groups = groups
        self._interval_s = interval_s
        self._procs: dict[int, psutil.Process] = {}
        self._last: dict[int, float] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def _sample(self) -> None:
        try:
            groups = self._groups()
        except Exception as exc:  # noqa: BLE001 - a sample lost, the run goes on
            log.debug("cpu sampler: %r", exc)
            return
        out: dict[str, float] = {}
        for group, pids in groups.items():
            total = 0.0
            for pid in pids:
                try:
                    proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                    self._last[pid] = _cpu_s(proc)
                except psutil.Error:
                    pass
                total += self._last.get(pid, 0.0)
            out[group] = total
        out["machine"] = _machine_busy_s()
        self.samples.append((time.time(), out))

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds of every group between wall-clock ``start`` and ``end`` (linear between samples)."""
        return cpu_window(self.samples, start, end)


def cpu_window(samples: Sequence[tuple[float, Mapping[str, float]]], start: float, end: float) -> dict[str, float]:
    """CPU seconds of each group between ``start`` and ``end`` from cumulative ``samples`` ``(time, {group:
    cpu_s})`` in time order, interpolating linearly between the samples around each bound (a group
    missing from a sample counts from its first sample on)."""
    if not samples or end <= start:
        return {}

    def at(t: float, group: str) -> float:
        pts = [(ts, vals[group]) for ts, vals in samples if group in vals]
        if not pts:
            return 0.0
        if t <= pts[0][0]:
            return pts[0][1]
        for (t1, v1), (t2, v2) in zip(pts, pts[1:], strict=False):
            if t1 <= t <= t2:
                return v1 + (v2 - v1) * ((t - t1) / (t2 - t1) if t2 > t1 else 1.0)
        return pts[-1][1]

    groups = {g for _, vals in samples for g in vals}
    return {g: max(at(end, g) - at(start, g), 0.0) for g in sorted(groups)}


def _spawned_children() -> list[int]:
    """Pids of this process's multiprocessing children (the driver processes)."""
    out = []
    for child in psutil.Process().children():
        try:
            if any("multiprocessing" in part for part in child.cmdline()):
                out.append(child.pid)
        except psutil.Error:
            pass
    return out


def actor_pids(config: Config) -> dict[str, list[int]]:
    """``{role: [pid, ...]}`` of the deployment's alive actors, from Ray's GCS."""
    out: dict[str, list[int]] = {}
    for info in ray._private.state.actors().values():  # noqa: SLF001 - as im_actors.cluster.actor_nodes
        if info.get("State") != "ALIVE" or not info.get("Pid"):
            continue
        try:
            role, _ = ids.parse_actor_name(info.get("Name", ""), config.actor_prefix)
        except ValueError:
            continue
        out.setdefault(role, []).append(int(info["Pid"]))
    return out


# --- one step ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RampOptions:
    """Everything of a ramp but its rates (see the command-line help for each)."""

    users: int
    group_size: int
    body_bytes: int
    step_s: float
    processes: int
    open_loop: bool
    send_deadline_s: float
    drain_timeout_s: float
    seed: int


#: Deployments tried per step before the ramp counts as broken.
_DEPLOY_ATTEMPTS = 2


def run_step(base: Config, services: LocalServices, rate: float, opts: RampOptions) -> dict[str, Any]:
    """Deploy ``base`` afresh under a new deployment name, drive one step at ``rate`` msgs/s, tear down;
    returns ``{"report" (drivers.run's), "cpu" (see the module docstring)}``."""
    cfg = base.model_copy(update={"deployment": f"sat{secrets.token_hex(3)}"})
    for attempt in range(_DEPLOY_ATTEMPTS):
        try:
            dep = deploy(cfg)
            break
        except Exception as exc:  # noqa: BLE001 - e.g. the storage server slow to answer under load: once more
            teardown(cfg)
            purge_deployment(cfg)
            if attempt + 1 == _DEPLOY_ATTEMPTS:
                raise
            log.warning("deploying for the step at %g msgs/s failed (%s); once more in 5 s", rate, exc)
            time.sleep(5.0)
    mongo_proc = services.mongo.proc if services.mongo is not None else None
    mongo_pid = mongo_proc.pid if mongo_proc is not None else None
    pids = actor_pids(cfg)

    def groups() -> dict[str, list[int]]:
        g = {role: list(p) for role, p in pids.items()}
        if mongo_pid is not None:
            g["mongodb"] = [mongo_pid]
        g["driver"] = [os.getpid(), *_spawned_children()]
        return g

    try:
        workload = SyntheticWorkload(
            users=opts.users,
            rate=rate,
            duration_s=opts.step_s,
            msg_bytes=opts.body_bytes,
            group_size=opts.group_size,
            seed=opts.seed,
        )
        with CpuSampler(groups) as sampler:
            report = run_workload(
                dep.router_url,
                workload,
                processes=opts.processes,
                progress=False,
                drain_timeout_s=opts.drain_timeout_s,
                send_deadline_s=opts.send_deadline_s,
                open_loop=opts.open_loop,
            )
        cpu: dict[str, Any] = {}
        t0 = report.get("t0_s")
        if t0 and report["duration_s"] > 0:
            window = sampler.window(float(t0), float(t0) + float(report["duration_s"]))
            cpu = {
                "window_s": report["duration_s"],
                "cpu_s": {k: round(v, 3) for k, v in window.items()},
                "ms_per_msg": {k: round(v * 1000.0 / report["acked"], 3) for k, v in window.items() if report["acked"]},
                "machine_busy_pct": round(100.0 * window.get("machine", 0.0) / report["duration_s"], 1),
                "cores": psutil.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
    finally:
        teardown(cfg)
        purge_deployment(cfg)
    report["config"] = cfg.knobs()
    return {"report": report, "cpu": cpu}


# --- output -----------------------------------------------------------------------------------------

_HEADER = (
    ("offered", 8),
    ("sent", 7),
    ("acked/s", 8),
    ("ratio", 6),
    ("thru/s", 8),
    ("deliv/s", 8),
    ("lost", 5),
    ("dup", 4),
    ("ord", 4),
    ("ack50", 7),
    ("ack99", 7),
    ("ack99s", 7),
    ("dlv50", 7),
    ("dlv99", 7),
    ("dlv50s", 7),
    ("dlv99s", 7),
    ("lag99", 7),
    ("inflt", 6),
    ("verdict", 0),
)


def format_header() -> str:
    """The step table's header: latencies in ms; ``s`` = from the scheduled send time; lag = schedule lag."""
    return " ".join(f"{h:>{w}}" if w else h for h, w in _HEADER)


def format_row(rate: float, report: Mapping[str, Any], why: Sequence[str]) -> str:
    """One step's row of the table (see :func:`format_header`)."""
    a, d = report["ack_latency_ms"], report["delivery_latency_ms"]
    a_s = report.get("ack_latency_from_schedule_ms") or {}
    d_s = report.get("delivery_latency_from_schedule_ms") or {}
    lag = report.get("schedule_lag_ms") or {}
    vals: list[Any] = [
        f"{rate:g}",
        report["sent"],
        f"{acked_rate(report):.1f}",
        f"{acked_rate(report) / rate:.3f}",
        f"{report['throughput_msgs_per_s']:.1f}",
        f"{report['deliveries_per_s']:.0f}",
        report["lost"],
        report["duplicates"],
        report["order_violations"],
        f"{a['p50']:.1f}",
        f"{a['p99']:.1f}",
        f"{a_s.get('p99', 0.0):.1f}",
        f"{d['p50']:.1f}",
        f"{d['p99']:.1f}",
        f"{d_s.get('p50', 0.0):.1f}",
        f"{d_s.get('p99', 0.0):.1f}",
        f"{lag.get('p99', 0.0):.1f}",
        report.get("sends_in_flight_max", 0),
        "pass" if not why else "FAIL: " + "; ".join(why),
    ]
    return " ".join(f"{v:>{w}}" if w else str(v) for v, (_, w) in zip(vals, _HEADER, strict=True))


def format_cpu(cpu: Mapping[str, Any]) -> str:
    """``# cpu ms/msg: mongodb 2.31, conv 1.52, ...; machine busy 177% of 200%``."""
    per = cpu.get("ms_per_msg") or {}
    if not per:
        return "#   cpu: not measured"
    parts = [f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if k != "machine"]
    cores = int(cpu.get("cores") or 1)
    return (
        f"#   cpu ms/msg: {', '.join(parts)}; machine busy {cpu.get('machine_busy_pct', 0):.0f}% of {100 * cores}%"
        f" (everything running on it; load average {cpu.get('load_avg_1m', 0):g})"
    )


def has_stages(stages: Any) -> bool:
    """True when a report's ``stages`` section holds any figure (drivers/stages.py reports
    ``{"traced": 0, "steps": {}}`` when nothing was traced)."""
    if isinstance(stages, Mapping) and "steps" in stages:
        return bool(stages["steps"])
    return bool(stages)


def format_stages(stages: Any) -> list[str]:
    """Lines of a report's ``stages`` section: ``{"traced": n, "steps": {step: {"p50", "p99", "count",
    ...}}}`` (drivers/stages.py), ``{step: {...}}`` (ms) or a list of ``{"stage", "p50", "p99"}``;
    anything else is printed as JSON."""
    rows: list[tuple[str, Mapping[str, Any]]] = []
    head: list[str] = []
    if isinstance(stages, Mapping) and isinstance(stages.get("steps"), Mapping):
        head = [f"#   stages of {int(stages.get('traced', 0)):,} traced receipts (each step ends at its stage):"]
        stages = stages["steps"]
    if isinstance(stages, Mapping):
        rows = [(str(k), v) for k, v in stages.items() if isinstance(v, Mapping)]
    elif isinstance(stages, list):
        rows = [(str(v.get("stage", i)), v) for i, v in enumerate(stages) if isinstance(v, Mapping)]
    if not rows:
        return [f"#   stages: {json.dumps(stages, default=str)}"]
    width = max(len(name) for name, _ in rows)
    out = [*head, f"#   {'stage':<{width}} {'p50 ms':>9} {'p99 ms':>9} {'count':>8}"]
    for name, v in rows:
        out.append(
            f"#   {name:<{width}} {float(v.get('p50', 0)):>9.2f} {float(v.get('p99', 0)):>9.2f} "
            f"{int(v.get('count', 0)):>8}"
        )
    return out


# --- main -------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--users", type=int, default=200, help="simulated users (one client each)")
    ap.add_argument("--group-size", type=int, default=0, help="0: 1:1 messages; N: groups of N members")
    ap.add_argument("--body-bytes", type=int, default=64, help="message body (bytes)")
    ap.add_argument("--rates", type=float, nargs="+", help="offered rates of the ramp (msgs/s)")
    ap.add_argument("--start", type=float, default=250.0, help="first offered rate without --rates (msgs/s)")
    ap.add_argument("--factor", type=float, default=2.0, help="rate factor between steps without --rates")
    ap.add_argument("--steps", type=int, default=8, help="most steps without --rates")
    ap.add_argument("--step-s", type=float, default=10.0, help="send phase of each step (s)")
    ap.add_argument("--processes", type=int, default=1, help="driver processes")
    ap.add_argument("--closed-loop", action="store_true", help="one send in flight per sender (the old driver)")
    ap.add_argument("--p99-ms", type=float, default=1000.0, help="a step fails at delivery p99 >= this (ms)")
    ap.add_argument("--acked-ratio", type=float, default=0.95, help="a step fails below this x offered acked/s")
    ap.add_argument("--hubs", type=int, help="hub actors [the deployment's default]")
    ap.add_argument("--shards", type=int, help="session and conversation shards [the deployment's default]")
    ap.add_argument(
        "--store-writers", type=int, help="store writer actors, 0: shards commit [the deployment's default]"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other configuration knob (im_actors/config.py), e.g. --set hub_batch_ms=0.5",
    )
    ap.add_argument("--ceiling-docs", type=int, default=20000, help="documents per storage-ceiling batch size")
    ap.add_argument("--ceiling-batch", type=int, nargs="+", help="insert_many batch sizes [100 store_batch_max]")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the storage ceiling")
    ap.add_argument("--send-deadline", type=float, default=30.0, help="each send's retry deadline (s)")
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="bound of each step's final catch-up (s)")
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument("--stage-report", action="store_true", help="print the report's per-stage p50/p99, if any")
    ap.add_argument(
        "--trace-sample",
        type=float,
        help="share of sends traced through every stage (the trace_sample knob, 0..1); implies --stage-report",
    )
    ap.add_argument("--json", type=Path, help="write everything here")
    return ap


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The knobs of every step's configuration; raises ConfigError naming a bad --set key."""
    given = {
        "hubs": args.hubs,
        "session_shards": args.shards,
        "conv_shards": args.shards,
        "store_writers": args.store_writers,
        "trace_sample": args.trace_sample,
    }
    out: dict[str, Any] = {k: v for k, v in given.items() if v is not None}  # unset: the deployment's default
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ceiling and the ramp; see the module docstring for the exit status."""
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        rates = ramp_rates(args.rates, args.start, args.factor, args.steps)
    except ValueError as exc:
        ap.error(str(exc))
    if args.users < 2 or args.step_s <= 0 or args.processes < 1:
        ap.error("--users >= 2, --step-s > 0 and --processes >= 1 are required")
    rule = StepRule(p99_ms=args.p99_ms, acked_ratio=args.acked_ratio)
    opts = RampOptions(
        users=args.users,
        group_size=args.group_size,
        body_bytes=args.body_bytes,
        step_s=args.step_s,
        processes=args.processes,
        open_loop=not args.closed_loop,
        send_deadline_s=args.send_deadline,
        drain_timeout_s=args.drain_timeout,
        seed=args.seed,
    )
    try:
        overrides = _overrides(args)
        # every knob checked once, before anything starts: a bad one fails here naming its key
        base = load_config(dev_login=True, jwt_secret=secrets.token_hex(32), router_port=0, push_workers=0, **overrides)
        SyntheticWorkload(users=args.users, rate=rates[0], duration_s=1.0, group_size=args.group_size).build("")
    except (ConfigError, ValueError) as exc:
        print(f"saturation: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    out: dict[str, Any] = {"args": vars(args) | {"json": str(args.json) if args.json else None}}
    out["rule"] = asdict(rule)
    out["rates"] = rates
    steps: list[dict[str, Any]] = []
    broke = False
    base, services = ensure_services(base)
    try:
        init_local_ray(base)
        server = describe_services(base)["mongodb"]
        out["services"] = {"mongodb": server}
        out["machine"] = {"cores": psutil.cpu_count(), "ray": ray.__version__, "python": sys.version.split()[0]}
        workload_name = "1:1" if args.group_size == 0 else f"group of {args.group_size}"
        print(
            f"# MongoDB-wire server: {server.get('server')} {server.get('version')}; "
            f"{psutil.cpu_count()} cores; Ray {ray.__version__}; workload {workload_name}, {args.users} users, "
            f"{args.body_bytes}-byte bodies, {'open' if opts.open_loop else 'closed'} loop, "
            f"{args.processes} driver process(es), {args.step_s:g} s steps",
            flush=True,
        )
        knobs = base.knobs()
        shown = ["hubs", "session_shards", "conv_shards", "store_writers", "hub_batch_ms", "fanout_batch_ms"]
        shown += [k for k in overrides if k not in shown]
        print("# deployment: " + " ".join(f"{k}={knobs.get(k)}" for k in shown), flush=True)
        if not args.no_ceiling:
            batches = args.ceiling_batch or sorted({100, base.store_batch_max})
            plan = SyntheticWorkload(
                users=args.users,
                rate=float(args.ceiling_docs),
                duration_s=1.0,
                msg_bytes=args.body_bytes,
                group_size=args.group_size,
                seed=args.seed,
            ).build("ceiling.")
            try:
                ceiling = asyncio.run(measure_ceiling(base, plan, batches))
            except PyMongoError as exc:
                ceiling = {"error": repr(exc), "docs_per_s": 0.0, "by_batch": {}, "indexes": {}}
            out["ceiling"] = ceiling
        if not args.no_ceiling and "error" in out["ceiling"]:
            print(f"# storage ceiling: FAILED ({out['ceiling']['error']})", flush=True)
        elif not args.no_ceiling:
            ceiling = out["ceiling"]
            by = ", ".join(f"batch {k}: {v:,.0f}" for k, v in ceiling["by_batch"].items())
            print(
                f"# storage ceiling: {ceiling['docs_per_s']:,.0f} docs/s ({by}; {ceiling['docs']:,} documents, "
                f"insert_many from one client, w={ceiling['write_concern']}, unique indexes "
                f"{', '.join(ceiling['indexes'])}; slowest batch {max(ceiling['slowest_batch_ms'].values()):,.0f} ms; "
                f"load average {ceiling['load_avg_1m']:g})",
                flush=True,
            )
        print(
            f"# a step passes with lost <= {rule.max_lost}, delivery p99 from schedule < {rule.p99_ms:g} ms, "
            f"acked/s >= {rule.acked_ratio:g} x offered; latencies in ms, 's' = from the scheduled send time",
            flush=True,
        )
        print(format_header(), flush=True)
        for rate in rates:
            try:
                step = run_step(base, services, rate, opts)
            except Exception as exc:  # noqa: BLE001 - the ramp ends, the figures so far are kept
                log.exception("step at %g msgs/s broke", rate)
                steps.append({"rate": rate, "passed": False, "why": [f"run broke: {exc!r}"]})
                broke = True
                break
            why = rule.judge(rate, step["report"])
            steps.append({"rate": rate, "passed": not why, "why": why, **step})
            print(format_row(rate, step["report"], why), flush=True)
            print(format_cpu(step["cpu"]), flush=True)
            if (args.stage_report or args.trace_sample) and has_stages(step["report"].get("stages")):
                for line in format_stages(step["report"]["stages"]):
                    print(line, flush=True)
            if why:
                break
        if steps and "report" in steps[0] and out.get("ceiling", {}).get("indexes"):
            built = index_keys(asyncio.run(deployment_indexes(base)))
            wanted = index_keys(out["ceiling"]["indexes"])
            out["ceiling_indexes_match_store"] = built == wanted
            if built != wanted:
                print(f"# WARNING: the store's unique indexes {built} differ from the ceiling's {wanted}", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        services.stop()
    sat, reached = saturation_point(steps)
    out["steps"] = steps
    out["saturation_msgs_per_s"] = sat
    out["saturation_reached"] = reached
    ceiling_rate = float(out.get("ceiling", {}).get("docs_per_s") or 0.0)
    out["saturation_of_ceiling"] = round(sat / ceiling_rate, 4) if sat and ceiling_rate else None
    if broke:
        print(f"# the ramp broke at {steps[-1]['rate']:g} msgs/s: {steps[-1]['why'][0]}", flush=True)
    if sat is None and broke:
        print("# saturation: not measured", flush=True)
    elif sat is None:
        print(f"# saturation: below {rates[0]:g} msgs/s (the first step failed)", flush=True)
    elif not reached:
        print(f"# saturation: not reached; every step passed, up to {sat:g} msgs/s", flush=True)
    else:
        print(f"# saturation: {sat:g} msgs/s (the highest passing step before the first failing one)", flush=True)
    if sat and ceiling_rate:
        print(
            f"# saturation / storage ceiling: {sat:g} / {ceiling_rate:,.0f} = {out['saturation_of_ceiling']:.3f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 1 if broke or sat is None else 0


if __name__ == "__main__":
    sys.exit(main())
