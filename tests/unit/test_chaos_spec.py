"""Chaos specs, schedules and the per-kind summary (no Ray, no servers)."""

from __future__ import annotations

import pytest

from drivers.chaos import KINDS, ChaosSpec, summarize


def test_parse_all_and_lists_and_interval() -> None:
    assert ChaosSpec.parse("all") == ChaosSpec(KINDS, None)
    assert ChaosSpec.parse("hub, conv:7.5") == ChaosSpec(("hub", "conv"), 7.5)
    with pytest.raises(ValueError, match="nope"):
        ChaosSpec.parse("hub,nope")


def test_schedule_injects_every_kind_twice_inside_the_window() -> None:
    spec = ChaosSpec(("hub", "conv", "mongodb"))
    plan = spec.schedule(10.0, 70.0)
    assert [k for _, k in plan] == ["hub", "conv", "mongodb"] * 2
    assert plan[0][0] == 10.0 and all(10.0 <= t < 70.0 for t, _ in plan)
    assert [t for t, _ in ChaosSpec(("hub",), 20.0).schedule(0.0, 65.0)] == [0.0, 20.0, 40.0]


def test_summary_gives_median_and_worst_recovery() -> None:
    faults = [
        {"kind": "hub", "recovery_s": 0.5},
        {"kind": "hub", "recovery_s": 1.5},
        {"kind": "hub", "recovery_s": None},
        {"kind": "conv", "recovery_s": 2.0},
    ]
    assert summarize(faults) == {
        "hub": {"injected": 3, "recovered": 2, "median_recovery_s": 1.0, "worst_recovery_s": 1.5},
        "conv": {"injected": 1, "recovered": 1, "median_recovery_s": 2.0, "worst_recovery_s": 2.0},
    }
