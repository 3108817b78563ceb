"""The client-level contract: the same cases run against the fake server and against a real deployment.

:mod:`tests.fakeserver` stands in for im-actors in the client's and the drivers' unit tests. These
cases hold it to the real hub (as Phoenix.PubSub runs one test suite on every adapter): each one
speaks PROTOCOL.md through :class:`~im_actors.client.Client` only, with no fault hooks and nothing
that only one side has, and asserts what a client can observe. ``tests/unit/test_contract_fake.py``
runs them against the fake, ``tests/integration/test_contract_real.py`` against a local deployment;
a case that passes on one and fails on the other is a divergence to fix in the fake.

A case is ``async def case(env: Env) -> None``; :data:`CASES` lists them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from im_actors import ids
from im_actors.client import Client
from im_actors.errors import BadRequest, CloseConnection, Conflict, Forbidden
from im_actors.protocol import SUBPROTOCOL_JSON

__all__ = ["CASES", "Env", "Inbox"]

#: How long a case waits for a delivery before it fails (seconds). Generous: the real deployment
#: shares 2 cores with other test runs. Only an upper bound, never an assertion on speed.
WAIT_S = 20.0


class Inbox:
    """What one client handed to the application: ``msgs`` and ``events`` (receipt, typing, presence)."""

    def __init__(self) -> None:
        self.msgs: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def on_msg(self, msg: dict[str, Any]) -> None:
        self.msgs.append(msg)

    def on_event(self, frame: dict[str, Any]) -> None:
        self.events.append(frame)

    def seqs(self, conv: str) -> list[int]:
        return [m["seq"] for m in self.msgs if m["conv"] == conv]

    def of(self, conv: str) -> list[dict[str, Any]]:
        return [m for m in self.msgs if m["conv"] == conv]


@dataclass
class Env:
    """What a case gets: the router URL and a way to make unique user ids.

    ``uid("alice")`` is unique per case run (``alice-3f2a``), so cases share a deployment safely.
    Clients made with :meth:`client` are closed by :meth:`close_all`.
    """

    router_url: str
    uid: Callable[[str], str]
    made: list[Client] = field(default_factory=list)

    async def client(self, user: str, device: str = "d1", connect: bool = True, **kw: Any) -> tuple[Client, Inbox]:
        inbox = Inbox()
        client = Client(self.router_url, user, device, on_msg=inbox.on_msg, on_event=inbox.on_event, **kw)
        self.made.append(client)
        if connect:
            await client.connect()
        return client, inbox

    async def close_all(self) -> None:
        await asyncio.gather(*(c.close() for c in self.made))


async def until(pred: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Wait until ``pred()`` holds; AssertionError after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def quiet() -> None:
    """Let frames still on their way arrive before a case asserts that nothing more came."""
    await asyncio.sleep(0.3)


# --- the cases ---------------------------------------------------------------------------------------


async def send_acks_and_fans_out_to_every_device(env: Env) -> None:
    a, b = env.uid("alice"), env.uid("bob")
    alice, a_in = await env.client(a)
    bob1, b1_in = await env.client(b, "phone")
    bob2, b2_in = await env.client(b, "laptop")
    conv = ids.direct_conv(a, b)
    acks = [await alice.send(conv, f"m{i}", cmid=f"c{i}") for i in range(3)]
    assert [(x.conv, x.seq, x.dup) for x in acks] == [(conv, 1, False), (conv, 2, False), (conv, 3, False)]
    assert all(isinstance(x.ts, int) and x.ts > 0 for x in acks)
    for inbox in (a_in, b1_in, b2_in):  # the sender's own device too
        await until(lambda inbox=inbox: len(inbox.seqs(conv)) >= 3)
    await quiet()
    for inbox in (a_in, b1_in, b2_in):
        assert inbox.seqs(conv) == [1, 2, 3]
        got = inbox.of(conv)
        assert [(m["t"], m["from"], m["cmid"], m["kind"], m["body"]) for m in got] == [
            ("msg", a, f"c{i}", "text", f"m{i}") for i in range(3)
        ]
        assert [m["ts"] for m in got] == [x.ts for x in acks]


async def resend_of_a_cmid_is_a_dup_and_reuse_is_a_conflict(env: Env) -> None:
    a, b = env.uid("alice"), env.uid("bob")
    alice, _ = await env.client(a)
    conv = ids.direct_conv(a, b)
    first = await alice.send(conv, "hello", cmid="same")
    again = await alice.send(conv, "hello", cmid="same")
    assert (again.seq, again.ts, again.dup) == (first.seq, first.ts, True)
    with pytest.raises(Conflict):
        await alice.send(conv, "a different body", cmid="same")
    nxt = await alice.send(conv, "next")
    assert nxt.seq == first.seq + 1  # neither the dup nor the conflict took a seq


async def sync_and_history_pages(env: Env) -> None:
    a, b = env.uid("alice"), env.uid("bob")
    alice, _ = await env.client(a)
    conv = ids.direct_conv(a, b)
    for i in range(5):
        await alice.send(conv, f"m{i}")
    page = await alice.sync(conv, after=1, limit=2)
    assert [m["seq"] for m in page.msgs] == [2, 3] and page.last == 5 and page.more
    assert [m["body"] for m in page.msgs] == ["m1", "m2"]
    page = await alice.sync(conv, after=3, limit=2)
    assert [m["seq"] for m in page.msgs] == [4, 5] and page.last == 5 and not page.more
    page = await alice.sync(conv, after=5)
    assert page.msgs == [] and page.last == 5 and not page.more
    old = await alice.history(conv, before=5, limit=2)
    assert [m["seq"] for m in old.msgs] == [3, 4]
    newest = await alice.history(conv, before=0, limit=2)  # before 0: the newest entries
    assert [m["seq"] for m in newest.msgs] == [4, 5]
    assert [m["seq"] for m in (await alice.history(conv, before=1)).msgs] == []


async def convs_and_read_receipts(env: Env) -> None:
    a, b = env.uid("alice"), env.uid("bob")
    alice, a_in = await env.client(a)
    bob, _ = await env.client(b)
    conv = ids.direct_conv(a, b)
    await alice.send(conv, "one")
    await alice.send(conv, "two")
    await bob.read(conv, 2)
    await until(lambda: any(e["t"] == "receipt" for e in a_in.events))
    receipt = next(e for e in a_in.events if e["t"] == "receipt")
    assert (receipt["conv"], receipt["user"], receipt["seq"]) == (conv, b, 2)
    assert {"conv": conv, "last": 2, "read": 2} in await bob.convs()
    assert {"conv": conv, "last": 2, "read": 0} in await alice.convs()


async def non_members_are_forbidden(env: Env) -> None:
    a, b, c = env.uid("alice"), env.uid("bob"), env.uid("carol")
    alice, _ = await env.client(a)
    carol, _ = await env.client(c)
    conv = ids.direct_conv(a, b)
    await alice.send(conv, "private")
    group, gconv = await alice.group_create("secret", [b])
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: carol.send(conv, "let me in"),
        lambda: carol.sync(conv, 0),
        lambda: carol.history(conv, 0),
        lambda: carol.send(gconv, "let me in"),
        lambda: carol.group_info(group),
    ]
    for attempt in attempts:
        with pytest.raises(Forbidden):
            await attempt()
    assert all(c_["conv"] not in (conv, gconv) for c_ in await carol.convs())


async def group_membership_changes_are_entries(env: Env) -> None:
    o, b, c = env.uid("owner"), env.uid("bob"), env.uid("carol")
    owner, o_in = await env.client(o)
    bob, b_in = await env.client(b)
    carol, c_in = await env.client(c)
    group, conv = await owner.group_create("team", [b])
    assert conv == ids.group_conv(group)
    await until(lambda: b_in.seqs(conv) == [1])  # a conversation seen after connect starts at 0
    created = b_in.of(conv)[0]
    assert created["kind"] == "system" and created["meta"]["event"] == "created"
    assert set(created["meta"]["users"]) == {o, b} and created["meta"]["owner"] == o
    info = await bob.group_info(group)
    assert info["group"] == group and info["name"] == "team"
    assert set(info["members"]) == {o, b} and info["roles"] == {o: "owner", b: "member"}
    await owner.group_add(group, [c])  # seq 2
    await owner.send(conv, "welcome")  # seq 3
    await until(lambda: 3 in c_in.seqs(conv) and 3 in b_in.seqs(conv))
    assert c_in.seqs(conv) == [2, 3]  # the newcomer starts at its "added" entry
    assert c_in.of(conv)[0]["meta"] == {"event": "added", "users": [c]}
    await owner.group_remove(group, [b])  # seq 4
    await owner.send(conv, "after bob")  # seq 5
    await until(lambda: o_in.seqs(conv) == [1, 2, 3, 4, 5] and c_in.seqs(conv) == [2, 3, 4, 5])
    await until(lambda: 4 in b_in.seqs(conv))
    await quiet()
    assert b_in.seqs(conv) == [1, 2, 3, 4]  # the removed member gets the removal and nothing after
    assert b_in.of(conv)[-1]["meta"] == {"event": "removed", "users": [b]}
    with pytest.raises(Forbidden):
        await bob.send(conv, "still here?")
    assert set((await carol.group_info(group))["members"]) == {o, c}


async def typing_and_presence(env: Env) -> None:
    a, b = env.uid("alice"), env.uid("bob")
    alice, a_in = await env.client(a)
    bob, _ = await env.client(b)
    conv = ids.direct_conv(a, b)
    await alice.send(conv, "hi")
    await bob.typing(conv)
    await until(lambda: any(e["t"] == "typing" for e in a_in.events))
    typing = next(e for e in a_in.events if e["t"] == "typing")
    assert (typing["conv"], typing["user"]) == (conv, b)
    answer = await alice.request("presence.get", users=[b, env.uid("nobody")])
    assert answer["t"] == "presence"
    assert answer["users"][b]["online"] is True
    assert answer["users"][env.uid("nobody")]["online"] is False


async def a_second_connection_of_a_device_replaces_the_first(env: Env) -> None:
    b = env.uid("bob")
    first, _ = await env.client(b, "phone")
    second, _ = await env.client(b, "phone")
    await until(lambda: not first.connected)
    await quiet()
    assert first.reconnects == 0 and second.connected
    with pytest.raises(CloseConnection) as err:
        await first.convs()
    assert err.value.close_code == 4409
    assert isinstance(await second.convs(), list)


async def bad_requests_are_answered_and_the_connection_stays(env: Env) -> None:
    a = env.uid("alice")
    alice, _ = await env.client(a)
    with pytest.raises(BadRequest):
        await alice.request("no.such.request")
    with pytest.raises(BadRequest):
        await alice.request("sync", conv="not a conversation", after=0)
    with pytest.raises(BadRequest):
        await alice.request("send", conv=ids.direct_conv(a, env.uid("bob")), cmid="c1")  # no body
    assert alice.connected and isinstance(await alice.convs(), list)


async def a_forged_token_is_refused_with_4401(env: Env) -> None:
    mallory, _ = await env.client(env.uid("mallory"), connect=False, token="forged")
    with pytest.raises(CloseConnection) as err:
        await mallory.connect()
    assert err.value.close_code == 4401


async def json_subprotocol_carries_binary_bodies(env: Env) -> None:
    a, b = env.uid("alice"), env.uid("bob")
    alice, a_in = await env.client(a, subprotocol=SUBPROTOCOL_JSON)
    bob, b_in = await env.client(b)
    conv = ids.direct_conv(a, b)
    await alice.send(conv, b"\x00\x01\xff", kind="bin", meta={"n": 1.5})
    await until(lambda: len(a_in.seqs(conv)) == 1 and len(b_in.seqs(conv)) == 1)
    for inbox in (a_in, b_in):
        got = inbox.of(conv)[0]
        assert (got["body"], got["kind"], got["meta"]) == (b"\x00\x01\xff", "bin", {"n": 1.5})


#: Every case, in a stable order (pytest ids are the function names).
CASES: list[Callable[[Env], Awaitable[None]]] = [
    send_acks_and_fans_out_to_every_device,
    resend_of_a_cmid_is_a_dup_and_reuse_is_a_conflict,
    sync_and_history_pages,
    convs_and_read_receipts,
    non_members_are_forbidden,
    group_membership_changes_are_entries,
    typing_and_presence,
    a_second_connection_of_a_device_replaces_the_first,
    bad_requests_are_answered_and_the_connection_stays,
    a_forged_token_is_refused_with_4401,
    json_subprotocol_carries_binary_bodies,
]
