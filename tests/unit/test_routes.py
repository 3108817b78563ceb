"""Routes held by conversation shards (``fanout_via = "conv"``): the table, and a shard that fans
entries and events out to the hubs itself. No Ray: see tests/fakes.py."""

from __future__ import annotations

import asyncio
from typing import Any

from im_actors.config import load_config
from im_actors.conversation import ConversationShard, SendItem
from im_actors.routes import Routes
from tests.fakes import FakePeers, FakeStore

CONV = "d:alice:bob"


def test_a_newer_connection_of_a_device_wins_and_its_old_close_is_ignored() -> None:
    routes = Routes()
    routes.add("alice", "d1", "hub-a", 1)
    routes.add("alice", "d1", "hub-b", 2)  # the same device again, elsewhere (4409 replaced the first)
    assert not routes.remove("alice", "d1", "hub-a", 1)  # the old connection's close comes late
    assert routes.targets(["alice"]) == {"hub-b": [2]}
    assert routes.remove("alice", "d1", "hub-b", 2)
    assert routes.targets(["alice"]) == {} and len(routes) == 0


def test_targets_group_by_hub_skip_the_origin_and_hub_gone_forgets() -> None:
    routes = Routes()
    routes.add("alice", "d1", "hub-a", 1)
    routes.add("alice", "d2", "hub-b", 2)
    routes.add("bob", "d1", "hub-a", 3)
    assert routes.targets(["alice", "bob", "carol"]) == {"hub-a": [1, 3], "hub-b": [2]}
    assert routes.targets(["alice", "bob"], skip=("hub-a", 1)) == {"hub-b": [2], "hub-a": [3]}
    version = routes.version
    assert routes.hub_gone("hub-a") == 2 and routes.version > version
    assert routes.targets(["alice", "bob"]) == {"hub-b": [2]}


async def _settled(peers: FakePeers, hub: str, count: int) -> list[tuple[dict[str, Any], list[int]]]:
    for _ in range(200):
        if len(peers.delivered.get(hub, [])) >= count:
            break
        await asyncio.sleep(0.01)
    return peers.delivered.get(hub, [])


def make_shard(groups: dict[str, list[str]] | None = None, **cfg: Any) -> tuple[ConversationShard, FakePeers]:
    store = FakeStore()
    peers = FakePeers(store, groups or {})
    shard = ConversationShard(load_config(fanout_batch_ms=0, **cfg), peers, store)  # type: ignore[arg-type]
    shard.start()
    return shard, peers


async def test_a_shard_delivers_to_the_hubs_of_the_routes_it_holds_and_no_session_shard() -> None:
    shard, peers = make_shard()
    shard.route("alice", "d1", "hub-a", 1)
    shard.route("bob", "d1", "hub-b", 7)
    shard.route("bob", "d2", "hub-a", 8)
    await shard.send_batch([SendItem("alice", CONV, "c1", "hi")])
    assert [(e["seq"], sorted(ids)) for e, ids in await _settled(peers, "hub-a", 1)] == [(1, [1, 8])]
    assert [(e["seq"], ids) for e, ids in await _settled(peers, "hub-b", 1)] == [(1, [7])]
    assert peers.fanned == []  # push is off: no session shard on the path
    shard.unroute("bob", "d1", "hub-b", 7)
    await shard.send_batch([SendItem("bob", CONV, "c2", "yo")])
    assert [e["seq"] for e, _ in await _settled(peers, "hub-a", 2)] == [1, 2]
    assert len(peers.delivered["hub-b"]) == 1  # bob's d1 left: nothing more to hub-b


async def test_with_push_on_the_session_shards_plan_offline_pushes() -> None:
    shard, peers = make_shard(push_workers=1, rabbitmq_url="amqp://guest:guest@127.0.0.1:5672/")
    shard.route("alice", "d1", "hub-a", 1)
    await shard.send_batch([SendItem("alice", CONV, "c1", "hi")])
    await _settled(peers, "hub-a", 1)
    for _ in range(200):
        if peers.fanned:
            break
        await asyncio.sleep(0.01)
    methods = {m for session in peers.sessions for m, _ in session.calls}
    assert methods == {"plan_push"}
    assert sorted(u for _, items in peers.fanned for _, users in items for u in users) == ["alice", "bob"]


