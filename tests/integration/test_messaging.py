"""End to end through hubs, shards, store writers and push workers on a local Ray."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
from aiohttp import web
from websockets.asyncio.client import connect

from im_actors import ids
from im_actors.client import Client
from im_actors.errors import Conflict, Forbidden

pytestmark = pytest.mark.integration


async def _until(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class Inbox:
    """Collects the msgs a client delivers to the application."""

    def __init__(self) -> None:
        self.msgs: list[dict[str, Any]] = []

    def __call__(self, msg: dict[str, Any]) -> None:
        self.msgs.append(msg)

    def seqs(self, conv: str, kind: str | None = None) -> list[int]:
        return [m["seq"] for m in self.msgs if m["conv"] == conv and (kind is None or m["kind"] == kind)]


@pytest.fixture
async def clients(router_url: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[Client] = []

    async def make(user: str, device: str = "d1") -> tuple[Client, Inbox]:
        inbox = Inbox()
        client = Client(router_url, user, device, on_msg=inbox)
        await client.connect()
        made.append(client)
        return client, inbox

    yield make
    for c in made:
        await c.close()


async def test_send_ack_and_delivery_across_two_hubs(clients: Any, uid: Any) -> None:
    a_user, b_user = uid("alice"), uid("bob")
    alice, a_in = await clients(a_user)
    bob, b_in = await clients(b_user)
    for n in range(2, 10):  # the router balances by load; make sure the two hubs are exercised
        if bob.hub != alice.hub:
            break
        bob, b_in = await clients(b_user, f"d{n}")
    assert bob.hub != alice.hub
    conv = ids.direct_conv(a_user, b_user)
    acks = [await alice.send(conv, f"hello {i}") for i in range(5)]
    assert [a.seq for a in acks] == [1, 2, 3, 4, 5]
    assert all(not a.dup for a in acks)
    await _until(lambda: len(b_in.seqs(conv)) == 5)
    assert b_in.seqs(conv) == [1, 2, 3, 4, 5]
    assert [m["body"] for m in b_in.msgs] == [f"hello {i}" for i in range(5)]
    await _until(lambda: a_in.seqs(conv) == [1, 2, 3, 4, 5])  # the sender's device gets its own too


async def test_cmid_dedup_and_conflict(clients: Any, uid: Any) -> None:
    a_user, b_user = uid("alice"), uid("bob")
    alice, _ = await clients(a_user)
    conv = ids.direct_conv(a_user, b_user)
    first = await alice.send(conv, "once", cmid="fixed-1")
    again = await alice.send(conv, "once", cmid="fixed-1")
    assert (again.seq, again.ts, again.dup) == (first.seq, first.ts, True)
    with pytest.raises(Conflict):
        await alice.send(conv, "different", cmid="fixed-1")
    nxt = await alice.send(conv, "next")
    assert nxt.seq == first.seq + 1


async def test_sync_and_history_pages(clients: Any, uid: Any) -> None:
    a_user, b_user = uid("alice"), uid("bob")
    alice, _ = await clients(a_user)
    conv = ids.direct_conv(a_user, b_user)
    for i in range(12):
        await alice.send(conv, f"m{i}")
    page = await alice.sync(conv, after=0, limit=5)
    assert [m["seq"] for m in page.msgs] == [1, 2, 3, 4, 5] and page.more and page.last == 12
    page = await alice.sync(conv, after=10, limit=2)
    assert [m["seq"] for m in page.msgs] == [11, 12] and not page.more
    hist = await alice.history(conv, before=12, limit=3)
    assert [m["seq"] for m in hist.msgs] == [9, 10, 11] and hist.more
    assert [m["body"] for m in hist.msgs] == ["m8", "m9", "m10"]
    convs = {c["conv"]: c for c in await alice.convs()}
    assert convs[conv]["last"] == 12


async def test_group_fan_out_reaches_every_member_in_order(clients: Any, uid: Any) -> None:
    names = [uid(f"u{i}") for i in range(4)]
    pairs = [await clients(n) for n in names]
    owner = pairs[0][0]
    group, conv = await owner.group_create("team", names[1:])
    info = await owner.group_info(group)
    assert sorted(info["members"]) == sorted(names) and info["roles"][names[0]] == "owner"
    for i, (c, _) in enumerate(pairs):
        await c.send(conv, f"from {i}")
    for _, inbox in pairs:
        await _until(lambda inbox=inbox: len(inbox.seqs(conv)) == 5)
        assert inbox.seqs(conv) == [1, 2, 3, 4, 5]
        assert inbox.msgs[0]["kind"] == "system"
    outsider, _ = await clients(uid("eve"))
    with pytest.raises(Forbidden):
        await outsider.send(conv, "let me in")
    with pytest.raises(Forbidden):
        await outsider.sync(conv, 0, 10)
    late = uid("late")
    await owner.group_add(group, [late])
    late_client, late_in = await clients(late)
    await late_client.send(conv, "hi all")
    await _until(lambda: len(pairs[1][1].seqs(conv)) == 7)
    assert pairs[1][1].msgs[-2]["meta"]["event"] == "added"


async def test_second_connection_of_a_device_replaces_the_first(router_url: str, uid: Any) -> None:
    import aiohttp

    user = uid("dup")
    async with aiohttp.ClientSession() as http:
        token = (await (await http.post(f"{router_url}/v1/login", json={"user": user})).json())["token"]
        hub = await (await http.get(f"{router_url}/v1/hub")).json()
    auth = msgpack.packb({"t": "auth", "token": token, "device": "phone", "proto": 1})
    first = await connect(hub["url"], subprotocols=["im.v1.msgpack"])  # type: ignore[list-item]
    await first.send(auth)
    assert msgpack.unpackb(await first.recv())["t"] == "ready"
    second = await connect(hub["url"], subprotocols=["im.v1.msgpack"])  # type: ignore[list-item]
    await second.send(auth)
    assert msgpack.unpackb(await second.recv())["t"] == "ready"
    await asyncio.wait_for(first.wait_closed(), 10)
    assert first.close_code == 4409
    await second.close()


async def test_bad_token_and_bad_frames_close_only_that_connection(router_url: str, clients: Any, uid: Any) -> None:
    import aiohttp

    a_user = uid("ok")
    alice, a_in = await clients(a_user)
    async with aiohttp.ClientSession() as http:
        hub = await (await http.get(f"{router_url}/v1/hub")).json()
    ws = await connect(hub["url"], subprotocols=["im.v1.msgpack"])  # type: ignore[list-item]
    await ws.send(msgpack.packb({"t": "auth", "token": "forged.token.x", "device": "d", "proto": 1}))
    await asyncio.wait_for(ws.wait_closed(), 10)
    assert ws.close_code == 4401
    ws = await connect(hub["url"], subprotocols=["im.v1.json"])  # type: ignore[list-item]
    await ws.send("{not json")
    await asyncio.wait_for(ws.wait_closed(), 10)
    assert ws.close_code == 4400
    conv = ids.direct_conv(a_user, uid("zed"))
    assert (await alice.send(conv, "still fine")).seq == 1


async def test_offline_push_job_reaches_the_webhook_once(clients: Any, uid: Any, deployment: Any) -> None:
    received: list[tuple[dict[str, Any], dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((json.loads(body), dict(request.headers), body))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        a_user, b_user = uid("alice"), uid("bob")
        bob, _ = await clients(b_user, "phone")
        await bob.push_register("webhook", f"http://127.0.0.1:{port}/hook")
        await bob.close()
        alice, _ = await clients(a_user)
        conv = ids.direct_conv(a_user, b_user)
        ack = await alice.send(conv, "are you there?")
        await _until(lambda: len(received) >= 1, timeout=30)
        await asyncio.sleep(1.5)  # a second job, if any, would arrive by now
        assert len(received) == 1
        job, headers, raw = received[0]
        assert (job["user"], job["device"], job["conv"], job["seq"]) == (b_user, "phone", conv, ack.seq)
        assert job["preview"] == "are you there?"
        expected = hmac.new(b"test-secret", raw, hashlib.sha256).hexdigest()
        assert headers["X-Im-Signature"] == f"sha256={expected}"
    finally:
        await runner.cleanup()


async def test_sync_and_history_at_page_edges_and_one_past(clients: Any, uid: Any) -> None:
    a_user = uid("edge")
    alice, _ = await clients(a_user)
    conv = ids.direct_conv(a_user, uid("other"))
    for i in range(10):
        await alice.send(conv, f"e{i}")

    async def sync_seqs(after: int, limit: int) -> tuple[list[int], bool]:
        page = await alice.sync(conv, after=after, limit=limit)
        return [m["seq"] for m in page.msgs], page.more

    async def history_seqs(before: int, limit: int) -> tuple[list[int], bool]:
        page = await alice.history(conv, before=before, limit=limit)
        return [m["seq"] for m in page.msgs], page.more

    assert await sync_seqs(0, 10) == (list(range(1, 11)), False)  # ends exactly on the last entry
    assert await sync_seqs(0, 9) == (list(range(1, 10)), True)  # one short of it
    assert await sync_seqs(9, 1) == ([10], False)
    assert await sync_seqs(10, 1) == ([], False)  # one past it
    assert await sync_seqs(5, 5) == ([6, 7, 8, 9, 10], False)
    assert await history_seqs(11, 10) == (list(range(1, 11)), False)
    assert await history_seqs(11, 9) == (list(range(2, 11)), True)
    assert await history_seqs(2, 1) == ([1], False)
    assert await history_seqs(1, 5) == ([], False)  # nothing before the first entry
