"""Groups, authorization, contacts and presence end to end on the deployment fixture."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from im_actors import ids
from im_actors.client import Client
from im_actors.errors import Forbidden
from tests.rawconn import RawConn

pytestmark = pytest.mark.integration


async def _until(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class Inbox:
    """What a client delivered to the application: msgs and events."""

    def __init__(self) -> None:
        self.msgs: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def __call__(self, msg: dict[str, Any]) -> None:
        self.msgs.append(msg)

    def event(self, frame: dict[str, Any]) -> None:
        self.events.append(frame)

    def seqs(self, conv: str) -> list[int]:
        return [m["seq"] for m in self.msgs if m["conv"] == conv]


@pytest.fixture
async def clients(router_url: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[Client] = []

    async def make(user: str, device: str = "d1") -> tuple[Client, Inbox]:
        inbox = Inbox()
        client = Client(router_url, user, device, on_msg=inbox, on_event=inbox.event)
        await client.connect()
        made.append(client)
        return client, inbox

    yield make
    for c in made:
        await c.close()


async def test_member_added_and_posting_at_once_is_seen_after_the_added_entry(clients: Any, uid: Any) -> None:
    names = [uid(n) for n in ("owner", "m1", "m2")]
    pairs = [await clients(n) for n in names]
    owner = pairs[0][0]
    group, conv = await owner.group_create("team", names[1:])
    newcomer = uid("new")
    new_client, new_in = await clients(newcomer)
    await owner.group_add(group, [newcomer])
    ack = await new_client.send(conv, "hello, I am new")  # at once, after the add's ok
    assert ack.seq == 3
    for _, inbox in [*pairs, (new_client, new_in)]:
        await _until(lambda inbox=inbox: 3 in inbox.seqs(conv))
    for _, inbox in pairs:
        got = [(m["seq"], m["kind"]) for m in inbox.msgs if m["conv"] == conv]
        assert got == [(1, "system"), (2, "system"), (3, "text")]
        assert inbox.msgs[1]["meta"] == {"event": "added", "users": [newcomer]}
    assert [(m["seq"], m["kind"]) for m in new_in.msgs if m["conv"] == conv] == [(2, "system"), (3, "text")]
    assert new_client.holes_skipped == 0  # the client starts a group it just joined at its "added" entry


async def test_removed_member_with_a_second_device_gets_nothing_more(clients: Any, uid: Any) -> None:
    owner_name, bob_name, carol_name = uid("owner"), uid("bob"), uid("carol")
    owner, _ = await clients(owner_name)
    bob1, bob1_in = await clients(bob_name, "phone")
    bob2, bob2_in = await clients(bob_name, "laptop")
    carol, carol_in = await clients(carol_name)
    group, conv = await owner.group_create("team", [bob_name, carol_name])
    await owner.send(conv, "before")  # 2
    await _until(lambda: bob2_in.seqs(conv) == [1, 2] and bob1_in.seqs(conv) == [1, 2])
    await owner.group_remove(group, [bob_name])  # 3
    await bob1.close()  # one device goes away; the other stays connected
    for i in range(3):
        await owner.send(conv, f"after {i}")  # 4, 5, 6
    await carol.typing(conv)
    await _until(lambda: carol_in.seqs(conv) == [1, 2, 3, 4, 5, 6] and 3 in bob2_in.seqs(conv))
    await asyncio.sleep(0.5)  # anything still on its way to bob would be here by now
    assert bob2_in.seqs(conv) == [1, 2, 3]
    assert bob2_in.msgs[-1]["meta"] == {"event": "removed", "users": [bob_name]}
    assert [e for e in bob2_in.events if e.get("conv") == conv] == []
    page = await bob2.sync(conv, 0, 100)
    assert [m["seq"] for m in page.msgs] == [1, 2, 3] and page.last == 3 and not page.more
    page = await bob2.sync(conv, 3, 100)
    assert page.msgs == [] and page.last == 3
    hist = await bob2.history(conv, 0, 100)
    assert [m["seq"] for m in hist.msgs] == [1, 2, 3]
    with pytest.raises(Forbidden):
        await bob2.send(conv, "let me back")
    with pytest.raises(Forbidden):
        await bob2.group_info(group)
    await owner.group_add(group, [bob_name])  # 7: back
    await owner.send(conv, "welcome back")  # 8
    await _until(lambda: bob2_in.seqs(conv) == [1, 2, 3, 7, 8])
    page = await bob2.sync(conv, 3, 100)
    assert [m["seq"] for m in page.msgs] == [7, 8] and page.last == 8


async def test_non_member_answers_are_identical_for_existing_and_made_up_groups(
    router_url: str, clients: Any, uid: Any
) -> None:
    owner, _ = await clients(uid("owner"))
    group, conv = await owner.group_create("secret", [uid("friend")])
    await owner.send(conv, "nobody else reads this")
    made_up = "zzzzMadeUpGroup1"
    mallory = await RawConn.open(router_url, uid("mallory"))
    try:
        for gid, cv in ((group, conv), (made_up, ids.group_conv(made_up))):
            answers = [
                await mallory.ask({"t": "send", "conv": cv, "cmid": "m1", "body": "hi"}),
                await mallory.ask({"t": "sync", "conv": cv, "after": 0}),
                await mallory.ask({"t": "history", "conv": cv, "before": 0}),
                await mallory.ask({"t": "read", "conv": cv, "seq": 1}),
                await mallory.ask({"t": "group.info", "group": gid}),
                await mallory.ask({"t": "group.add", "group": gid, "users": ["mallory2"]}),
                await mallory.ask({"t": "group.leave", "group": gid}),
            ]
            if gid == group:
                existing = answers
            else:
                missing = answers
        assert existing == missing
        conv_err = {"t": "err", "code": "forbidden", "msg": "not a member of this conversation", "retry": False}
        group_err = {"t": "err", "code": "forbidden", "msg": "not a member of this group", "retry": False}
        assert existing == [conv_err] * 4 + [group_err] * 3
    finally:
        await mallory.ws.close()


async def test_roles_and_rename_over_the_wire(clients: Any, uid: Any) -> None:
    a, b = uid("a"), uid("b")
    alice, _ = await clients(a)
    bob, _ = await clients(b)
    group, conv = await alice.group_create("team", [b])
    await alice.group_role(group, b, "admin")
    await bob.group_rename(group, "crew")
    info = await bob.group_info(group)
    assert info == {"group": group, "name": "crew", "members": sorted([a, b]), "roles": {a: "owner", b: "admin"}}
    with pytest.raises(Forbidden, match="the owner hands over ownership"):
        await alice.request("group.leave", group=group)
    await bob.group_leave(group)
    page = await alice.sync(conv, 0, 100)
    assert [(m["kind"], m["body"]) for m in page.msgs] == [
        ("system", f"{a} created team"),
        ("system", f"{a} made {b} admin"),
        ("system", f"{b} renamed the group to crew"),
        ("system", f"{b} left"),
    ]


async def test_contacts_block_refuses_direct_messages(clients: Any, uid: Any) -> None:
    a, b = uid("alice"), uid("bob")
    alice, _ = await clients(a)
    bob, bob_in = await clients(b)
    conv = ids.direct_conv(a, b)
    await alice.request("contact.request", user=b)
    assert (await alice.request("contact.list"))["contacts"] == [{"user": b, "state": "pending_out"}]
    assert (await bob.request("contact.list"))["contacts"] == [{"user": a, "state": "pending_in"}]
    await bob.request("contact.accept", user=a)
    assert (await alice.request("contact.list"))["contacts"] == [{"user": b, "state": "accepted"}]
    assert (await alice.send(conv, "hi friend")).seq == 1
    await bob.request("contact.block", user=a)
    assert (await bob.request("contact.list"))["contacts"] == [{"user": a, "state": "blocked"}]
    assert (await alice.request("contact.list"))["contacts"] == []
    with pytest.raises(Forbidden, match="not allowed to message this user"):
        await alice.send(conv, "are you there?")
    with pytest.raises(Forbidden, match="not allowed to contact this user"):
        await alice.request("contact.request", user=b)
    await bob.request("contact.unblock", user=a)
    assert (await alice.send(conv, "hello again")).seq == 2
    await _until(lambda: bob_in.seqs(conv) == [1, 2])


async def test_presence_get_and_events_to_online_contacts(clients: Any, uid: Any) -> None:
    a, b = uid("alice"), uid("bob")
    alice, alice_in = await clients(a)
    bob, bob_in = await clients(b)

    def saw(inbox: Inbox, user: str, online: bool) -> bool:
        return any(e["t"] == "presence" and e["user"] == user and e["online"] is online for e in inbox.events)

    await alice.request("contact.request", user=b)
    await bob.request("contact.accept", user=a)
    # a new contact learns the other's presence (after the debounce window)
    await _until(lambda: saw(alice_in, b, True) and saw(bob_in, a, True))
    answer = await alice.request("presence.get", users=[b, uid("ghost")])
    assert answer["users"][b]["online"] is True
    assert answer["users"][uid("ghost")] == {"online": False, "last_seen": 0}
    await bob.close()
    await _until(lambda: saw(alice_in, b, False))
    answer = await alice.request("presence.get", users=[b])
    assert answer["users"][b]["online"] is False and answer["users"][b]["last_seen"] > 0
    offline = [e for e in alice_in.events if e["t"] == "presence" and e["user"] == b and not e["online"]]
    assert offline == [{"t": "presence", "user": b, "online": False, "last_seen": answer["users"][b]["last_seen"]}]


async def test_large_group_fan_out_and_catch_up_of_an_offline_member(clients: Any, uid: Any) -> None:
    members = [uid(f"m{i}") for i in range(2000)]
    owner, _ = await clients(members[0])
    online = [await clients(m) for m in members[1:4]]
    group, conv = await owner.group_create("large", members[1:])
    assert len((await owner.group_info(group))["members"]) == 2000
    acks = [await owner.send(conv, f"m{i}") for i in range(5)]
    assert [a.seq for a in acks] == [2, 3, 4, 5, 6]
    for _, inbox in online:
        await _until(lambda inbox=inbox: inbox.seqs(conv) == [1, 2, 3, 4, 5, 6])
    late, late_in = await clients(members[-1])  # offline so far: catches up from the stream
    page = await late.sync(conv, 0, 100)
    assert [m["seq"] for m in page.msgs] == [1, 2, 3, 4, 5, 6] and page.last == 6
    assert {c["conv"]: c["last"] for c in await late.convs()}[conv] == 6
