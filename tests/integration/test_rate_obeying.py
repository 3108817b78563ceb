"""A client that obeys every ``retry_after_ms`` is never closed 4429, however many sends it has in
flight (issue 14, defect 3): a real hub (tests/hubkit.py, peers faked in-process, no Ray)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from im_actors import ids
from im_actors.protocol import SUBPROTOCOL_MSGPACK, decode, encode
from tests.hubkit import HubKit, hub_config

pytestmark = pytest.mark.integration

MP = SUBPROTOCOL_MSGPACK


async def test_eight_sends_in_flight_obeying_retry_after_are_all_acked_and_never_closed() -> None:
    # 20 sends/s after a burst of 4: 8 in flight are refused several times per 50 ms refill window;
    # counting each refusal closed this client after 11 of them.
    kit = HubKit(hub_config(rate_send_per_s=20.0, rate_send_burst=4, rate_refusals_max=10, rate_refusals_window_s=10.0))
    await kit.start()
    try:
        ws = await connect(kit.url, subprotocols=[Subprotocol(MP)], compression=None)
        await ws.send(encode({"t": "auth", "token": kit.token("alice"), "device": "d1", "proto": 1}, MP))
        assert decode(await asyncio.wait_for(ws.recv(), 5), MP)["t"] == "ready"
        conv = ids.direct_conv("alice", "bob")
        total, inflight = 48, 8
        answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        refused = 0

        async def reader() -> None:
            async for data in ws:
                frame = decode(data, MP)
                future = answers.get(frame.get("id", -1))
                if future is not None and not future.done():
                    future.set_result(frame)

        async def one(i: int) -> None:
            nonlocal refused
            rid = i * 100
            while True:
                rid += 1
                answers[rid] = asyncio.get_running_loop().create_future()
                await ws.send(encode({"t": "send", "id": rid, "conv": conv, "cmid": f"c{i}", "body": "x"}, MP))
                try:
                    answer = await asyncio.wait_for(answers[rid], 20)
                finally:
                    answers.pop(rid, None)
                if answer["t"] == "ack":
                    return
                assert answer["code"] == "rate_limited", answer
                refused += 1
                await asyncio.sleep(answer["retry_after_ms"] / 1000)  # obeys, resends the same cmid

        reading = asyncio.create_task(reader())
        slots = asyncio.Semaphore(inflight)

        async def slot(i: int) -> None:
            async with slots:
                await one(i)

        try:
            await asyncio.gather(*(slot(i) for i in range(total)))
        except ConnectionClosed as exc:
            raise AssertionError(f"closed {exc.rcvd} after {refused} refusals") from exc
        assert refused > 10  # more refusals than rate_refusals_max: the old count would have closed it
        assert kit.hub.stats["rate_closed"] == 0
        assert len(kit.peers.entries.get(conv, [])) == total  # every send committed once
        reading.cancel()
        await ws.close()
    finally:
        await kit.stop()
