"""The oracle (drivers.oracle): exact counts, latency percentiles, merging partial results."""

from __future__ import annotations

import pickle

import pytest

from drivers.oracle import AckRecord, Partial, Recorder, device_key, evaluate, merge

A, B, C = device_key("a"), device_key("b"), device_key("c")
RECIPIENTS = {"c1": [A, B, C], "c2": [A, B]}
# c1: seqs 1..3 sent at 1000, 1010, 1020 (ms), acked 5 ms later; c2: seqs 1..2 acked 10 ms later.
ACKED = [
    AckRecord("c1", 1, 1000.0, 1005.0),
    AckRecord("c1", 2, 1010.0, 1015.0),
    AckRecord("c1", 3, 1020.0, 1025.0),
    AckRecord("c2", 1, 1000.0, 1010.0),
    AckRecord("c2", 2, 1030.0, 1040.0),
]
# Receipts (conv, seq, recv_ms, send_ms from the message meta): every delivery takes 2 ms.
RECEIVED = {
    A: [
        ("c1", 1, 1002, 1000),
        ("c1", 2, 1012, 1010),
        ("c1", 3, 1022, 1020),
        ("c2", 1, 1002, 1000),
        ("c2", 2, 1032, 1030),
    ],
    # b: c1 seq 2 after 3 (an order violation), c2 seq 1 twice (a duplicate, and an order violation)
    B: [
        ("c1", 1, 1002, 1000),
        ("c1", 3, 1022, 1020),
        ("c1", 2, 1012, 1010),
        ("c2", 1, 1002, 1000),
        ("c2", 1, 1003, 1000),
        ("c2", 2, 1032, 1030),
    ],
    # c lost c1 seqs 2 and 3
    C: [("c1", 1, 1002, 1000)],
}


def test_counts_are_exact() -> None:
    r = evaluate(ACKED, RECIPIENTS, RECEIVED, sent=6)
    assert r["sent"] == 6
    assert r["acked"] == 5
    assert r["unacked"] == 1
    assert r["expected_deliveries"] == 3 * 3 + 2 * 2
    assert r["delivered"] == 5 + 5 + 1
    assert r["lost"] == 2
    assert r["lost_entries"] == [
        {"conv": "c1", "seq": 2, "devices": 2, "expected_devices": 3},
        {"conv": "c1", "seq": 3, "devices": 2, "expected_devices": 3},
    ]
    assert r["duplicates"] == 1
    assert r["order_violations"] == 2
    assert r["unexpected_deliveries"] == 0
    assert r["delivered_unacked"] == 0


def test_latency_percentiles() -> None:
    r = evaluate(ACKED, RECIPIENTS, RECEIVED)
    ack = r["ack_latency_ms"]
    assert ack["count"] == 5
    assert ack["p50"] == pytest.approx(5.0, abs=0.01)  # 5, 5, 5, 10, 10
    assert ack["p95"] == pytest.approx(10.0, abs=0.01)
    assert ack["p99"] == pytest.approx(10.0, abs=0.01)
    assert ack["max"] == pytest.approx(10.0, abs=0.01)
    assert ack["mean"] == pytest.approx(7.0, abs=0.01)
    dl = r["delivery_latency_ms"]
    assert dl["count"] == 11  # first receipts by expected devices only
    assert dl["p50"] == dl["p99"] == dl["max"] == pytest.approx(2.0, abs=0.001)


def test_latency_without_meta_uses_the_local_ack() -> None:
    received = {A: [("c1", 1, 1007)], B: [("c1", 1, 1100)]}
    r = evaluate(ACKED[:1], RECIPIENTS, received)
    assert r["delivery_latency_ms"]["p50"] == pytest.approx(7.0, abs=0.01)
    assert r["delivery_latency_ms"]["max"] == pytest.approx(100.0, abs=0.1)
    assert (r["expected_deliveries"], r["delivered"], r["lost"]) == (3, 2, 1)


