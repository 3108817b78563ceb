"""Fault plans (drivers/faultplan.py) and their replay through the chaos monkey (no Ray, no servers)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from drivers import chaos
from drivers.chaos import ChaosMonkey, ChaosSpec, pick_index
from drivers.faultplan import FORMAT, FaultPlan, PlannedFault, plan_path
from im_actors.config import load_config
from im_actors.services import LocalServices


def _plan() -> FaultPlan:
    return FaultPlan(
        seed=424242,
        chaos="hub,mongodb-slow,conv:15",
        faults=(PlannedFault(9.5, "hub", 1), PlannedFault(24.5, "mongodb-slow"), PlannedFault(39.5, "conv", 0)),
        outage_s=10.0,
        slow_ms=450.0,
        options={"messages": 5000, "duration_s": 90.0, "synthetic": False, "corpus": Path("/data/c.jsonl.gz")},
    )


def test_a_plan_written_then_read_is_the_same_plan(tmp_path: Path) -> None:
    plan = _plan()
    path = plan.write(tmp_path / "p.json")
    assert FaultPlan.read(path) == plan
    assert json.loads(path.read_text())["format"] == FORMAT
    # A report holding it under fault_plan is read the same way (--replay REPORT).
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"sent": 10, "lost": 1, "fault_plan": plan.as_dict()}))
    assert FaultPlan.read(report) == plan
    assert plan.schedule() == [(9.5, "hub", 1), (24.5, "mongodb-slow", None), (39.5, "conv", 0)]
    assert plan_path(report) == tmp_path / "r.replay.json"


def test_what_is_not_a_plan_says_so(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"sent": 1}))
    with pytest.raises(ValueError, match="not a fault plan"):
        FaultPlan.read(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        FaultPlan.read(bad)
    newer = {**_plan().as_dict(), "version": 99}
    with pytest.raises(ValueError, match="newer"):
        FaultPlan.from_dict(newer)


def test_a_plan_from_a_reports_faults_keeps_planned_offsets_and_targets() -> None:
    faults = [
        {"kind": "hub", "at_s": 9.61, "planned_at_s": 9.5, "index": 1, "target": "x-hub-1"},
        {"kind": "mongodb-slow", "at_s": 24.52, "planned_at_s": 24.5, "target": "mongodb replies +450 ms"},
        {"kind": "conv", "at_s": 39.7, "index": 0},  # a report of before planned_at_s: at_s stands in
    ]
    options = {"messages": 5000, "duration_s": 90.0, "synthetic": False, "corpus": Path("/data/c.jsonl.gz"), "x": 1}
    plan = FaultPlan.from_faults(424242, "hub,mongodb-slow,conv:15", faults, 10.0, 450.0, options)
    expected = (PlannedFault(9.5, "hub", 1), PlannedFault(24.5, "mongodb-slow"), PlannedFault(39.7, "conv", 0))
    assert plan.faults == expected
    assert "x" not in plan.options  # only the options a replay takes


def test_pick_index_repeats_a_given_target_and_draws_from_the_seed_otherwise() -> None:
    a = [pick_index(5, None, r) for r in [random.Random(7)] for _ in range(20)]
    b = [pick_index(5, None, r) for r in [random.Random(7)] for _ in range(20)]
    assert a == b and set(a) <= set(range(5))
    assert pick_index(5, 3, random.Random(1)) == 3
    assert pick_index(2, 3, random.Random(1)) in (0, 1)  # out of range here: chosen again
    with pytest.raises(ValueError):
        pick_index(0, None, random.Random(1))


class _FakeProxy:
    """The proxy's switches and counters, recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.stats = self

    def as_dict(self) -> dict[str, int]:
        return {"delayed": len(self.calls), "cuts": 0, "refused": 0, "connections": 0}

    def slow(self, delay_ms: float) -> None:
        self.calls.append(f"slow {delay_ms:g}")

    def cut(self, ratio: float = 1.0) -> None:
        self.calls.append("cut")

    def heal(self) -> None:
        self.calls.append("heal")


