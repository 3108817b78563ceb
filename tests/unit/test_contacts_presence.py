"""The contact rules (a pure function) and presence announcements of a session shard, without Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from im_actors.config import load_config
from im_actors.contacts import ContactBook, SideCache, transition
from im_actors.errors import BadRequest, Forbidden
from im_actors.ids import direct_members
from im_actors.session import SessionShard
from tests.fakes import FakeStore


@pytest.mark.parametrize(
    ("op", "mine", "theirs", "expected"),
    [
        ("request", None, None, ("pending_out", "pending_in")),
        ("request", "pending_out", "pending_in", ("pending_out", "pending_in")),
        ("request", "pending_in", "pending_out", ("accepted", "accepted")),  # both asked: accepted
        ("request", "accepted", "accepted", ("accepted", "accepted")),
        ("accept", "pending_in", "pending_out", ("accepted", "accepted")),
        ("accept", "accepted", "accepted", ("accepted", "accepted")),
        ("accept", "accepted", "pending_out", ("accepted", "accepted")),  # a half-written accept completes
        ("request", "accepted", "pending_out", ("accepted", "accepted")),
        ("request", "pending_out", None, ("pending_out", "pending_in")),  # a half-written request completes
        ("remove", "accepted", "accepted", (None, None)),
        ("remove", "pending_out", "pending_in", (None, None)),
        ("remove", None, "blocked", (None, "blocked")),  # their block stays
        ("block", "accepted", "accepted", ("blocked", None)),
        ("block", None, "blocked", ("blocked", "blocked")),
        ("unblock", "blocked", None, (None, None)),
        ("unblock", "blocked", "blocked", (None, "blocked")),
        ("unblock", "accepted", "accepted", ("accepted", "accepted")),
    ],
)
def test_transition(op: str, mine: str | None, theirs: str | None, expected: tuple[str | None, str | None]) -> None:
    assert transition(op, mine, theirs) == expected


@pytest.mark.parametrize(
    ("op", "mine", "theirs", "message"),
    [
        ("request", None, "blocked", "not allowed to contact this user"),
        ("request", "blocked", None, "not allowed to contact this user"),
        ("accept", None, None, "no contact request from this user"),
        ("accept", "pending_out", "pending_in", "no contact request from this user"),
    ],
)
def test_transition_refusals(op: str, mine: str | None, theirs: str | None, message: str) -> None:
    with pytest.raises(Forbidden) as exc:
        transition(op, mine, theirs)
    assert exc.value.msg == message


def test_unknown_op() -> None:
    with pytest.raises(BadRequest):
        transition("befriend", None, None)


@pytest.mark.parametrize(
    ("policy", "mine", "theirs", "allowed"),
    [
        ("anyone", None, None, True),
        ("anyone", "pending_out", "pending_in", True),
        ("anyone", "blocked", None, False),
        ("anyone", None, "blocked", False),
        ("contacts", None, None, False),
        ("contacts", "pending_out", "pending_in", False),
        ("contacts", "accepted", "accepted", True),
        ("contacts", "blocked", "blocked", False),
    ],
)
async def test_dm_policy(policy: str, mine: str | None, theirs: str | None, allowed: bool) -> None:
    store = FakeStore()
    for user, other, state in (("alice", "bob", mine), ("bob", "alice", theirs)):
        if state is not None:
            store.contacts.docs[f"{user}|{other}"] = {"user": user, "other": other, "state": state, "ms": 0}
    sides = SideCache(load_config(dm_policy=policy), store)  # type: ignore[arg-type]
    assert await sides.allowed_many([("alice", "bob"), ("bob", "alice")]) == [allowed, allowed]


class _Shards:
    """Peers of a contact book: session shards take every notice, and the conversation shard's
    ``contact_changed`` does what ConversationShard.contact_changed does to its SideCache."""

    def __init__(self, sides: SideCache) -> None:
        self.sides = sides

    def session(self, user: str) -> Any:
        return self

    def conv(self, conv: str) -> Any:
        return self

    def notify(self, *args: Any) -> None:
        pass

    async def call(self, method: str, conv: str) -> None:
        assert method == "contact_changed"
        self.sides.forget(*direct_members(conv))


async def test_first_seen_pairs_are_answered_from_each_users_sides_read_once() -> None:
    """200 users make 19,900 pairs: each user's sides are read once, not each pair's."""
    store = FakeStore()
    reads: list[list[str]] = []
    real = store.contact_sides_many

    async def counted(users: list[str]) -> dict[str, dict[str, str]]:
        reads.append(list(users))
        return await real(users)

    store.contact_sides_many = counted  # type: ignore[method-assign]
    sides = SideCache(load_config(), store)  # type: ignore[arg-type]
    users = [f"u{i}" for i in range(6)]
    first = [(users[0], u) for u in users[1:]]
    assert await sides.allowed_many(first) == [True] * 5
    assert reads == [users]
    later = [(a, b) for i, a in enumerate(users) for b in users[i + 1 :]]  # 15 pairs, 10 never asked
    assert await sides.allowed_many(later) == [True] * 15
    assert len(reads) == 1


async def test_a_change_is_seen_at_once_and_a_read_on_its_way_during_it_is_not_kept() -> None:
    store = FakeStore()
    sides = SideCache(load_config(), store)  # type: ignore[arg-type]  # the conversation shard's
    book = ContactBook(load_config(), _Shards(sides), store)  # type: ignore[arg-type]
    assert await sides.allowed_many([("alice", "bob")]) == [True]
    await book.change("block", "alice", "bob")
    assert await sides.allowed_many([("alice", "bob"), ("bob", "alice")]) == [False, False]
    await book.change("unblock", "alice", "bob")
    assert await sides.allowed_many([("bob", "alice")]) == [True]

    # dave's sides are being read when he blocks carol: that read must not be kept
    real = store.contact_sides_many
    reading, release = asyncio.Event(), asyncio.Event()

    async def slow(users: list[str]) -> dict[str, dict[str, str]]:
        found = await real(users)  # read before the block is written
        reading.set()
        await release.wait()
        return found

    store.contact_sides_many = slow  # type: ignore[method-assign]
    asked = asyncio.ensure_future(sides.allowed_many([("dave", "erin")]))
    await reading.wait()
    store.contact_sides_many = real  # type: ignore[method-assign]
    await book.change("block", "dave", "carol")
    release.set()
    assert await asked == [True]  # dave and erin: allowed, answered from the old read...
    assert await sides.allowed_many([("carol", "dave")]) == [False]  # ...which was not kept


def test_bad_dm_policy_names_the_key() -> None:
    from im_actors.errors import ConfigError

    with pytest.raises(ConfigError, match="dm_policy"):
        load_config(dm_policy="friends")


class _Peers:
    """Two session shards (this one is 0) and hubs that record the events they get."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []  # (hub or "session-1", items)
        self.sessions = [self._peer("session-0"), self._peer("session-1")]

    def _peer(self, name: str) -> Any:
        peers = self

        class P:
            async def call(self, method: str, items: Any, timeout: float = 30) -> None:
                peers.events.append((name, items))

        return P()

    def hub(self, name: str) -> Any:
        return self._peer(name)

    def session_index(self, user: str) -> int:
        return 1 if user.startswith("far") else 0


