"""What an actor's process holds right now, asked from inside it: asyncio tasks and threads.

A soak (``im-actors demo``, :mod:`drivers.resources`) samples every actor's process from outside
with psutil (RSS, file descriptors, TCP sockets); the number of asyncio tasks on the actor's event
loop can only be counted from inside. :class:`Vitals` is a mixin for the Ray actor shells (the
``@ray.remote`` classes of hub, session, conversation, group, store, push worker and router) that
adds one method, :meth:`Vitals.vitals`, answered on the actor's event loop.

It reads and changes nothing else: a plain mixin, no Ray import, so unit tests call it on any object.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import tracemalloc
from collections import Counter
from typing import Any

__all__ = ["Vitals", "task_name"]

#: How many coroutine names :meth:`Vitals.vitals` lists (the most common first).
TOP_COROS = 20


def task_name(task: asyncio.Task[Any]) -> str:
    """The qualified name of the coroutine ``task`` runs (``Hub._serve``), or the task's own name
    when it does not run a coroutine function (a wrapped future)."""
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    qualname = getattr(coro, "__qualname__", None) or getattr(code, "co_qualname", None)
    return str(qualname or task.get_name())


class Vitals:
    """Mixin for an async Ray actor shell: ``await actor.vitals.remote()``."""

    async def vitals(self) -> dict[str, Any]:
        """``{"pid", "tasks", "threads", "tasks_by_coro", "py_blocks", "heap_bytes"}``: this process's
        id, the asyncio tasks not done on the actor's event loop (this call's own task included), the
        Python threads alive, the :data:`TOP_COROS` most common coroutine names of those tasks with
        their counts (where to look when ``tasks`` grows), the memory blocks the interpreter holds
        (``sys.getallocatedblocks()``: Python objects and buffers, not the C++ of Ray's core worker;
        when RSS climbs and this stays flat, what grows is not Python's), and, while
        :meth:`heap_growth` traces, the bytes tracemalloc sees allocated (None otherwise)."""
        tasks = [t for t in asyncio.all_tasks() if not t.done()]
        by_coro = Counter(task_name(t) for t in tasks)
        return {
            "pid": os.getpid(),
            "tasks": len(tasks),
            "threads": threading.active_count(),
            "tasks_by_coro": dict(by_coro.most_common(TOP_COROS)),
            "py_blocks": sys.getallocatedblocks(),
            "heap_bytes": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
        }

    async def heap_growth(self, limit: int = 15) -> list[str] | None:
        """Where this process's Python heap grew since the previous call (tracemalloc, Python's own
        allocation tracer): the ``limit`` source lines whose live allocations grew most, as
        ``"<file>:<line>: +<KiB> KiB (+<blocks> blocks)"``, largest first. The first call starts
        tracing (10 frames deep; allocations slow down by about a third while it runs) and answers
        None; later calls compare with the call before. For a soak whose memory slope is not flat:
        call it once, again after some minutes of traffic, and read what grew."""
        if not tracemalloc.is_tracing():
            tracemalloc.start(10)
            self._heap_before = tracemalloc.take_snapshot()
            return None
        now = tracemalloc.take_snapshot()
        before = getattr(self, "_heap_before", None) or now
        self._heap_before = now
        keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
        stats = now.filter_traces(keep).compare_to(before.filter_traces(keep), "lineno")
        return [
            f"{st.traceback[0].filename}:{st.traceback[0].lineno}: {st.size_diff / 1024:+.1f} KiB "
            f"({st.count_diff:+d} blocks)"
            for st in stats[:limit]
        ]