async def _run(schedule: list[Any], seed: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict[str, Any]], Any]:
    """Run ``schedule`` through a real :class:`ChaosMonkey` whose Ray calls are recorded, not made."""
    killed: list[str] = []
    monkeypatch.setattr(chaos.ray, "get_actor", lambda name, namespace=None: name)
    monkeypatch.setattr(chaos.ray, "kill", lambda handle, no_restart=False: killed.append(handle))
    cfg = load_config(hubs=3, conv_shards=4, session_shards=2, store_writers=2, deployment="plan")
    proxy = _FakeProxy()
    monkey = ChaosMonkey(
        cfg,
        "http://127.0.0.1:9",
        ChaosSpec.parse("hub,conv,session,store,mongodb-slow,mongodb-cut"),
        LocalServices(),
        outage_s=0.0,
        rng=random.Random(seed),
        mongo_proxy=proxy,  # type: ignore[arg-type]
        slow_ms=300.0,
    )
    await monkey.run(schedule)  # the probes are not started: only the injections run
    return [f.as_dict() for f in monkey.faults], (killed, proxy.calls)


async def test_a_replay_injects_the_same_kinds_at_the_same_offsets_on_the_same_targets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = ChaosSpec.parse("hub,conv,session,store,mongodb-slow,mongodb-cut")
    first, (killed, calls) = await _run(spec.schedule(0.0, 0.3, rounds=2), seed=11, monkeypatch=monkeypatch)
    assert [f["kind"] for f in first] == list(spec.kinds) * 2 and all(f["error"] is None for f in first)
    assert calls == ["slow 300", "heal", "cut", "heal"] * 2
    plan = FaultPlan.from_faults(11, "hub,conv,session,store,mongodb-slow,mongodb-cut", first, 0.0, 300.0, {})
    replayed = FaultPlan.read(plan.write(tmp_path / "plan.json"))
    # Another seed: only the plan's targets can make the kills the same.
    again, (killed_again, _) = await _run(replayed.schedule(), seed=99, monkeypatch=monkeypatch)
    assert [(f["kind"], f["planned_at_s"], f.get("index")) for f in again] == [
        (f["kind"], f["planned_at_s"], f.get("index")) for f in first
    ]
    assert killed_again == killed and [f["target"] for f in again] == [f["target"] for f in first]
    assert all(f.get("index") is not None for f in first if f["kind"] in ("hub", "conv", "session", "store"))
    proxy_faults = [f for f in again if f["kind"].startswith("mongodb-")]
    assert all(f["proxy"]["window_s"] == 0.0 for f in proxy_faults)
    assert [f["proxy"]["delay_ms"] for f in proxy_faults] == [300.0, 0.0, 300.0, 0.0]


def test_the_demo_records_the_options_a_replay_gives_back(tmp_path: Path) -> None:
    import dataclasses

    from drivers.demo import DemoOptions, _replayed_options
    from drivers.faultplan import REPLAYED_OPTIONS
    from drivers.replay import ReplayWorkload
    from drivers.synthetic import SyntheticWorkload

    assert set(REPLAYED_OPTIONS) <= {f.name for f in dataclasses.fields(DemoOptions)}
    cfg = load_config(hubs=3, conv_shards=2, session_shards=2, store_writers=1)
    opts = DemoOptions(messages=300, duration_s=20.0, seed=5, chaos="hub")
    fell_back = _replayed_options(opts, SyntheticWorkload(seed=5), cfg, nodes=1)
    assert fell_back["synthetic"] is True and fell_back["corpus"] is None
    assert (fell_back["hubs"], fell_back["shards"], fell_back["store_writers"]) == (3, 2, 1)
    corpus = tmp_path / "c.jsonl.gz"
    recorded = _replayed_options(opts, ReplayWorkload(path=str(corpus)), cfg, nodes=3)
    plan = FaultPlan.from_faults(5, "hub", [], 10.0, 500.0, recorded)
    again = FaultPlan.read(plan.write(tmp_path / "p.json"))
    replayed = dataclasses.replace(DemoOptions(), **dict(again.options))
    assert (replayed.corpus, replayed.synthetic, replayed.messages, replayed.duration_s) == (corpus, False, 300, 20.0)
    assert (replayed.hubs, replayed.shards, replayed.nodes) == (3, 2, 3)
