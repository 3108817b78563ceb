"""What the worker does with each provider answer, driven with a fake channel (no broker, no Ray)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from aiormq import spec
from aiormq.abc import DeliveredMessage
from pamqp.header import ContentHeader

from im_actors.config import load_config
from im_actors.push.jobs import PushJob, decode_job, encode_job, make_job
from im_actors.push.ledger import ClaimState, MemoryLedger
from im_actors.push.providers.base import Outcome, Provider
from im_actors.push.worker import PushWorker


class FakeChannel:
    """Records publishes, acks and nacks; ``fail_publish`` makes the next confirm fail."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.published: list[tuple[str, bytes, spec.Basic.Properties]] = []
        self.fail_publish = False
        self.is_closed = False

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str, properties: Any, **_: Any) -> None:
        if self.fail_publish:
            raise ConnectionError("gone")
        assert exchange == ""
        self.published.append((routing_key, body, properties))
        self.events.append(("publish", routing_key))

    async def basic_ack(self, delivery_tag: int, **_: Any) -> None:
        self.events.append(("ack", delivery_tag))

    async def basic_nack(self, delivery_tag: int, requeue: bool = True, **_: Any) -> None:
        self.events.append(("nack", delivery_tag))


class Scripted(Provider):
    name = "webhook"

    def __init__(self, outcome: Outcome | Exception) -> None:
        self.outcome = outcome
        self.jobs: list[PushJob] = []

    async def send(self, job: PushJob) -> Outcome:
        self.jobs.append(job)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def _message(channel: FakeChannel, body: bytes, tag: int = 1) -> DeliveredMessage:
    deliver = spec.Basic.Deliver(consumer_tag="c", delivery_tag=tag, routing_key="job", exchange="x")
    header = ContentHeader(properties=spec.Basic.Properties(message_id="m"), body_size=len(body))
    return DeliveredMessage(delivery=deliver, header=header, body=body, channel=channel)  # type: ignore[arg-type]


def _job(attempt: int = 0, provider: str = "webhook") -> PushJob:
    job = make_job(user="bob", device="phone", provider=provider, token="http://h/x", conv="d:a:bob", seq=5, sender="a")
    job["attempt"] = attempt
    return job


def _worker(outcome: Outcome | Exception, **over: Any) -> tuple[PushWorker, Scripted, list[PushJob]]:
    config = load_config(deployment="w", push_retry_base_ms=50, push_max_attempts=3, **over)
    provider = Scripted(outcome)
    invalid: list[PushJob] = []

    async def on_invalid(job: PushJob) -> None:
        invalid.append(job)

    return PushWorker(config, {"webhook": provider}, on_invalid), provider, invalid


async def test_delivered_is_acked_with_no_follow_up() -> None:
    worker, provider, _ = _worker(Outcome.delivered())
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job()), tag=9))
    assert channel.events == [("ack", 9)]
    assert [job["job_id"] for job in provider.jobs] == [_job()["job_id"]]
    stats = worker.stats()
    assert stats["delivered"] == 1 and stats["in_flight"] == 0


async def test_invalid_token_calls_back_and_acks() -> None:
    worker, _, invalid = _worker(Outcome.invalid_token("HTTP 410"))
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job())))
    assert channel.events == [("ack", 1)]
    assert [j["job_id"] for j in invalid] == [_job()["job_id"]]
    assert worker.stats()["invalid"] == 1


async def test_failing_cleanup_still_acks() -> None:
    config = load_config(deployment="w")

    async def on_invalid(job: PushJob) -> None:
        raise RuntimeError("mongo down")

    worker = PushWorker(config, {"webhook": Scripted(Outcome.invalid_token())}, on_invalid)
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job())))
    assert channel.events == [("ack", 1)]
    assert worker.stats()["invalid_cleanup_errors"] == 1


@pytest.mark.parametrize(
    ("attempt", "retry_after_ms", "level_ms"),
    [(0, None, 64), (1, None, 128), (0, 3000, 4096), (1, 10, 128), (0, 10**9, 4194304)],
)
async def test_retry_goes_to_the_retry_queue_of_its_delay_before_the_ack(
    attempt: int, retry_after_ms: int | None, level_ms: int
) -> None:
    worker, _, _ = _worker(Outcome.retry(retry_after_ms, "HTTP 429"))
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job(attempt))))
    # backoff 50 * 2**attempt ms or the Retry-After, rounded up to a delay level (a queue TTL)
    assert channel.events == [("publish", f"w.im.push.retry.{level_ms}"), ("ack", 1)]
    [(_, body, props)] = channel.published
    assert decode_job(body)["attempt"] == attempt + 1
    assert props.expiration is None
    assert props.delivery_mode == 2
    assert props.message_id == _job()["job_id"]
    assert worker.stats()["retried"] == 1


async def test_retry_after_the_last_attempt_goes_dead() -> None:
    worker, _, _ = _worker(Outcome.retry(None, "HTTP 503"))  # push_max_attempts=3
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job(attempt=2))))
    assert channel.events == [("publish", "w.im.push.dead"), ("ack", 1)]
    [(_, _, props)] = channel.published
    assert props.headers == {"x-im-outcome": "retry", "x-im-error": "HTTP 503"}
    assert props.expiration is None
    assert worker.stats()["dead"] == 1


async def test_failed_goes_dead() -> None:
    worker, _, _ = _worker(Outcome.failed("HTTP 400"))
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job())))
    assert channel.events == [("publish", "w.im.push.dead"), ("ack", 1)]


