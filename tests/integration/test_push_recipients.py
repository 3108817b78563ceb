"""Who gets a push, end to end through hubs, session shards, RabbitMQ and the push worker of the test
deployment (conftest): only devices with a token and no live connection, and never a device whose token
moved to another user."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiormq
import pytest
from aiohttp import web

from im_actors import ids
from im_actors.client import Client
from im_actors.cluster import Deployment, status
from im_actors.push.topology import push_names

pytestmark = pytest.mark.integration


class Hooks:
    """Webhook receivers at /hook/<name>: every job received, with the hook it came to."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.base = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((request.match_info["name"], json.loads(await request.read())))
        return web.Response(status=200)

    def url(self, name: str) -> str:
        return f"{self.base}/hook/{name}"

    def jobs(self, **match: Any) -> list[tuple[str, dict[str, Any]]]:
        return [(hook, job) for hook, job in self.received if all(job[k] == v for k, v in match.items())]


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    receiver = Hooks()
    app = web.Application()
    app.router.add_post("/hook/{name}", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield receiver
    finally:
        await runner.cleanup()


@pytest.fixture
async def clients(router_url: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[Client] = []

    async def make(user: str, device: str) -> Client:
        client = Client(router_url, user, device)
        await client.connect()
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def until(predicate: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def quiet(deployment: Deployment) -> None:
    """Wait until every push job made so far has been handled: every session shard's outbox confirmed,
    no job ready in the work or retry queue, none in the worker's hands (twice in a row)."""
    config = deployment.config
    sessions = [
        deployment.actors[ids.actor_name("session", i, config.actor_prefix)] for i in range(config.session_shards)
    ]
    worker = deployment.actors[ids.actor_name("push", 0, config.actor_prefix)]
    for shard in sessions:
        assert await shard.flush_push.remote(10.0)
    names = push_names(config)
    connection = await aiormq.connect(config.rabbitmq_url)
    try:
        channel = await connection.channel()

        async def idle() -> bool:
            ready = 0
            for queue in (names.jobs, *names.retry_queues):
                ready += (await channel.queue_declare(queue, passive=True)).message_count
            stats = await worker.stats.remote()
            return ready == 0 and stats["in_flight"] == 0

        async def idle_twice() -> bool:
            if not await idle():
                return False
            await asyncio.sleep(0.2)
            return await idle()

        await until(idle_twice, 30, "the push pipeline to be idle")
    finally:
        await connection.close()


async def test_one_connected_and_one_disconnected_device_exactly_one_push_to_the_disconnected(
    deployment: Deployment, clients: Any, hooks: Hooks, uid: Any
) -> None:
    a, b = uid("alice"), uid("bob")
    laptop = await clients(b, "laptop")
    await laptop.push_register("webhook", hooks.url(f"{b}-laptop"))
    phone = await clients(b, "phone")
    await phone.push_register("webhook", hooks.url(f"{b}-phone"))
    await phone.close()  # bob's phone is offline, his laptop stays connected
    alice = await clients(a, "d1")
    conv = ids.direct_conv(a, b)
    ack = await alice.send(conv, "one push, to the phone")
    await until(lambda: hooks.jobs(user=b), 30, "bob's push")
    await quiet(deployment)
    assert [(hook, job["device"], job["seq"]) for hook, job in hooks.jobs(user=b)] == [(f"{b}-phone", "phone", ack.seq)]
    assert hooks.jobs(user=a) == []  # the sender's own connected device gets none either

    # the metrics `im-actors status` prints
    summary = (await asyncio.to_thread(status, deployment.config))["push"]
    assert summary["published"] >= summary["confirmed"] >= 1
    assert summary["jobs"] >= 1 and summary["delivered"] >= 1
    assert set(summary["queues"]) == {"jobs", "retry", "dead"}


async def test_a_token_registered_by_another_user_gets_no_push_of_the_first(
    deployment: Deployment, clients: Any, hooks: Hooks, uid: Any
) -> None:
    a, b, c = uid("alice"), uid("bob"), uid("carol")
    shared = hooks.url(f"shared-{b}")
    bob = await clients(b, "phone")
    await bob.push_register("webhook", shared)
    await bob.close()
    carol = await clients(c, "phone")  # the same phone, now carol's
    await carol.push_register("webhook", shared)
    await carol.close()
    alice = await clients(a, "d1")
    to_bob = await alice.send(ids.direct_conv(a, b), "for bob only")
    to_carol = await alice.send(ids.direct_conv(a, c), "for carol")
    await until(lambda: hooks.jobs(user=c), 30, "carol's push")
    await quiet(deployment)
    assert [(job["user"], job["conv"], job["seq"]) for _, job in hooks.received if job["user"] in (b, c)] == [
        (c, ids.direct_conv(a, c), to_carol.seq)
    ]
    assert to_bob.seq >= 1
