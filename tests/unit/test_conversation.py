"""The sequencer (ConversationShard) driven without Ray: order, dedup, conflicts, failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from im_actors.config import load_config
from im_actors.conversation import ConversationShard, SendItem
from im_actors.ids import direct_conv
from tests.fakes import FakePeers, FakeStore

CONV = "d:alice:bob"


def make_shard(
    store: FakeStore, groups: dict[str, list[str]] | None = None, **cfg: Any
) -> tuple[ConversationShard, FakePeers]:
    peers = FakePeers(store, groups or {})
    cfg.setdefault("fanout_via", "session")  # these tests follow fan-out through the session shards
    config = load_config(fanout_batch_ms=0, **cfg)
    shard = ConversationShard(config, peers, store)  # type: ignore[arg-type]
    shard.start()
    return shard, peers


def item(cmid: str, body: str = "hi", sender: str = "alice", conv: str = CONV) -> SendItem:
    return SendItem(sender=sender, conv=conv, cmid=cmid, body=body)


async def test_seqs_are_contiguous_in_send_order() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    acks = await shard.send_batch([item(f"c{i}") for i in range(10)])
    assert [a["seq"] for a in acks] == list(range(1, 11))
    assert not any(a["dup"] for a in acks)
    assert sorted(s for _, s in store.entries) == list(range(1, 11))


async def test_concurrent_batches_never_reuse_or_skip_a_seq() -> None:
    store = FakeStore()
    shard, _ = make_shard(store, store_batch_max=3)
    batches = [[item(f"b{b}-{i}", sender="alice" if i % 2 else "bob") for i in range(7)] for b in range(5)]
    results = await asyncio.gather(*(shard.send_batch(b) for b in batches))
    seqs = sorted(a["seq"] for acks in results for a in acks)
    assert seqs == list(range(1, 36))


async def test_resend_same_cmid_answers_original_seq_dup() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    first = await shard.send_batch([item("c1"), item("c2")])
    again = await shard.send_batch([item("c1")])
    assert again == [{"conv": CONV, "seq": first[0]["seq"], "ts": first[0]["ts"], "dup": True}]
    assert len(store.entries) == 2


async def test_same_cmid_different_body_is_conflict() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    await shard.send_batch([item("c1", "one")])
    answer = await shard.send_batch([item("c1", "two")])
    assert answer == [{"err": "conflict", "msg": "cmid already committed with a different body", "retry": False}]


async def test_resend_after_restart_is_settled_by_storage() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    first = await shard.send_batch([item("c1"), item("c2")])
    fresh, _ = make_shard(store)  # a restarted shard: no cmid cache
    answers = await fresh.send_batch([item("c2"), item("c3")])
    assert answers[0] == {"conv": CONV, "seq": first[1]["seq"], "ts": first[1]["ts"], "dup": True}
    assert answers[1]["seq"] == 3 and not answers[1]["dup"]
    assert sorted(s for _, s in store.entries) == [1, 2, 3]


async def test_failed_commit_answers_unavailable_and_leaves_no_hole() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    await shard.send_batch([item("c1")])
    store.down = True
    answer = await shard.send_batch([item("c2")])
    assert answer == [{"err": "unavailable", "msg": "MongoDB unreachable: fake", "retry": True}]
    store.down = False
    answer = await shard.send_batch([item("c2")])
    assert answer[0]["seq"] == 2


async def test_flushed_redis_does_not_roll_seq_back() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    await shard.send_batch([item("c1"), item("c2")])
    store.redis_last.clear()  # FLUSHALL
    fresh, _ = make_shard(store)
    assert (await fresh.send_batch([item("c3")]))[0]["seq"] == 3


async def test_stale_last_moves_forward_from_storage() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    await shard.send_batch([item("c1")])
    other, _ = make_shard(store)  # a second activation that wrote seq 2 meanwhile
    await other.send_batch([item("c2")])
    answers = await shard.send_batch([item("c3"), item("c4")])
    assert [a["seq"] for a in answers] == [3, 4]


async def test_non_member_is_forbidden_for_existing_and_missing_groups() -> None:
    store = FakeStore()
    shard, _ = make_shard(store, {"g1": ["alice", "bob"]})
    ok = await shard.send_batch([item("c1", conv="g:g1")])
    assert ok[0]["seq"] == 1
    existing = await shard.send_batch([item("c2", sender="mallory", conv="g:g1")])
    missing = await shard.send_batch([item("c2", sender="mallory", conv="g:nope")])
    assert existing == missing == [{"err": "forbidden", "msg": "not a member of this conversation", "retry": False}]
    with pytest.raises(Exception) as a:
        await shard.sync("mallory", "g:g1", 0, 10)
    with pytest.raises(Exception) as b:
        await shard.sync("mallory", "g:nope", 0, 10)
    assert type(a.value) is type(b.value) and a.value.msg == b.value.msg  # type: ignore[attr-defined]


async def test_sync_pages_exactly_at_edges() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    await shard.send_batch([item(f"c{i}") for i in range(10)])
    page = await shard.sync("bob", CONV, 0, 5)
    assert [m["seq"] for m in page["msgs"]] == [1, 2, 3, 4, 5] and page["more"] and page["last"] == 10
    page = await shard.sync("bob", CONV, 5, 5)
    assert [m["seq"] for m in page["msgs"]] == [6, 7, 8, 9, 10] and not page["more"]
    page = await shard.sync("bob", CONV, 10, 5)
    assert page["msgs"] == [] and not page["more"]
    hist = await shard.history("bob", CONV, 6, 3)
    assert [m["seq"] for m in hist["msgs"]] == [3, 4, 5] and hist["more"]
    hist = await shard.history("bob", CONV, 0, 20)
    assert [m["seq"] for m in hist["msgs"]] == list(range(1, 11)) and not hist["more"]


async def test_fan_out_goes_to_every_member_once_per_session_shard() -> None:
    store = FakeStore()
    shard, peers = make_shard(store, {"g1": ["alice", "bob", "carol"]})
    await shard.send_batch([item("c1", conv="g:g1")])
    for _ in range(50):
        if peers.fanned:
            break
        await asyncio.sleep(0.01)
    users = sorted(u for _, items in peers.fanned for _, us in items for u in us)
    assert users == ["alice", "bob", "carol"]


async def test_system_entry_sets_members_when_it_commits() -> None:
    store = FakeStore()
    shard, _ = make_shard(store, {"g1": ["alice"]})
    ack = await shard.append_system("g:g1", "alice", "alice added bob", {"event": "added", "users": ["bob"]}, "sys-1")
    assert ack["seq"] == 1
    answer = await shard.send_batch([item("c1", sender="bob", conv="g:g1")])
    assert answer[0]["seq"] == 2


async def test_read_cursor_never_passes_last() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    await shard.send_batch([item("c1"), item("c2")])
    await shard.read("bob", CONV, 99)
    assert store.cursors[("bob", CONV)] == 2


async def test_pages_are_cut_to_max_page_bytes_without_skipping() -> None:
    store = FakeStore()
    shard, _ = make_shard(store, max_page_bytes=2048)
    await shard.send_batch([item(f"c{i}", body="x" * 1000) for i in range(5)])
    page = await shard.sync("bob", CONV, 0, 100)
    assert [m["seq"] for m in page["msgs"]] == [1, 2] and page["more"]
    page = await shard.sync("bob", CONV, 2, 100)
    assert [m["seq"] for m in page["msgs"]] == [3, 4] and page["more"]
    hist = await shard.history("bob", CONV, 0, 100)
    assert [m["seq"] for m in hist["msgs"]] == [4, 5] and hist["more"]
    big, _ = make_shard(store, max_page_bytes=1024)
    await big.send_batch([item("huge", body="y" * 5000)])
    page = await big.sync("bob", CONV, 5, 100)
    assert [m["seq"] for m in page["msgs"]] == [6] and not page["more"]  # one entry always goes


async def test_a_direct_conversation_is_listed_for_both_users_by_its_first_commit() -> None:
    """The first entry carries the listing (store.py): a commit that fails leaves neither the
    entry nor the listing (a shard dying between two writes once left an entry that `convs` never
    showed its recipient, found by removing Ray nodes mid-traffic), and one that succeeds both."""
    store = FakeStore()
    shard, _ = make_shard(store)
    store.down = True
    assert (await shard.send_batch([item("c1")]))[0]["err"] == "unavailable"
    assert store.entries == {} and store.user_convs_rows == set()
    store.down = False
    assert (await shard.send_batch([item("c1")]))[0]["seq"] == 1
    assert store.user_convs_rows == {("alice", CONV), ("bob", CONV)}
    assert store.commits[-1][0]["seq"] == 1  # listed by that commit, no storage call of its own


async def test_a_sender_activates_from_redis_and_a_stale_guess_is_renumbered_from_mongodb() -> None:
    """A send activates its conversation from Redis's last alone; where Redis is behind MongoDB
    (lost keys, an old snapshot) the commit meets the unique (conv, seq) index and is renumbered
    from MongoDB's last before anything is acked: no seq reused, none skipped."""
    store = FakeStore()
    shard, _ = make_shard(store)
    await shard.send_batch([item("c1"), item("c2"), item("c3")])
    fresh, _ = make_shard(store)  # a restarted shard...
    store.redis_last[CONV] = 1  # ...and a Redis that lost the newest commits
    assert [a["seq"] for a in await fresh.send_batch([item("c4"), item("c5")])] == [4, 5]
    assert sorted(s for c, s in store.entries if c == CONV) == [1, 2, 3, 4, 5]
    store.redis_down = True  # without Redis, MongoDB is read first
    other, _ = make_shard(store)
    assert [a["seq"] for a in await other.send_batch([item("c6")])] == [6]


