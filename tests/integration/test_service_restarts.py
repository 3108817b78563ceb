"""Redis and RabbitMQ restarted under a deployment of their own (DESIGN.md section 4).

The machine's shared Redis and RabbitMQ are never stopped: this module starts a private Redis and a
private RabbitMQ node on free loopback ports (:class:`~im_actors.services.PrivateRedis`,
:class:`~im_actors.services.PrivateRabbitMQ`), deploys a second deployment on them into the test
run's Ray, and restarts only those.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from drivers.chaos import ChaosMonkey, ChaosSpec
from drivers.run import run_workload_async
from drivers.synthetic import SyntheticWorkload
from im_actors import ids
from im_actors.client import Client
from im_actors.cluster import Deployment, deploy, teardown
from im_actors.config import Config
from im_actors.services import LocalServices, PrivateRabbitMQ, PrivateRedis, purge_deployment

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
    pytest.mark.skipif(
        shutil.which("rabbitmq-server") is None and not os.path.exists("/usr/lib/rabbitmq/bin/rabbitmq-server"),
        reason="rabbitmq-server not installed",
    ),
]


@pytest.fixture(scope="module")
def private(base_config: Config, local_ray: None) -> Iterator[tuple[Deployment, LocalServices]]:
    services = LocalServices(redis=PrivateRedis(), rabbitmq=PrivateRabbitMQ())
    try:
        assert services.redis is not None and services.rabbitmq is not None
        cfg = base_config.model_copy(
            update={
                "deployment": f"{base_config.deployment}r{secrets.token_hex(2)}",
                "redis_url": services.redis.start(),
                "rabbitmq_url": services.rabbitmq.start(),
                "hubs": 2,
                "session_shards": 1,
                "conv_shards": 1,
                "store_writers": 1,
                "push_workers": 1,
            }
        )
        dep = deploy(cfg)
        try:
            yield dep, services
        finally:
            teardown(cfg)
            purge_deployment(cfg)
    finally:
        services.stop()


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook receiver on loopback: ``(url, jobs received)``."""
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(json.loads(await request.read()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook", received
    finally:
        await runner.cleanup()


async def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def test_redis_restart_between_two_sends_continues_the_seq(private: tuple[Deployment, LocalServices]) -> None:
    dep, services = private
    assert services.redis is not None
    a, b = f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"
    alice = Client(dep.router_url, a)
    await alice.connect()
    try:
        conv = ids.direct_conv(a, b)
        first = await alice.send(conv, "before the restart")
        services.redis.stop()  # every key gone: last seq and recent entries
        services.redis.start()
        second = await alice.send(conv, "after the restart")
        assert second.seq == first.seq + 1
        page = await alice.sync(conv, 0)
        assert [(m["seq"], m["body"]) for m in page.msgs] == [
            (first.seq, "before the restart"),
            (second.seq, "after the restart"),
        ]
    finally:
        await alice.close()


async def test_pushes_of_messages_sent_while_rabbitmq_restarts_arrive_once(
    private: tuple[Deployment, LocalServices], webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    dep, services = private
    assert services.rabbitmq is not None
    url, received = webhook
    a, b = f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"
    bob = Client(dep.router_url, b, "phone")
    await bob.connect()
    await bob.push_register("webhook", url)
    await bob.close()  # offline from now on: every message to him is a push job
    alice = Client(dep.router_url, a)
    await alice.connect()
    try:
        conv = ids.direct_conv(a, b)
        acks = [await alice.send(conv, "before")]
        await _until(lambda: len(received) == 1, 30, "the push sent before the restart")
        services.rabbitmq.stop()
        # The broker is down: messaging goes on, the jobs wait in the publisher's outbox.
        acks += [await alice.send(conv, f"during {i}") for i in range(5)]
        services.rabbitmq.start()
        acks += [await alice.send(conv, "after")]
        await _until(lambda: len(received) >= len(acks), 60, "every push after the broker came back")
        await asyncio.sleep(1.5)  # a duplicate, if any, would arrive by now
        seqs = Counter(job["seq"] for job in received if job["conv"] == conv)
        assert seqs == Counter(ack.seq for ack in acks)
        assert {(job["user"], job["device"]) for job in received} == {(b, "phone")}
    finally:
        await alice.close()


async def test_chaos_redis_and_rabbitmq_restarted_twice_loses_nothing(
    private: tuple[Deployment, LocalServices],
) -> None:
    dep, services = private
    spec = ChaosSpec(("redis-restart", "rabbitmq"))
    monkey = ChaosMonkey(dep.config, dep.router_url, spec, services)
    await monkey.start()
    workload = SyntheticWorkload(users=16, rate=40, duration_s=20, group_size=4, direct_share=0.3, seed=11)
    run = asyncio.create_task(run_workload_async(dep.router_url, workload, progress=False))
    await monkey.run(spec.schedule(2.0, 16.0))
    report = await run
    faults = await monkey.finish()
    assert report["sent"] == report["acked"], report.get("send_errors")
    assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0), report["lost_entries"]
    assert report["delivered"] == report["expected_deliveries"] > 0
    assert sorted(f["kind"] for f in faults) == ["rabbitmq", "rabbitmq", "redis-restart", "redis-restart"]
    assert all(f["error"] is None and f["recovery_s"] is not None for f in faults), faults