async def test_a_receipt_reaches_every_routed_device_but_the_reading_one() -> None:
    shard, peers = make_shard()
    shard.route("alice", "d1", "hub-a", 1)
    shard.route("alice", "d2", "hub-a", 2)
    shard.route("bob", "d1", "hub-b", 3)
    await shard.send_batch([SendItem("alice", CONV, "c1", "hi")])
    await shard.read("bob", CONV, 1, origin=("hub-b", 3))
    for _ in range(200):
        if peers.hub_events:
            break
        await asyncio.sleep(0.01)
    assert {h: [(f, sorted(ids)) for f, ids in items] for h, items in peers.hub_events.items()} == {
        "hub-a": [({"t": "receipt", "conv": CONV, "user": "bob", "seq": 1}, [1, 2])]
    }


async def test_the_sender_hubs_copies_of_a_direct_entry_ride_on_its_ack() -> None:
    shard, peers = make_shard()
    shard.route("alice", "d1", "hub-a", 1)
    shard.route("bob", "d1", "hub-b", 7)
    shard.route("bob", "d2", "hub-a", 8)
    [ack] = await shard.send_batch([SendItem("alice", CONV, "c1", "hi")], "hub-a")
    entry, conn_ids = ack["copies"]
    assert (ack["seq"], entry["seq"], entry["body"], sorted(conn_ids)) == (1, 1, "hi", [1, 8])
    assert [(e["seq"], ids) for e, ids in await _settled(peers, "hub-b", 1)] == [(1, [7])]  # the other hub: a call
    assert "hub-a" not in peers.delivered
    assert shard.stats["answer_copies"] == 2 and shard.stats["deliveries"] == 3
    # a resend while the first is committing answers dup; through the same hub with the first's
    # copies (that hub may have given up on the first answer), through another hub without them
    first, again, elsewhere = await asyncio.gather(
        shard.send_batch([SendItem("alice", CONV, "c2", "yo")], "hub-a"),
        shard.send_batch([SendItem("alice", CONV, "c2", "yo")], "hub-a"),
        shard.send_batch([SendItem("alice", CONV, "c2", "yo")], "hub-b"),
    )
    assert first[0]["seq"] == again[0]["seq"] == elsewhere[0]["seq"] == 2
    assert again[0]["dup"] and again[0]["copies"] == first[0]["copies"]
    assert elsewhere[0]["dup"] and "copies" not in elsewhere[0]
    await _settled(peers, "hub-b", 2)
    # a resend of a committed cmid is fanned out again: its first answer may be what was lost
    [dup] = await shard.send_batch([SendItem("alice", CONV, "c1", "hi")], "hub-a")
    entry, conn_ids = dup["copies"]
    assert dup["dup"] and (entry["seq"], entry["body"], entry["sender"], sorted(conn_ids)) == (1, "hi", "alice", [1, 8])
    assert [(e["seq"], ids) for e, ids in await _settled(peers, "hub-b", 3)] == [(1, [7]), (2, [7]), (1, [7])]


async def test_copies_in_the_answer_only_for_direct_conversations_and_when_asked() -> None:
    shard, peers = make_shard({"g1": ["alice", "bob"]})
    shard.route("alice", "d1", "hub-a", 1)
    shard.route("bob", "d1", "hub-a", 2)
    [group_ack] = await shard.send_batch([SendItem("alice", "g:g1", "c1", "hi")], "hub-a")
    assert group_ack["seq"] == 1 and "copies" not in group_ack  # groups: one channel per hub
    [no_hub] = await shard.send_batch([SendItem("alice", CONV, "c2", "hi")])
    assert "copies" not in no_hub
    assert [e["conv"] for e, _ in await _settled(peers, "hub-a", 2)] == ["g:g1", CONV]
    for cfg in ({"answer_copies": False}, {"hub_inflight": 2}, {"fanout_via": "session"}):
        off, off_peers = make_shard(**cfg)
        off.route("alice", "d1", "hub-a", 1)
        [ack] = await off.send_batch([SendItem("alice", CONV, "c1", "hi")], "hub-a")
        assert "copies" not in ack, cfg