def test_unexpected_and_unacked_deliveries_are_not_counted_as_delivered() -> None:
    received = {A: [("c1", 1, 1002, 1000), ("c1", 4, 1100, 1090)], device_key("z"): [("c1", 1, 1002, 1000)]}
    r = evaluate(ACKED[:1], RECIPIENTS, received)
    assert r["delivered"] == 1
    assert r["unexpected_deliveries"] == 1
    assert r["delivered_unacked"] == 1
    assert r["lost"] == 2


def test_nothing_sent() -> None:
    r = evaluate([], RECIPIENTS, {})
    assert (r["sent"], r["acked"], r["expected_deliveries"], r["delivered"], r["lost"]) == (0, 0, 0, 0, 0)
    assert r["ack_latency_ms"] == {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0, "count": 0}


def _recorder(acks: list[AckRecord], received: dict[str, list[tuple[str, int, int, int]]]) -> Recorder:
    rec = Recorder(RECIPIENTS)
    rec.add_sent(len(acks))
    for a in acks:
        rec.add_ack(a.conv, a.seq, a.send_ms, a.ack_ms)
    for dev, receipts in received.items():
        for conv, seq, recv_ms, send_ms in receipts:
            rec.add_receipt(dev, conv, seq, recv_ms, send_ms)
    return rec


def test_merged_partials_equal_the_single_process_result() -> None:
    whole = _recorder(ACKED, RECEIVED).partial().report()
    # process 1 sends in c1 and hosts a; process 2 sends in c2 and hosts b and c
    p1 = _recorder(ACKED[:3], {A: RECEIVED[A]}).partial()
    p2 = _recorder(ACKED[3:], {B: RECEIVED[B], C: RECEIVED[C]}).partial()
    # across processes a partial travels as a plain dict
    shipped = [Partial.from_dict(pickle.loads(pickle.dumps(p.to_dict()))) for p in (p1, p2)]
    merged = merge(shipped).report()
    assert merged == whole
    assert merge([p1]).report() == p1.report()


def test_record_msg_counts_only_driver_entries() -> None:
    rec = Recorder({"c1": [A]})
    assert not rec.record_msg(A, {"conv": "c1", "seq": 1, "kind": "system", "meta": {"t": 1.0}}, 5.0)
    assert not rec.record_msg(A, {"conv": "c1", "seq": 2, "kind": "text"}, 5.0)
    assert rec.record_msg(A, {"conv": "c1", "seq": 3, "kind": "text", "meta": {"t": 1.0}}, 5.0)
    assert rec.receipts == 1
    rec.add_ack("c1", 3, 1.0, 2.0)
    r = rec.partial().report()
    assert (r["delivered"], r["lost"], r["order_violations"]) == (1, 0, 0)
    assert r["delivery_latency_ms"]["p50"] == pytest.approx(4.0, abs=0.01)


def test_large_seqs_and_many_duplicates() -> None:
    rec = Recorder({"c": [A]})
    for seq in range(1, 20001):
        rec.add_ack("c", seq, 0.0, 1.0)
        rec.add_receipt(A, "c", seq, 1.0, 0.0)
    for seq in (5, 10000, 20000):
        rec.add_receipt(A, "c", seq, 2.0, 0.0)
    r = rec.partial().report()
    assert (r["acked"], r["delivered"], r["lost"], r["duplicates"], r["order_violations"]) == (20000, 20000, 0, 3, 3)


