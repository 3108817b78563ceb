"""The job ledger: what makes a push reach its provider once although RabbitMQ delivers at least once.

RabbitMQ hands a job out again when the worker that had it did not ack it (the worker died, its
connection or the broker went away); a fan-out retried by a conversation shard, or a publisher that lost
a confirm, publishes the same job twice. Every copy has the same ``job_id`` (``user/device/conv/seq``),
so the workers keep one record per job id in Redis, under the deployment's prefix::

    <key_prefix>push:job:<job_id>  = <worker id>   a worker is sending it: a claim, expires after
                                                   push_claim_ms (a worker that dies leaves it behind)
                                   = "done"        the provider answered (delivered, invalid token or a
                                                   permanent failure); kept push_dedup_ttl_s seconds

A worker claims a job (``SET NX PX``) before calling the provider. A copy that finds ``done`` is acked
and not sent; a copy that finds another worker's claim waits in the retry queue until the claim ends,
then claims it itself (the claimant died, or gave it back after a transient failure). This leaves one
window: a worker that dies after the provider received the request and before it wrote ``done`` has
its job sent again when the claim ends. Nothing else sends a job twice while the record lives.

:class:`RedisLedger` is the one the workers use; :class:`MemoryLedger` keeps the same records in a
dict (one process; unit tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import redis.asyncio as aioredis

from im_actors.config import Config

__all__ = ["ClaimState", "Claim", "Ledger", "RedisLedger", "MemoryLedger", "DONE", "ledger_redis"]

#: Value of the record of a job that reached its provider.
DONE = "done"

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class ClaimState(StrEnum):
    """What :meth:`Ledger.claim` found."""

    MINE = "mine"  # claimed now: send it
    DONE = "done"  # already reached its provider: ack, do not send
    HELD = "held"  # another worker's claim: come back after held_ms


@dataclass(frozen=True)
class Claim:
    """The answer of :meth:`Ledger.claim`; ``held_ms`` is the claim's remaining life when HELD."""

    state: ClaimState
    held_ms: int = 0


class Ledger(Protocol):
    """Records of jobs being sent and sent (module docstring)."""

    async def claim(self, job_id: str, owner: str, claim_ms: int) -> Claim:
        """Claim ``job_id`` for ``owner`` (unique per handling of one delivery: a second copy handed to
        the same worker finds the first one's claim) for ``claim_ms``, or say that it is held or done."""

    async def done(self, job_id: str, ttl_s: int) -> None:
        """Record that ``job_id`` reached its provider, for ``ttl_s`` seconds."""

    async def release(self, job_id: str, owner: str) -> None:
        """Give back ``owner``'s claim on ``job_id`` (a transient failure: the retry will claim it again)."""


def ledger_redis(config: Config) -> aioredis.Redis:
    """A Redis client for one worker's ledger: a blocking pool of ``push_prefetch + 8`` connections (every
    job in hand may wait on Redis at once; beyond the pool a call waits up to 5 s for a connection rather
    than failing), 2 s socket timeouts."""
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url,
        max_connections=config.push_prefetch + 8,
        timeout=5,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
    )
    return aioredis.Redis(connection_pool=pool)


class RedisLedger:
    """:class:`Ledger` in Redis (``redis.asyncio``) under ``prefix`` (``config.key_prefix``).

    Raises ``redis`` errors when Redis does not answer; the worker then sends without the ledger
    (at least once) and counts it.
    """

    def __init__(self, redis: Any, prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}push:job:"
        self._release = redis.register_script(_RELEASE)

    def key(self, job_id: str) -> str:
        """The Redis key of ``job_id``'s record."""
        return self._prefix + job_id

    async def claim(self, job_id: str, owner: str, claim_ms: int) -> Claim:
        key = self.key(job_id)
        if await self._redis.set(key, owner, nx=True, px=claim_ms):
            return Claim(ClaimState.MINE)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            value, pttl = await pipe.execute()
        if isinstance(value, bytes):
            value = value.decode()
        if value == DONE:
            return Claim(ClaimState.DONE)
        return Claim(ClaimState.HELD, max(0, int(pttl)))

    async def done(self, job_id: str, ttl_s: int) -> None:
        await self._redis.set(self.key(job_id), DONE, ex=max(1, ttl_s))

    async def release(self, job_id: str, owner: str) -> None:
        await self._release(keys=[self.key(job_id)], args=[owner])


class MemoryLedger:
    """:class:`Ledger` in a dict of ``job_id -> (value, expires at)`` (one process; tests)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._records: dict[str, tuple[str, float]] = {}
        self._clock = clock

    def _get(self, job_id: str) -> tuple[str, float] | None:
        record = self._records.get(job_id)
        if record is not None and record[1] <= self._clock():
            del self._records[job_id]
            return None
        return record

    async def claim(self, job_id: str, owner: str, claim_ms: int) -> Claim:
        record = self._get(job_id)
        if record is None:
            self._records[job_id] = (owner, self._clock() + claim_ms / 1000)
            return Claim(ClaimState.MINE)
        value, expires = record
        if value == DONE:
            return Claim(ClaimState.DONE)
        return Claim(ClaimState.HELD, int((expires - self._clock()) * 1000))

    async def done(self, job_id: str, ttl_s: int) -> None:
        self._records[job_id] = (DONE, self._clock() + ttl_s)

    async def release(self, job_id: str, owner: str) -> None:
        record = self._get(job_id)
        if record is not None and record[0] == owner:
            del self._records[job_id]
