"""Offline push end to end against the real RabbitMQ on 127.0.0.1:5672: PushPublisher -> RabbitMQ ->
PushWorker (plain, no Ray) -> webhook provider -> a local aiohttp receiver.

Each test uses a fresh deployment name, so its exchange and queues are its own; they are deleted at the
end. Broker outages are made with a TCP proxy on loopback: the shared broker is never stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiormq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from im_actors.config import Config, load_config
from im_actors.push.jobs import PushJob, decode_job, make_job
from im_actors.push.providers import WebhookProvider
from im_actors.push.publisher import PushPublisher
from im_actors.push.topology import delete_topology, push_names
from im_actors.push.worker import PushWorker

RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
RABBIT_URL = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/"


def _rabbit_up() -> bool:
    with contextlib.suppress(OSError), socket.create_connection((RABBIT_HOST, RABBIT_PORT), timeout=0.5):
        return True
    return False


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not _rabbit_up(), reason=f"no RabbitMQ at {RABBIT_HOST}:{RABBIT_PORT}"),
]


# --- helpers ---


class Receiver:
    """A webhook receiver on 127.0.0.1: counts requests per job id, answers from a per-job script."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}
        self.attempts: dict[str, list[str]] = {}
        self.script: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.delay: dict[str, float] = {}
        self.app = web.Application()
        self.app.router.add_post("/hook/{device}", self.handle)
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        job_id = request.headers["X-Im-Job"]
        await request.read()
        self.counts[job_id] += 1
        self.times.setdefault(job_id, []).append(time.monotonic())
        self.attempts.setdefault(job_id, []).append(request.headers["X-Im-Attempt"])
        if job_id in self.delay:
            await asyncio.sleep(self.delay[job_id])
        answers = self.script.get(job_id)
        if answers:
            status, headers = answers.pop(0) if len(answers) > 1 else answers[0]
            return web.Response(status=status, headers=headers)
        return web.Response(status=200)

    def url(self, device: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(f"/hook/{device}"))


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of RabbitMQ: ``down()`` refuses and cuts every connection,
    ``up()`` accepts again on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection(RABBIT_HOST, RABBIT_PORT)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, broker_w}
        for reader, writer in ((client_r, broker_w), (broker_r, client_w)):
            task = asyncio.create_task(self._pipe(reader, writer))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)

    async def close(self) -> None:
        await self.down()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def amqp_channel() -> AsyncIterator[Any]:
    connection = await aiormq.connect(RABBIT_URL)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


@pytest.fixture
async def make_config() -> AsyncIterator[Callable[..., Config]]:
    """Configs with a unique deployment each; their topology is deleted afterwards."""
    made: list[Config] = []

    def make(**over: Any) -> Config:
        fields: dict[str, Any] = dict(
            deployment="t" + uuid.uuid4().hex[:8],
            rabbitmq_url=RABBIT_URL,
            mongo_url="mongodb://127.0.0.1:1",
            push_retry_base_ms=50,
            push_timeout_s=5,
            webhook_allow_private=True,
        )
        fields.update(over)
        config = load_config(**fields)
        made.append(config)
        return config

    yield make
    async with amqp_channel() as channel:
        for config in made:
            await delete_topology(channel, config)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    hook.server = TestServer(hook.app, host="127.0.0.1", port=0)
    await hook.server.start_server()
    try:
        yield hook
    finally:
        await hook.server.close()


@contextlib.asynccontextmanager
async def running(
    config: Config, on_invalid: Callable[[PushJob], Awaitable[None]] | None = None
) -> AsyncIterator[tuple[PushPublisher, PushWorker]]:
    publisher = PushPublisher(config)
    worker = PushWorker(config, {"webhook": WebhookProvider(config)}, on_invalid or _ignore)
    await publisher.start()
    await worker.start()
    try:
        yield publisher, worker
    finally:
        await worker.close()
        await publisher.close()


def job_for(hook: Receiver, seq: int, device: str = "phone", **over: Any) -> PushJob:
    fields: dict[str, Any] = dict(
        user="bob",
        device=device,
        provider="webhook",
        token=hook.url(device),
        conv="d:alice:bob",
        seq=seq,
        sender="alice",
        body=f"message {seq}",
        badge=seq,
    )
    fields.update(over)
    return make_job(**fields)


