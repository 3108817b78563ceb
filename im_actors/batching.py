"""Keyed batching of calls to peers: every hop on the hot path goes through one (DESIGN.md section 9).

A :class:`Batcher` collects items per key (a peer) and hands them to ``send(key, items)`` in batches
of at most ``max_items``, waiting at most ``window_ms`` after the first item of a batch (0: natural
batching, a batch leaves at once). At most ``max_inflight`` calls per key are in flight (1 by
default): items arriving while that many are in flight form the next batch (group commit), so a slow
peer gets bigger batches, never more concurrent calls. Calls for one key *start* in the order their
items were added; with ``max_inflight`` > 1 they may end in any order, so a peer that must keep the
order of items across calls takes them in arrival order itself (the conversation shard does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["Batcher"]

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)


class Batcher(Generic[K]):
    """Batches items per key; ``send(key, items)`` is awaited with at most ``max_inflight`` calls
    in flight per key.

    ``send`` must handle its own errors (answer each item's waiter): an exception escaping it is
    logged and the batch is dropped, since the batcher has nobody to give it to.
    """

    def __init__(
        self,
        send: Callable[[K, list[Any]], Awaitable[None]],
        max_items: int,
        window_ms: float,
        max_inflight: int = 1,
    ) -> None:
        self._send = send
        self._max = max_items
        self._window = window_ms / 1000.0
        self._max_inflight = max(1, max_inflight)
        self._queues: dict[K, list[Any]] = {}
        self._tasks: dict[K, asyncio.Task[None]] = {}  # the flusher forming batches, per key
        self._inflight: dict[K, int] = {}  # calls in flight per key
        self._calls: set[asyncio.Task[None]] = set()
        self._closed = False

    def add(self, key: K, item: Any) -> None:
        """Queue ``item`` for ``key``; starts that key's flusher when none runs."""
        if self._closed:
            raise RuntimeError("batcher closed")
        self._queues.setdefault(key, []).append(item)
        self._kick(key)

    def pending(self) -> int:
        """Items queued and not yet handed to ``send``."""
        return sum(len(q) for q in self._queues.values())

    def queued(self, key: K) -> int:
        """Items queued for ``key`` and not yet handed to ``send`` (admission control reads it)."""
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def _kick(self, key: K) -> None:
        """Start ``key``'s flusher if items wait, none runs, and a call may start."""
        if (
            key not in self._tasks
            and self._queues.get(key)
            and self._inflight.get(key, 0) < self._max_inflight
            and not self._closed
        ):
            self._tasks[key] = asyncio.get_running_loop().create_task(self._run(key))

    async def _run(self, key: K) -> None:
        try:
            while self._inflight.get(key, 0) < self._max_inflight:
                queue = self._queues.get(key)
                if not queue:
                    break
                if len(queue) < self._max and self._window > 0:
                    await asyncio.sleep(self._window)
                    queue = self._queues.get(key, [])
                batch, rest = queue[: self._max], queue[self._max :]
                if rest:
                    self._queues[key] = rest
                else:
                    self._queues.pop(key, None)
                self._inflight[key] = self._inflight.get(key, 0) + 1
                if self._max_inflight == 1:
                    await self._call(key, batch)
                else:
                    call = asyncio.get_running_loop().create_task(self._call(key, batch))
                    self._calls.add(call)
                    call.add_done_callback(self._calls.discard)
        finally:
            self._tasks.pop(key, None)
            self._kick(key)

    async def _call(self, key: K, batch: list[Any]) -> None:
        try:
            await self._send(key, batch)
        except Exception:  # noqa: BLE001 - see the class docstring
            log.exception("batch of %d items for %r dropped", len(batch), key)
        finally:
            left = self._inflight[key] - 1
            if left:
                self._inflight[key] = left
            else:
                del self._inflight[key]
            self._kick(key)

    async def close(self) -> None:
        """Flush what is queued, then stop accepting items."""
        while self._tasks or self._calls:
            await asyncio.gather(*list(self._tasks.values()), *list(self._calls), return_exceptions=True)
        self._closed = True
