"""The runner (drivers.run) end to end against the in-memory fake server, with and without faults."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.replay import ReplayWorkload
from drivers.run import build_report, run_workload_async, split_users
from drivers.synthetic import SyntheticWorkload
from drivers.workload import Plan, PlannedSend
from tests.fakeserver import FakeServer

REPORT_KEYS = {
    "sent",
    "acked",
    "unacked",
    "expected_deliveries",
    "delivered",
    "lost",
    "duplicates",
    "order_violations",
    "clients",
    "duration_s",
    "throughput_msgs_per_s",
    "deliveries_per_s",
    "ack_latency_ms",
    "delivery_latency_ms",
    "reconnects",
    "processes",
    "total_s",
    "workload",
    "run_id",
    "drained",
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with FakeServer(hubs=2) as server:
        yield server


def _expected(plan: Plan) -> int:
    members = {g.key: len(g.members) for g in plan.groups}
    return sum(members[s.group] if s.group else 2 for s in plan.sends)


async def test_synthetic_run_is_clean(fake: FakeServer) -> None:
    w = SyntheticWorkload(users=8, rate=100.0, duration_s=1.0, group_size=4, direct_share=0.5, seed=2)
    report = await run_workload_async(fake.router_url, w, progress=False, drain_timeout_s=5.0, quiet_s=0.2)
    assert REPORT_KEYS <= set(report)
    plan = w.build("")
    assert (report["sent"], report["acked"], report["unacked"]) == (100, 100, 0)
    assert report["expected_deliveries"] == report["delivered"] == _expected(plan)
    assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0), report["lost_entries"]
    assert report["clients"] == 8 and report["processes"] == 1 and report["drained"]
    assert report["ack_latency_ms"]["count"] == 100
    assert report["delivery_latency_ms"]["count"] == report["delivered"]
    assert set(report["ack_latency_ms"]) >= {"p50", "p95", "p99", "max"}
    assert 0.9 <= report["duration_s"] < 3.0 and report["throughput_msgs_per_s"] > 30
    # the cmids are unique per run and every user is prefixed with the run id
    cmids = [cmid for _, _, cmid in fake.send_log]
    assert len(cmids) == len(set(cmids)) == 100
    assert all(user.startswith(report["run_id"] + ".") for user, _, _ in fake.send_log)


async def test_run_with_faults_loses_nothing(fake: FakeServer) -> None:
    fake.fail_sends = 5
    fake.duplicate_fanout = True
    fake.drop_fanout = lambda entry, user, device: entry["seq"] % 7 == 3 and user.endswith("s1")
    w = SyntheticWorkload(users=6, rate=100.0, duration_s=1.0, group_size=3, direct_share=0.3, seed=5)
    report = await run_workload_async(fake.router_url, w, progress=False, drain_timeout_s=5.0, quiet_s=0.2)
    assert report["acked"] == report["sent"] == 100
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["order_violations"] == 0
    assert report["client_counters"]["resends"] == 5
    assert report["client_counters"]["dups_dropped"] > 0
    assert report["client_counters"]["gap_fills"] > 0


async def test_unacked_sends_are_reported(fake: FakeServer) -> None:
    fake.fail_sends = 10**6
    w = SyntheticWorkload(users=2, rate=20.0, duration_s=0.2)
    report = await run_workload_async(
        fake.router_url, w, progress=False, drain_timeout_s=1.0, quiet_s=0.1, send_deadline_s=0.2
    )
    assert (report["sent"], report["acked"], report["unacked"]) == (4, 0, 4)
    # the last failure before the deadline: the error answer, or a timeout when the deadline cut a retry short
    assert sum(report["send_errors"].values()) == 4
    assert set(report["send_errors"]) <= {"Unavailable", "TimeoutError"}
    assert report["expected_deliveries"] == 0 and report["lost"] == 0


async def test_replay_in_two_processes(fake: FakeServer, tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for i in range(60):
            f.write(json.dumps({"ts": i * 2.0, "room": f"r{i % 2 + 1}", "sender": f"u{i % 5}", "text": f"t{i}"}) + "\n")
    w = ReplayWorkload(str(corpus), messages=60, duration_s=1.0)
    report = await run_workload_async(fake.router_url, w, processes=2, progress=False, drain_timeout_s=5.0, quiet_s=0.2)
    plan = w.build("")
    assert report["processes"] == 2 and report["clients"] == 5
    assert (report["sent"], report["acked"]) == (60, 60)
    assert report["expected_deliveries"] == report["delivered"] == _expected(plan)
    assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0), report["lost_entries"]
    # each sender's sends reach the server in corpus order (senders in two processes interleave freely)
    by_sender: dict[str, list[int]] = {}
    for user, _, cmid in fake.send_log:
        by_sender.setdefault(user, []).append(int(cmid.rsplit(".", 1)[1]))
    assert len(by_sender) == 5
    assert all(seq == sorted(seq) for seq in by_sender.values())
    assert sorted(i for seq in by_sender.values() for i in seq) == list(range(60))


async def test_open_loop_sends_on_schedule_behind_a_slow_ack(fake: FakeServer) -> None:
    # one sender, five sends 10 ms apart, every ack held back 300 ms
    fake.ack_delay_s = 0.3
    plan = Plan("t", ("a", "b"), (), tuple(PlannedSend(i, i * 0.01, "a", f"m{i}", peer="b") for i in range(5)), 0.04)
    closed = await run_workload_async(fake.router_url, plan, progress=False, drain_timeout_s=5.0, quiet_s=0.2)
    opened = await run_workload_async(
        fake.router_url, plan, progress=False, drain_timeout_s=5.0, quiet_s=0.2, open_loop=True
    )
    for report in (closed, opened):
        assert (report["sent"], report["acked"], report["lost"], report["duplicates"]) == (5, 5, 0, 0)
        assert report["delivered"] == report["expected_deliveries"] == 10
        assert report["ack_latency_ms"]["count"] == report["ack_latency_from_schedule_ms"]["count"] == 5
        assert report["delivery_latency_from_schedule_ms"]["count"] == 10
        assert report["ack_latency_ms"]["p50"] >= 300.0  # the held-back ack, measured from the actual send
        assert 0 < report["ack_span_s"] <= report["duration_s"] and report["acks_per_s"] > 0
    # closed loop: one send in flight; the fifth waited for four acks, which only the schedule shows
    assert (closed["open_loop"], closed["sends_in_flight_max"]) == (False, 1)
    # (it was due at 40 ms, issued after four acks, >= 1200 ms, and acked >= 300 ms later)
    assert closed["ack_latency_from_schedule_ms"]["max"] >= 5 * 300.0 - 40.0
    assert closed["schedule_lag_ms"]["max"] >= 4 * 300.0 - 40.0
    # open loop: the sends went out while the first ack was still held back
    assert opened["open_loop"] is True and opened["sends_in_flight_max"] > 1


def test_split_users_balances_sends() -> None:
    sends = [PlannedSend(i, 0.0, "heavy", "x", peer="b") for i in range(10)]
    sends += [PlannedSend(10 + i, 0.0, u, "x", peer="heavy") for i, u in enumerate("bcde")]
    plan = Plan("t", ("heavy", "b", "c", "d", "e"), (), tuple(sends), 0.0)
    parts = split_users(plan, 2)
    assert parts[0] == ["heavy"] and sorted(parts[1]) == ["b", "c", "d", "e"]
    assert split_users(plan, 10) == [[u] for u in ["heavy", "b", "c", "d", "e"]]
    assert split_users(plan, 1) == [["heavy", "b", "c", "d", "e"]]


def test_build_report_without_any_send() -> None:
    plan = Plan("empty", ("a",), (), (), 0.0)
    from drivers.oracle import Recorder, new_histogram

    result = {
        "partial": Recorder().partial().to_dict(),
        "clients": 1,
        "stats": {},
        "errors": {},
        "lag_hist": new_histogram().encode().decode("ascii"),
        "drained": True,
        "t0": 0.0,
    }
    report = build_report(plan, [result], 1, 0.5)
    assert report["throughput_msgs_per_s"] == 0.0 and report["deliveries_per_s"] == 0.0
    assert report["sent"] == report["lost"] == 0


async def test_hub_kills_during_a_run_lose_nothing() -> None:
    async with FakeServer(hubs=3) as fake:

        async def chaos() -> None:
            await asyncio.sleep(0.6)
            for i, hub in enumerate(["hub-0", "hub-1", "hub-2"]):
                await fake.kill_hub(hub, None if i % 2 == 0 else 1001)
                await asyncio.sleep(0.15)
                fake.revive_hub(hub)
            fake.drop_after_commit = 3
            fake.fail_sends = 10

        w = SyntheticWorkload(users=12, rate=200.0, duration_s=2.0, group_size=4, direct_share=0.4, seed=9)
        task = asyncio.create_task(chaos())
        report = await run_workload_async(fake.router_url, w, progress=False, drain_timeout_s=10.0, quiet_s=0.3)
        await task
    assert report["acked"] == report["sent"] == 400
    assert report["expected_deliveries"] == report["delivered"] == _expected(w.build(""))
    assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0), report["lost_entries"]
    assert report["reconnects"] >= 12
    assert report["client_counters"]["resends"] >= 13


def test_stage_recorder_steps_add_up_and_merge() -> None:
    from drivers.stages import STAGES, StageRecorder

    msg = {
        "t": "msg",
        "meta": {"t": 1000.0},
        "trace": {
            "hub_in": 1001.0,
            "shard_in": 1002.0,
            "seq": 1003.0,
            "committed": 1010.0,
            "fanout": 1011.0,
            "hub_queued": 1012.5,
        },
    }
    a, b = StageRecorder(), StageRecorder()
    a.record(msg, 1014.0)
    b.record(msg, 1014.0)
    b.record({"t": "msg", "meta": {"t": 1.0}}, 5.0)  # not traced: ignored
    a.add_encoded(b.encode())
    rep = a.report()
    assert rep["traced"] == 2
    assert list(rep["steps"]) == list(STAGES)
    assert abs(rep["steps"]["committed"]["p50"] - 7.0) < 0.01  # HdrHistogram: 3 significant digits
    assert rep["steps"]["hub_queued"]["count"] == 2
    assert abs(sum(s["p50"] for s in rep["steps"].values()) - 14.0) < 0.05


def test_cli_open_loop(capsys: pytest.CaptureFixture[str]) -> None:
    from drivers.run import main

    argv = ["--fake-hubs", "1", "--open-loop", "--no-progress", "synthetic", "--users", "3", "--group-size", "0"]
    argv += ["--rate", "20"]
    assert main([*argv, "--duration", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["open_loop"] is True and report["acked"] == report["sent"] == 10 and report["lost"] == 0
    assert report["ack_latency_from_schedule_ms"]["count"] == 10


def test_step_times_count_each_step_from_the_stage_before_it() -> None:
    from drivers.stages import step_times

    trace = {"hub_in": 101.0, "shard_in": 103.5, "committed": 110.0}  # no seq, fanout, hub_queued
    assert step_times(trace, 100.0, 112.0) == {"hub_in": 1.0, "shard_in": 2.5, "committed": 6.5, "received": 2.0}