async def test_unknown_provider_goes_dead() -> None:
    worker, provider, _ = _worker(Outcome.delivered())
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job(provider="apns"))))
    assert channel.events == [("publish", "w.im.push.dead"), ("ack", 1)]
    assert provider.jobs == []


async def test_undecodable_bytes_go_dead_as_they_are() -> None:
    worker, provider, _ = _worker(Outcome.delivered())
    channel = FakeChannel()
    junk = msgpack.packb({"nonsense": 1})
    await worker._on_message(_message(channel, junk))
    assert channel.events == [("publish", "w.im.push.dead"), ("ack", 1)]
    assert channel.published[0][1] == junk
    assert provider.jobs == []


async def test_a_provider_that_raises_is_retried() -> None:
    worker, _, _ = _worker(ValueError("bug"))
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job())))
    assert channel.events == [("publish", "w.im.push.retry.64"), ("ack", 1)]


async def test_no_ack_when_the_follow_up_is_not_confirmed() -> None:
    worker, _, _ = _worker(Outcome.retry())
    channel = FakeChannel()
    channel.fail_publish = True
    await worker._on_message(_message(channel, encode_job(_job())))
    assert channel.events == [("nack", 1)]
    stats = worker.stats()
    assert stats["unacked_errors"] == 1 and stats["retried"] == 0 and stats["in_flight"] == 0


# --- the job ledger: each job reaches its provider once ---


def _ledgered(outcome: Outcome, ledger: MemoryLedger) -> tuple[PushWorker, Scripted]:
    config = load_config(deployment="w", push_retry_base_ms=50, push_max_attempts=3, push_claim_ms=5000)
    provider = Scripted(outcome)

    async def on_invalid(job: PushJob) -> None:
        pass

    return PushWorker(config, {"webhook": provider}, on_invalid, ledger=ledger), provider


async def test_a_second_copy_of_a_delivered_job_is_acked_unsent() -> None:
    ledger = MemoryLedger()
    worker, provider = _ledgered(Outcome.delivered(), ledger)
    channel = FakeChannel()
    body = encode_job(_job())
    await worker._on_message(_message(channel, body, 1))
    await worker._on_message(_message(channel, body, 2))  # a redelivery or a republished copy
    assert len(provider.jobs) == 1
    assert channel.events == [("ack", 1), ("ack", 2)]
    assert worker.stats()["duplicates"] == 1 and worker.stats()["delivered"] == 1


async def test_a_copy_held_by_another_claim_waits_in_the_retry_queue() -> None:
    ledger = MemoryLedger()
    await ledger.claim(_job()["job_id"], "a-dead-worker:0", 3000)
    worker, provider = _ledgered(Outcome.delivered(), ledger)
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job()), 1))
    assert provider.jobs == []
    [(queue, body, properties)] = channel.published
    assert queue == "w.im.push.retry.4096"  # the claim's remaining 2-3 s, rounded up to a level
    assert decode_job(body)["attempt"] == 0  # a wait, not an attempt
    assert properties.expiration is None
    assert channel.events == [("publish", "w.im.push.retry.4096"), ("ack", 1)]
    assert worker.stats()["deferred"] == 1


async def test_a_transient_failure_gives_the_claim_back_for_the_retry() -> None:
    ledger = MemoryLedger()
    worker, provider = _ledgered(Outcome.retry(None, "503"), ledger)
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job()), 1))
    [(_, retry_body, _)] = channel.published
    provider.outcome = Outcome.delivered()
    await worker._on_message(_message(channel, retry_body, 2))  # the retry claims it again and is sent
    assert [j["attempt"] for j in provider.jobs] == [0, 1]
    await worker._on_message(_message(channel, retry_body, 3))  # a copy after delivery: not sent
    assert len(provider.jobs) == 2 and worker.stats()["duplicates"] == 1


async def test_invalid_and_failed_jobs_are_done_too() -> None:
    for outcome in (Outcome.invalid_token("410"), Outcome.failed("400")):
        ledger = MemoryLedger()
        worker, provider = _ledgered(outcome, ledger)
        channel = FakeChannel()
        await worker._on_message(_message(channel, encode_job(_job()), 1))
        await worker._on_message(_message(channel, encode_job(_job()), 2))
        assert len(provider.jobs) == 1, outcome


async def test_a_failing_ledger_sends_anyway_and_counts() -> None:
    class Broken(MemoryLedger):
        async def claim(self, job_id: str, owner: str, claim_ms: int) -> Any:
            raise ConnectionError("redis down")

    worker, provider = _ledgered(Outcome.delivered(), Broken())
    channel = FakeChannel()
    await worker._on_message(_message(channel, encode_job(_job()), 1))
    assert len(provider.jobs) == 1 and channel.events == [("ack", 1)]
    assert worker.stats()["ledger_errors"] == 1


async def test_memory_ledger_claims_expire() -> None:
    now = [0.0]
    ledger = MemoryLedger(clock=lambda: now[0])
    assert (await ledger.claim("j", "a", 1000)).state is ClaimState.MINE
    held = await ledger.claim("j", "b", 1000)
    assert held.state is ClaimState.HELD and held.held_ms == 1000
    now[0] = 1.0
    assert (await ledger.claim("j", "b", 1000)).state is ClaimState.MINE
    await ledger.release("j", "a")  # not a's any more: no effect
    assert (await ledger.claim("j", "c", 1000)).state is ClaimState.HELD
    await ledger.done("j", 60)
    assert (await ledger.claim("j", "d", 1000)).state is ClaimState.DONE
