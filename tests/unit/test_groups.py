"""Groups, roles and membership spans on the plain objects: GroupShard + ConversationShard, no Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from im_actors.config import load_config
from im_actors.conversation import ConversationShard, SendItem
from im_actors.errors import BadRequest, Forbidden, RequestError
from im_actors.groups import GroupShard
from im_actors.membership import Membership
from tests.fakes import FakePeer, FakePeers, FakeStore

GID = "g1"
CONV = "g:g1"


class World:
    """One group shard and one conversation shard wired to each other through fake peers."""

    def __init__(self, store: FakeStore | None = None, **cfg: Any) -> None:
        self.store = store or FakeStore()
        cfg.setdefault("fanout_via", "session")  # these tests follow fan-out through the session shards
        self.config = load_config(fanout_batch_ms=0, **cfg)
        self.peers = FakePeers(self.store, {})
        self.conv = ConversationShard(self.config, self.peers, self.store)  # type: ignore[arg-type]
        self.conv.start()
        self.groups = GroupShard(self.config, self.peers, self.store, 0)  # type: ignore[arg-type]
        self.peers.group_peer.handlers["membership"] = self.groups.membership
        self.peers.conv_peer = FakePeer({"append_system": self.conv.append_system})

    async def send(self, sender: str, cmid: str, body: str = "hi") -> dict[str, Any]:
        return (await self.conv.send_batch([SendItem(sender=sender, conv=CONV, cmid=cmid, body=body)]))[0]

    def stream(self) -> list[tuple[int, str, str]]:
        """(seq, kind, body) of every stored entry of the group conversation."""
        return [(s, e["kind"], e["body"]) for (c, s), e in sorted(self.store.entries.items()) if c == CONV]

    async def fanned_to(self, user: str) -> list[int]:
        """Seqs fanned out to ``user``, in the order the session shards got them."""
        await asyncio.sleep(0.02)
        return [e["seq"] for _, items in self.peers.fanned for e, users in items if user in users]


async def test_create_commits_created_entry_and_info_is_exact() -> None:
    w = World()
    res = await w.groups.create("alice", "team", ["bob", "carol"], gid=GID)
    assert res == {"group": GID, "conv": CONV}
    assert w.stream() == [(1, "system", "alice created team")]
    assert w.store.entries[(CONV, 1)]["meta"] == {
        "event": "created",
        "name": "team",
        "owner": "alice",
        "users": ["alice", "bob", "carol"],
    }
    assert await w.groups.info("bob", GID) == {
        "group": GID,
        "name": "team",
        "members": ["alice", "bob", "carol"],
        "roles": {"alice": "owner", "bob": "member", "carol": "member"},
    }
    assert w.store.groups.docs[GID]["seq"] == 1  # checkpointed at the created entry


async def test_member_added_and_posting_at_once_is_seen_after_the_added_entry() -> None:
    w = World()
    await w.groups.create("alice", "team", ["bob"], gid=GID)
    add = asyncio.create_task(w.groups.add("alice", GID, ["dave"]))
    refused = 0
    while True:  # dave posts as early as he can: refused until the added entry commits
        ack = await w.send("dave", f"d{refused}")
        if "seq" in ack:
            break
        assert ack == {"err": "forbidden", "msg": "not a member of this conversation", "retry": False}
        refused += 1
        await asyncio.sleep(0)
    await add
    assert w.stream() == [
        (1, "system", "alice created team"),
        (2, "system", "alice added dave"),
        (3, "text", "hi"),
    ]
    assert ack["seq"] == 3
    for user in ("alice", "bob"):
        assert await w.fanned_to(user) == [1, 2, 3]
    assert await w.fanned_to("dave") == [2, 3]


async def test_send_queued_behind_its_senders_removal_is_refused() -> None:
    w = World()
    await w.groups.create("alice", "team", ["bob"], gid=GID)
    w.store.gate = asyncio.Event()
    first = asyncio.create_task(w.send("alice", "a1"))  # holds the conversation's commit in flight
    await asyncio.sleep(0.01)
    removal = asyncio.create_task(w.groups.remove("alice", GID, ["bob"]))
    await asyncio.sleep(0.01)
    late = asyncio.create_task(w.send("bob", "b1"))  # bob is still a member when it is queued
    await asyncio.sleep(0.01)
    w.store.gate.set()
    assert (await first)["seq"] == 2
    await removal
    assert await late == {"err": "forbidden", "msg": "not a member of this conversation", "retry": False}
    assert w.stream() == [(1, "system", "alice created team"), (2, "text", "hi"), (3, "system", "alice removed bob")]


async def test_removed_member_gets_nothing_more_and_reads_stop_at_removal_then_resume() -> None:
    w = World()
    await w.groups.create("alice", "team", ["bob"], gid=GID)
    await w.send("alice", "a1")  # 2
    await w.groups.remove("alice", GID, ["bob"])  # 3
    await w.send("alice", "a2")  # 4
    await w.send("alice", "a3")  # 5
    assert await w.fanned_to("bob") == [1, 2, 3]  # his removal, nothing after it
    page = await w.conv.sync("bob", CONV, 0, 100)
    assert [m["seq"] for m in page["msgs"]] == [1, 2, 3] and page["last"] == 3 and not page["more"]
    assert await w.conv.sync("bob", CONV, 3, 100) == {"msgs": [], "last": 3, "more": False}
    hist = await w.conv.history("bob", CONV, 0, 100)
    assert [m["seq"] for m in hist["msgs"]] == [1, 2, 3] and hist["last"] == 3
    assert await w.send("bob", "b1") == {"err": "forbidden", "msg": "not a member of this conversation", "retry": False}
    with pytest.raises(Forbidden, match="not a member of this group"):
        await w.groups.info("bob", GID)
    assert await w.conv.last_seqs("bob", [CONV]) == {CONV: 3}
    await w.groups.add("alice", GID, ["bob"])  # 6: bob is back
    await w.send("bob", "b2")  # 7
    page = await w.conv.sync("bob", CONV, 3, 100)
    assert [m["seq"] for m in page["msgs"]] == [6, 7] and page["last"] == 7 and not page["more"]
    page = await w.conv.sync("bob", CONV, 0, 2)
    assert [m["seq"] for m in page["msgs"]] == [1, 2] and page["more"]
    page = await w.conv.sync("bob", CONV, 2, 2)
    assert [m["seq"] for m in page["msgs"]] == [3, 6] and page["more"]
    hist = await w.conv.history("bob", CONV, 7, 2)
    assert [m["seq"] for m in hist["msgs"]] == [3, 6] and hist["more"]
    hist = await w.conv.history("bob", CONV, 0, 100)
    assert [m["seq"] for m in hist["msgs"]] == [1, 2, 3, 6, 7] and not hist["more"]
    assert await w.fanned_to("bob") == [1, 2, 3, 6, 7]


async def test_non_member_gets_identical_answers_for_existing_and_made_up_groups() -> None:
    w = World()
    await w.groups.create("alice", "team", ["bob"], gid=GID)
    await w.send("alice", "a1")

    async def answers(conv: str, gid: str) -> list[tuple[str, str, bool]]:
        out: list[tuple[str, str, bool]] = []
        ack = (await w.conv.send_batch([SendItem(sender="mallory", conv=conv, cmid="m1", body="x")]))[0]
        out.append((ack["err"], ack["msg"], ack["retry"]))
        calls = [
            w.conv.sync("mallory", conv, 0, 10),
            w.conv.history("mallory", conv, 0, 10),
            w.conv.read("mallory", conv, 1),
            w.conv.typing("mallory", conv),
            w.groups.info("mallory", gid),
            w.groups.add("mallory", gid, ["eve"]),
            w.groups.remove("mallory", gid, ["bob"]),
            w.groups.leave("mallory", gid),
            w.groups.rename("mallory", gid, "mine"),
            w.groups.role("mallory", gid, "bob", "admin"),
        ]
        for call in calls:
            with pytest.raises(RequestError) as exc:
                await call
            out.append((exc.value.code, exc.value.msg, exc.value.retry))
        return out

    existing = await answers(CONV, GID)
    missing = await answers("g:nope", "nope")
    assert existing == missing
    assert existing[0] == ("forbidden", "not a member of this conversation", False)
    assert existing[5] == ("forbidden", "not a member of this group", False)
    assert w.conv.sequencers.keys() == {CONV}  # the made-up id left nothing behind


async def test_roles_rename_leave_and_their_entries() -> None:
    w = World()
    await w.groups.create("alice", "team", ["bob", "carol", "dave"], gid=GID)
    with pytest.raises(Forbidden, match="only the owner and admins add members"):
        await w.groups.add("bob", GID, ["eve"])
    with pytest.raises(Forbidden, match="only the owner changes roles"):
        await w.groups.role("bob", GID, "carol", "admin")
    await w.groups.role("alice", GID, "bob", "admin")  # 2
    await w.groups.add("bob", GID, ["eve"])  # 3: an admin adds
    await w.groups.role("alice", GID, "carol", "admin")  # 4
    with pytest.raises(Forbidden, match="admins remove members only"):
        await w.groups.remove("bob", GID, ["carol"])
    await w.groups.remove("bob", GID, ["dave"])  # 5
    await w.groups.rename("bob", GID, "crew")  # 6
    with pytest.raises(Forbidden, match="the owner hands over ownership"):
        await w.groups.leave("alice", GID)
    with pytest.raises(BadRequest, match="use group.leave"):
        await w.groups.remove("alice", GID, ["alice"])
    await w.groups.role("alice", GID, "carol", "owner")  # 7: alice becomes an admin
    await w.groups.leave("alice", GID)  # 8
    await w.groups.role("carol", GID, "bob", "member")  # 9
    assert await w.groups.info("carol", GID) == {
        "group": GID,
        "name": "crew",
        "members": ["bob", "carol", "eve"],
        "roles": {"bob": "member", "carol": "owner", "eve": "member"},
    }
    assert [(s, body) for s, _, body in w.stream()] == [
        (1, "alice created team"),
        (2, "alice made bob admin"),
        (3, "bob added eve"),
        (4, "alice made carol admin"),
        (5, "bob removed dave"),
        (6, "bob renamed the group to crew"),
        (7, "alice made carol owner"),
        (8, "alice left"),
        (9, "carol made bob member"),
    ]
    # no-ops commit nothing
    await w.groups.add("carol", GID, ["bob"])
    await w.groups.remove("carol", GID, ["zed"])
    await w.groups.rename("carol", GID, "crew")
    await w.groups.role("carol", GID, "bob", "member")
    assert len(w.stream()) == 9


async def test_max_group_size() -> None:
    w = World(max_group_members=3)
    with pytest.raises(BadRequest, match="a group has at most 3 members"):
        await w.groups.create("alice", "big", ["b", "c", "d"], gid="big")
    await w.groups.create("alice", "team", ["bob"], gid=GID)
    await w.groups.add("alice", GID, ["carol"])
    with pytest.raises(BadRequest, match="a group has at most 3 members"):
        await w.groups.add("alice", GID, ["dave"])
    assert (await w.groups.info("alice", GID))["members"] == ["alice", "bob", "carol"]


async def test_restarted_shards_rebuild_membership_from_document_and_stream() -> None:
    w = World()
    await w.groups.create("alice", "team", ["bob"], gid=GID)
    await w.groups.add("alice", GID, ["carol"])  # 2
    w.store.groups.down = True  # the checkpoint of the next change fails: the stream has it
    await w.groups.remove("alice", GID, ["bob"])  # 3
    w.store.groups.down = False
    assert w.store.groups.docs[GID]["seq"] == 2
    fresh = World(w.store)  # both shards restarted: empty caches, same storage
    assert (await fresh.groups.info("alice", GID))["members"] == ["alice", "carol"]
    assert await fresh.send("bob", "b1") == {
        "err": "forbidden",
        "msg": "not a member of this conversation",
        "retry": False,
    }
    page = await fresh.conv.sync("bob", CONV, 0, 100)
    assert [m["seq"] for m in page["msgs"]] == [1, 2, 3] and page["last"] == 3
    assert (await fresh.send("carol", "c1"))["seq"] == 4


def test_membership_spans_and_ranges() -> None:
    m = Membership()
    assert m.apply("a", {"event": "created", "users": ["a", "b"], "owner": "a", "name": "n"}, 1)
    assert not m.apply("a", {"event": "added", "users": ["c"]}, 1)  # replayed: ignored
    m.apply("a", {"event": "removed", "users": ["b"]}, 4)
    m.apply("a", {"event": "added", "users": ["b"]}, 9)
    assert m.ranges("b", 12) == [(1, 4), (9, 12)]
    assert m.ranges("a", 12) == [(1, 12)]
    assert m.ranges("z", 12) == [] and not m.ever("z")
    back = Membership.from_doc(m.to_doc())
    assert (back.members, back.spans, back.roles, back.seq) == ({"a", "b"}, m.spans, {"a": "owner"}, 9)


async def test_blocked_direct_messages_are_refused_until_the_contacts_host_says_otherwise() -> None:
    store = FakeStore()
    peers = FakePeers(store, {})
    shard = ConversationShard(load_config(fanout_batch_ms=0, fanout_via="session"), peers, store)  # type: ignore[arg-type]
    shard.start()
    conv = "d:alice:bob"
    ok = await shard.send_batch([SendItem("alice", conv, "c1", "hi")])
    assert ok[0]["seq"] == 1
    side = {"user": "alice", "other": "bob", "state": "blocked", "ms": 0}
    store.contacts.docs["alice|bob"] = side  # what the contacts host writes, then tells the shard
    shard.contact_changed(conv)
    refused = {"err": "forbidden", "msg": "not allowed to message this user", "retry": False}
    assert await shard.send_batch([SendItem("bob", conv, "c2", "hi")]) == [refused]
    assert await shard.send_batch([SendItem("alice", conv, "c3", "hi")]) == [refused]
    with pytest.raises(Forbidden, match="not allowed to message this user"):
        await shard.typing("bob", conv)
    assert [m["seq"] for m in (await shard.sync("bob", conv, 0, 10))["msgs"]] == [1]  # history stays readable
    del store.contacts.docs["alice|bob"]
    shard.contact_changed(conv)
    assert (await shard.send_batch([SendItem("bob", conv, "c2", "hi")]))[0]["seq"] == 2


async def test_resent_entry_found_in_storage_is_fanned_out_only_to_its_readers() -> None:
    w = World()
    await w.groups.create("alice", "team", ["bob"], gid=GID)
    first = await w.send("alice", "c1")  # 2
    fresh = World(w.store)  # restarted shards: no cmid cache
    await fresh.groups.add("alice", GID, ["dave"])  # 3
    again = await fresh.send("alice", "c1")  # the ack was lost: resent, found in storage
    assert again == {**first, "dup": True}
    assert await fresh.fanned_to("bob") == [3, 2]  # fanned out again (clients drop what they hold)
    assert await fresh.fanned_to("dave") == [3]  # never an entry from before dave joined


async def test_made_up_ids_are_remembered_so_probes_are_answered_from_memory() -> None:
    w = World()
    for _ in range(3):
        with pytest.raises(Forbidden):
            await w.conv.sync("mallory", "g:nope", 0, 10)
        with pytest.raises(Forbidden):
            await w.groups.info("mallory", "nope")
    assert [args for method, args in w.peers.group_peer.calls if method == "membership"] == [("nope",)]
    assert "g:nope" not in w.conv.sequencers


async def test_large_group_ack_does_not_wait_for_fan_out_and_nothing_is_written_per_member() -> None:
    w = World()
    members = [f"u{i}" for i in range(1, 5000)]
    await w.groups.create("u0", "large", members, gid=GID)
    rows_after_create = len(w.store.user_convs_rows)
    assert rows_after_create == 5000
    assert sorted(await w.fanned_to("u1") + await w.fanned_to("u2") + await w.fanned_to("u3")) == [1, 1, 1]
    assert len(w.peers.fanned) == 2  # the created entry: one call per session shard
    stuck = asyncio.Event()
    calls: list[list[int]] = []  # the seqs of each fan-out call

    async def slow_fanout(items: Any) -> None:
        calls.append([e["seq"] for e, _ in items])
        await stuck.wait()  # a session shard that does not answer yet

    for peer in w.peers.sessions:
        peer.handlers["fanout"] = slow_fanout
    acks = [await w.send("u0", f"c{i}") for i in range(100)]  # answered while every fan-out is stuck
    assert [a["seq"] for a in acks] == list(range(2, 102))
    assert len(w.store.entries) == 101  # one stored entry per message, none per member
    assert len(w.store.user_convs_rows) == rows_after_create
    assert calls == [[2], [2]]  # one call in flight per session shard; the rest wait for it
    stuck.set()
    for _ in range(100):
        if len(calls) == 4:
            break
        await asyncio.sleep(0.01)
    assert calls[2:] == [list(range(3, 102))] * 2  # then the other 99 entries in one call per shard
    page = await w.conv.sync("u4999", CONV, 0, 500)  # catch-up reads the conversation stream
    assert [m["seq"] for m in page["msgs"]] == list(range(1, 102))


def test_group_role_and_rename_requests_are_validated() -> None:
    from im_actors.protocol import Request, parse_request

    assert parse_request({"t": "group.role", "id": 1, "group": "abc", "user": "bob", "role": "admin"}) == Request(
        "group.role", 1, {"group": "abc", "user": "bob", "role": "admin"}
    )
    assert parse_request({"t": "group.rename", "id": 2, "group": "abc", "name": "crew"}) == Request(
        "group.rename", 2, {"group": "abc", "name": "crew"}
    )
    for bad in (
        {"t": "group.role", "id": 3, "group": "abc", "user": "bob", "role": "king"},
        {"t": "group.role", "id": 3, "group": "abc", "user": "no spaces", "role": "admin"},
        {"t": "group.rename", "id": 3, "group": "abc", "name": ""},
        {"t": "group.rename", "id": 3, "group": "a:b", "name": "x"},
    ):
        with pytest.raises(BadRequest) as exc:
            parse_request(bad)
        assert exc.value.request_id == 3
