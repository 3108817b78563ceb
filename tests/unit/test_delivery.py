"""The sans-I/O delivery module fed frame by frame: no sockets, no event loop."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from im_actors.delivery import Delivery, FillNext, Hole, Step, SyncRange

C = "d:alice:bob"
G = "g:g1"


def msg(seq: int, conv: str = C, **extra: Any) -> dict[str, Any]:
    frame = {"t": "msg", "conv": conv, "seq": seq, "from": "alice", "ts": 1000 + seq, "kind": "text", "body": f"m{seq}"}
    return frame | extra


def sync_answer(seqs: list[int], last: int, more: bool = False, conv: str = C) -> dict[str, Any]:
    # a server's sync answer: the entries without "t" and "conv" (the client fills them in)
    return {"t": "msgs", "conv": conv, "msgs": [{"seq": s, "body": f"m{s}"} for s in seqs], "last": last, "more": more}


def seqs(step: Step) -> list[int]:
    return [m["seq"] for m in step.deliver]


def started(last: int = 0, conv: str = C, user: str = "bob") -> Delivery:
    """A delivery whose baseline is taken: ``conv`` held at ``last``."""
    d = Delivery(user)
    d.receive_convs([{"conv": conv, "last": last, "read": 0}])
    return d


def test_in_order_msgs_are_delivered_at_once() -> None:
    d = started()
    assert [seqs(d.receive_msg(msg(s))) for s in (1, 2, 3)] == [[1], [2], [3]]
    assert d.held == {C: 3}
    assert d.gap(C) is None and d.lagging() == []


def test_duplicates_are_dropped_and_counted() -> None:
    d = started()
    d.receive_msg(msg(1))
    d.receive_msg(msg(2))
    assert d.receive_msg(msg(1)) == Step()
    assert d.receive_msg(msg(2)) == Step()
    assert d.dups_dropped == 2
    d.receive_msg(msg(4))  # buffered
    assert d.receive_msg(msg(4)) == Step()  # a duplicate of a buffered entry too
    assert d.dups_dropped == 3
    assert d.held == {C: 2}


def test_a_gap_asks_for_the_missing_range_and_holds_what_is_ahead() -> None:
    d = started()
    d.receive_msg(msg(1))
    step = d.receive_msg(msg(4))
    assert step.deliver == () and step.sync == (SyncRange(C, 1, 4),)
    assert step.sync[0].request(500) == {"t": "sync", "conv": C, "after": 1, "limit": 500}
    cursor = d.cursor(C)
    assert cursor is not None and sorted(cursor.buffer) == [4]
    step = d.receive_msg(msg(6))  # the range grows with the highest seq seen
    assert step.sync == (SyncRange(C, 1, 6),)
    assert d.gap(C) == SyncRange(C, 1, 6)


def test_held_entries_are_released_when_the_gap_closes_by_live_msgs() -> None:
    d = started()
    d.receive_msg(msg(1))
    d.receive_msg(msg(3))
    d.receive_msg(msg(4))
    step = d.receive_msg(msg(2))  # the missing one: it and every buffered successor, in order
    assert seqs(step) == [2, 3, 4]
    assert step.sync == ()
    assert d.held == {C: 4} and d.gap(C) is None


def test_gap_fill_by_sync_pages() -> None:
    d = started()
    d.receive_msg(msg(1))
    d.receive_msg(msg(7))  # 2..6 missing, 7 held back
    step = d.receive_sync(C, sync_answer([2, 3], last=7, more=True))
    assert seqs(step) == [2, 3] and step.fill is FillNext.CONTINUE
    assert d.gap(C) == SyncRange(C, 3, 7)
    step = d.receive_sync(C, sync_answer([4, 5, 6, 7], last=7))
    assert seqs(step) == [4, 5, 6, 7]  # 7 comes from the answer; the buffered copy is dropped
    assert step.fill is FillNext.DONE
    assert d.held == {C: 7} and d.gap(C) is None
    cursor = d.cursor(C)
    assert cursor is not None and cursor.buffer == {}
    assert all(m["t"] == "msg" and m["conv"] == C for m in step.deliver)


def test_sync_answer_crossing_live_msgs_delivers_nothing_twice() -> None:
    d = started()
    d.receive_msg(msg(1))
    d.receive_msg(msg(4))  # a fill for 2..4 goes out with after=1 ...
    assert seqs(d.receive_msg(msg(2))) == [2]  # ... and live msgs overtake it
    assert seqs(d.receive_msg(msg(3))) == [3, 4]
    assert seqs(d.receive_msg(msg(5))) == [5]
    step = d.receive_sync(C, sync_answer([2, 3, 4, 5, 6], last=6))  # the answer comes back late
    assert seqs(step) == [6]  # only what was not delivered yet
    assert step.fill is FillNext.DONE
    assert d.held == {C: 6} and d.dups_dropped == 0


def test_a_live_msg_arriving_while_the_answer_is_out_widens_the_gap() -> None:
    d = started()
    d.receive_msg(msg(1))
    d.receive_msg(msg(3))
    d.receive_msg(msg(6))  # live, while the sync for 2..3 is out
    step = d.receive_sync(C, sync_answer([2, 3], last=3))
    assert seqs(step) == [2, 3]
    assert step.fill is FillNext.CONTINUE  # 4..5 still missing: the same fill goes on
    assert d.gap(C) == SyncRange(C, 3, 6)
    step = d.receive_sync(C, sync_answer([4, 5, 6], last=6))
    assert seqs(step) == [4, 5, 6] and step.fill is FillNext.DONE


def test_an_answer_without_progress_is_a_stall() -> None:
    d = started()
    d.receive_msg(msg(1))
    d.receive_msg(msg(3))
    step = d.receive_sync(C, sync_answer([], last=3))  # the server knows 3 but returns nothing yet
    assert step == Step(fill=FillNext.STALLED)
    assert d.gap(C) == SyncRange(C, 1, 3)


def test_seqs_a_sync_jumps_over_are_holes() -> None:
    d = started()
    d.receive_msg(msg(1))
    d.receive_msg(msg(3))
    d.receive_msg(msg(5))
    step = d.receive_sync(C, sync_answer([4, 5], last=5))  # 2 and 3 do not exist on the server
    assert step.holes == (Hole(C, 2, 3),)
    assert seqs(step) == [4, 5]
    assert d.holes_skipped == 2
    cursor = d.cursor(C)
    assert cursor is not None and cursor.buffer == {}  # the buffered 3 went with the hole
    assert step.fill is FillNext.DONE


def test_msgs_before_the_baseline_wait_for_it() -> None:
    d = Delivery("bob")
    assert d.receive_msg(msg(5)) == Step()  # convs has not answered yet
    assert d.receive_msg(msg(6)) == Step()
    assert d.held == {}
    step = d.receive_convs([{"conv": C, "last": 5, "read": 0}])
    assert d.baseline_done
    assert seqs(step) == [6]  # 5 is history (the baseline), 6 is news
    assert step.sync == ()
    assert d.held == {C: 6} and d.dups_dropped == 0  # placing early frames is not a duplicate


def test_an_early_msg_ahead_of_the_baseline_asks_for_the_range() -> None:
    d = Delivery("bob")
    d.receive_msg(msg(9))
    step = d.receive_convs([{"conv": C, "last": 7}])
    assert step.deliver == () and step.sync == (SyncRange(C, 7, 9),)


def test_baseline_starts_known_conversations_at_last_and_later_ones_at_zero() -> None:
    d = Delivery("bob")
    step = d.receive_convs([{"conv": C, "last": 10}])
    assert step == Step() and d.held == {C: 10}
    # a later convs answer (after a reconnect): C moved on, G appeared while the client was away
    step = d.receive_convs([{"conv": C, "last": 12}, {"conv": G, "last": 3}])
    assert set(step.sync) == {SyncRange(C, 10, 12), SyncRange(G, 0, 3)}
    assert d.held == {C: 10, G: 0}


def test_reconnect_keeps_the_cursors_and_the_buffer() -> None:
    d = started()
    d.receive_msg(msg(1))
    d.receive_msg(msg(4))  # then the connection is lost; the client reconnects and asks convs again
    step = d.receive_convs([{"conv": C, "last": 6}])
    assert step.sync == (SyncRange(C, 1, 6),)  # from held, not from 0 or from last
    step = d.receive_sync(C, sync_answer([2, 3, 4, 5, 6], last=6))
    assert seqs(step) == [2, 3, 4, 5, 6] and d.dups_dropped == 0


def test_a_new_conversation_from_a_live_msg_starts_at_zero() -> None:
    d = started()
    step = d.receive_msg(msg(3, conv=G))
    assert step.sync == (SyncRange(G, 0, 3),)
    step = d.receive_sync(G, sync_answer([1, 2, 3], last=3, conv=G))
    assert seqs(step) == [1, 2, 3]


def test_a_group_just_joined_starts_at_the_added_entry() -> None:
    d = started(user="carol")
    added = msg(5, conv=G, kind="system", meta={"event": "added", "users": ["carol"]})
    step = d.receive_msg(added)
    assert seqs(step) == [5] and step.sync == ()
    other = msg(3, conv="g:g2", kind="system", meta={"event": "added", "users": ["dave"]})
    assert d.receive_msg(other).sync == (SyncRange("g:g2", 0, 3),)  # someone else's join: from 0


def test_restored_held_continues_from_there() -> None:
    d = Delivery("bob", held={C: 40})
    step = d.receive_convs([{"conv": C, "last": 42}])
    assert step.sync == (SyncRange(C, 40, 42),)
    assert seqs(d.receive_msg(msg(41))) == [41]


@pytest.mark.parametrize("frame", [{"t": "msg", "seq": 1}, {"t": "msg", "conv": C}, msg(1) | {"seq": "1"}])
def test_malformed_msgs_are_counted_and_ignored(frame: dict[str, Any]) -> None:
    d = started()
    assert d.receive_msg(frame) == Step()
    assert d.bad_msgs == 1 and d.held == {C: 0}


def test_bool_seq_is_not_a_seq() -> None:
    d = started()
    assert d.receive_msg(msg(1) | {"seq": True}) == Step()
    assert d.bad_msgs == 1


def test_a_bad_convs_answer_raises() -> None:
    d = Delivery("bob")
    with pytest.raises(KeyError):
        d.receive_convs([{"last": 3}])
    with pytest.raises(ValueError):
        d.receive_convs([{"conv": C, "last": "x"}])


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=30),
    order=st.randoms(use_true_random=False),
    dup_share=st.floats(min_value=0, max_value=1),
    drop_share=st.floats(min_value=0, max_value=0.5),
)
def test_any_arrival_order_with_fills_delivers_each_seq_once_in_order(
    n: int, order: Any, dup_share: float, drop_share: float
) -> None:
    """Live frames shuffled, duplicated and dropped; every gap filled by sync: 1..n once, in order."""
    d = started()
    arrivals = [s for s in range(1, n + 1) if order.random() >= drop_share]
    arrivals += [s for s in arrivals if order.random() < dup_share]
    order.shuffle(arrivals)
    out: list[int] = []
    for s in arrivals:
        step = d.receive_msg(msg(s))
        out += seqs(step)
        for gap in step.sync:  # answer every fill at once, with pages of 4 (the server has 1..n)
            while (g := d.gap(gap.conv)) is not None:
                page = list(range(g.after + 1, min(g.after + 4, n) + 1))
                out += seqs(d.receive_sync(C, sync_answer(page, last=n, more=page[-1] < n)))
    while (g := d.gap(C)) is not None or d.held[C] < n:  # the catch-up at the end
        after = d.held[C]
        page = list(range(after + 1, min(after + 4, n) + 1))
        out += seqs(d.receive_sync(C, sync_answer(page, last=n, more=page[-1] < n)))
    assert out == list(range(1, n + 1))
