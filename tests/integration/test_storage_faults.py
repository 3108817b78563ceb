"""Storage faults on a deployment of its own, with a private Redis and a private SecantusDB.

The shared services are never stopped or flushed: this module starts ``redis-server`` and
``secantusd-py`` on free loopback ports, deploys a second im-actors deployment into the test run's
Ray, and stops, flushes and restarts only those.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import ray
import redis
from websockets.asyncio.client import connect

from drivers.run import run_workload_async
from drivers.synthetic import SyntheticWorkload
from im_actors import ids
from im_actors.client import Client
from im_actors.cluster import Deployment, deploy, teardown
from im_actors.config import Config
from im_actors.services import LocalServices, PrivateRedis, free_port, purge_deployment, start_secantus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]


@dataclass
class PrivateStack:
    """A deployment whose Redis and MongoDB-wire server the tests may stop, flush and restart."""

    deployment: Deployment
    redis: PrivateRedis
    mongo_port: int
    mongo_folder: Path
    mongo_services: LocalServices = field(default_factory=LocalServices)

    def start_redis(self) -> None:
        self.redis.start()

    def stop_redis(self) -> None:
        self.redis.stop()

    def flush_redis(self) -> None:
        redis.Redis.from_url(self.redis.url).flushall()

    def start_mongo(self) -> None:
        if self.mongo_services.mongo is None:
            start_secantus(self.mongo_services, port=self.mongo_port, folder=self.mongo_folder)
        else:
            self.mongo_services.mongo.start()

    def stop_mongo(self) -> None:
        assert self.mongo_services.mongo is not None
        self.mongo_services.mongo.stop()


@pytest.fixture(scope="module")
def stack(base_config: Config, local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    folder = tmp_path_factory.mktemp("secantus")
    st = PrivateStack(Deployment(base_config), PrivateRedis(), free_port(), folder)
    st.start_redis()
    st.start_mongo()
    cfg = base_config.model_copy(
        update={
            "deployment": f"{base_config.deployment}s{secrets.token_hex(2)}",
            "redis_url": st.redis.url,
            "mongo_url": f"mongodb://127.0.0.1:{st.mongo_port}/?directConnection=true",
            "mongo_timeout_ms": 1000,
            "push_workers": 0,
        }
    )
    try:
        st.deployment = deploy(cfg)
        yield st
    finally:
        teardown(cfg)
        purge_deployment(cfg)
        st.stop_redis()
        st.mongo_services.stop()


def _kill(dep: Deployment, role: str, index: int) -> None:
    name = ids.actor_name(role, index, dep.config.actor_prefix)
    ray.kill(ray.get_actor(name, namespace=ids.NAMESPACE), no_restart=False)


async def test_flushall_between_two_sends_continues_the_seq(stack: PrivateStack) -> None:
    dep = stack.deployment
    a, b = f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"
    alice = Client(dep.router_url, a)
    await alice.connect()
    try:
        conv = ids.direct_conv(a, b)
        first = await alice.send(conv, "one")
        stack.flush_redis()
        second = await alice.send(conv, "two")
        assert second.seq == first.seq + 1
        stack.flush_redis()
        _kill(dep, "conv", ids.shard_of(conv, dep.config.conv_shards))  # re-activation reads MongoDB
        third = await alice.send(conv, "three")
        assert third.seq == second.seq + 1
        page = await alice.sync(conv, 0, 10)  # Redis lost them: served from MongoDB
        assert [m["body"] for m in page.msgs] == ["one", "two", "three"]
        bob = Client(dep.router_url, b)
        await bob.connect()
        try:  # listed for the recipient by the first entry itself (store.py), last from MongoDB
            assert [(c["conv"], c["last"]) for c in await bob.convs()] == [(conv, 3)]
        finally:
            await bob.close()
    finally:
        await alice.close()


async def test_mongodb_down_answers_unavailable_and_the_resend_succeeds(stack: PrivateStack) -> None:
    import aiohttp

    dep = stack.deployment
    a, b = f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"
    conv = ids.direct_conv(a, b)
    alice = Client(dep.router_url, a)
    await alice.connect()
    first = await alice.send(conv, "before")
    async with aiohttp.ClientSession() as http:
        token = (await (await http.post(f"{dep.router_url}/v1/login", json={"user": a})).json())["token"]
        hub = await (await http.get(f"{dep.router_url}/v1/hub")).json()
    ws = await connect(hub["url"], subprotocols=["im.v1.msgpack"])  # type: ignore[list-item]
    try:
        await ws.send(msgpack.packb({"t": "auth", "token": token, "device": "raw", "proto": 1}))
        assert msgpack.unpackb(await ws.recv())["t"] == "ready"
        stack.stop_mongo()
        await ws.send(msgpack.packb({"t": "send", "id": 7, "conv": conv, "cmid": "during", "body": "x"}))
        while True:
            frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))
            if frame.get("id") == 7:
                break
        assert frame["t"] == "err" and frame["code"] == "unavailable" and frame["retry"] is True
        stack.start_mongo()
        again = await alice.send(conv, "x", cmid="during")  # the same cmid, as the protocol says
        assert again.seq == first.seq + 1 and not again.dup
        page = await alice.sync(conv, 0, 10)
        assert [m["cmid"] for m in page.msgs][-1] == "during" and len(page.msgs) == 2
    finally:
        await ws.close()
        await alice.close()


async def _fault_during_run(stack: PrivateStack, down: Any, up: Any, outage_s: float) -> dict[str, Any]:
    workload = SyntheticWorkload(users=12, rate=30, duration_s=6, group_size=4, direct_share=0.3)
    run = asyncio.create_task(run_workload_async(stack.deployment.router_url, workload, progress=False))
    await asyncio.sleep(2.5)
    down()
    await asyncio.sleep(outage_s)
    up()
    return await run


@pytest.mark.parametrize("service", ["mongodb", "redis"])
async def test_storage_outage_mid_traffic_loses_nothing(stack: PrivateStack, service: str) -> None:
    if service == "mongodb":
        report = await _fault_during_run(stack, stack.stop_mongo, stack.start_mongo, 3.0)
    else:
        report = await _fault_during_run(stack, stack.stop_redis, stack.start_redis, 3.0)
    assert report["sent"] == report["acked"], report.get("send_errors")
    assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0), report["lost_entries"]
    assert report["delivered"] == report["expected_deliveries"] > 0
    if service == "mongodb":  # the outage was felt: sends were answered unavailable and resent
        assert report["client_counters"]["resends"] > 0
