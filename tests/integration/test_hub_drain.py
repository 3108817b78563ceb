"""Hub drain against a real hub (its WebSocket server unchanged, peers faked in process; no Ray):
``GET /ready``, 1001 closes spread over the window, handshakes refused while draining."""

from __future__ import annotations

import asyncio
import random
import secrets
import urllib.request

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from im_actors.cluster import hub_ready
from im_actors.errors import CLOSE_GOING_AWAY
from im_actors.protocol import SUBPROTOCOL_MSGPACK, decode, encode
from tests.hubkit import HubKit, hub_config

pytestmark = pytest.mark.integration

MP = SUBPROTOCOL_MSGPACK


async def _authed(kit: HubKit, user: str) -> ClientConnection:
    ws = await connect(kit.url, subprotocols=[Subprotocol(MP)], compression=None)
    await ws.send(encode({"t": "auth", "token": kit.token(user), "device": "d1", "proto": 1}, MP))
    assert decode(await asyncio.wait_for(ws.recv(), 5), MP)["t"] == "ready"
    return ws


async def _closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    try:
        async with asyncio.timeout(30):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, None)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - the test's own hub on loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_drain_closes_every_client_1001_spread_over_the_window_and_refuses_new_ones() -> None:
    kit = HubKit(hub_config())
    await kit.start()
    ready_url = kit.url.replace("ws://", "http://").replace("/v1/ws", "/ready")
    try:
        assert await asyncio.to_thread(_status, ready_url) == 200
        assert await asyncio.to_thread(hub_ready, kit.url)
        suffix = secrets.token_hex(3)
        clients = [await _authed(kit, f"u{i}-{suffix}") for i in range(12)]
        assert kit.hub.load()["draining"] is False
        drain = asyncio.create_task(kit.hub.drain(1.0, random.Random(3)))
        await asyncio.sleep(0)  # the drain has begun: the hub is draining
        assert kit.hub.load()["draining"] is True
        assert await asyncio.to_thread(_status, ready_url) == 503
        assert not await asyncio.to_thread(hub_ready, kit.url)
        with pytest.raises(InvalidStatus) as refused:
            await connect(kit.url, subprotocols=[Subprotocol(MP)])
        assert refused.value.response.status_code == 503
        closes = await asyncio.gather(*(_closed_with(ws) for ws in clients))
        result = await drain
        assert closes == [(CLOSE_GOING_AWAY, "hub draining")] * 12
        assert result["connections"] == result["closed"] == 12
        assert result["window_s"] == 1.0
        assert result["spread_s"] is not None and result["spread_s"] > 0  # not all at one moment
        assert result["first_close_s"] <= result["last_close_s"]
        assert kit.hub.conns == {}
    finally:
        await kit.stop()


async def test_drain_of_an_empty_hub_and_a_zero_window() -> None:
    kit = HubKit(hub_config())
    await kit.start()
    try:
        ws = await _authed(kit, f"z-{secrets.token_hex(3)}")
        result = await kit.hub.drain(0.0)
        assert await _closed_with(ws) == (CLOSE_GOING_AWAY, "hub draining")
        assert result["closed"] == 1 and result["spread_s"] == 0.0
        again = await kit.hub.drain(0.0)
        assert again["closed"] == 0 and again["spread_s"] is None
    finally:
        await kit.stop()
