"""RedisLedger against the real Redis on 127.0.0.1:6379, under a unique key prefix removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from im_actors.push.ledger import ClaimState, RedisLedger


def _redis_up() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
        return True
    return False


pytestmark = [pytest.mark.integration, pytest.mark.skipif(not _redis_up(), reason="no Redis at 127.0.0.1:6379")]


@pytest.fixture
async def ledger() -> AsyncIterator[RedisLedger]:
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    prefix = f"t{uuid.uuid4().hex[:8]}:im:"
    try:
        yield RedisLedger(client, prefix)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_claim_hold_release_done(ledger: RedisLedger) -> None:
    assert (await ledger.claim("u/d/c/1", "w1:0", 2000)).state is ClaimState.MINE
    held = await ledger.claim("u/d/c/1", "w2:0", 2000)
    assert held.state is ClaimState.HELD and 1000 < held.held_ms <= 2000
    await ledger.release("u/d/c/1", "w2:0")  # not w2's claim: stays
    assert (await ledger.claim("u/d/c/1", "w3:0", 2000)).state is ClaimState.HELD
    await ledger.release("u/d/c/1", "w1:0")
    assert (await ledger.claim("u/d/c/1", "w3:0", 2000)).state is ClaimState.MINE
    await ledger.done("u/d/c/1", 60)
    assert (await ledger.claim("u/d/c/1", "w4:0", 2000)).state is ClaimState.DONE


async def test_a_dead_workers_claim_ends_by_itself(ledger: RedisLedger) -> None:
    assert (await ledger.claim("u/d/c/2", "dead:0", 200)).state is ClaimState.MINE
    await asyncio.sleep(0.3)
    assert (await ledger.claim("u/d/c/2", "alive:0", 200)).state is ClaimState.MINE


async def test_concurrent_claims_have_one_winner(ledger: RedisLedger) -> None:
    claims = await asyncio.gather(*(ledger.claim("u/d/c/3", f"w{i}:0", 5000) for i in range(20)))
    assert [c.state for c in claims].count(ClaimState.MINE) == 1
