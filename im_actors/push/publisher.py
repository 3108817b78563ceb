"""The publisher side of offline push: a bounded outbox in front of RabbitMQ (DESIGN.md sections 2.7, 4, 6).

A session shard calls :meth:`PushPublisher.publish` for each job; that never blocks and never
fails. A background task moves jobs from the outbox to the exchange as persistent messages with
publisher confirms, many at once, and forgets a job only when the broker confirmed it. While the
broker is unreachable the jobs wait; beyond ``config.push_outbox_max`` waiting jobs the oldest is
dropped and counted (a late or lost push, never a lost message: clients catch up with ``sync``).

Lifecycle::

    publisher = PushPublisher(config)
    await publisher.start()          # never raises: connects (and reconnects) in the background
    publisher.publish(job)           # any time, also before start() and while the broker is down
    await publisher.flush(5.0)       # True once everything published so far is confirmed
    await publisher.close()          # jobs not yet confirmed are abandoned (and counted in stats)

Delivery is at least once: a job whose confirm was lost with its connection is published again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel

from im_actors.config import Config
from im_actors.push.amqp import Backoff, close_quietly, open_channel, wait_closed
from im_actors.push.jobs import PushJob, encode_job
from im_actors.push.topology import PushNames

__all__ = ["PushPublisher", "CONFIRM_WINDOW"]

log = logging.getLogger(__name__)

#: Most jobs published and not yet confirmed at once.
CONFIRM_WINDOW = 256


class PushPublisher:
    """Bounded outbox of push jobs, published to RabbitMQ with confirms; see the module docstring.

    Not thread-safe: call it from the event loop it was started on.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._max = config.push_outbox_max
        self._window = min(CONFIRM_WINDOW, config.push_outbox_max)
        self._pending: deque[tuple[int, PushJob]] = deque()  # not handed to the broker yet, oldest first
        self._inflight: dict[int, PushJob] = {}  # published, confirm not yet in
        self._next_key = 0
        self._wakeup = asyncio.Event()  # something to send, or room in the window
        self._idle = asyncio.Event()  # outbox and window both empty
        self._idle.set()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._connected = False
        self._published = 0
        self._confirmed = 0
        self._dropped = 0
        self._requeued = 0
        self._connects = 0

    # --- the caller's side ---

    def publish(self, job: PushJob) -> None:
        """Queue ``job`` (a dict from :func:`~im_actors.push.jobs.make_job`) for RabbitMQ; never blocks.

        When ``push_outbox_max`` jobs already wait, the oldest waiting one is dropped and counted in
        ``stats()["dropped"]``. Raises :class:`~im_actors.push.jobs.BadJob` for a malformed job and
        ``RuntimeError`` after :meth:`close`.
        """
        if self._stop.is_set():
            raise RuntimeError("PushPublisher is closed")
        encode_job(job)  # validate now, where the caller can see the error
        self._pending.append((self._next_key, job))
        self._next_key += 1
        self._trim()
        self._update_idle()
        self._wakeup.set()

    async def start(self) -> None:
        """Start the background publishing task (idempotent). Never raises when the broker is down:
        the task keeps reconnecting with backoff until :meth:`close`."""
        if self._stop.is_set():
            raise RuntimeError("PushPublisher is closed")
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="push-publisher")

    async def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds until every job published so far is confirmed.

        True when the outbox is empty and nothing is in flight, False on timeout (jobs stay queued).
        """
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop publishing and close the connection (idempotent). Jobs not yet confirmed stay in the
        outbox, are counted in ``stats()["outbox"]`` and are lost with this object: :meth:`flush` first."""
        self._stop.set()
        self._wakeup.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            try:
                await runner
            except asyncio.CancelledError:
                pass
        if self._pending:
            log.warning("push publisher closed with %d jobs unconfirmed", len(self._pending))

    def stats(self) -> dict[str, Any]:
        """Counters since creation: ``published`` (handed to the broker, republications included),
        ``confirmed``, ``dropped`` (outbox overflow), ``requeued`` (nacked or cut off, to publish again),
        ``outbox`` (jobs not confirmed: waiting plus in flight), ``in_flight``, ``connected`` (bool),
        ``connects`` (connections opened)."""
        return {
            "published": self._published,
            "confirmed": self._confirmed,
            "dropped": self._dropped,
            "requeued": self._requeued,
            "outbox": len(self._pending) + len(self._inflight),
            "in_flight": len(self._inflight),
            "connected": self._connected,
            "connects": self._connects,
        }

    def outbox_jobs(self) -> list[PushJob]:
        """The jobs not yet confirmed, oldest first (a copy of the list, for tests and operators)."""
        jobs = [job for _, job in sorted(self._inflight.items())]
        return jobs + [job for _, job in self._pending]

    # --- outbox bookkeeping (plain code, no awaits) ---

    def _trim(self) -> None:
        # Jobs already handed to the broker are never dropped: its confirm may still arrive.
        while self._pending and len(self._pending) + len(self._inflight) > self._max:
            _, job = self._pending.popleft()
            self._dropped += 1
            log.debug("push outbox full: dropped %s", job["job_id"])

    def _requeue(self, key: int) -> None:
        """Put in-flight job ``key`` back at the head of the outbox (it goes out again first)."""
        job = self._inflight.pop(key, None)
        if job is None:
            return
        # Keep the outbox sorted by key: a job cut off in flight is older than anything waiting.
        index = 0
        while index < len(self._pending) and self._pending[index][0] < key:
            index += 1
        self._pending.insert(index, (key, job))
        self._requeued += 1
        self._trim()
        self._wakeup.set()

    def _confirm(self, key: int) -> None:
        if self._inflight.pop(key, None) is not None:
            self._confirmed += 1
        self._wakeup.set()
        self._update_idle()

    def _update_idle(self) -> None:
        if not self._pending and not self._inflight:
            self._idle.set()
        else:
            self._idle.clear()

    # --- the background task ---

    async def _run(self) -> None:
        backoff = Backoff()
        quiet = False  # one warning per outage, not one per reconnect attempt
        while not self._stop.is_set():
            connection = None
            try:
                connection, channel, names = await open_channel(self._config)
                self._connected = True
                self._connects += 1
                backoff.reset()
                quiet = False
                log.info("push publisher connected (%s)", names.exchange)
                await self._pump(connection, channel, names)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every broker or network failure means: reconnect
                waiting = len(self._pending) + len(self._inflight)
                log.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "push publisher: broker unavailable (%r); %d jobs wait",
                    exc,
                    waiting,
                )
                quiet = True
            finally:
                self._connected = False
                for task in list(self._sends):
                    task.cancel()
                for key in sorted(self._inflight):
                    self._requeue(key)
                self._update_idle()
                if connection is not None:
                    await close_quietly(connection)
            if not self._stop.is_set():
                await asyncio.sleep(backoff.next_delay())

    async def _pump(self, connection: Any, channel: AbstractChannel, names: PushNames) -> None:
        """Publish from the outbox, keeping up to the window in flight, until the connection ends."""
        broken = asyncio.Event()
        closed = asyncio.ensure_future(wait_closed(connection, channel, self._stop))
        try:
            while True:
                self._wakeup.clear()
                while self._pending and len(self._inflight) < self._window and not broken.is_set():
                    key, job = self._pending.popleft()
                    self._inflight[key] = job
                    task = asyncio.create_task(self._send(channel, names, key, job, broken))
                    self._sends.add(task)
                    task.add_done_callback(self._sends.discard)
                self._update_idle()
                wakeup = asyncio.ensure_future(self._wakeup.wait())
                done, _ = await asyncio.wait({wakeup, closed}, return_when=asyncio.FIRST_COMPLETED)
                wakeup.cancel()
                if closed in done or broken.is_set():
                    raise ConnectionError("push publisher: connection or channel closed")
        finally:
            closed.cancel()

    async def _send(
        self, channel: AbstractChannel, names: PushNames, key: int, job: PushJob, broken: asyncio.Event
    ) -> None:
        """Publish one job and wait for its confirm; a nack, a return or an error puts it back."""
        self._published += 1
        try:
            await channel.basic_publish(
                encode_job(job),
                exchange=names.exchange,
                routing_key=names.routing_key,
                mandatory=True,  # unroutable (queue deleted) comes back instead of vanishing
                properties=aiormq.spec.Basic.Properties(
                    delivery_mode=2,
                    message_id=job["job_id"],
                    content_type="application/msgpack",
                ),
            )
        except asyncio.CancelledError:
            self._requeue(key)
            raise
        except aiormq.exceptions.PublishError:
            # Returned as unroutable: the topology is gone; reconnecting declares it again.
            log.warning("push job %s returned unroutable; redeclaring the topology", job["job_id"])
            self._requeue(key)
            broken.set()
            self._wakeup.set()
        except aiormq.exceptions.DeliveryError:
            log.warning("push job %s nacked by the broker; publishing it again", job["job_id"])
            self._requeue(key)
        except Exception as exc:  # the connection or channel went away mid-publish
            log.debug("push job %s not confirmed: %r", job["job_id"], exc)
            self._requeue(key)
            broken.set()
            self._wakeup.set()
        else:
            self._confirm(key)
