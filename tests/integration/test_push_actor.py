"""PushWorkerActor on a local Ray cluster, with the real RabbitMQ and a MongoDB-wire server (SecantusDB,
started here as a separate process on a free loopback port and stopped afterwards)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiormq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from im_actors.config import Config, load_config
from im_actors.push.jobs import make_job
from im_actors.push.publisher import PushPublisher
from im_actors.push.topology import delete_topology

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SECANTUS = shutil.which("secantusd-py") or str(Path(sys.executable).parent / "secantusd-py")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not _listening(5672), reason="no RabbitMQ at 127.0.0.1:5672"),
    pytest.mark.skipif(not Path(SECANTUS).exists(), reason="secantusd-py (SecantusDB) not installed"),
]


@pytest.fixture(scope="module")
def mongo_url(base_config: Config) -> str:
    """The test run's MongoDB-wire server (conftest starts a private SecantusDB)."""
    return base_config.mongo_url


@pytest.fixture(scope="module")
def ray_local(local_ray: None) -> Any:
    """The test run's local Ray cluster (conftest)."""
    import ray

    return ray


@pytest.fixture
async def config(mongo_url: str) -> AsyncIterator[Config]:
    cfg = load_config(
        deployment="t" + uuid.uuid4().hex[:8],
        rabbitmq_url=RABBIT_URL,
        mongo_url=mongo_url,
        mongo_db="im_push_test",
        push_retry_base_ms=50,
        push_timeout_s=5,
        webhook_allow_private=True,
    )
    yield cfg
    connection = await aiormq.connect(RABBIT_URL)
    try:
        await delete_topology(await connection.channel(), cfg)
    finally:
        await connection.close()


async def until(predicate: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_actor_delivers_removes_invalid_tokens_and_survives_a_restart(
    ray_local: Any, config: Config, mongo_url: str
) -> None:
    import pymongo

    from im_actors.push.worker import PushWorkerActor

    app = web.Application()
    app.router.add_post("/gone", _gone)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    mongo: Any = pymongo.AsyncMongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    devices = mongo[config.mongo_db]["devices"]
    gone_url = str(server.make_url("/gone"))
    await devices.insert_many(
        [
            {"_id": gone_url, "user": "bob", "device": "old", "provider": "webhook"},
            {"_id": "keep-me", "user": "bob", "device": "new", "provider": "log"},
        ]
    )
    publisher = PushPublisher(config)
    await publisher.start()
    actor = PushWorkerActor.remote(config)  # type: ignore[attr-defined]
    try:
        await actor.start.remote()  # idempotent: creation already started it
        await until(lambda: _stat(actor, "connected"), 20, "the actor's connection")

        def job(device: str, provider: str, token: str, seq: int, user: str = "bob") -> dict:
            return make_job(
                user=user, device=device, provider=provider, token=token, conv="d:alice:bob", seq=seq, sender="alice"
            )

        publisher.publish(job("new", "log", "keep-me", 1))
        publisher.publish(job("old", "webhook", gone_url, 2))
        # made for carol's phone before its token moved to bob's "new" device: must not be sent
        publisher.publish(job("phone", "log", "keep-me", 4, user="carol"))
        assert await publisher.flush(10)
        await until(lambda: _both(actor), 20, "a delivery and an invalid token")
        await until(lambda: _stat(actor, "dead", 1), 20, "the job for a moved token in the dead queue")
        stats = await actor.stats.remote()
        assert stats["delivered"] == 1
        assert stats["invalid_cleanup_errors"] == 0
        assert await devices.count_documents({"user": "bob", "device": "old"}) == 0
        assert await devices.count_documents({"user": "bob", "device": "new"}) == 1

        # A crashed actor comes back empty (max_restarts=-1) and consumes again by itself.
        ray_local.kill(actor, no_restart=False)
        await asyncio.sleep(1)
        publisher.publish(job("new", "log", "keep-me", 3))
        assert await publisher.flush(10)
        await until(lambda: _fresh_delivery(actor), 60, "a delivery by the restarted actor")
    finally:
        with contextlib.suppress(Exception):
            await actor.close.remote()
        ray_local.kill(actor, no_restart=True)
        await publisher.close()
        await devices.drop()
        await mongo.close()
        await server.close()


async def _gone(request: web.Request) -> web.Response:
    return web.Response(status=410)


async def _stat(actor: Any, key: str, value: Any = True) -> bool:
    with contextlib.suppress(Exception):  # the actor may be restarting
        return (await actor.stats.remote())[key] == value
    return False


async def _fresh_delivery(actor: Any) -> bool:
    """True once a restarted actor (its counters start again at 0) has delivered exactly one job."""
    with contextlib.suppress(Exception):  # the actor may be restarting
        stats = await actor.stats.remote()
        return stats["received"] == 1 and stats["delivered"] == 1
    return False


async def _both(actor: Any) -> bool:
    stats = await actor.stats.remote()
    return stats["delivered"] == 1 and stats["invalid"] == 1
