"""A hub writes a frame at once when nothing of its connection waits (``hub_direct_write``,
:func:`im_actors.hub.write_now`), and through the writer task otherwise, in order either way: a
real hub (tests/hubkit.py, peers faked in-process, no Ray)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from im_actors.hub import DIRECT_WRITE_SUPPORTED
from im_actors.protocol import SUBPROTOCOL_MSGPACK, decode, encode
from tests.hubkit import HubKit, hub_config

pytestmark = pytest.mark.integration

MP = SUBPROTOCOL_MSGPACK


def _entry(seq: int, body: str = "hi") -> dict[str, Any]:
    return {"conv": "g:g1", "seq": seq, "sender": "bob", "cmid": f"c{seq}", "ts": 0, "kind": "text", "body": body}


async def _ready(kit: HubKit, user: str) -> Any:
    ws = await connect(kit.url, subprotocols=[Subprotocol(MP)], compression=None, max_size=None)
    await ws.send(encode({"t": "auth", "token": kit.token(user), "device": "d1", "proto": 1}, MP))
    assert decode(await asyncio.wait_for(ws.recv(), 5), MP)["t"] == "ready"
    return ws


@pytest.mark.parametrize("direct", [True, False])
async def test_a_frame_is_written_at_once_only_when_nothing_waits_and_order_holds(direct: bool) -> None:
    assert DIRECT_WRITE_SUPPORTED  # the websockets release in use has what write_now needs
    kit = HubKit(hub_config(hub_direct_write=direct))
    await kit.start()
    try:
        ws = await _ready(kit, "alice")
        [conn_id] = list(kit.hub.conns)
        await asyncio.sleep(0.05)  # the ready frame is out: nothing of this connection waits
        before = kit.hub.stats["frames_out"]
        kit.hub.deliver([(_entry(1), [conn_id])])
        # written synchronously inside deliver, or left to the writer task
        assert kit.hub.stats["frames_out"] - before == (1 if direct else 0)
        # a burst: the first frames may go at once, the rest queue behind the writer, in seq order
        kit.hub.deliver([(_entry(seq, "x" * 20_000), [conn_id]) for seq in range(2, 60)])
        seqs = [decode(await asyncio.wait_for(ws.recv(), 5), MP)["seq"] for _ in range(59)]
        assert seqs == list(range(1, 60))
        await ws.close()
    finally:
        await kit.stop()


async def test_a_batch_of_entries_leaves_in_one_write_per_connection_in_order() -> None:
    # A deliver of five entries to a MessagePack and a JSON connection: each connection's five
    # frames are framed by websockets and handed to its transport in one write.
    kit = HubKit(hub_config(hub_direct_write=True))
    await kit.start()
    try:
        alice = await _ready(kit, "alice")
        js = await connect(kit.url, subprotocols=[Subprotocol("im.v1.json")], compression=None)
        await js.send(json.dumps({"t": "auth", "token": kit.token("carol"), "device": "d1", "proto": 1}))
        assert json.loads(await asyncio.wait_for(js.recv(), 5))["t"] == "ready"
        await asyncio.sleep(0.05)  # both ready frames are out: nothing of either connection waits
        writes: dict[int, int] = {}
        for cid, conn in kit.hub.conns.items():
            transport, write = conn.ws.transport, conn.ws.transport.write

            def counted(data: bytes, cid: int = cid, write: Any = write) -> None:
                writes[cid] = writes.get(cid, 0) + 1
                write(data)

            transport.write = counted  # type: ignore[method-assign,assignment]
        ids = list(kit.hub.conns)
        before = kit.hub.stats["frames_out"]
        assert kit.hub.deliver([(_entry(seq), ids) for seq in range(1, 6)]) == 10
        assert kit.hub.stats["frames_out"] - before == 10  # all written inside deliver
        assert writes == {cid: 1 for cid in ids}  # one write per connection for its five frames
        assert [decode(await asyncio.wait_for(alice.recv(), 5), MP)["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]
        got = [await asyncio.wait_for(js.recv(), 5) for _ in range(5)]
        assert [json.loads(g)["seq"] for g in got] == [1, 2, 3, 4, 5]  # text frames, in the same write
        await alice.close()
        await js.close()
    finally:
        await kit.stop()
