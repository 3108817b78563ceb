"""A bug in the actor behind the hub is answered ``internal`` to the client, and the hub logs it with
the ids that follow the request (user, device, request id, conv), issue 14 defect 1. No Ray: the hub
runs over tests/hubkit.py's fakes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from im_actors.errors import Internal
from im_actors.protocol import SUBPROTOCOL_MSGPACK, decode, encode
from tests.hubkit import HubKit, hub_config
from tests.integration.test_hub_hostile import authed

pytestmark = pytest.mark.integration

MP = SUBPROTOCOL_MSGPACK


async def test_an_internal_answer_from_a_peer_is_logged_with_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    kit = HubKit(hub_config())

    def broken_sync(*_args: Any) -> Any:
        raise Internal("internal error (logged on the server)")  # what refs.Peer.call raises for a bug

    kit.peers.conv_peer.handlers["sync"] = broken_sync
    await kit.start()
    try:
        ws = await authed(kit, "alice")
        with caplog.at_level(logging.ERROR, logger="im_actors.hub"):
            await ws.send(encode({"t": "sync", "id": 41, "conv": "d:alice:bob", "after": 0}, MP))
            answer = decode(await asyncio.wait_for(ws.recv(), 10), MP)
        assert answer["t"] == "err" and answer["id"] == 41 and answer["code"] == "internal"
        assert "im-" not in answer["msg"]  # no actor names reach clients
        records = [r for r in caplog.records if getattr(r, "request_id", None) == 41]
        assert records, [r.getMessage() for r in caplog.records]
        assert records[0].user == "alice" and records[0].device == "d1" and records[0].conv == "d:alice:bob"
        # the connection stays usable
        await ws.send(encode({"t": "send", "id": 42, "conv": "d:alice:bob", "cmid": "c1", "body": "x"}, MP))
        async with asyncio.timeout(10):
            while (frame := decode(await ws.recv(), MP))["t"] == "msg":
                pass
        assert frame["t"] == "ack" and frame["id"] == 42
        await ws.close()
    finally:
        await kit.stop()