async def test_a_reader_of_a_guessed_last_checks_it_against_mongodb() -> None:
    """sync must not stop short of an acked entry because a sender's activation guessed ``last``
    from a Redis that lost it: the reader checks it first."""
    store = FakeStore()
    shard, _ = make_shard(store)
    await shard.send_batch([item("c1"), item("c2")])
    fresh, _ = make_shard(store)
    store.redis_last[CONV] = 0
    store.gate = asyncio.Event()  # the sender's first commit is held at storage
    send = asyncio.ensure_future(fresh.send_batch([item("c3")]))
    for _ in range(50):
        if fresh.sequencers.get(CONV) is not None:
            break
        await asyncio.sleep(0.01)
    assert not fresh.sequencers[CONV].verified and fresh.sequencers[CONV].last == 0
    page = await fresh.sync("bob", CONV, 0, 100)  # while the commit is still held
    assert page["last"] == 2 and [m["seq"] for m in page["msgs"]] == [1, 2]
    store.gate.set()
    assert [a["seq"] for a in await send] == [3]


async def test_first_seen_conversations_of_a_batch_activate_together() -> None:
    store = FakeStore()
    calls: list[list[str]] = []
    real = store.recent_last_seqs

    async def last_seqs(convs: list[str]) -> dict[str, int] | None:
        calls.append(list(convs))
        return await real(convs)

    store.recent_last_seqs = last_seqs  # type: ignore[method-assign]
    shard, peers = make_shard(store)
    convs = [f"d:alice:u{i:02d}" for i in range(20)]
    acks = await shard.send_batch([item("c1", conv=c) for c in convs])
    assert [a["seq"] for a in acks] == [1] * 20
    assert calls == [convs]  # one storage read for the batch's twenty new conversations
    assert peers.contacts_peer.calls == []  # no call to the contacts host: the shard keeps the sides
    assert shard.sides.stats["side_reads"] == 1  # one storage read for the 21 users' contact sides
    assert store.user_convs_rows == {(u, c) for c in convs for u in ("alice", c.split(":")[2])}


