"""Keyed batching of calls to peers: every hop on the hot path goes through one (DESIGN.md section 9).

A :class:`Batcher` collects items per key (a peer) and hands them to ``send(key, items)`` in batches
of at most ``max_items``, waiting at most ``window_ms`` after the first item of a batch. One call per
key is in flight at a time: items arriving meanwhile form the next batch (group commit), so a slow
peer gets bigger batches, never more concurrent calls, and items for one key leave in the order
they were added.
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
    """Batches items per key; ``send(key, items)`` is awaited with one call in flight per key.

    ``send`` must handle its own errors (answer each item's waiter): an exception escaping it is
    logged and the batch is dropped, since the batcher has nobody to give it to.
    """

    def __init__(
        self,
        send: Callable[[K, list[Any]], Awaitable[None]],
        max_items: int,
        window_ms: float,
    ) -> None:
        self._send = send
        self._max = max_items
        self._window = window_ms / 1000.0
        self._queues: dict[K, list[Any]] = {}
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._closed = False

    def add(self, key: K, item: Any) -> None:
        """Queue ``item`` for ``key``; starts that key's flusher when none runs."""
        if self._closed:
            raise RuntimeError("batcher closed")
        self._queues.setdefault(key, []).append(item)
        if key not in self._tasks:
            self._tasks[key] = asyncio.get_running_loop().create_task(self._run(key))

    def pending(self) -> int:
        """Items queued and not yet handed to ``send``."""
        return sum(len(q) for q in self._queues.values())

    def queued(self, key: K) -> int:
        """Items queued for ``key`` and not yet handed to ``send`` (admission control reads it)."""
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    async def _run(self, key: K) -> None:
        try:
            while True:
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
                try:
                    await self._send(key, batch)
                except Exception:  # noqa: BLE001 - see the class docstring
                    log.exception("batch of %d items for %r dropped", len(batch), key)
        finally:
            self._tasks.pop(key, None)
            if self._queues.get(key) and not self._closed:
                self._tasks[key] = asyncio.get_running_loop().create_task(self._run(key))

    async def close(self) -> None:
        """Flush what is queued, then stop accepting items."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
        self._closed = True
