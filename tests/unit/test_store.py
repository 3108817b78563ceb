"""The storage door (store.py) without servers: error mapping, bounded pieces, one bulk operation at a time.

The real :class:`Store` is built (its MongoDB and Redis clients connect lazily, so nothing is
contacted) and its collections are replaced by recorders: this is the one test that fakes raw
collections, since it tests the one module that owns them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo.errors import AutoReconnect, ServerSelectionTimeoutError
from redis.exceptions import ConnectionError as RedisConnectionError

from im_actors.config import load_config
from im_actors.conversation import ConversationShard
from im_actors.errors import StorageUnavailable, Unavailable
from im_actors.store import BULK_CHUNK, READ_CHUNK, Store, mongo_client, storage_errors
from tests.fakes import FakePeers, FakeStore


class _Cursor:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self._docs = iter(docs)

    def __aiter__(self) -> _Cursor:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return next(self._docs)
        except StopIteration:
            raise StopAsyncIteration from None


class Recorder:
    """A collection that records the size of every call and how many run at the same time."""

    def __init__(self, docs: list[dict[str, Any]] | None = None, fail: Exception | None = None) -> None:
        self.sizes: list[int] = []
        self.docs = docs or []
        self.fail = fail
        self.running = 0
        self.most_at_once = 0
        self.release = asyncio.Event()
        self.release.set()

    async def _enter(self, size: int) -> None:
        if self.fail is not None:
            raise self.fail
        self.sizes.append(size)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await self.release.wait()
        await asyncio.sleep(0)
        self.running -= 1

    async def bulk_write(self, ops: list[Any], ordered: bool = True) -> None:
        await self._enter(len(ops))

    async def insert_many(self, docs: list[Any], ordered: bool = True) -> None:
        await self._enter(len(docs))

    def find(self, query: dict[str, Any], *args: Any) -> _Cursor:
        if self.fail is not None:
            raise self.fail
        wanted = query.get("user", {}).get("$in") if isinstance(query.get("user"), dict) else None
        if wanted is not None:
            self.sizes.append(len(wanted))
            return _Cursor([d for d in self.docs if d["user"] in wanted])
        seq = query.get("seq", {})
        self.sizes.append(int(seq.get("$lte", 0)) - int(seq.get("$gte", 0)) + 1)
        return _Cursor([d for d in self.docs if seq.get("$gte", 0) <= d.get("seq", 0) <= seq.get("$lte", 0)])

    async def find_one(self, query: dict[str, Any], **kwargs: Any) -> dict[str, Any] | None:
        if self.fail is not None:
            raise self.fail
        return None


class FakeRedis:
    """``mget`` that finds nothing (every entry read from MongoDB) and records its sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def mget(self, keys: list[str]) -> list[None]:
        self.sizes.append(len(keys))
        return [None] * len(keys)


def make_store() -> Store:
    return Store(load_config(mongo_url="mongodb://127.0.0.1:9", redis_url="redis://127.0.0.1:9/0"))


def test_storage_errors_maps_mongodb_and_redis_errors_and_nothing_else() -> None:
    for raised in (AutoReconnect("down"), ServerSelectionTimeoutError("no primary"), RedisConnectionError("refused")):
        with pytest.raises(StorageUnavailable) as caught, storage_errors("group read"):
            raise raised
        assert caught.value.code == "unavailable" and caught.value.retry
        assert "group read" in caught.value.msg
        assert isinstance(caught.value, Unavailable)
    with pytest.raises(UnicodeEncodeError), storage_errors("group write"):  # a bug upstream: not "unavailable"
        "\ud83d".encode()


async def test_every_store_method_answers_storage_unavailable_when_mongodb_is_down() -> None:
    store = make_store()
    down = Recorder(fail=AutoReconnect("fake MongoDB down"))
    for name in ("_groups", "_contacts", "_devices", "_user_convs", "_cursors"):
        setattr(store, name, down)
    calls = [
        store.group_doc("g1"),
        store.contact_states("a", "b"),
        store.contacts_of("a"),
        store.accepted_contacts("a"),
        store.push_tokens(["a"]),
        store.token_holder("t"),
        store.add_user_convs("g:g1", ["a"]),
        store.user_convs("a"),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable):
            await call