async def test_failed_activation_answers_unavailable_and_the_resend_commits() -> None:
    store = FakeStore()
    shard, _ = make_shard(store)
    store.down = True
    answers = await shard.send_batch([item("c1"), item("c2", conv="d:alice:carol")])
    assert [a.get("err") for a in answers] == ["unavailable", "unavailable"]
    assert not store.entries and not store.user_convs_rows
    store.down = False
    acks = await shard.send_batch([item("c1"), item("c2", conv="d:alice:carol")])
    assert [a["seq"] for a in acks] == [1, 1]


async def test_a_traced_send_carries_its_stage_stamps_to_the_fanout_only() -> None:
    store = FakeStore()
    shard, peers = make_shard(store)
    traced = item("c1")
    traced.trace = {"hub_in": 1.0}
    await shard.send_batch([traced, item("c2")])
    for _ in range(50):
        if sum(len(items) for _, items in peers.fanned) >= 4:
            break
        await asyncio.sleep(0.01)
    entries = {e["cmid"]: e for _, items in peers.fanned for e, _ in items}
    assert set(entries["c1"]["trace"]) == {"hub_in", "shard_in", "seq", "committed"}
    assert entries["c1"]["trace"]["hub_in"] <= entries["c1"]["trace"]["seq"] <= entries["c1"]["trace"]["committed"]
    assert "trace" not in entries["c2"]
    assert all("trace" not in e for e in store.entries.values())  # never stored


