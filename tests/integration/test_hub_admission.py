"""Admission control at the hub: sends over ``hub_send_queue_max`` for a conversation shard that is
behind are refused at once with ``unavailable`` and ``retry_after_ms``; the queued ones still commit.
No Ray: the hub runs over tests/hubkit.py's fakes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from im_actors.protocol import SUBPROTOCOL_MSGPACK, decode, encode
from tests.hubkit import HubKit, hub_config
from tests.integration.test_hub_hostile import authed

pytestmark = pytest.mark.integration

MP = SUBPROTOCOL_MSGPACK


async def test_sends_over_the_queue_bound_are_refused_early_and_the_rest_commit() -> None:
    kit = HubKit(hub_config(hub_send_queue_max=4, hub_batch_max=1, hub_inflight=1))
    gate, entered = asyncio.Event(), asyncio.Event()
    real = kit.peers.conv_peer.handlers["send_batch"]

    async def slow_shard(items: list[Any], hub: str | None = None) -> list[dict[str, Any]]:
        entered.set()
        await gate.wait()  # the conversation shard is behind
        return real(items, hub)  # type: ignore[no-any-return]

    kit.peers.conv_peer.handlers["send_batch"] = slow_shard
    await kit.start()
    try:
        ws = await authed(kit, "alice")
        send = {"t": "send", "id": 1, "conv": "d:alice:bob", "cmid": "c1", "body": "x"}
        await ws.send(encode(send, MP))
        await asyncio.wait_for(entered.wait(), 10)  # the first batch is in flight
        for i in range(2, 8):
            await ws.send(encode({"t": "send", "id": i, "conv": "d:alice:bob", "cmid": f"c{i}", "body": "x"}, MP))
        answers: dict[int, dict[str, Any]] = {}
        async with asyncio.timeout(10):
            while len(answers) < 2:  # 1 in flight + 4 queued; the 6th and 7th are refused at once
                frame = decode(await ws.recv(), MP)
                answers[frame["id"]] = frame
            assert sorted(answers) == [6, 7]
            for refused in answers.values():
                assert refused["t"] == "err" and refused["code"] == "unavailable" and refused["retry"] is True
                assert refused["retry_after_ms"] >= 10
            gate.set()
            while len(answers) < 7:
                frame = decode(await ws.recv(), MP)
                if frame["t"] != "msg":  # alice's own device gets her messages too
                    answers[frame["id"]] = frame
        assert [answers[i]["seq"] for i in range(1, 6)] == [1, 2, 3, 4, 5]
        assert kit.hub.stats["overload_refused"] == 2
        # the refused sends are resent with the same cmid and commit after the others
        await ws.send(encode({"t": "send", "id": 8, "conv": "d:alice:bob", "cmid": "c6", "body": "x"}, MP))
        async with asyncio.timeout(10):
            ack = decode(await ws.recv(), MP)
            while ack["t"] == "msg":
                ack = decode(await ws.recv(), MP)
        assert ack["t"] == "ack" and ack["seq"] == 6
        await ws.close()
    finally:
        await kit.stop()


async def test_a_shard_that_does_not_take_a_route_does_not_hold_the_connection_up() -> None:
    from im_actors.errors import Unavailable

    kit = HubKit(hub_config())
    attempts: list[tuple[Any, ...]] = []

    def route(*conn: Any) -> None:
        attempts.append(conn)
        if len(attempts) < 3:
            raise Unavailable("conversation shard restarting")

    kit.peers.conv_peer.handlers["route"] = route
    await kit.start()
    try:
        ws = await authed(kit, "alice")  # ready came although the shard refused the route
        async with asyncio.timeout(10):
            while len(attempts) < 3:
                await asyncio.sleep(0.05)
        assert {a[:2] for a in attempts} == {("alice", "d1")}
        assert kit.hub.stats["routes_retried"] == 1
        await ws.close()
    finally:
        await kit.stop()