async def test_presence_is_debounced_and_reaches_online_contacts_only() -> None:
    peers = _Peers()
    shard = SessionShard(load_config(fanout_batch_ms=0, presence_debounce_ms=50), peers, None, None)  # type: ignore[arg-type]
    shard.connect("carol", "d1", "hub-0", 5)  # an online contact on this shard
    await asyncio.sleep(0.08)
    shard._session("bob").contacts = ["carol", "dan", "far-eve"]  # dan is offline; far-eve on shard 1
    peers.events.clear()
    shard.connect("bob", "phone", "hub-1", 1)
    for i in range(20):  # flapping within one window
        shard.disconnect("bob", "phone", "hub-1", i + 1)
        shard.connect("bob", "phone", "hub-1", i + 2)
    await asyncio.sleep(0.12)
    frames = [(dest, items) for dest, items in peers.events]
    assert len(frames) == 2
    online = {"t": "presence", "user": "bob", "online": True, "last_seen": shard.users["bob"].last_seen_ms}
    assert ("hub-0", [(online, [5])]) in frames
    assert ("session-1", [(online, ["far-eve"], None)]) in frames
    peers.events.clear()
    shard.disconnect("bob", "phone", "hub-1", 21)
    shard.connect("bob", "phone", "hub-1", 22)  # back within the window: nothing to announce
    await asyncio.sleep(0.12)
    assert peers.events == []
    shard.hub_gone("hub-1")  # the device counts offline once its hub is gone
    await asyncio.sleep(0.12)
    offline = {"t": "presence", "user": "bob", "online": False, "last_seen": shard.users["bob"].last_seen_ms}
    assert ("hub-0", [(offline, [5])]) in peers.events
    assert shard.presence(["bob", "carol", "nobody"]) == {
        "bob": {"online": False, "last_seen": shard.users["bob"].last_seen_ms},
        "carol": {"online": True, "last_seen": shard.presence(["carol"])["carol"]["last_seen"]},
        "nobody": {"online": False, "last_seen": 0},
    }
