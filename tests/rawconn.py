"""A bare WebSocket client of PROTOCOL.md for integration tests: frames in, frames out, nothing hidden
(the client library would retry, reorder and fill gaps; these tests look at the frames themselves)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import msgpack
from websockets.asyncio.client import ClientConnection, connect


async def open_ready(router_url: str, user: str, subprotocol: str = "im.v1.msgpack") -> ClientConnection:
    """A WebSocket connection of ``user`` (development login), authenticated and ``ready``, on the
    hub the router hands out, speaking ``subprotocol`` (``im.v1.msgpack`` or ``im.v1.json``)."""
    async with aiohttp.ClientSession() as http:
        token = (await (await http.post(f"{router_url}/v1/login", json={"user": user})).json())["token"]
        hub = await (await http.get(f"{router_url}/v1/hub")).json()
    ws = await connect(hub["url"], subprotocols=[subprotocol])  # type: ignore[list-item]
    auth = {"t": "auth", "token": token, "device": "raw", "proto": 1}
    if subprotocol == "im.v1.json":
        await ws.send(json.dumps(auth))
        assert json.loads(await ws.recv())["t"] == "ready"
    else:
        await ws.send(msgpack.packb(auth))
        assert msgpack.unpackb(await ws.recv())["t"] == "ready"
    return ws


class RawConn:
    """A bare WebSocket client: frames in, frames out, nothing hidden."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0

    @classmethod
    async def open(cls, router_url: str, user: str) -> RawConn:
        return cls(await open_ready(router_url, user))

    async def ask(self, frame: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        await self.ws.send(msgpack.packb({**frame, "id": rid}))
        while True:
            answer = msgpack.unpackb(await asyncio.wait_for(self.ws.recv(), 20))
            if answer.get("id") == rid:
                return {k: v for k, v in answer.items() if k != "id"}
