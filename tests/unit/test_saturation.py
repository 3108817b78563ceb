"""The pure parts of benchmarks/saturation.py: the step rule, the ramp, the ceiling's documents, CPU windows."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import saturation as sat
from drivers.synthetic import SyntheticWorkload
from im_actors.store import CMID_INDEX, SEQ_INDEX


def _lat(p99: float, count: int = 10) -> dict[str, float]:
    return {"p50": p99 / 2, "p95": p99, "p99": p99, "max": p99, "mean": p99 / 2, "count": count}


def _report(**kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "lost": 0,
        "duplicates": 0,
        "order_violations": 0,
        "expected_deliveries": 20,
        "throughput_msgs_per_s": 248.0,
        "delivery_latency_ms": _lat(50.0),
        "delivery_latency_from_schedule_ms": _lat(60.0),
    }
    r.update(kw)
    return r


def test_a_clean_step_passes() -> None:
    assert sat.StepRule().judge(250.0, _report()) == []


def test_each_failure_of_the_rule_is_named() -> None:
    rule = sat.StepRule()
    assert rule.judge(250.0, _report(lost=1)) == ["lost 1"]
    assert rule.judge(250.0, _report(throughput_msgs_per_s=237.0))[0].startswith("acked 237/s < 0.95 x 250")
    assert rule.judge(250.0, _report(throughput_msgs_per_s=237.5)) == []
    # the rate acks came in at counts when the report has it: a constant latency is not lost throughput
    assert rule.judge(250.0, _report(throughput_msgs_per_s=230.0, acks_per_s=249.0)) == []
    assert rule.judge(250.0, _report(throughput_msgs_per_s=249.0, acks_per_s=200.0))[0].startswith("acked 200/s")
    assert rule.judge(250.0, _report(duplicates=2))[0].startswith("duplicates 2")
    # the p99 that counts is the one from the schedule (coordinated-omission corrected)
    slow = _report(delivery_latency_from_schedule_ms=_lat(1000.0))
    assert rule.judge(250.0, slow) == ["delivery p99 1000 ms >= 1000"]
    # a report without schedule figures falls back to the actual-send latency
    old = _report(delivery_latency_from_schedule_ms=_lat(0.0, count=0), delivery_latency_ms=_lat(1500.0))
    assert rule.judge(250.0, old) == ["delivery p99 1500 ms >= 1000"]
    assert "nothing delivered" in rule.judge(250.0, _report(expected_deliveries=0))


def test_ramp_rates() -> None:
    assert sat.ramp_rates([1000, 250, 500], 1, 2, 1) == [250.0, 500.0, 1000.0]
    assert sat.ramp_rates(None, 250, 2, 4) == [250.0, 500.0, 1000.0, 2000.0]
    assert sat.ramp_rates(None, 100, 1.5, 3) == [100.0, 150.0, 225.0]
    for bad in ((None, 250, 1.0, 4), (None, 0, 2, 4), (None, 250, 2, 0), ([250, -1], 1, 2, 1)):
        with pytest.raises(ValueError):
            sat.ramp_rates(*bad)


def test_saturation_point() -> None:
    steps = [{"rate": 250, "passed": True}, {"rate": 500, "passed": True}, {"rate": 1000, "passed": False}]
    assert sat.saturation_point(steps) == (500.0, True)
    assert sat.saturation_point(steps[:2]) == (500.0, False)  # every step passed: not reached
    assert sat.saturation_point(steps[2:]) == (None, True)  # the first step failed
    assert sat.saturation_point([]) == (None, False)


def test_ceiling_documents_are_the_stores_entries() -> None:
    plan = SyntheticWorkload(users=3, rate=100.0, duration_s=0.2, msg_bytes=64).build("x.")
    docs = sat.ceiling_documents(plan, 1_000_000)
    assert len(docs) == len(plan.sends) == 20
    assert all(set(d) == {"conv", "seq", "sender", "cmid", "ts", "kind", "body", "meta"} for d in docs)
    assert all(len(d["body"]) == 64 and d["conv"].startswith("d:") for d in docs)
    # seqs count from 1 in each conversation; both unique keys hold
    by_conv: dict[str, list[int]] = {}
    for d in docs:
        by_conv.setdefault(d["conv"], []).append(d["seq"])
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in by_conv.values())
    assert len({(d["conv"], d["sender"], d["cmid"]) for d in docs}) == len(docs)
    group = SyntheticWorkload(users=4, rate=10.0, duration_s=1.0, group_size=4).build("")
    gdocs = sat.ceiling_documents(group, 0)
    assert {d["conv"] for d in gdocs} == {"g:ceiling-g0"} and [d["seq"] for d in gdocs] == list(range(1, 11))


def test_the_ceiling_uses_the_stores_unique_indexes() -> None:
    assert set(sat.UNIQUE_INDEXES) == {SEQ_INDEX, CMID_INDEX}
    info = {
        "_id_": {"key": [("_id", 1)]},
        SEQ_INDEX: {"key": [("conv", 1), ("seq", 1)], "unique": True},
        CMID_INDEX: {"key": [("conv", 1), ("sender", 1), ("cmid", 1)], "unique": True},
        "other": {"key": [("x", 1)]},
    }
    keys = sat.index_keys(info)
    assert set(keys) == {SEQ_INDEX, CMID_INDEX}
    assert keys[SEQ_INDEX][1] == tuple(sat.UNIQUE_INDEXES[SEQ_INDEX])


def test_cpu_window_interpolates_between_samples() -> None:
    samples = [(0.0, {"hub": 0.0, "machine": 0.0}), (1.0, {"hub": 0.5, "machine": 2.0}), (2.0, {"hub": 1.5})]
    w = sat.cpu_window(samples, 0.5, 1.5)
    assert w["hub"] == pytest.approx(0.75)  # 0.25 -> 1.0
    assert w["machine"] == pytest.approx(1.0)  # 1.0 -> 2.0 (held after its last sample)
    assert sat.cpu_window(samples, 2.0, 1.0) == {}
    assert sat.cpu_window([], 0.0, 1.0) == {}


def test_stage_report_lines() -> None:
    lines = sat.format_stages({"hub_received": {"p50": 0.1, "p99": 0.4, "count": 5}, "committed": {"p50": 2, "p99": 9}})
    assert len(lines) == 3 and "hub_received" in lines[1] and "9.00" in lines[2]
    assert sat.format_stages([{"stage": "seq", "p50": 1, "p99": 2}])[1].split()[1:4] == ["seq", "1.00", "2.00"]
    assert sat.format_stages("odd") == ['#   stages: "odd"']
    # drivers/stages.py's report: {"traced", "steps"}
    report = {"traced": 40, "steps": {"hub_in": {"p50": 0.5, "p99": 1.5, "count": 40}}}
    lines = sat.format_stages(report)
    assert "40 traced" in lines[0] and lines[2].split()[1:4] == ["hub_in", "0.50", "1.50"]
    assert sat.has_stages(report) and not sat.has_stages({"traced": 0, "steps": {}}) and not sat.has_stages(None)


def test_a_row_names_why_a_step_failed() -> None:
    report = _report(
        sent=2500,
        deliveries_per_s=496.0,
        ack_latency_ms=_lat(30.0),
        ack_latency_from_schedule_ms=_lat(31.0),
        schedule_lag_ms=_lat(1.0),
        sends_in_flight_max=7,
    )
    row = sat.format_row(250.0, report, ["lost 1"])
    assert row.split()[:5] == ["250", "2500", "248.0", "0.992", "248.0"] and row.endswith("FAIL: lost 1")
    assert len(sat.format_header().split()) == len(row.split()) - 2  # "FAIL:" and "lost 1" are one column
