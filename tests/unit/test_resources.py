"""Resource figures of a run (drivers.resources) on synthetic samples: the memory slope with restarts
and warm-up left out, the leak count before/after, the sampler's bookkeeping, the report's parts."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest

from drivers.resources import (
    ALLOWANCE,
    ResourceSampler,
    _Series,
    count_leaks,
    leak_count,
    memory_slope,
    peer_ports,
    pooled_slope,
    resources_section,
    role_totals,
    send_phase_end_ms,
    summary_lines,
)
from drivers.verdict import Threshold, judge, metric_value
from im_actors.config import load_config
from im_actors.report import RESOURCE_FIGURES, figures, render_html
from im_actors.vitals import Vitals

MB = 1e6


def _series(points: list[tuple[float, int | None, float | None]], role: str = "hub") -> dict[str, Any]:
    """An actor's columns from ``(t_s, pid, rss_mb)`` points, through the sampler's own bookkeeping."""
    s = _Series(role)
    for t, pid, rss in points:
        s.add(t, None if pid is None else {"pid": pid, "rss_bytes": None if rss is None else int(rss * MB)})
    return s.as_dict()


def test_pooled_slope_gives_each_segment_its_own_intercept() -> None:
    a = [(float(t), 100 + 2.0 * t) for t in range(10)]
    b = [(float(t), 40 + 2.0 * t) for t in range(20, 30)]  # same slope, far lower: a fresh process
    assert pooled_slope([a, b]) == pytest.approx(2.0)
    # one line through both would read as memory given back
    assert pooled_slope([a + b]) < 0  # type: ignore[operator]
    assert pooled_slope([[(1.0, 5.0)], []]) is None
    assert pooled_slope([[(1.0, 5.0), (1.0, 6.0)]]) is None


def test_memory_slope_leaves_out_the_warm_up_and_the_time_after_a_restart() -> None:
    points: list[tuple[float, int | None, float | None]] = []
    for t in range(0, 600, 10):
        if t < 60:
            points.append((t, 11, 80 + t))  # warm-up: fills caches fast
        elif t < 300:
            points.append((t, 11, 150 + (t - 60) / 60 * 1.5))  # 1.5 MB/min
        elif t == 300:
            points.append((t, None, None))  # restarting: not answered
        elif t < 340:
            points.append((t, 12, 80 + (t - 310)))  # the new process warms up again
        else:
            points.append((t, 12, 120 + (t - 340) / 60 * 1.5))
    series = _series(points)
    assert series["restarts_at_s"] == [310.0] and series["incarnation"][-1] == 1
    assert series["pid"][30] is None and series["incarnation"][30] is None
    fit = memory_slope([series], warmup_s=60, restart_settle_s=30)
    assert fit.mb_per_min == pytest.approx(1.5, abs=1e-3)
    assert fit.segments == 2 and fit.samples == len(points) - 6 - 1 - 3
    # without the exclusions the warm-ups dominate
    assert memory_slope([series], warmup_s=0, restart_settle_s=0).mb_per_min != pytest.approx(1.5, abs=0.2)
    # the same slope shared by two processes of a role, one of them flat
    flat = _series([(t, 21, 100.0) for t in range(0, 600, 10)])
    both = memory_slope([series, flat], warmup_s=60, restart_settle_s=30).mb_per_min
    assert both is not None and 0 < both < 1.5


def test_resources_section_per_role_and_steepest() -> None:
    actors = {
        "d-im-hub-0": _series([(t, 1, 100 + t / 60 * 3) for t in range(0, 301, 10)], "hub"),
        "d-im-hub-1": _series([(t, 2, 100 + t / 60 * 1) for t in range(0, 301, 10)], "hub"),
        "d-im-conv-0": _series([(t, 3, 130.0) for t in range(0, 301, 10)], "conv"),
        "mongodb": _series([(t, 4, 50 + t) for t in range(0, 301, 10)], "mongodb"),
    }
    out = resources_section(actors, every_s=10, start_ms=1.0e12, warmup_s=60, restart_settle_s=30)
    assert out["warmup_s"] == 60
    assert out["roles"]["hub"]["mem_slope_mb_per_min"] == pytest.approx(2.0, abs=1e-3)
    assert out["actors"]["d-im-hub-0"]["mem_slope_mb_per_min"] == pytest.approx(3.0, abs=1e-3)
    assert out["roles"]["hub"]["first_rss_bytes"] == 200 * MB
    assert out["roles"]["hub"]["last_rss_bytes"] == pytest.approx((100 + 15 + 100 + 5) * MB, rel=1e-6)
    assert out["roles"]["conv"]["mem_slope_mb_per_min"] == 0
    # the storage server's data grows fastest, but only actor roles are judged
    assert out["roles"]["mongodb"]["mem_slope_mb_per_min"] == pytest.approx(60.0, abs=1e-2)
    assert (out["mem_slope_role"], out["mem_slope_mb_per_min"]) == ("hub", pytest.approx(2.0, abs=1e-3))
    # a short run keeps two thirds of its samples
    short = resources_section({"d-im-hub-0": actors["d-im-hub-0"]}, 10, 0.0, warmup_s=600)
    assert short["warmup_s"] == 100.0
    assert role_totals([actors["d-im-hub-0"], actors["d-im-hub-1"]])[0] == (0.0, 200 * MB)


def test_slopes_stop_at_the_end_of_the_send_phase() -> None:
    # flat while sending; the final catch-up (every client syncing) is a step, not a trend
    points = [(t, 1, 130.0 + (8.0 if t > 600 else 0.0)) for t in range(0, 700, 10)]
    actors = {"d-im-session-0": _series(points, "session")}
    whole = resources_section(actors, every_s=10, start_ms=0.0)
    sending = resources_section(actors, every_s=10, start_ms=0.0, fit_until_s=600.0)
    assert whole["mem_slope_mb_per_min"] > 0.5
    assert sending["mem_slope_mb_per_min"] == 0 and sending["fit_until_s"] == 600.0
    assert sending["roles"]["session"]["last_rss_bytes"] == 138 * MB  # first/last/peak cover every sample
    assert send_phase_end_ms({"t0_s": 1000.0, "duration_s": 600.5}) == 1_600_500.0
    assert send_phase_end_ms({"t0_s": 1000.0}) is None


def _row(fds: int, tasks: int | None, tcp: int, pooled: int = 0) -> dict[str, Any]:
    return {"fds": fds, "tasks": tasks, "tcp": tcp, "pooled": pooled}


def test_leaks_beyond_the_allowance_per_actor_pooled_sockets_left_out() -> None:
    roles = {"d-im-hub-0": "hub", "d-im-session-0": "session", "d-im-conv-0": "conv", "mongodb": "mongodb"}
    before = {
        "d-im-hub-0": _row(100, 4, 10),
        "d-im-session-0": {**_row(50, 10, 7, pooled=0), "tasks_by_coro": {"Hub._serve": 1}},
        "d-im-conv-0": _row(55, 8, 10, pooled=3),
        "mongodb": _row(30, None, 3),
    }
    after = {
        "d-im-hub-0": _row(100 + ALLOWANCE["fds"] + 40, 4 + 50, 10 + 40),  # a connection leak of 40 sockets
        "d-im-session-0": {**_row(50 + 60, 15, 7 + 60, pooled=60), "tasks_by_coro": {"Hub._serve": 6}},
        "d-im-conv-0": _row(55 + 5, 8, 10 + 5, pooled=3 + 2),
        "mongodb": _row(300, None, 280),
    }
    out = count_leaks(before, after, ALLOWANCE, roles)
    hub = out["actors"]["d-im-hub-0"]
    assert hub["diff"] == {"fds": ALLOWANCE["fds"] + 40, "tasks": 50, "connections": 40, "pooled": 0}
    assert hub["leaked"] == {"fds": 40, "tasks": 50 - ALLOWANCE["tasks"], "connections": 40 - ALLOWANCE["connections"]}
    session = out["actors"]["d-im-session-0"]
    assert session["diff"]["pooled"] == 60 and session["diff"]["connections"] == 0  # a pool that filled
    assert session["leaked"] == {"fds": 0, "tasks": 0, "connections": 0}
    assert session["tasks_by_coro_grown"] == {"Hub._serve": 5}
    assert out["actors"]["mongodb"]["leaked"] == {"fds": 0, "connections": 0}  # servers are reported only
    assert out["leaked"] == {"fds": 40, "tasks": 50 - ALLOWANCE["tasks"], "connections": 40 - ALLOWANCE["connections"]}
    assert out["leaking"] == ["d-im-hub-0"]
    assert out["roles"]["conv"]["before"]["pooled"] == 3 and out["roles"]["conv"]["diff"]["connections"] == 3
    assert out["roles"]["mongodb"]["after"]["fds"] == 300
    # a count read only once is not a difference
    one_sided = count_leaks({"d-im-hub-0": _row(1, None, 1)}, {"d-im-hub-0": _row(1, 9, 1)}, ALLOWANCE, roles)
    assert "tasks" not in one_sided["actors"]["d-im-hub-0"]["diff"] and one_sided["leaked"]["tasks"] == 0
    assert leak_count(_row(60, 3, 20, pooled=12), "fds") == 48
    assert leak_count(_row(60, 3, 20, pooled=12), "connections") == 8
    assert leak_count({"fds": None}, "fds") is None


class _CannedSampler(ResourceSampler):
    """A sampler whose snapshots come from a list (no Ray, no processes)."""

    snapshot_gap_s = 0.0

    def __init__(self, snaps: Iterator[dict[str, dict[str, Any]]]) -> None:
        super().__init__(load_config(deployment="d"), every_s=3600, settle_s=0, before_settle_s=0)
        self._snaps = snaps

    def snapshot(self) -> dict[str, dict[str, Any]]:
        snap = next(self._snaps)
        for name in snap:
            self._roles[name] = name.rpartition("im-")[2].split("-")[0]
        return snap


def test_sampler_takes_the_least_of_its_snapshots_before_and_after() -> None:
    def sample(pid: int, fds: int, tasks: int, tcp: int, pooled: int, rss_mb: float) -> dict[str, Any]:
        return {"pid": pid, "rss_bytes": int(rss_mb * MB), **_row(fds, tasks, tcp, pooled)}

    snaps = iter(
        [
            {"d-im-hub-0": sample(1, 50, 5, 9, 0, 100)},
            {"d-im-hub-0": sample(1, 58, 9, 12, 0, 101)},  # a call in flight: a moment, not a leak
            {"d-im-hub-0": sample(1, 51, 4, 10, 0, 101)},
            {"d-im-hub-0": sample(2, 90, 30, 40, 20, 90)},  # restarted, pools full
            {"d-im-hub-0": sample(2, 80, 20, 35, 20, 91)},
            {"d-im-hub-0": sample(2, 85, 25, 38, 20, 91)},
        ]
    )
    sampler = _CannedSampler(snaps)
    sampler.start()
    out = sampler.finish()
    hub = out["leaks"]["actors"]["d-im-hub-0"]
    assert hub["role"] == "hub"
    assert hub["before"] == {"fds": 50, "tasks": 4, "connections": 9, "pooled": 0}
    assert hub["after"] == {"fds": 60, "tasks": 20, "connections": 15, "pooled": 20}
    assert hub["leaked"] == {"fds": 0, "tasks": 16 - ALLOWANCE["tasks"], "connections": 0}
    series = out["resources"]["actors"]["d-im-hub-0"]
    assert series["pid"] == [1, 1, 1, 2, 2, 2] and series["incarnation"] == [0, 0, 0, 1, 1, 1]
    assert len(series["restarts_at_s"]) == 1 and series["rss_bytes"][0] == 100 * MB
    assert out["resources"]["roles"]["hub"]["restarts"] == 1
    assert out["leaks"]["snapshots"] == 3 and out["leaks"]["settle_s"] == 0
    with pytest.raises(ValueError, match="every_s"):
        ResourceSampler(load_config(deployment="d"), every_s=0)


def test_peer_ports_name_the_storage_servers() -> None:
    cfg = load_config(
        deployment="d",
        mongo_url="mongodb://127.0.0.1:27017,127.0.0.1:27018/?replicaSet=r",
        redis_url="redis://:pw@127.0.0.1:6390/0",
        rabbitmq_url="amqp://guest:guest@127.0.0.1:5673/",
    )
    assert peer_ports(cfg) == {27017: "mongodb", 27018: "mongodb", 6390: "redis", 5673: "rabbitmq"}


def _report_with_resources() -> dict[str, Any]:
    actors = {
        "d-im-hub-0": _series([(t, 1 if t < 100 else 2, 100 + t / 60) for t in range(0, 301, 10)], "hub"),
        "mongodb": _series([(t, 4, 50.0) for t in range(0, 301, 10)], "mongodb"),
    }
    resources = resources_section(actors, every_s=10, start_ms=1.8e12)
    leaks = count_leaks(
        {"d-im-hub-0": _row(10, 2, 3)}, {"d-im-hub-0": _row(11, 2, 3)}, ALLOWANCE, {"d-im-hub-0": "hub"}
    )
    leaks["settle_s"] = 5.0
    return {"resources": resources, "leaks": leaks, "timeline": {}, "histograms": {}}


def test_thresholds_on_resources_and_nan_without_them() -> None:
    report = {**_report_with_resources(), "lost": 0, "acked": 1, "delivered": 1, "expected_deliveries": 1}
    assert metric_value(report, "mem_slope_mb_per_min") == pytest.approx(1.0, abs=1e-3)
    assert [metric_value(report, f"leaked_{k}") for k in ("fds", "tasks", "connections")] == [0, 0, 0]
    held = [Threshold.parse(t) for t in ("mem_slope_mb_per_min<1.5", "leaked_fds==0", "leaked_connections==0")]
    assert judge(report, held).passed
    bare = {"lost": 0, "acked": 1, "delivered": 1, "expected_deliveries": 1}
    assert math.isnan(metric_value(bare, "leaked_tasks"))
    verdict = judge(bare, [Threshold.parse("leaked_tasks==0")])
    assert not verdict.passed and verdict.broken == ("threshold leaked_tasks==0 broken: leaked_tasks = nan",)


def test_report_draws_memory_per_role_and_tables() -> None:
    report = _report_with_resources()
    figs = figures(report)
    assert "memory" in figs
    titles = [ax.get_title() for ax in figs["memory"].axes]
    assert titles == ["hub: +1.00 MB/min", "mongodb: +0.00 MB/min"]
    assert figs["memory"].get_suptitle() == RESOURCE_FIGURES["memory"]
    page = render_html(report)
    assert "<h2>Resources</h2>" in page and "<h2>Leaks</h2>" in page and "RSS slope MB/min" in page
    assert "memory" not in figures({"timeline": {}, "histograms": {}})
    lines = summary_lines(report)
    assert any(line.strip().startswith("hub") and "+1.000 MB/min" in line and "restarts 1" in line for line in lines)
    assert lines[-1].strip().startswith("leaked beyond the allowance: fds 0  tasks 0  connections 0")


async def test_vitals_counts_the_tasks_on_the_loop_by_coroutine() -> None:
    async def idle() -> None:
        await asyncio.sleep(60)

    tasks = [asyncio.create_task(idle()) for _ in range(3)]
    try:
        await asyncio.sleep(0)
        out = await Vitals().vitals()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    names = out["tasks_by_coro"]
    assert names[f"{test_vitals_counts_the_tasks_on_the_loop_by_coroutine.__name__}.<locals>.idle"] == 3
    assert out["tasks"] >= 4 and out["threads"] >= 1 and out["pid"] > 0


def test_a_killed_process_not_reaped_yet_is_not_sampled() -> None:
    import subprocess
    import time

    import psutil

    from drivers.resources import _process_figures

    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
        assert _process_figures([child.pid], {}) is None
        mine = _process_figures([psutil.Process().pid, child.pid], {})
        assert mine is not None and mine["rss_bytes"] > 0 and mine["fds"] > 0
    finally:
        child.wait()


async def test_heap_growth_names_the_line_that_keeps_allocating() -> None:
    import tracemalloc

    vitals = Vitals()
    kept: list[bytes] = []
    try:
        assert await vitals.heap_growth() is None  # starts tracing
        for _ in range(2000):
            kept.append(bytes(512))  # the growth, on this line
        top = await vitals.heap_growth(limit=3)
        assert top is not None and __file__ in top[0] and "+" in top[0]
    finally:
        tracemalloc.stop()


def test_python_blocks_are_fitted_beside_rss_and_printed() -> None:
    # RSS climbs 3 MB/min while the interpreter's blocks stay flat: not Python objects piling up
    s = _Series("hub")
    for t in range(0, 301, 10):
        s.add(float(t), {"pid": 1, "rss_bytes": int((100 + t / 60 * 3) * MB), "py_blocks": 500_000})
    s2 = _Series("conv")
    for t in range(0, 301, 10):
        s2.add(float(t), {"pid": 2, "rss_bytes": int(130 * MB), "py_blocks": 400_000 + 100 * t})
    out = resources_section({"d-im-hub-0": s.as_dict(), "d-im-conv-0": s2.as_dict()}, every_s=10, start_ms=0.0)
    hub, conv = out["roles"]["hub"], out["roles"]["conv"]
    assert hub["mem_slope_mb_per_min"] == pytest.approx(3.0, abs=1e-3) and hub["py_blocks_per_min"] == 0
    assert conv["py_blocks_per_min"] == pytest.approx(6000.0) and conv["last_py_blocks"] == 430_000
    lines = summary_lines({"resources": out})
    assert any(line.strip().startswith("conv") and "python blocks +6,000/min of 430,000" in line for line in lines)
    # a series without the column (an older report) prints as before
    bare = resources_section({"d-im-hub-0": _series([(t, 1, 100.0) for t in range(0, 301, 10)])}, 10, 0.0)
    assert bare["roles"]["hub"]["py_blocks_per_min"] is None
    assert "python blocks" not in " ".join(summary_lines({"resources": bare}))


class _TracingSampler(_CannedSampler):
    """A canned sampler whose actors answer heap_growth like Vitals: None first, then lines."""

    def __init__(self, snaps: Iterator[dict[str, dict[str, Any]]]) -> None:
        super().__init__(snaps)
        self.heap_trace = True
        self.asked = 0

    def heap_growth(self) -> dict[str, list[str] | None]:
        self.asked += 1
        if self.asked == 1:
            return {"d-im-hub-0": None}
        return {"d-im-hub-0": ["hub.py:10: +900.0 KiB (+12 blocks)"], "d-im-hub-1": None}


def test_heap_trace_starts_after_before_and_reports_at_after() -> None:
    rows = [{"d-im-hub-0": {"pid": 1, "rss_bytes": int(100 * MB), **_row(5, 5, 5)}}] * 6
    sampler = _TracingSampler(iter(rows))
    sampler.start()
    assert sampler.asked == 1
    out = sampler.finish()
    assert sampler.asked == 2
    assert out["resources"]["heap_growth"] == {"d-im-hub-0": ["hub.py:10: +900.0 KiB (+12 blocks)"], "d-im-hub-1": None}
    text = "\n".join(summary_lines(out))
    assert "heap growth of d-im-hub-0, largest first:\n      hub.py:10: +900.0 KiB" in text
    assert "heap growth of d-im-hub-1: restarted, not traced" in text
    # off by default: never asked
    plain = _CannedSampler(iter(rows))
    plain.start()
    assert "heap_growth" not in plain.finish()["resources"]


async def test_vitals_reports_python_blocks_and_traced_bytes_while_tracing() -> None:
    import tracemalloc

    vitals = Vitals()
    out = await vitals.vitals()
    assert out["py_blocks"] > 0 and out["heap_bytes"] is None
    try:
        assert await vitals.heap_growth() is None
        traced = await vitals.vitals()
        assert traced["heap_bytes"] is not None and traced["heap_bytes"] > 0
    finally:
        tracemalloc.stop()
