"""The keyed batcher: natural batching, at most max_inflight calls per key, calls started in order."""

from __future__ import annotations

import asyncio

from im_actors.batching import Batcher


async def test_one_call_in_flight_gathers_what_arrives_meanwhile_into_the_next_batch() -> None:
    gate = asyncio.Event()
    batches: list[list[int]] = []

    async def send(key: str, items: list[int]) -> None:
        batches.append(items)
        await gate.wait()

    b: Batcher[str] = Batcher(send, max_items=10, window_ms=0)
    b.add("k", 1)
    await asyncio.sleep(0)  # the first item leaves at once (natural batching)
    for i in range(2, 6):
        b.add("k", i)
    await asyncio.sleep(0.01)
    assert batches == [[1]] and b.queued("k") == 4
    gate.set()
    await b.close()
    assert batches == [[1], [2, 3, 4, 5]]


async def test_max_inflight_calls_start_in_order_and_the_rest_wait_for_one_to_end() -> None:
    gates = [asyncio.Event() for _ in range(8)]
    started: list[list[int]] = []
    inflight, peak = 0, 0

    async def send(key: str, items: list[int]) -> None:
        nonlocal inflight, peak
        started.append(items)
        inflight += 1
        peak = max(peak, inflight)
        await gates[len(started) - 1].wait()
        inflight -= 1

    b: Batcher[str] = Batcher(send, max_items=100, window_ms=0, max_inflight=3)
    for i in range(1, 4):
        b.add("k", i)
        await asyncio.sleep(0)
    for i in range(4, 8):
        b.add("k", i)  # three calls in flight: these wait
    await asyncio.sleep(0.01)
    assert started == [[1], [2], [3]] and b.queued("k") == 4
    gates[1].set()  # the second call ends first
    await asyncio.sleep(0.01)
    assert started == [[1], [2], [3], [4, 5, 6, 7]]
    for g in gates:
        g.set()
    await b.close()
    assert peak == 3


async def test_an_exception_in_send_drops_that_batch_only() -> None:
    seen: list[list[int]] = []

    async def send(key: str, items: list[int]) -> None:
        seen.append(items)
        if items == [1]:
            raise RuntimeError("peer broke")

    b: Batcher[str] = Batcher(send, max_items=10, window_ms=0, max_inflight=2)
    b.add("k", 1)
    await asyncio.sleep(0.01)
    b.add("k", 2)
    await b.close()
    assert seen == [[1], [2]]