def test_latency_from_the_schedule() -> None:
    # one send due at 1000, issued 50 ms late at 1050, acked at 1060, received at 1070
    rec = Recorder({"c1": [A]})
    rec.add_sent(1, 1050.0)
    rec.add_ack("c1", 1, 1050.0, 1060.0, scheduled_ms=1000.0)
    assert rec.record_msg(A, {"conv": "c1", "seq": 1, "kind": "text", "meta": {"t": 1050.0, "s": 1000.0}}, 1070.0)
    r = rec.partial().report()
    assert r["ack_latency_ms"]["p50"] == pytest.approx(10.0, rel=0.01)
    assert r["ack_latency_from_schedule_ms"]["p50"] == pytest.approx(60.0, rel=0.01)
    assert r["delivery_latency_ms"]["p50"] == pytest.approx(20.0, rel=0.01)
    assert r["delivery_latency_from_schedule_ms"]["p50"] == pytest.approx(70.0, rel=0.01)
    # without meta "s" the local ack's schedule stands in, as the local send time does for meta "t"
    rec2 = Recorder({"c1": [A]})
    rec2.add_ack("c1", 1, 1050.0, 1060.0, scheduled_ms=1000.0)
    rec2.add_receipt(A, "c1", 1, 1080.0)
    assert rec2.partial().report()["delivery_latency_from_schedule_ms"]["max"] == pytest.approx(80.0, rel=0.01)


def test_no_schedule_leaves_the_corrected_latencies_empty() -> None:
    r = _recorder(ACKED, RECEIVED).partial().report()
    assert r["ack_latency_from_schedule_ms"]["count"] == 0
    assert r["delivery_latency_from_schedule_ms"]["count"] == 0
    assert r["ack_latency_ms"]["count"] == len(ACKED)


def test_partial_from_a_dict_without_schedule_histograms() -> None:
    # a partial shipped by a driver of before the schedule histograms still merges
    rec = Recorder({"c1": [A]})
    rec.add_ack("c1", 1, 0.0, 1.0, scheduled_ms=0.0)
    data = rec.partial().to_dict()
    old = {k: v for k, v in data.items() if k not in ("ack_sched_hist", "delivery_sched_hist")}
    merged = merge([Partial.from_dict(old), Partial.from_dict(data)]).report()
    assert merged["ack_latency_ms"]["count"] == 2
    assert merged["ack_latency_from_schedule_ms"]["count"] == 1


def test_first_ack_time_merges_as_the_earliest() -> None:
    a, b = Recorder({"c1": [A]}), Recorder({"c1": [A]})
    a.add_ack("c1", 1, 100.0, 150.0)
    a.add_ack("c1", 2, 100.0, 120.0)
    b.add_ack("c1", 3, 100.0, 110.0)
    merged = merge([Partial.from_dict(a.partial().to_dict()), b.partial()])
    assert (merged.first_ack_ms, merged.last_ack_ms) == (110.0, 150.0)


def test_pending_deliveries_reach_the_histograms_whoever_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # Deliveries are noted cheaply and folded into the histograms when the numbers are read: the
    # report, the timeline, a dict for another process and a merge all see every one of them.
    rec = _recorder(ACKED, RECEIVED)
    part = rec.partial()
    assert len(part.pending) == 3 * part.receipts - 3 * 1  # b's duplicate is not a delivery
    assert part.delivery_hist.get_total_count() == 0
    assert Partial.from_dict(part.to_dict()).delivery_hist.get_total_count() == 11
    assert len(part.pending) == 0
    rec.add_receipt(A, "c1", 4, 2002.0, 2000.0)
    assert part.timeline()["delivery_p99_ms"][-1] == pytest.approx(2.0, rel=0.01) and len(part.pending) == 0
    rec.add_receipt(B, "c1", 4, 2003.0, 2000.0)
    assert merge([part]).delivery_hist.get_total_count() == 13
    # past PENDING_DELIVERIES_MAX a Partial folds them in at once
    monkeypatch.setattr("drivers.oracle.PENDING_DELIVERIES_MAX", 2)
    rec.add_receipt(C, "c1", 4, 2004.0, 2000.0)
    assert len(part.pending) == 3
    rec.add_receipt(C, "c1", 5, 2005.0, 2000.0)
    assert len(part.pending) == 0 and part.delivery_hist.get_total_count() == 15