async def test_batches_in_flight_together_keep_their_arrival_order() -> None:
    """A hub has several send batches in flight (hub_inflight); a later batch must not overtake an
    earlier one that waits for its conversation's activation."""
    store = FakeStore()
    real = store.recent_last_seqs

    async def slow_last_seqs(convs: list[str]) -> dict[str, int] | None:
        await asyncio.sleep(0.02)  # activation waits on storage
        return await real(convs)

    store.recent_last_seqs = slow_last_seqs  # type: ignore[method-assign]
    shard, _ = make_shard(store, hub_inflight=4)
    first = asyncio.ensure_future(shard.send_batch([item("a1")]))
    await asyncio.sleep(0)  # the first batch is preparing (activating the conversation)
    second = asyncio.ensure_future(shard.send_batch([item("a2"), item("a3")]))
    acks = [*await first, *await second]
    assert [a["seq"] for a in acks] == [1, 2, 3]


async def test_idle_sequencers_past_the_bound_are_dropped_and_come_back_from_storage() -> None:
    """conv_active_max bounds the sequencers a shard holds (the capacity model's memory per active
    conversation): the least recently used idle ones go, and their next send re-activates them
    from storage: numbering goes on from the stored last seq and an old cmid is still a dup."""
    store = FakeStore()
    shard, _ = make_shard(store, conv_active_max=10)
    users = [f"u{i:02d}" for i in range(30)]
    convs = [direct_conv("alice", u) for u in users]
    first = {}
    for conv in convs:  # one at a time: each activation may drop older idle ones
        (ack,) = await shard.send_batch([item(f"{conv}-1", conv=conv)])
        first[conv] = ack
        assert len(shard.sequencers) <= 10
    assert shard.stats["evictions"] >= 20
    assert convs[0] not in shard.sequencers and convs[-1] in shard.sequencers
    # the oldest: dropped, now used again
    again = await shard.send_batch([item(f"{convs[0]}-1", conv=convs[0]), item(f"{convs[0]}-2", conv=convs[0])])
    assert again[0] == {**first[convs[0]], "dup": True}
    assert again[1]["seq"] == 2 and not again[1]["dup"]
    assert sorted(s for c, s in store.entries if c == convs[0]) == [1, 2]
    # a conversation in use is never dropped: the most recent stays
    assert convs[0] in shard.sequencers


async def test_no_bound_keeps_every_sequencer() -> None:
    store = FakeStore()
    shard, _ = make_shard(store, conv_active_max=0)
    for i in range(30):
        await shard.send_batch([item(f"c{i}", conv=direct_conv("alice", f"v{i:02d}"))])
    assert len(shard.sequencers) == 30 and shard.stats["evictions"] == 0


async def test_recent_cmids_are_bounded_per_conversation_and_an_older_resend_is_settled_by_storage() -> None:
    """conv_recent_cmids bounds what a sequencer keeps (a conversation shard's memory grows by
    about 460 bytes per committed entry until then); a resend older than that is answered from
    MongoDB's unique (conv, sender, cmid) index with its first seq, never committed twice."""
    store = FakeStore()
    shard, _ = make_shard(store, conv_recent_cmids=2)
    first = await shard.send_batch([item("c1")])
    await shard.send_batch([item("c2")])
    await shard.send_batch([item("c3")])
    assert list(shard.sequencers[CONV].cmids) == [("alice", "c2"), ("alice", "c3")]
    again = await shard.send_batch([item("c1")])
    assert again == [{**first[0], "dup": True}]
    assert sorted(s for c, s in store.entries if c == CONV) == [1, 2, 3]