async def queue_depths(config: Config) -> dict[str, int]:
    names = push_names(config)
    async with amqp_channel() as channel:
        out = {}
        for key, queues in (("jobs", (names.jobs,)), ("retry", names.retry_queues), ("dead", (names.dead,))):
            out[key] = 0
            for queue in queues:
                out[key] += (await channel.queue_declare(queue, passive=True)).message_count
        return out


async def dead_letters(config: Config) -> list[tuple[bytes, dict[str, Any]]]:
    out: list[tuple[bytes, dict[str, Any]]] = []
    async with amqp_channel() as channel:
        while True:
            message = await channel.basic_get(push_names(config).dead, no_ack=True)
            if isinstance(message.delivery, aiormq.spec.Basic.GetEmpty):
                return out
            out.append((message.body, dict(message.header.properties.headers or {})))


async def until_queues_empty(config: Config) -> None:
    deadline = time.monotonic() + 10
    while (depths := await queue_depths(config)) != {"jobs": 0, "retry": 0, "dead": 0}:
        if time.monotonic() > deadline:
            raise AssertionError(f"queues not empty: {depths}")
        await asyncio.sleep(0.1)


# --- tests ---


async def test_fifty_jobs_reach_the_webhook_exactly_once(
    make_config: Callable[..., Config], receiver: Receiver
) -> None:
    config = make_config(webhook_secret="k")
    async with running(config) as (publisher, worker):
        jobs = [job_for(receiver, seq) for seq in range(1, 51)]
        for job in jobs:
            publisher.publish(job)
        assert await publisher.flush(15), publisher.stats()
        await until(lambda: len(receiver.counts) == 50, 15, "50 webhook calls")
        await until(lambda: worker.stats()["delivered"] == 50, 5, "50 acks")
        await asyncio.sleep(0.3)  # room for a duplicate to show up
        assert receiver.counts == Counter({job["job_id"]: 1 for job in jobs})
        assert publisher.stats()["confirmed"] == 50
        assert publisher.stats()["dropped"] == 0
        stats = worker.stats()
        assert (stats["delivered"], stats["retried"], stats["dead"], stats["in_flight"]) == (50, 0, 0, 0)
    assert await queue_depths(config) == {"jobs": 0, "retry": 0, "dead": 0}


async def test_429_then_200_is_delivered_after_the_backoff(
    make_config: Callable[..., Config], receiver: Receiver
) -> None:
    config = make_config(push_retry_base_ms=50)
    async with running(config) as (publisher, worker):
        job = job_for(receiver, 1)
        receiver.script[job["job_id"]] = [(429, {}), (200, {})]
        publisher.publish(job)
        await until(lambda: worker.stats()["delivered"] == 1, 10, "the delivery after the retry")
        assert receiver.counts[job["job_id"]] == 2
        assert receiver.attempts[job["job_id"]] == ["0", "1"]
        first, second = receiver.times[job["job_id"]]
        assert second - first >= 0.045  # the 50 ms retry TTL
        stats = worker.stats()
        assert (stats["retried"], stats["delivered"], stats["dead"]) == (1, 1, 0)
    assert await queue_depths(config) == {"jobs": 0, "retry": 0, "dead": 0}


async def test_retry_after_is_honoured(make_config: Callable[..., Config], receiver: Receiver) -> None:
    config = make_config(push_retry_base_ms=10)
    async with running(config) as (publisher, worker):
        job = job_for(receiver, 1)
        receiver.script[job["job_id"]] = [(503, {"Retry-After": "1"}), (200, {})]
        publisher.publish(job)
        await until(lambda: worker.stats()["delivered"] == 1, 10, "the delivery after Retry-After")
        first, second = receiver.times[job["job_id"]]
        assert second - first >= 0.95


