"""The router's hub table and HTTP app, the session table and the batcher, without Ray."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import jwt
from aiohttp.test_utils import TestClient, TestServer

from im_actors.batching import Batcher
from im_actors.config import load_config
from im_actors.router import HubTable, make_app
from im_actors.session import SessionShard


def test_pick_least_connections_and_skip_dead_and_excluded() -> None:
    table = HubTable(random.Random(1))
    table.update("h0", "ws://a", 5)
    table.update("h1", "ws://b", 2)
    table.update("h2", "ws://c", 9)
    assert table.pick().name == "h1"  # type: ignore[union-attr]
    table.mark_dead("h1")
    assert table.pick().name == "h0"  # type: ignore[union-attr]
    assert table.pick({"h0"}).name == "h2"  # type: ignore[union-attr]
    table.mark_dead("h0")
    table.mark_dead("h2")
    assert table.pick() is None
    table.update("h1", "ws://b", 0)  # answered again
    assert table.pick().name == "h1"  # type: ignore[union-attr]


async def test_router_http_endpoints() -> None:
    config = load_config(dev_login=True, jwt_secret="k" * 32)
    table = HubTable()
    async with TestClient(TestServer(make_app(config, table))) as client:
        resp = await client.get("/v1/hub")
        assert resp.status == 503 and await resp.json() == {"error": "no_hub"}
        table.update("h0", "ws://127.0.0.1:1/v1/ws", 0)
        resp = await client.get("/v1/hub", params=[("exclude", "hx")])
        assert await resp.json() == {"hub": "h0", "url": "ws://127.0.0.1:1/v1/ws", "ttl_s": 30}
        resp = await client.post("/v1/login", json={"user": "alice"})
        token = (await resp.json())["token"]
        assert jwt.decode(token, "k" * 32, algorithms=["HS256"])["sub"] == "alice"
        resp = await client.post("/v1/login", json={"user": "not valid!"})
        assert resp.status == 400
        resp = await client.get("/v1/health")
        assert resp.status == 200 and (await resp.json())["hubs_live"] == 1


async def test_login_absent_without_dev_login() -> None:
    config = load_config(dev_login=False)
    async with TestClient(TestServer(make_app(config, HubTable()))) as client:
        resp = await client.post("/v1/login", json={"user": "alice"})
        assert resp.status in (404, 405)


class _Sink:
    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def publish(self, job: dict[str, Any]) -> None:
        self.jobs.append(job)


class _HubPeers:
    def __init__(self) -> None:
        self.delivered: dict[str, list[Any]] = {}

    def hub(self, name: str) -> Any:
        peers = self

        class P:
            async def call(self, method: str, items: list[Any], timeout: float = 30) -> None:
                peers.delivered.setdefault(name, []).extend(items)

        return P()


async def test_session_routes_online_devices_and_pushes_offline_ones() -> None:
    sink = _Sink()
    peers = _HubPeers()
    shard = SessionShard(load_config(fanout_batch_ms=0), peers, None, sink)  # type: ignore[arg-type]
    assert shard.connect("bob", "phone", "hub-0", 1) is None
    shard._session("bob").tokens = {"phone": ("webhook", "t1"), "tablet": ("webhook", "t2")}
    shard._session("carol").tokens = {}
    # a second connection of the same device replaces the first
    assert shard.connect("bob", "phone", "hub-1", 7) == ("hub-0", 1)
    entry = {"conv": "d:bob:carol", "seq": 1, "sender": "carol", "cmid": "c", "ts": 1, "kind": "text", "body": "yo"}
    shard._route([(entry, ["bob", "carol"])])
    await asyncio.sleep(0.05)
    assert peers.delivered == {"hub-1": [(entry, [7])]}
    assert [(j["device"], j["token"], j["seq"]) for j in sink.jobs] == [("tablet", "t2", 1)]
    shard.disconnect("bob", "phone", "hub-0", 1)  # stale: ignored
    assert shard.online("bob") == {"phone": ("hub-1", 7)}
    assert shard.hub_gone("hub-1") == 1 and shard.online("bob") == {}


async def test_batcher_batches_per_key_in_order() -> None:
    sent: list[tuple[str, list[int]]] = []

    async def send(key: str, items: list[int]) -> None:
        await asyncio.sleep(0.01)
        sent.append((key, items))

    b: Batcher[str] = Batcher(send, max_items=3, window_ms=5)
    for i in range(7):
        b.add("a", i)
    b.add("b", 100)
    await b.close()
    assert [i for k, items in sent if k == "a" for i in items] == list(range(7))
    assert all(len(items) <= 3 for _, items in sent)
    assert ("b", [100]) in sent