async def test_group_sized_writes_and_reads_are_cut_into_bounded_pieces() -> None:
    store = make_store()
    store._user_convs = rows = Recorder()  # type: ignore[assignment]
    users = [f"u{i}" for i in range(9999)]
    await store.add_user_convs("g:big", users)
    assert max(rows.sizes) <= BULK_CHUNK and sum(rows.sizes) == 9999
    assert len(rows.sizes) == -(-9999 // BULK_CHUNK)

    store._devices = devices = Recorder(  # type: ignore[assignment]
        [{"_id": "tok-7", "user": "u7", "device": "phone", "provider": "log"}]
    )
    tokens = await store.push_tokens(users)
    assert max(devices.sizes) <= BULK_CHUNK and sum(devices.sizes) == 9999
    assert tokens["u7"] == {"phone": ("log", "tok-7")} and tokens["u8"] == {} and len(tokens) == 9999

    store.redis = redis = FakeRedis()  # type: ignore[assignment]
    store.messages = msgs = Recorder(  # type: ignore[assignment]
        [
            {"conv": "d:a:b", "seq": s, "sender": "a", "cmid": f"c{s}", "ts": s, "kind": "text", "body": "x"}
            for s in range(1, 501)
        ]
    )
    got = await store.read_range("d:a:b", 0, 500)
    assert [e["seq"] for e in got] == list(range(1, 501))
    assert max(redis.sizes) <= READ_CHUNK and max(msgs.sizes) <= READ_CHUNK and sum(redis.sizes) == 500


async def test_bulk_operations_run_one_at_a_time_and_small_ones_never_wait_for_them() -> None:
    store = make_store()
    store._user_convs = rows = Recorder()  # type: ignore[assignment]
    rows.release.clear()  # the storage server is slow: every call waits until released
    first = asyncio.create_task(store.add_user_convs("g:one", [f"u{i}" for i in range(2000)]))
    second = asyncio.create_task(store.add_user_convs("g:two", [f"v{i}" for i in range(2000)]))
    await asyncio.sleep(0.01)
    assert rows.running == 1  # the second bulk operation waits for the first, not beside it
    small = asyncio.create_task(store.add_user_convs("d:a:b", ["a", "b"]))  # a direct conversation's index
    await asyncio.sleep(0.01)
    assert rows.running == 2 and rows.sizes[-1] == 2  # it went to storage at once, beside one piece
    rows.release.set()
    await asyncio.gather(first, second, small)
    assert rows.most_at_once == 2  # one bulk piece plus the small call, never two bulk pieces
    assert store.stats["bulk_waits"] == 1


async def test_commit_is_retried_on_another_writer_only_when_the_writer_failed_not_storage() -> None:
    store = FakeStore()
    peers = FakePeers(store, {})
    shard = ConversationShard(load_config(fanout_batch_ms=0, store_writers=2), peers, store)  # type: ignore[arg-type]
    tries: list[str] = []

    async def writer_gone(entries: list[dict[str, Any]]) -> Any:
        tries.append("gone")
        if len(tries) == 1:
            raise Unavailable("a component is restarting")
        return await store.commit(entries)

    peers.store_peer.handlers["commit"] = writer_gone
    entry = {"conv": "d:a:b", "seq": 1, "sender": "a", "cmid": "c1", "ts": 1, "kind": "text", "body": "x"}
    assert (await shard._commit_with_retry([entry])).committed == 1
    assert tries == ["gone", "gone"]

    tries.clear()

    async def storage_down(entries: list[dict[str, Any]]) -> Any:
        tries.append("storage")
        raise StorageUnavailable("MongoDB unreachable: commit failed (AutoReconnect)")

    peers.store_peer.handlers["commit"] = storage_down
    with pytest.raises(StorageUnavailable):
        await shard._commit_with_retry([dict(entry, seq=2, cmid="c2")])
    assert tries == ["storage"]  # every writer talks to the same storage: not tried again


class Messages:
    """A ``messages`` collection whose inserts fail ambiguously (a reply cut mid-way) and whose
    reads answer from ``stored``; records every query."""

    def __init__(self, stored: list[dict[str, Any]]) -> None:
        self.stored = stored
        self.queries: list[dict[str, Any]] = []

    async def insert_many(self, docs: list[Any], ordered: bool = True) -> None:
        raise AutoReconnect("connection closed")  # the write may or may not have been carried out

    @staticmethod
    def _match(doc: dict[str, Any], clause: dict[str, Any]) -> bool:
        seq = clause.get("seq", {})
        return doc["conv"] == clause["conv"] and seq.get("$gte", 0) <= doc["seq"] <= seq.get("$lte", 1 << 62)

    def find(self, query: dict[str, Any], projection: Any = None) -> _Cursor:
        self.queries.append(query)
        clauses = query.get("$or", [query])
        return _Cursor([d for d in self.stored if any(self._match(d, c) for c in clauses)])

    async def find_one(self, query: dict[str, Any], **kwargs: Any) -> dict[str, Any] | None:
        self.queries.append(query)
        docs = [d for d in self.stored if d["conv"] == query["conv"]]
        return max(docs, key=lambda d: d["seq"]) if docs else None


def _entry(conv: str, seq: int, cmid: str) -> dict[str, Any]:
    return {"conv": conv, "seq": seq, "sender": "u1", "cmid": cmid, "ts": 1, "kind": "text", "body": "x"}


async def test_an_ambiguous_commit_is_read_back_in_one_query_whatever_the_batch_size() -> None:
    store = make_store()
    entries = [_entry("d:a:b", s, f"c{s}") for s in range(1, 4)] + [_entry("g:g1", s, f"g{s}") for s in (5, 6)]
    # The cut insert went through for the first two entries only.
    store.messages = msgs = Messages([dict(e) for e in entries[:2]])  # type: ignore[assignment]
    result = await store.commit([])  # nothing to do, no query
    assert result.committed == 0 and msgs.queries == []
    result = await store._read_back(entries)
    assert (result.committed, result.conflict) == (2, None)
    assert len(msgs.queries) == 1 and len(msgs.queries[0]["$or"]) == 2  # one range per conversation
    # Nothing stored: the ambiguous commit settles as nothing committed (the send answers unavailable).
    store.messages = msgs = Messages([])  # type: ignore[assignment]
    result = await store.commit(entries)
    assert (result.committed, result.conflict) == (0, None) and len(msgs.queries) == 1
    assert (store.stats["commits"], store.stats["ambiguous_commits"]) == (1, 1)
    # The seq after the committed prefix is held by another entry: a seq conflict with the stored last.
    other = {**entries[1], "cmid": "someone-else"}
    store.messages = msgs = Messages([dict(entries[0]), other, _entry("d:a:b", 3, "x3")])  # type: ignore[assignment]
    result = await store._read_back(entries)
    assert (result.committed, result.conflict, result.last_seq) == (1, "seq", 3)
    assert len(msgs.queries) == 2  # the read-back, then the stored last seq


async def test_pooled_connections_idle_past_mongo_max_idle_ms_are_retired_unless_the_url_says_otherwise() -> None:
    def idle_s(**overrides: Any) -> float | None:
        client = mongo_client(load_config(**overrides))
        return client.options.pool_options.max_idle_time_seconds

    assert idle_s(mongo_url="mongodb://127.0.0.1:9") == 60.0  # the default, below SecantusDB's 300 s
    assert idle_s(mongo_url="mongodb://127.0.0.1:9", mongo_max_idle_ms=15_000) == 15.0
    # an operator's URL option wins over the knob (a keyword argument would silently override it)
    assert idle_s(mongo_url="mongodb://127.0.0.1:9/?maxIdleTimeMS=20000", mongo_max_idle_ms=15_000) == 20.0