async def test_invalid_failed_and_exhausted_jobs(make_config: Callable[..., Config], receiver: Receiver) -> None:
    config = make_config(push_max_attempts=3, push_retry_base_ms=20)
    invalid: list[PushJob] = []

    async def on_invalid(job: PushJob) -> None:
        invalid.append(job)

    async with running(config, on_invalid) as (publisher, worker):
        gone, bad, down = job_for(receiver, 1, "gone"), job_for(receiver, 2, "bad"), job_for(receiver, 3, "down")
        receiver.script[gone["job_id"]] = [(410, {})]
        receiver.script[bad["job_id"]] = [(400, {})]
        receiver.script[down["job_id"]] = [(503, {})]
        for job in (gone, bad, down):
            publisher.publish(job)
        await until(lambda: worker.stats()["dead"] == 2 and worker.stats()["invalid"] == 1, 10, "outcomes")
        assert [job["job_id"] for job in invalid] == [gone["job_id"]]
        assert receiver.counts == Counter({gone["job_id"]: 1, bad["job_id"]: 1, down["job_id"]: 3})
        assert worker.stats()["retried"] == 2
    dead = {decode_job(body)["job_id"]: headers for body, headers in await dead_letters(config)}
    assert set(dead) == {bad["job_id"], down["job_id"]}
    assert dead[bad["job_id"]]["x-im-outcome"] == "failed"
    assert dead[down["job_id"]]["x-im-outcome"] == "retry"
    assert await queue_depths(config) == {"jobs": 0, "retry": 0, "dead": 0}


async def test_both_sides_resume_after_the_broker_goes_away(
    make_config: Callable[..., Config], receiver: Receiver
) -> None:
    proxy = Proxy()
    await proxy.up()
    config = make_config(rabbitmq_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    try:
        async with running(config) as (publisher, worker):
            await until(lambda: publisher.stats()["connected"] and worker.stats()["connected"], 10, "connections")
            before = [job_for(receiver, seq) for seq in range(1, 31)]
            for job in before:
                publisher.publish(job)
            await until(lambda: len(receiver.counts) >= 10, 10, "some deliveries")

            await proxy.down()  # the broker "goes away" mid-stream
            after = [job_for(receiver, seq) for seq in range(31, 61)]
            for job in after:
                publisher.publish(job)
            await until(lambda: not publisher.stats()["connected"] and not worker.stats()["connected"], 10, "loss")
            assert await publisher.flush(0.5) is False

            await asyncio.sleep(0.5)
            await proxy.up()  # and comes back on the same address
            assert await publisher.flush(20), publisher.stats()
            expected = {job["job_id"] for job in before + after}
            await until(lambda: expected <= set(receiver.counts), 20, "every job at least once")
            assert set(receiver.counts) == expected
            assert publisher.stats()["connects"] >= 2
            assert worker.stats()["connects"] >= 2
            assert publisher.stats()["dropped"] == 0
            await until_queues_empty(config)  # republished duplicates, if any, are consumed too
    finally:
        await proxy.close()


async def test_both_sides_redeclare_a_deleted_topology(make_config: Callable[..., Config], receiver: Receiver) -> None:
    config = make_config()
    async with running(config) as (publisher, worker):
        publisher.publish(job_for(receiver, 1))
        await until(lambda: worker.stats()["delivered"] == 1, 10, "the first delivery")
        async with amqp_channel() as channel:
            await delete_topology(channel, config)  # an operator's mistake; the broker cancels the consumer
        await until(lambda: worker.stats()["connects"] >= 2, 10, "the worker consuming again")
        publisher.publish(job_for(receiver, 2))
        assert await publisher.flush(10), publisher.stats()
        await until(lambda: worker.stats()["delivered"] == 2, 10, "the delivery after the topology came back")
        assert set(receiver.counts) == {job_for(receiver, seq)["job_id"] for seq in (1, 2)}


async def test_close_finishes_the_jobs_in_hand(make_config: Callable[..., Config], receiver: Receiver) -> None:
    config = make_config()
    publisher = PushPublisher(config)
    worker = PushWorker(config, {"webhook": WebhookProvider(config)}, _ignore)
    await publisher.start()
    await worker.start()
    try:
        job = job_for(receiver, 1)
        receiver.delay[job["job_id"]] = 0.5
        publisher.publish(job)
        await until(lambda: worker.stats()["in_flight"] == 1, 10, "the job in hand")
        await worker.close()
        assert worker.stats()["delivered"] == 1
        assert receiver.counts[job["job_id"]] == 1
    finally:
        await worker.close()
        await publisher.close()
    assert await queue_depths(config) == {"jobs": 0, "retry": 0, "dead": 0}


async def _ignore(job: PushJob) -> None:
    return None
