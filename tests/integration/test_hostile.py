"""Hostile clients against the whole deployment (2 hubs on a local Ray): fuzzing a live hub while a
well-behaved client chats through it, impersonation, and the per-user connection bound over hubs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import aiohttp
import msgpack
import pytest
import ray
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from im_actors import ids
from im_actors.auth import issue_token
from im_actors.client import Client
from im_actors.cluster import Deployment, deploy, teardown
from im_actors.config import Config
from im_actors.errors import Forbidden
from im_actors.protocol import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, decode, encode
from im_actors.services import purge_deployment
from tests.hubkit import masked_frame

pytestmark = pytest.mark.integration

MP, JS = SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON
#: Every close code a fuzzed connection may get (PROTOCOL.md section 7); 1000/1006 when the fuzzer itself
#: stops or a frame it wrote was cut mid-way.
FUZZ_CLOSE_CODES = {1000, 1002, 1006, 1007, 1009, 4400, 4401, 4429}


_VALID = [
    {"t": "send", "id": 1, "conv": "d:a:b", "cmid": "c1", "body": "hello", "meta": {"k": [1, 2]}},
    {"t": "sync", "id": 2, "conv": "g:abc", "after": 0, "limit": 10},
    {"t": "group.create", "id": 3, "name": "x", "members": ["a", "b"]},
    {"t": "presence.get", "id": 4, "users": ["a"]},
    {"t": "typing", "conv": "d:a:b"},
    {"t": "read", "id": 5, "conv": "d:a:b", "seq": 3},
]


def _hostile_payload(rng: random.Random, sub: str) -> tuple[str, bytes | str]:
    """One hostile thing to do: ``("frame", data)`` to send as a frame, or ``("raw", bytes)`` to write."""
    kind = rng.randrange(9)
    frame = dict(rng.choice(_VALID))
    if kind == 0:
        return "frame", os.urandom(rng.randrange(1, 200)) if sub == MP else "".join(
            chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 100))
        )
    if kind == 1:  # a valid frame, mutated
        data = bytearray(msgpack.packb(frame))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return "frame", bytes(data) if sub == MP else bytes(data).decode("latin-1")
    if kind == 2:  # truncated
        data = encode(frame, sub)
        return "frame", data[: rng.randrange(1, len(data))]
    if kind == 3:  # a header claiming 1 GiB
        return "raw", masked_frame(0x2, b"x" * 8, claimed_len=1 << 30)
    if kind == 4:  # invalid UTF-8 in a text frame
        return "raw", masked_frame(0x1, b'{"t":"\xc3\x28"}')
    if kind == 5:  # deep nesting
        return "frame", encode({"t": "send", "meta": _deep(rng.randrange(20, 200))}, sub)
    if kind == 6:  # wrong types in a well-formed frame (answered bad_request, connection kept)
        key = rng.choice(list(frame))
        frame[key] = rng.choice([None, -1, 2**70 if sub == JS else 2**63, [], {"x": 1}, "", "z" * 300, True])
        return "frame", encode(frame, sub)
    if kind == 7:  # a reserved opcode
        return "raw", masked_frame(rng.choice([0x3, 0x4, 0xB]), b"xx")
    return "frame", encode(frame, sub)


def _deep(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


async def _fuzzer(url: str, config: Config, index: int, until: float, codes: list[int]) -> None:
    rng = random.Random(index)
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        sub = rng.choice([MP, JS])
        try:
            ws = await connect(url, subprotocols=[Subprotocol(sub)], compression=None, max_size=None, open_timeout=10)
        except (OSError, InvalidHandshake, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        try:
            if rng.random() < 0.8:  # most fuzzers get past auth; the rest fuzz the auth frame itself
                auth = {"t": "auth", "token": issue_token(config, f"fuzz-{index}"), "device": "d", "proto": 1}
                await ws.send(encode(auth, sub))
            for _ in range(rng.randrange(1, 30)):
                what, data = _hostile_payload(rng, sub)
                if what == "raw":
                    if ws.transport.is_closing():
                        break
                    try:
                        ws.transport.write(data)  # type: ignore[arg-type]
                    except RuntimeError:  # the hub closed it meanwhile (write after EOF)
                        break
                else:
                    await ws.send(data)
                await asyncio.sleep(rng.random() * 0.02)
            await ws.close()
        except ConnectionClosed:
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ws.wait_closed(), 15)
        codes.append(ws.close_code if ws.close_code is not None else 1006)


async def _hub_urls(router_url: str) -> dict[str, str]:
    """``{hub name: ws url}`` of the live hubs, from the router (a hub restarted by an earlier test
    listens on a new port: ``Deployment.hub_urls`` is what they were at deploy time)."""
    async with aiohttp.ClientSession() as http, http.get(f"{router_url}/v1/health") as resp:
        health = await resp.json()
    return {h["hub"]: h["url"] for h in health["hubs"] if h["alive"]}


async def _client_on(router_url: str, user: str, hub: str | None, on_msg: Callable[..., Any]) -> Client:
    """A connected client, reconnecting devices until it is on ``hub`` (any hub when None)."""
    for n in range(20):
        client = Client(router_url, user, f"d{n}", on_msg=on_msg)
        await client.connect()
        if hub is None or client.hub == hub:
            return client
        await client.close()
    raise AssertionError(f"the router never handed out {hub}")


@pytest.fixture
async def made() -> AsyncIterator[list[Client]]:
    """Clients a test made: closed afterwards, whatever happened."""
    clients: list[Client] = []
    yield clients
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()


async def test_fuzzing_a_live_hub_costs_a_chatting_client_nothing(
    deployment: Deployment, base_config: Config, uid: Any, made: list[Client]
) -> None:
    a_user, b_user = uid("alice"), uid("bob")
    got: list[dict[str, Any]] = []
    alice = await _client_on(deployment.router_url, a_user, None, lambda m: None)
    made.append(alice)
    hub = alice.hub
    assert hub is not None
    bob = await _client_on(deployment.router_url, b_user, hub, got.append)
    made.append(bob)
    url = (await _hub_urls(deployment.router_url))[hub]
    conv = ids.direct_conv(a_user, b_user)
    loop = asyncio.get_running_loop()
    until = loop.time() + 12
    codes: list[int] = []
    fuzzers = [asyncio.create_task(_fuzzer(url, base_config, i, until, codes)) for i in range(24)]
    sent = 0
    try:
        while loop.time() < until:
            ack = await alice.send(conv, f"m{sent}", cmid=f"c{sent}")
            sent += 1
            assert ack.seq == sent and not ack.dup
            await asyncio.sleep(0.02)
        await asyncio.gather(*fuzzers)
    finally:
        for task in fuzzers:
            task.cancel()
        await asyncio.gather(*fuzzers, return_exceptions=True)
    deadline = loop.time() + 30
    while len(got) < sent and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert [m["seq"] for m in got] == list(range(1, sent + 1))
    assert [m["body"] for m in got] == [f"m{i}" for i in range(sent)]
    for client in (alice, bob):
        stats = client.stats()
        assert stats["reconnects"] == 0 and stats["resends"] == 0 and stats["bad_frames"] == 0, stats
        assert client.hub == hub
    assert len(codes) >= 24 and set(codes) <= FUZZ_CLOSE_CODES, sorted(set(codes))
    assert {1009, 4400} <= set(codes)
    handle = ray.get_actor(hub, namespace="im")
    stats = await handle.stats.remote()  # the hub is up and answering
    assert stats["frames_in"] > sent
    # ... releases every fuzzing connection (under CPU contention it takes the hub some seconds to
    # work through their closes) and keeps only the two chatting clients ...
    deadline = loop.time() + 60
    while (await handle.stats.remote())["connections"] != 2:
        assert loop.time() < deadline, await handle.stats.remote()
        await asyncio.sleep(0.2)
    # ... and is handed out by the router again (under CPU contention a busy hub may miss a heartbeat)
    deadline = loop.time() + 30
    while hub not in await _hub_urls(deployment.router_url):
        assert loop.time() < deadline, "the fuzzed hub is not handed out again"
        await asyncio.sleep(0.2)


async def test_a_token_for_one_user_never_acts_as_another(deployment: Deployment, uid: Any) -> None:
    a_user, b_user, c_user = uid("alice"), uid("bob"), uid("carol")
    bob_got: list[dict[str, Any]] = []
    alice = await _client_on(deployment.router_url, a_user, None, lambda m: None)
    bob = await _client_on(deployment.router_url, b_user, None, bob_got.append)
    carol = await _client_on(deployment.router_url, c_user, None, lambda m: None)
    try:
        bc = ids.direct_conv(b_user, c_user)
        assert (await bob.send(bc, "private")).seq == 1
        with pytest.raises(Forbidden):
            await alice.sync(bc)
        with pytest.raises(Forbidden):
            await alice.history(bc, before=10)
        with pytest.raises(Forbidden):
            await alice.send(bc, "intrude")
        with pytest.raises(Forbidden):
            await alice.read(bc, 1)
        group, _gconv = await carol.group_create("closed", [b_user])
        with pytest.raises(Forbidden):
            await alice.group_info(group)
        with pytest.raises(Forbidden):
            await alice.group_add(group, [a_user])
        # A frame claiming another sender: the sender is the token's subject.
        url = (await _hub_urls(deployment.router_url))[alice.hub or ""]
        ws: ClientConnection = await connect(url, subprotocols=[Subprotocol(MP)])
        await ws.send(encode({"t": "auth", "token": alice._token, "device": "raw", "proto": 1}, MP))
        assert decode(await ws.recv(), MP)["user"] == a_user
        ab = ids.direct_conv(a_user, b_user)
        await ws.send(encode({"t": "send", "id": 1, "conv": ab, "cmid": "x", "body": "hi", "from": b_user}, MP))
        await ws.close()
        deadline = asyncio.get_running_loop().time() + 15
        while not any(m["conv"] == ab for m in bob_got) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert [m["from"] for m in bob_got if m["conv"] == ab] == [a_user]
        assert (await carol.sync(bc)).msgs[0]["body"] == "private"  # nothing of alice's got in
        assert len((await carol.sync(bc)).msgs) == 1
    finally:
        for c in (alice, bob, carol):
            await c.close()


async def test_connections_per_user_are_bounded_over_both_hubs(
    deployment: Deployment, base_config: Config, uid: Any
) -> None:
    user = uid("many")
    token = issue_token(base_config, user)
    urls = sorted((await _hub_urls(deployment.router_url)).values())
    limit = base_config.max_connections_per_user
    opened: list[ClientConnection] = []
    try:
        for n in range(limit):
            ws = await connect(urls[n % len(urls)], subprotocols=[Subprotocol(MP)])
            await ws.send(encode({"t": "auth", "token": token, "device": f"d{n}", "proto": 1}, MP))
            assert decode(await ws.recv(), MP)["t"] == "ready"
            opened.append(ws)
        for url in urls:  # one more device, on either hub, is refused
            ws = await connect(url, subprotocols=[Subprotocol(MP)])
            await ws.send(encode({"t": "auth", "token": token, "device": "extra", "proto": 1}, MP))
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.recv()
            assert ws.close_code == 4429
        await opened.pop().close()  # one goes: a new device is accepted again
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            ws = await connect(urls[0], subprotocols=[Subprotocol(MP)])
            await ws.send(encode({"t": "auth", "token": token, "device": "extra", "proto": 1}, MP))
            try:
                assert decode(await ws.recv(), MP)["t"] == "ready"
                opened.append(ws)
                break
            except ConnectionClosed:
                assert ws.close_code == 4429  # the disconnect has not reached the session shard yet
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
    finally:
        for ws in opened:
            await ws.close()


@pytest.fixture(scope="module")
def small_queue_deployment(base_config: Config, local_ray: None) -> Iterator[Deployment]:
    """A second, small deployment (1 hub) whose hubs have small send queues and socket buffers, so a
    reader that never reads overflows within a few hundred KiB instead of ~20 MiB."""
    cfg = base_config.model_copy(
        update={
            "deployment": f"{base_config.deployment}sq",
            "hubs": 1,
            "session_shards": 1,
            "conv_shards": 1,
            "store_writers": 0,
            "push_workers": 0,
            "send_queue_bytes": 256 << 10,
            "socket_send_buffer_bytes": 64 << 10,
        }
    )
    dep = deploy(cfg)
    try:
        yield dep
    finally:
        teardown(cfg)
        purge_deployment(cfg)


async def test_a_member_that_never_reads_in_a_busy_group_on_the_deployment(
    small_queue_deployment: Deployment, base_config: Config, uid: Any, made: list[Client]
) -> None:
    dep = small_queue_deployment
    members = [uid(f"m{i}") for i in range(50)]
    inboxes: dict[str, list[int]] = {m: [] for m in members[:-1]}
    for m in members[:-1]:
        client = Client(dep.router_url, m, on_msg=lambda msg, m=m: inboxes[m].append(msg["seq"]))
        await client.connect()
        made.append(client)
    (hub_url,) = dep.hub_urls.values()
    u = urlparse(hub_url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((u.hostname, u.port))
    sock.setblocking(False)
    slow = await connect(hub_url, sock=sock, subprotocols=[Subprotocol(MP)], max_queue=1, compression=None)
    await slow.send(
        encode({"t": "auth", "token": issue_token(base_config, members[-1]), "device": "d", "proto": 1}, MP)
    )
    assert decode(await slow.recv(), MP)["t"] == "ready"
    sender = made[0]
    group, conv = await sender.group_create("busy", members[1:])
    body = "x" * 4096
    n = 150
    for start in range(0, n, 10):
        await asyncio.gather(*(sender.send(conv, body, cmid=f"c{i}") for i in range(start, start + 10)))
    hub = ray.get_actor(next(iter(dep.hub_urls)), namespace="im")
    deadline = asyncio.get_running_loop().time() + 60
    while any(len([s for s in seqs if s > 1]) < n for seqs in inboxes.values()):
        assert asyncio.get_running_loop().time() < deadline, {m: len(s) for m, s in inboxes.items()}
        await asyncio.sleep(0.1)
    stats = await hub.stats.remote()
    assert stats["slow_closed"] == 1
    assert stats["queued_bytes_max"] <= 256 << 10
    for seqs in inboxes.values():  # seq 1 is the group's creation entry; then every message, once, in order
        assert seqs == list(range(1, n + 2))
    for client in made:
        assert client.stats()["reconnects"] == 0
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        async with asyncio.timeout(20):
            async for _ in slow:
                pass
    assert slow.close_code == 4508, slow.close_code
