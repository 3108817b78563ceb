"""Honest error answers through a real deployment (issue 14, defects 1 and 3).

The frames of the acceptance run, over the JSON subprotocol: a group name and a push token holding
a lone surrogate were answered ``unavailable`` (retry, forever) with the group shard's actor name in
the text; a push token for a provider the deployment does not enable was answered ``ok``. Each is
answered ``bad_request`` now, the connection stays open and keeps working.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from tests.rawconn import open_ready

pytestmark = pytest.mark.integration


class JsonConn:
    """A raw ``im.v1.json`` connection: frames are sent exactly as written (escapes included)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, router_url: str, user: str) -> JsonConn:
        return cls(await open_ready(router_url, user, "im.v1.json"))

    async def ask(self, text: str, rid: int) -> dict[str, Any]:
        await self.ws.send(text)
        while True:
            answer = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
            if answer.get("id") == rid:
                return dict(answer)


async def test_frames_that_can_never_succeed_are_bad_request_not_unavailable(
    router_url: str, deployment: Any, uid: Any
) -> None:
    conn = await JsonConn.open(router_url, uid("alice"))
    try:
        frames = [
            '{"t":"group.create","id":1,"name":"\\ud83d","members":[]}',
            '{"t":"push.register","id":2,"provider":"log","token":"tok\\ud83d"}',
            '{"t":"group.create","id":3,"name":"ok","members":["bob\\udc00"]}',
        ]
        for rid, text in enumerate(frames, start=1):
            answer = await conn.ask(text, rid)
            assert (answer["t"], answer["code"], answer["retry"]) == ("err", "bad_request", False), answer
            assert "-im-" not in answer["msg"]  # no actor name
        created = await conn.ask('{"t":"group.create","id":4,"name":"team \\ud83d\\ude00","members":[]}', 4)
        assert created["t"] == "ok" and created["group"]  # a whole emoji is fine; the connection still works
    finally:
        await conn.ws.close()


async def test_push_register_with_a_provider_that_is_not_enabled_says_so(
    router_url: str, deployment: Any, base_config: Any, uid: Any
) -> None:
    assert "apns" not in base_config.push_providers
    conn = await JsonConn.open(router_url, uid("bob"))
    try:
        answer = await conn.ask('{"t":"push.register","id":1,"provider":"apns","token":"abc"}', 1)
        assert (answer["t"], answer["code"], answer["retry"]) == ("err", "bad_request", False)
        assert "apns" in answer["msg"] and "not enabled" in answer["msg"]
        ok = await conn.ask('{"t":"push.register","id":2,"provider":"log","token":"abc"}', 2)
        assert ok["t"] == "ok"
    finally:
        await conn.ws.close()
