"""The push worker: consumes the work queue and delivers each job through its provider (DESIGN.md section 6).

:class:`PushWorker` is the plain object (no Ray; unit and integration tests drive it directly);
:class:`PushWorkerActor` is the thin Ray actor around it that removes invalid tokens from MongoDB.

For each delivery of ``<p>im.push.jobs`` (at most ``config.push_prefetch`` unacked at once)::

    provider answer   follow-up (published with confirms)                             then
    delivered         none                                                             ack
    invalid_token     await on_invalid_token(job)                                      ack
    retry             attempt+1 < push_max_attempts: the job with attempt+1 to the
                      retry queue of delay max(backoff, Retry-After) ms;
                      else the job to the dead queue                                   ack
    failed            the job to the dead queue                                        ack
    (undecodable)     the raw bytes to the dead queue                                  ack

The ack comes only after the provider answered and the follow-up was confirmed, so a worker that dies
or loses its connection in between leaves the job to RabbitMQ, which hands it out again: never zero
times. With a :class:`~im_actors.push.ledger.Ledger` (Redis, in the actor) a copy of a job that already
reached its provider is acked without being sent again, and a copy of a job another worker is sending
waits in the retry queue until that worker's claim ends (see ``ledger.py`` for the one window left).
Messages in the dead queue carry the headers ``x-im-outcome`` and ``x-im-error``.

Every ``DEPTH_INTERVAL_S`` the worker reads the message counts of the work, retry and dead queues with
passive declarations on a second channel; :meth:`PushWorker.stats` reports them under ``queues``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiormq
import ray
from aiormq.abc import AbstractChannel, DeliveredMessage

from im_actors.config import Config
from im_actors.push.amqp import Backoff, close_quietly, open_channel, wait_closed
from im_actors.push.jobs import BadJob, PushJob, decode_job, encode_job, next_attempt
from im_actors.push.ledger import ClaimState, Ledger, RedisLedger, ledger_redis
from im_actors.push.providers import make_providers
from im_actors.push.providers.base import Outcome, OutcomeKind, Provider
from im_actors.push.topology import PushNames, push_names, retry_delay_ms
from im_actors.vitals import Vitals

__all__ = ["PushWorker", "PushWorkerActor", "FOLLOW_UP_TIMEOUT_S", "DEPTH_INTERVAL_S"]

log = logging.getLogger(__name__)

#: Longest wait for the broker to confirm a job sent on to the retry or dead queue (s).
FOLLOW_UP_TIMEOUT_S = 30.0

#: How often a worker reads the queue depths (s).
DEPTH_INTERVAL_S = 2.0

#: Shortest wait in the retry queue for a copy of a job another worker holds (ms).
MIN_HELD_DELAY_MS = 100


class PushWorker:
    """Consumes push jobs and delivers them; see the module docstring for what happens to each.

    ``providers`` maps ``job["provider"]`` to the :class:`Provider` that serves it (a job naming
    another provider goes to the dead queue). ``on_invalid_token(job)`` is awaited when a provider
    says the token is invalid; an exception from it is logged and counted (``invalid_cleanup_errors``)
    and the job is acked all the same.

    ``ledger`` (optional) deduplicates copies of a job across redeliveries, republications and workers
    (``ledger.py``); its records last ``config.push_dedup_ttl_s`` and its claims ``config.push_claim_ms``.
    When it fails (Redis down) the job is sent all the same and ``ledger_errors`` counts it.

    ``start()`` never raises when the broker is down: the worker connects, and reconnects after
    losing the broker, in the background until ``close()``.
    """

    def __init__(
        self,
        config: Config,
        providers: Mapping[str, Provider],
        on_invalid_token: Callable[[PushJob], Awaitable[None]],
        still_owned: Callable[[PushJob], Awaitable[bool]] | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self._config = config
        self._providers = dict(providers)
        self._on_invalid_token = on_invalid_token
        self._still_owned = still_owned
        self._ledger = ledger
        self._owner = uuid.uuid4().hex  # prefix of this worker's claims in the ledger
        self._claims = 0
        self._sending: set[asyncio.Future[tuple[Outcome, bool]]] = set()  # provider calls, shielded
        self._claim_ms = config.push_claim_ms or int((2 * config.push_timeout_s + 5) * 1000)
        self._depths: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # no delivery being handled
        self._idle.set()
        self._connected = False
        self._connects = 0
        self._in_flight = 0
        self._names = push_names(config)
        self._drain_s = config.push_timeout_s + 5
        self._counts = {
            "received": 0,
            "delivered": 0,
            "retried": 0,
            "dead": 0,
            "invalid": 0,
            "invalid_cleanup_errors": 0,
            "unacked_errors": 0,
            "duplicates": 0,
            "deferred": 0,
            "ledger_errors": 0,
        }

    async def start(self) -> None:
        """Start consuming in the background (idempotent); returns at once, broker up or not."""
        if self._stop.is_set():
            raise RuntimeError("PushWorker is closed")
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="push-worker")

    async def close(self, drain_s: float | None = None) -> None:
        """Stop consuming, let the jobs being handled finish (up to ``drain_s`` seconds, default
        ``push_timeout_s + 5``), close the connection and the providers (idempotent). Jobs still
        unacked then go back to the queue for another worker."""
        if self._stop.is_set() and self._runner is None:
            return
        self._stop.set()
        if drain_s is not None:
            self._drain_s = drain_s
        runner, self._runner = self._runner, None
        if runner is not None:
            try:
                await asyncio.wait_for(asyncio.shield(runner), self._drain_s + 5)
            except TimeoutError:
                runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        for provider in self._providers.values():
            try:
                await provider.close()
            except Exception:
                log.exception("closing push provider %s", provider)

    def stats(self) -> dict[str, Any]:
        """Counters since creation: ``received``, ``delivered``, ``retried`` (sent to the retry queue),
        ``dead``, ``invalid`` (invalid tokens), ``invalid_cleanup_errors``, ``unacked_errors`` (deliveries
        left to redelivery after a failed follow-up), ``duplicates`` (copies of jobs that had already
        reached their provider, acked unsent), ``deferred`` (copies held by another worker's claim, sent
        to the retry queue), ``ledger_errors``, ``in_flight`` (being handled now), ``connected``,
        ``connects``, and ``queues``: ``{"jobs", "retry", "dead"}`` message counts read at most
        ``DEPTH_INTERVAL_S`` ago (empty before the first reading)."""
        return {
            **self._counts,
            "in_flight": self._in_flight,
            "connected": self._connected,
            "connects": self._connects,
            "queues": dict(self._depths),
        }

    async def _watch_depths(self, connection: Any, names: PushNames) -> None:
        """Read the queue depths every ``DEPTH_INTERVAL_S`` on a channel of its own (a failed passive
        declaration closes its channel, never the consumer's)."""
        channel = await connection.channel()
        while True:
            depths = {}
            for key, queues in (("jobs", (names.jobs,)), ("retry", names.retry_queues), ("dead", (names.dead,))):
                depths[key] = 0
                for queue in queues:
                    ok = await channel.queue_declare(queue, passive=True)
                    depths[key] += int(ok.message_count or 0)
            self._depths = depths
            await asyncio.sleep(DEPTH_INTERVAL_S)

    # --- connection loop ---

    async def _run(self) -> None:
        backoff = Backoff()
        quiet = False  # one warning per outage, not one per reconnect attempt
        while not self._stop.is_set():
            connection = None
            try:
                connection, channel, names = await open_channel(self._config, prefetch=self._config.push_prefetch)
                self._names = names
                # The broker cancels the consumer when the queue is deleted or moves: consume again.
                cancelled = asyncio.Event()
                channel.on_consumer_cancel_callbacks.add(_setter(cancelled))
                consume = await channel.basic_consume(names.jobs, self._on_message, no_ack=False)
                self._connected = True
                self._connects += 1
                backoff.reset()
                quiet = False
                log.info("push worker consuming %s", names.jobs)
                depths = asyncio.create_task(self._watch_depths(connection, names), name="push-queue-depths")
                try:
                    stopped = await wait_closed(connection, channel, self._stop, cancelled)
                finally:
                    depths.cancel()
                    with contextlib.suppress(BaseException):
                        await depths
                if not stopped:
                    raise ConnectionError("push worker: connection closed or consumer cancelled")
                # Closing: take no new jobs, finish the ones in hand, then close the connection.
                if consume.consumer_tag:
                    with contextlib.suppress(Exception):
                        await channel.basic_cancel(consume.consumer_tag)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), self._drain_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every broker or network failure means: reconnect
                log.log(logging.DEBUG if quiet else logging.WARNING, "push worker: broker unavailable (%r)", exc)
                quiet = True
            finally:
                self._connected = False
                if connection is not None:
                    await close_quietly(connection)
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff.next_delay())

    # --- one delivery ---

    async def _on_message(self, message: DeliveredMessage) -> None:
        self._in_flight += 1
        self._idle.clear()
        self._counts["received"] += 1
        try:
            await self._handle(self._names, message)
        except asyncio.CancelledError:
            raise  # the channel closed under us: RabbitMQ redelivers the job
        except Exception as exc:
            self._counts["unacked_errors"] += 1
            log.warning("push job left unacked for redelivery: %r", exc)
            channel = message.channel
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.basic_nack(_delivery_tag(message), requeue=True)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _handle(self, names: PushNames, message: DeliveredMessage) -> None:
        channel = message.channel
        tag = _delivery_tag(message)
        try:
            job = decode_job(message.body)
        except BadJob as exc:
            log.warning("undecodable push job %r to the dead queue: %s", message.header.properties.message_id, exc)
            await self._follow_up(
                channel,
                names.dead,
                message.body,
                message.header.properties.message_id,
                {"x-im-outcome": OutcomeKind.FAILED.value, "x-im-error": str(exc)},
            )
            await channel.basic_ack(tag)
            self._counts["dead"] += 1
            return

        claimed = False
        owner = f"{self._owner}:{self._claims}"  # one claim per handling, never shared by two copies
        self._claims += 1
        if self._ledger is not None:
            claim = await self._claim(job, owner)
            if claim is not None and claim.state is ClaimState.DONE:
                self._counts["duplicates"] += 1
                await channel.basic_ack(tag)
                return
            if claim is not None and claim.state is ClaimState.HELD:
                # Another worker is sending it, or died sending it: look again once its claim ends.
                await self._follow_up(
                    channel,
                    names.retry_queue(max(MIN_HELD_DELAY_MS, claim.held_ms)),
                    encode_job(job),
                    job["job_id"],
                    {"x-im-outcome": "held", "x-im-error": "claimed by another worker"},
                )
                self._counts["deferred"] += 1
                await channel.basic_ack(tag)
                return
            claimed = claim is not None

        # Shielded: when the channel closes under this handler (the broker went away), the provider call
        # in flight still ends and its "done" is still recorded, so the redelivered copy is not sent again.
        sending = asyncio.ensure_future(self._send_recorded(job, claimed))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)
        outcome, again = await asyncio.shield(sending)
        # DELIVERED and INVALID_TOKEN need no follow-up (_send_recorded counted them, removed the token).
        if again:
            delay = retry_delay_ms(self._config, job["attempt"], outcome.retry_after_ms)
            await self._follow_up(
                channel,
                names.retry_queue(delay),
                encode_job(next_attempt(job)),
                job["job_id"],
                {"x-im-outcome": outcome.kind.value, "x-im-error": outcome.detail},
            )
            self._counts["retried"] += 1
            if claimed:
                await self._ledger_call("release", job["job_id"], owner)
        elif outcome.kind in (OutcomeKind.RETRY, OutcomeKind.FAILED):  # attempts used up, or permanent
            log.warning("push job %s to the dead queue: %s %s", job["job_id"], outcome.kind.value, outcome.detail)
            await self._follow_up(
                channel,
                names.dead,
                encode_job(job),
                job["job_id"],
                {"x-im-outcome": outcome.kind.value, "x-im-error": outcome.detail},
            )
            self._counts["dead"] += 1
        await channel.basic_ack(tag)

    async def _send_recorded(self, job: PushJob, claimed: bool) -> tuple[Outcome, bool]:
        """Send ``job``, remove its token when the provider says it is invalid, and record the job done
        in the ledger unless it is to be retried: everything that must happen once the provider has the
        request, even if the handler is cancelled. Returns the outcome and whether it goes to the retry
        queue."""
        outcome = await self._send(job)
        again = outcome.kind is OutcomeKind.RETRY and job["attempt"] + 1 < self._config.push_max_attempts
        if outcome.kind is OutcomeKind.DELIVERED:
            self._counts["delivered"] += 1
        elif outcome.kind is OutcomeKind.INVALID_TOKEN:
            try:
                await self._on_invalid_token(job)
            except Exception:
                self._counts["invalid_cleanup_errors"] += 1
                log.exception("removing the invalid push token of %s/%s", job["user"], job["device"])
            self._counts["invalid"] += 1
        if claimed and not again:
            await self._ledger_call("done", job["job_id"], self._config.push_dedup_ttl_s)
        return outcome, again

    async def _claim(self, job: PushJob, owner: str) -> Any:
        """The ledger's :class:`~im_actors.push.ledger.Claim` on ``job``, or None when the ledger failed."""
        assert self._ledger is not None
        try:
            return await self._ledger.claim(job["job_id"], owner, self._claim_ms)
        except Exception as exc:  # Redis down: send without the ledger (at least once)
            self._counts["ledger_errors"] += 1
            log.warning("push ledger unavailable (%r): %s sent without deduplication", exc, job["job_id"])
            return None

    async def _ledger_call(self, method: str, *args: Any) -> None:
        assert self._ledger is not None
        try:
            await getattr(self._ledger, method)(*args)
        except Exception as exc:
            self._counts["ledger_errors"] += 1
            log.warning("push ledger %s failed: %r", method, exc)

    async def _send(self, job: PushJob) -> Outcome:
        provider = self._providers.get(job["provider"])
        if provider is None:
            return Outcome.failed(f"no provider {job['provider']!r} in this worker")
        try:
            if self._still_owned is not None and not await self._still_owned(job):
                # The token moved to another user or device since the job was made: never send
                # one user's message to another's phone.
                return Outcome.failed("token no longer belongs to this user and device")
            return await provider.send(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a provider bug: treat as transient, the retry limit bounds it
            log.exception("push provider %s raised on %s", job["provider"], job["job_id"])
            return Outcome.retry(None, f"provider raised {type(exc).__name__}: {exc}")

    async def _follow_up(
        self,
        channel: AbstractChannel,
        queue: str,
        body: bytes,
        message_id: str | None,
        headers: dict[str, Any],
    ) -> None:
        """Publish ``body`` to ``queue`` (default exchange), persistent, and wait for the confirm.
        Raises on a nack, a return (queue missing), a timeout or a broken channel."""
        await channel.basic_publish(
            body,
            exchange="",
            routing_key=queue,
            mandatory=True,
            properties=aiormq.spec.Basic.Properties(
                delivery_mode=2,
                message_id=message_id,
                content_type="application/msgpack",
                headers=headers,
            ),
            timeout=FOLLOW_UP_TIMEOUT_S,
        )


def _delivery_tag(message: DeliveredMessage) -> int:
    """The delivery tag of a consumed message (to ack or nack it)."""
    delivery = message.delivery
    if not isinstance(delivery, aiormq.spec.Basic.Deliver) or delivery.delivery_tag is None:
        raise TypeError(f"not a consumed message: {delivery!r}")
    return delivery.delivery_tag


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    """A callback that sets ``event`` whatever it is called with."""
    return lambda *_: event.set()


@ray.remote(num_cpus=0, max_restarts=-1)
class PushWorkerActor(Vitals):
    """A :class:`PushWorker` with the providers of ``config.push_providers``, as a Ray actor. It starts
    consuming as soon as it is created, and again after each restart; an invalid token is deleted from
    the ``devices`` collection of ``config.mongo_db``; the job ledger is in Redis (``config.redis_url``,
    unless ``push_dedup_ttl_s`` is 0).

    Methods: ``start()`` (idempotent; creation already started it), ``stats()``, ``close()``.
    """

    async def __init__(self, config: Config) -> None:  # type: ignore[misc]  # Ray runs an async __init__
        self._config = config
        self._store: Any = None  # im_actors.store.Store, opened on first use
        self._redis: Any = None
        ledger = None
        if config.push_dedup_ttl_s > 0 and config.redis_url:
            self._redis = ledger_redis(config)
            ledger = RedisLedger(self._redis, config.key_prefix)
        self._worker = PushWorker(config, make_providers(config), self._remove_token, self._still_owned, ledger)
        await self._worker.start()
        from im_actors import metrics

        self._metrics = metrics.for_actor(config, "push", self.stats)
        self._metrics.start()

    async def start(self) -> None:
        """Start consuming (idempotent)."""
        await self._worker.start()

    def stats(self) -> dict[str, Any]:
        """The worker's counters (:meth:`PushWorker.stats`)."""
        return self._worker.stats()

    async def close(self) -> None:
        """Finish the jobs in hand, stop consuming, close the MongoDB and Redis clients."""
        await self._worker.close()
        store, self._store = self._store, None
        if store is not None:
            await store.close()
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()

    def _tokens(self) -> Any:
        """The deployment's :class:`~im_actors.store.Store` (the one door to ``devices``)."""
        if self._store is None:
            from im_actors.store import Store  # imported here: only the actor needs it

            self._store = Store(self._config)
        return self._store

    async def _still_owned(self, job: PushJob) -> bool:
        """True while MongoDB still gives the job's token to the job's (user, device).

        A token is stored as ``devices._id``; registering it from another user moves it.
        """
        if not self._config.mongo_url:
            return True
        return bool(await self._tokens().token_holder(job["token"]) == (job["user"], job["device"]))

    async def _remove_token(self, job: PushJob) -> None:
        """Delete the device's token from MongoDB (only if it is still the token the job carried)."""
        if not self._config.mongo_url:
            log.warning("no mongo_url: invalid push token of %s/%s not removed", job["user"], job["device"])
            return
        await self._tokens().remove_token(job["token"], job["user"], job["device"])
