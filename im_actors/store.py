"""Storage: MongoDB history (the source of truth) and Redis recent entries (DESIGN.md sections 2.4, 5).

:class:`Store` is the plain object: commits, reads and the last seq of a conversation. The store
writer actor (:class:`StoreWriter`) wraps it for commits; conversation shards hold their own
:class:`Store` for reads.

An entry is a dict ``{conv, seq, sender, cmid, ts, kind, body, meta}`` (``ts`` in ms since the
epoch, ``body`` str or bytes). MongoDB keeps it in ``messages`` with unique indexes on
``(conv, seq)`` and ``(conv, sender, cmid)``; Redis keeps ``<prefix>m:<conv>:<seq>`` (MessagePack,
expiring after ``recent_ttl_s``) and ``<prefix>last:<conv>`` (the largest committed seq, never
lowered).

The first entry of a direct conversation (seq 1) is stored with ``members`` (the pair, sorted):
it lists the conversation for both users (:meth:`Store.user_convs` reads the sparse index
:data:`LISTING_INDEX` beside ``user_convs``, which holds the groups' rows), so the listing is
written with the entry, atomically, and costs no storage call of its own. ``members`` is never
part of an entry read back (:data:`_ENTRY_FIELDS`).

How a commit ends (:class:`CommitResult`): entries are inserted *in order*, so a commit always
settles as a committed prefix, optionally followed by one conflicting entry (its cmid is already
stored, or its seq is taken), the rest not written. A timeout is ambiguous: it is settled by
reading back, never by guessing; only when even that fails is :class:`StorageUnavailable` raised, and then
the caller must re-seed the conversation from storage before assigning seqs again.

Time (issue 14, storage that answers slowly): every MongoDB operation ends, done or raising, within
``mongo_timeout_ms`` (:func:`mongo_client`: pymongo's ``timeoutMS``, retries included), and a
:meth:`Store.commit` makes at most three in a row (the insert; the read-back or the conflict read;
the stored last seq), so a commit is settled or refused within 3 x ``mongo_timeout_ms`` (15 s by
default) however slowly the server answers. A slow reply within the bound is a slow success; one
past it is an ambiguous commit, settled as above.

The one door to storage: every MongoDB collection (``messages``, ``groups``, ``contacts``,
``devices``, ``user_convs``, ``cursors``) is read and written here and nowhere else, and every
MongoDB or Redis error is turned into :class:`~im_actors.errors.StorageUnavailable` in one place,
:func:`storage_errors` (as httpcore's ``map_exceptions`` does at its boundary). Callers catch our
errors only.

Bulk work (DESIGN.md section 4; issue 14, defect 2): an operation whose size a client chooses (a
9,999-member group's user_convs rows, the push tokens of a big fan-out, a 500-entry sync) is cut
into pieces of at most :data:`BULK_CHUNK` ids (:data:`READ_CHUNK` entries for reads), so one
storage call stays small and a commit from anywhere waits behind at most one piece at the server;
and an operation over :data:`BULK_MIN` ids (a read over :data:`READ_CHUNK` entries) holds this
store's bulk lock, so bulk operations of one actor run one at a time instead of in parallel with
each other. Commits never take that lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgpack
import pymongo
import ray
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError
from redis.exceptions import RedisError

from im_actors import ids
from im_actors.config import Config
from im_actors.errors import StorageUnavailable
from im_actors.refs import answers_internal
from im_actors.vitals import Vitals

__all__ = [
    "Store",
    "CommitResult",
    "StoreWriter",
    "SEQ_INDEX",
    "CMID_INDEX",
    "LISTING_INDEX",
    "BULK_CHUNK",
    "BULK_MIN",
    "READ_CHUNK",
    "mongo_client",
    "redis_client",
    "storage_errors",
    "chunks",
]

log = logging.getLogger(__name__)

#: Redis cache writes of committed entries in flight per :class:`Store` (see ``_cache_later``).
CACHE_WRITES_IN_FLIGHT = 16

SEQ_INDEX = "conv_seq"
CMID_INDEX = "conv_sender_cmid"
#: Sparse index of the ``members`` of each direct conversation's first entry (its listing).
LISTING_INDEX = "direct_listing"
_ENTRY_FIELDS = ("conv", "seq", "sender", "cmid", "ts", "kind", "body", "meta")

#: The most ids (user ids, rows) one storage call carries; bigger work is cut into pieces.
BULK_CHUNK = 500
#: The most entries one read of a range carries (entries are up to ``max_body_bytes`` each).
READ_CHUNK = 100
#: Sorted ``find_one`` reads of a last seq in flight at once (:meth:`Store.last_seqs`).
LAST_READS_AT_ONCE = 32
#: Work on more ids than this is bulk work: it holds the store's bulk lock (one at a time).
BULK_MIN = 64
#: MongoDB's error code for dropping an index that is not there (``IndexNotFound``).
INDEX_NOT_FOUND = 27


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn a MongoDB or Redis error raised in the block into :class:`StorageUnavailable`.

    ``what`` names the operation for the log and the answer (``"group read"``, ...): never an
    actor name, since the message reaches clients. The one place where storage errors are mapped
    (STYLE.md rule 8); everything else catches our errors. Other exceptions pass unchanged (a
    document BSON cannot encode is a bug upstream of here and is answered ``internal``).
    """
    try:
        yield
    except PyMongoError as exc:
        log.info("MongoDB %s failed: %r", what, exc)
        raise StorageUnavailable(f"MongoDB unreachable: {what} failed ({type(exc).__name__})") from exc
    except RedisError as exc:
        log.info("Redis %s failed: %r", what, exc)
        raise StorageUnavailable(f"Redis unreachable: {what} failed ({type(exc).__name__})") from exc


def server_answers(url: str, timeout_ms: int = 500) -> bool:
    """Does a MongoDB-wire server answer ``ping`` at ``url`` within ``timeout_ms``? (Blocking: for
    the local services' start-up, never an actor's event loop.)"""
    try:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout_ms)
        try:
            client.admin.command("ping")
        finally:
            client.close()
        return True
    except PyMongoError:
        return False


def server_info(url: str, timeout_ms: int = 2000) -> dict[str, Any]:
    """``{"server": "SecantusDB" | "mongod", "version", "wire_version"}`` of the server at ``url``, or
    ``{"error": text}`` when it does not answer (blocking; for reports)."""
    try:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout_ms)
        try:
            info = client.server_info()
        finally:
            client.close()
    except PyMongoError as exc:
        return {"error": str(exc)}
    return {
        "server": "SecantusDB" if "secantusVersion" in info else "mongod",
        "version": info.get("secantusVersion") or info.get("version"),
        "wire_version": info.get("version"),
    }


def drop_database(url: str, db: str, timeout_ms: int = 5000) -> None:
    """Drop a deployment's database ``db`` (``im-actors purge``); raises :class:`StorageUnavailable`
    when the server does not answer (blocking)."""
    with storage_errors("database drop"):
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout_ms)
        try:
            client.drop_database(db)
        finally:
            client.close()


def chunks(items: Sequence[Any], size: int = BULK_CHUNK) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive pieces of at most ``size`` (>= 1)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


# Sets KEYS[1] to ARGV[1] unless it already holds a larger number: the last seq never goes back.
_SET_MAX = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


@dataclass
class CommitResult:
    """How a commit of ``n`` entries ended.

    ``committed``: entries ``[0, committed)`` are stored. When ``conflict`` is set, entry
    ``committed`` was refused: ``"cmid"`` (``existing`` is the stored entry with that cmid) or
    ``"seq"`` (``existing`` is None; ``last_seq`` is the conversation's stored last seq). Entries
    after it were not written.
    """

    committed: int
    conflict: str | None = None
    existing: dict[str, Any] | None = None
    last_seq: int = 0


def mongo_client(config: Config) -> AsyncMongoClient[dict[str, Any]]:
    """An async MongoDB client with the configured timeouts and write concern.

    ``timeoutMS`` (pymongo's client-side operation timeout) bounds each operation as a whole at
    ``mongo_timeout_ms``: server selection, a connection's handshake, the driver's one retry of a
    retryable write or read, and every batch of a cursor included. Without it a reply slower than
    the socket timeout cost up to three of them (the attempt, the retry's server selection, the
    retry), measured with ``drivers/tcpproxy.py`` in front of SecantusDB: 15 s at 5 s. Past the bound
    the operation raises a PyMongoError (``NetworkTimeout``, ``ServerSelectionTimeoutError``,
    ``ExecutionTimeout``), which :func:`storage_errors` and :meth:`Store.commit` turn into
    ``unavailable`` or a read-back.

    ``maxIdleTimeMS`` (``mongo_max_idle_ms``) retires a pooled connection before the server's idle
    timeout closes it under the client: SecantusDB drops a connection idle for 300 s, and the next
    operation on it failed with ``AutoReconnect``, answered ``unavailable``, wherever pymongo cannot
    retry (a ``delete_many``, any write with retryable writes off: 5 of the million-frame fuzz run's
    answers, each a valid request). A ``maxIdleTimeMS`` given in ``mongo_url`` is kept instead.
    """
    w: int | str = "majority" if config.mongo_write_concern == "majority" else 1
    # A maxIdleTimeMS in the URL is the operator's (a keyword argument would override it).
    query = {k.lower() for k, _ in parse_qsl(urlsplit(config.mongo_url).query)}
    idle: dict[str, Any] = {} if "maxidletimems" in query else {"maxIdleTimeMS": config.mongo_max_idle_ms}
    return AsyncMongoClient(
        config.mongo_url,
        timeoutMS=config.mongo_timeout_ms,
        serverSelectionTimeoutMS=config.mongo_timeout_ms,
        socketTimeoutMS=config.mongo_timeout_ms,
        connectTimeoutMS=config.mongo_timeout_ms,
        w=w,
        tz_aware=False,
        **idle,
    )


def redis_client(config: Config) -> aioredis.Redis:
    """An async Redis client with short timeouts (Redis is a cache: a slow one must not stall commits)."""
    return aioredis.from_url(config.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)


def _clean(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in _ENTRY_FIELDS if k in doc}


def _document(entry: dict[str, Any]) -> dict[str, Any]:
    """The ``messages`` document of ``entry``: a copy, plus ``members`` (the listing) on the first
    entry of a direct conversation."""
    doc = dict(entry)
    if entry["seq"] == 1 and ids.conv_kind(entry["conv"]) == "direct":
        doc["members"] = sorted(ids.direct_members(entry["conv"]))
    return doc


class Store:
    """MongoDB history plus Redis recent entries for one deployment."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._mongo = mongo_client(config)
        self._db = self._mongo[config.mongo_db]
        self.messages = self._db["messages"]
        self._groups = self._db["groups"]
        self._contacts = self._db["contacts"]
        self._devices = self._db["devices"]
        self._user_convs = self._db["user_convs"]
        self._cursors = self._db["cursors"]
        self._redis: aioredis.Redis | None = None  # opened on first use (the push worker never needs it)
        self._prefix = config.key_prefix
        self._bulk = asyncio.Semaphore(1)
        self.stats: dict[str, float] = {
            "commits": 0,
            "ambiguous_commits": 0,
            "mongo_ms_total": 0.0,
            "redis_ms_total": 0.0,
            "bulk_waits": 0,
        }
        self._cache_tasks: set[asyncio.Task[None]] = set()

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client, made on first use."""
        if self._redis is None:
            self._redis = redis_client(self.config)
        return self._redis

    @redis.setter
    def redis(self, client: aioredis.Redis) -> None:
        self._redis = client

    async def setup(self) -> None:
        """Create the indexes (idempotent). Raises :class:`StorageUnavailable` when MongoDB does not answer."""
        with storage_errors("index setup"):
            await self.messages.create_index([("conv", 1), ("seq", 1)], unique=True, name=SEQ_INDEX)
            await self.messages.create_index([("conv", 1), ("sender", 1), ("cmid", 1)], unique=True, name=CMID_INDEX)
            await self.messages.create_index([("members", 1)], sparse=True, name=LISTING_INDEX)
            await self._drop_group_members_index()
            await self._user_convs.create_index([("user", 1)])
            await self._devices.create_index([("user", 1), ("device", 1)])
            await self._cursors.create_index([("user", 1)])
            await self._contacts.create_index([("user", 1)])

    async def _drop_group_members_index(self) -> None:
        """Drop the multikey index on ``groups.members`` that deployments before issue 14's fix
        built: nothing reads by it, and it made each checkpoint of a big group re-index every
        member in one write (:meth:`Membership.to_doc`). Idempotent, also when several store
        writers set up at once: the ones that find the index already dropped go on."""
        for name, info in (await self._groups.index_information()).items():
            if name != "_id_" and [k for k, _ in info.get("key", [])] == ["members"]:
                try:
                    await self._groups.drop_index(name)
                except OperationFailure as exc:
                    if exc.code != INDEX_NOT_FOUND:
                        raise
                    continue
                log.info("dropped the unused index %s on groups.members", name)

    @contextlib.asynccontextmanager
    async def _bulk_work(self, n: int, small: int = BULK_MIN) -> AsyncIterator[None]:
        """Hold the bulk lock for work on ``n`` ids when ``n`` > ``small`` (small work, and every
        commit, never waits for it)."""
        if n <= small:
            yield
            return
        if self._bulk.locked():
            self.stats["bulk_waits"] += 1
        async with self._bulk:
            yield

    async def close(self) -> None:
        """Finish the Redis writes in flight, then close both clients."""
        await self.flush_cache()
        await self._mongo.close()
        if self._redis is not None:
            await self._redis.aclose()

    def _entry_key(self, conv: str, seq: int) -> str:
        return f"{self._prefix}m:{conv}:{seq}"

    def _last_key(self, conv: str) -> str:
        return f"{self._prefix}last:{conv}"

    # --- commits -----------------------------------------------------------------------------

    async def commit(self, entries: list[dict[str, Any]]) -> CommitResult:
        """Commit ``entries`` (ordered by conv, then seq) to MongoDB, then Redis.

        Returns a :class:`CommitResult`; raises :class:`StorageUnavailable` when MongoDB could
        neither take the write nor be read back (the outcome is then unknown).
        """
        if not entries:
            return CommitResult(0)
        started = time.perf_counter()
        try:
            await self.messages.insert_many([_document(e) for e in entries], ordered=True)
            result = CommitResult(len(entries))
        except BulkWriteError as exc:
            result = await self._settle_conflict(entries, exc)
        except PyMongoError as exc:  # any other: ambiguous, settled by reading back
            log.warning("commit of %d entries ambiguous (%s); reading back", len(entries), type(exc).__name__)
            self.stats["ambiguous_commits"] += 1
            result = await self._read_back(entries)
        self.stats["commits"] += 1
        self.stats["mongo_ms_total"] += (time.perf_counter() - started) * 1000
        await self._cache_later(entries[: result.committed])
        return result

    async def _cache_later(self, entries: list[dict[str, Any]]) -> None:
        """Write ``entries`` to Redis without holding up the ack: MongoDB has them, and every
        reader falls back to it for an entry Redis lacks (:meth:`read_range`), while a sequencer's
        activation takes the larger of both last seqs (:meth:`last_seqs`), so a cache write still
        on its way is never a lost entry nor a reused seq. At most :data:`CACHE_WRITES_IN_FLIGHT`
        writes are in flight: past that, a commit waits for the oldest (backpressure on a slow Redis).
        """
        if not entries:
            return
        while len(self._cache_tasks) >= CACHE_WRITES_IN_FLIGHT:
            await asyncio.wait(self._cache_tasks, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.get_running_loop().create_task(self._cache(entries))
        self._cache_tasks.add(task)
        task.add_done_callback(self._cache_tasks.discard)

    async def flush_cache(self) -> None:
        """Wait until every Redis write started by a commit has ended (tests, shutdown)."""
        while self._cache_tasks:
            await asyncio.wait(set(self._cache_tasks))

    async def _settle_conflict(self, entries: list[dict[str, Any]], exc: BulkWriteError) -> CommitResult:
        details = exc.details or {}
        errors = details.get("writeErrors") or []
        n_ok = int(details.get("nInserted", 0))
        if not errors:  # only a write-concern error: what was written is settled by reading back
            return await self._read_back(entries)
        if errors[0].get("code") != 11000:
            log.warning("MongoDB refused a commit: %s", errors[:1])
            raise StorageUnavailable(f"MongoDB refused the commit (code {errors[0].get('code')})") from exc
        index = int(errors[0].get("index", n_ok))
        bad = entries[index]
        message = str(errors[0].get("errmsg", ""))
        key_pattern = errors[0].get("keyPattern") or {}
        with storage_errors("commit conflict read"):
            if CMID_INDEX in message or "cmid" in key_pattern:
                existing = await self.messages.find_one(
                    {"conv": bad["conv"], "sender": bad["sender"], "cmid": bad["cmid"]}
                )
                if existing is not None:
                    return CommitResult(index, "cmid", _clean(existing))
            return CommitResult(index, "seq", None, await self._mongo_last(bad["conv"], bad["seq"]))

    async def _read_back(self, entries: list[dict[str, Any]]) -> CommitResult:
        """Settle an ambiguous commit: which prefix of ``entries`` is stored, and whether the entry
        after it lost its seq to another one. One query for the whole batch (each conversation's
        seq range, only the fields compared), so the read-back is one bounded operation however
        big the batch; a seq found taken costs one more (the stored last seq)."""
        ranges: dict[str, list[int]] = {}
        for entry in entries:
            lo_hi = ranges.setdefault(entry["conv"], [entry["seq"], entry["seq"]])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], entry["seq"]), max(lo_hi[1], entry["seq"])
        clauses = [{"conv": c, "seq": {"$gte": lo, "$lte": hi}} for c, (lo, hi) in ranges.items()]
        with storage_errors("commit read-back"):
            cursor = self.messages.find(
                clauses[0] if len(clauses) == 1 else {"$or": clauses},
                {"conv": 1, "seq": 1, "sender": 1, "cmid": 1},
            )
            stored = {(d["conv"], int(d["seq"])): d async for d in cursor}
            committed = 0
            for entry in entries:
                doc = stored.get((entry["conv"], entry["seq"]))
                if doc is None:
                    break
                if doc.get("sender") != entry["sender"] or doc.get("cmid") != entry["cmid"]:
                    return CommitResult(committed, "seq", None, await self._mongo_last(entry["conv"], entry["seq"]))
                committed += 1
            return CommitResult(committed)

    async def _cache(self, entries: list[dict[str, Any]]) -> None:
        if not entries:
            return
        started = time.perf_counter()
        last: dict[str, int] = {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry in entries:
                    pipe.set(
                        self._entry_key(entry["conv"], entry["seq"]),
                        msgpack.packb(entry, use_bin_type=True),
                        ex=self.config.recent_ttl_s,
                    )
                    last[entry["conv"]] = max(last.get(entry["conv"], 0), entry["seq"])
                for conv, seq in last.items():
                    pipe.eval(_SET_MAX, 1, self._last_key(conv), seq)
                await pipe.execute()
        except RedisError as exc:
            # MongoDB holds the entries; readers fall back to it (DESIGN.md section 4).
            log.warning("Redis cache write failed: %s", exc)
        finally:
            self.stats["redis_ms_total"] += (time.perf_counter() - started) * 1000

    async def add_user_convs(self, conv: str, users: list[str]) -> None:
        """Record that each of ``users`` belongs to ``conv`` (for ``convs``); idempotent."""
        await self.add_user_convs_many({conv: users})

    async def add_user_convs_many(self, convs: dict[str, list[str]]) -> None:
        """:meth:`add_user_convs` for every ``{conv: [user, ...]}``, in unordered inserts of at most
        :data:`BULK_CHUNK` rows; over :data:`BULK_MIN` rows it is bulk work (one at a time per store).

        The documents are fixed by their ``_id`` (``user|conv``), so one already there is the same
        document: its duplicate-key refusal is success (an insert costs the MongoDB-wire servers a
        fifth of an upsert). Raises :class:`StorageUnavailable` for any other failure; a resend
        converges (the pieces written stay written).
        """
        docs = [{"_id": f"{u}|{conv}", "user": u, "conv": conv} for conv, users in convs.items() for u in users]
        if not docs:
            return
        async with self._bulk_work(len(docs)):
            for piece in chunks(docs):
                try:
                    with storage_errors("user_convs write"):
                        await self._user_convs.insert_many(list(piece), ordered=False)
                except StorageUnavailable as exc:
                    cause = exc.__cause__
                    details = (cause.details if isinstance(cause, BulkWriteError) else None) or {}
                    only_dups = bool(details.get("writeErrors")) and not details.get("writeConcernErrors")
                    if not only_dups or any(e.get("code") != 11000 for e in details["writeErrors"]):
                        raise

    async def user_convs(self, user: str) -> tuple[list[str], dict[str, int]]:
        """The conversations of ``user`` and the user's read cursor in each: ``(convs, {conv: seq})``.

        Groups (and direct conversations listed before their first entry carried the listing) come
        from ``user_convs``; direct conversations from their first entry's ``members``."""
        with storage_errors("user_convs read"):
            convs = [d["conv"] async for d in self._user_convs.find({"user": user}, {"conv": 1})]
            convs.extend([d["conv"] async for d in self.messages.find({"members": user}, {"conv": 1})])
            convs = list(dict.fromkeys(convs))
            reads = {d["conv"]: int(d["seq"]) async for d in self._cursors.find({"user": user})}
        return convs, reads

    async def set_read(self, user: str, conv: str, seq: int) -> None:
        """Move ``user``'s read cursor in ``conv`` to ``seq``; it never moves backwards."""
        with storage_errors("cursor write"):
            await self._cursors.update_one(
                {"_id": f"{user}|{conv}"}, {"$max": {"seq": seq}, "$set": {"user": user, "conv": conv}}, upsert=True
            )

    # --- groups (documents are checkpoints of the group's system entries: groups.py) ----------

    async def group_doc(self, gid: str) -> dict[str, Any] | None:
        """The stored document of group ``gid`` (``{_id, name, owner, seq, spans, roles, ...}``), or None."""
        with storage_errors("group read"):
            return await self._groups.find_one({"_id": gid})

    async def insert_group(self, doc: dict[str, Any]) -> None:
        """Store a new group document (``doc["_id"]`` is the group id)."""
        with storage_errors("group write"):
            await self._groups.insert_one(doc)

    async def checkpoint_group(self, gid: str, fields: dict[str, Any]) -> None:
        """Set ``fields`` on the document of ``gid`` (a checkpoint at ``fields["seq"]``). One
        document cannot be cut, so a big one (over :data:`BULK_MIN` membership spans) is bulk work.
        The ``members`` array of documents written before issue 14's fix goes (``spans`` holds
        them: :meth:`Membership.from_doc`)."""
        async with self._bulk_work(len(fields.get("spans") or ())):
            with storage_errors("group write"):
                await self._groups.update_one({"_id": gid}, {"$set": fields, "$unset": {"members": ""}})

    # --- contacts (one document per side: {_id: "<user>|<other>", user, other, state, ms}) ----

    async def contact_states(self, a: str, b: str) -> tuple[str | None, str | None]:
        """The states of both sides of the pair: ``(a's side, b's side)``, None where there is none."""
        with storage_errors("contacts read"):
            docs = [d async for d in self._contacts.find({"_id": {"$in": [f"{a}|{b}", f"{b}|{a}"]}})]
        by_id = {d["_id"]: d.get("state") for d in docs}
        return by_id.get(f"{a}|{b}"), by_id.get(f"{b}|{a}")

    async def contact_states_many(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str | None, str | None]]:
        """:meth:`contact_states` of each of ``pairs``, in order, in reads of at most
        :data:`BULK_CHUNK` sides (a batch of first-seen direct conversations asks for its pairs at
        once). Raises :class:`StorageUnavailable`."""
        keys = [k for a, b in pairs for k in (f"{a}|{b}", f"{b}|{a}")]
        state: dict[str, str | None] = {}
        for piece in chunks(keys):
            with storage_errors("contacts read"):
                async for d in self._contacts.find({"_id": {"$in": list(piece)}}, {"state": 1}):
                    state[d["_id"]] = d.get("state")
        return [(state.get(f"{a}|{b}"), state.get(f"{b}|{a}")) for a, b in pairs]

    async def set_contact_sides(self, sides: list[tuple[str, str, str | None]], ms: int) -> None:
        """Write sides ``[(user, other, state or None to delete)]`` in order, in one call.

        Raises :class:`StorageUnavailable`; part of it may then be written (contacts.py converges).
        """
        ops: list[Any] = []
        for user, other, state in sides:
            if state is None:
                ops.append(pymongo.DeleteOne({"_id": f"{user}|{other}"}))
            else:
                doc = {"user": user, "other": other, "state": state, "ms": ms}
                ops.append(pymongo.UpdateOne({"_id": f"{user}|{other}"}, {"$set": doc}, upsert=True))
        if ops:
            with storage_errors("contacts write"):
                await self._contacts.bulk_write(ops, ordered=True)

    async def contact_sides_many(self, users: Sequence[str]) -> dict[str, dict[str, str]]:
        """Every side of each of ``users``: ``{user: {other: state}}`` (users without any are
        left out), in reads of at most :data:`BULK_CHUNK` users. Raises :class:`StorageUnavailable`."""
        out: dict[str, dict[str, str]] = {}
        for piece in chunks(list(users)):
            with storage_errors("contacts read"):
                cursor = self._contacts.find({"user": {"$in": list(piece)}}, {"user": 1, "other": 1, "state": 1})
                async for d in cursor:
                    out.setdefault(d["user"], {})[d["other"]] = d["state"]
        return out

    async def contacts_of(self, user: str) -> list[tuple[str, str]]:
        """``[(other, state)]`` of ``user``'s side of every pair."""
        with storage_errors("contacts read"):
            return [(d["other"], d["state"]) async for d in self._contacts.find({"user": user})]

    async def accepted_contacts(self, user: str) -> list[str]:
        """The users whose pair with ``user`` is ``accepted`` on ``user``'s side."""
        with storage_errors("contacts read"):
            return [d["other"] async for d in self._contacts.find({"user": user, "state": "accepted"})]

    # --- push tokens (devices: {_id: token, user, device, provider}) ----------------------------

    async def push_tokens(self, users: Sequence[str]) -> dict[str, dict[str, tuple[str, str]]]:
        """``{user: {device: (provider, token)}}`` for each of ``users`` (an empty map for a user
        without tokens). Read in pieces of :data:`BULK_CHUNK` users; bulk work above
        :data:`BULK_MIN`. Raises :class:`StorageUnavailable`."""
        found: dict[str, dict[str, tuple[str, str]]] = {u: {} for u in users}
        if not users:
            return found
        async with self._bulk_work(len(users)):
            for piece in chunks(list(found)):
                with storage_errors("push tokens read"):
                    async for doc in self._devices.find({"user": {"$in": list(piece)}}):
                        found.setdefault(doc["user"], {})[doc["device"]] = (doc["provider"], doc["_id"])
        return found

    async def register_token(self, user: str, device: str, provider: str, token: str) -> None:
        """Give ``token`` to (``user``, ``device``): the device's other tokens go, and the token
        leaves any other holder (``_id`` is the token)."""
        with storage_errors("push token write"):
            await self._devices.delete_many({"user": user, "device": device, "_id": {"$ne": token}})
            await self._devices.update_one(
                {"_id": token}, {"$set": {"user": user, "device": device, "provider": provider}}, upsert=True
            )

    async def unregister_tokens(self, user: str, device: str) -> None:
        """Remove every push token of (``user``, ``device``)."""
        with storage_errors("push token write"):
            await self._devices.delete_many({"user": user, "device": device})

    async def token_holder(self, token: str) -> tuple[str, str] | None:
        """``(user, device)`` that ``token`` belongs to now, or None."""
        with storage_errors("push token read"):
            doc = await self._devices.find_one({"_id": token})
        return None if doc is None else (str(doc.get("user")), str(doc.get("device")))

    async def remove_token(self, token: str, user: str, device: str) -> None:
        """Delete ``token`` if it still belongs to (``user``, ``device``) (an invalid token)."""
        with storage_errors("push token write"):
            await self._devices.delete_one({"_id": token, "user": user, "device": device})

    # --- reads -------------------------------------------------------------------------------

    async def _mongo_last(self, conv: str, at_least: int = 0) -> int:
        """The largest seq MongoDB holds for ``conv``; ``at_least`` (a known committed seq, e.g.
        Redis's last) narrows the scan, which matters on servers that sort before limiting."""
        query: dict[str, Any] = {"conv": conv}
        if at_least > 0:
            query["seq"] = {"$gte": at_least}
        doc = await self.messages.find_one(query, sort=[("seq", pymongo.DESCENDING)], projection={"seq": 1})
        if doc is None and at_least > 0:
            return await self._mongo_last(conv)  # Redis was ahead of MongoDB: do not trust it
        return int(doc["seq"]) if doc else 0

    async def last_seq(self, conv: str) -> int:
        """The conversation's last committed seq: the larger of Redis's and MongoDB's.

        Raises :class:`StorageUnavailable` when MongoDB does not answer (Redis alone is never trusted).
        """
        return (await self.last_seqs([conv]))[conv]

    async def recent_last_seqs(self, convs: list[str]) -> dict[str, int] | None:
        """Redis's last seq of each of ``convs`` (0 where it has none) in one ``MGET``, or None
        when Redis does not answer. A *guess*, never below a seq Redis once held for a conversation
        and usually exact (Redis's last moves after each commit); where it is behind (lost keys, an
        old snapshot) the first commit numbered from it collides with the unique ``(conv, seq)``
        index and is renumbered from MongoDB's last (:class:`CommitResult` ``"seq"``), so no seq is
        reused and none skipped. The conversation shard activates senders' conversations with it
        (:meth:`ConversationShard._activate_many`)."""
        convs = list(dict.fromkeys(convs))
        if not convs:
            return {}
        try:
            raws = await self.redis.mget([self._last_key(c) for c in convs])
        except RedisError:
            return None
        return {c: int(r) if r else 0 for c, r in zip(convs, raws, strict=True)}

    async def last_seqs(self, convs: list[str]) -> dict[str, int]:
        """:meth:`last_seq` of each of ``convs``: one Redis ``MGET``, then MongoDB: for the
        conversations Redis has a last for, the largest seq at or above it (one indexed
        ``find_one`` each, :data:`LAST_READS_AT_ONCE` at a time); for the others (new ones, or
        Redis lost their keys), one aggregate of the largest seq over ``{conv: {$in: ...}}``.

        Not one ``$or`` of narrow clauses: SecantusDB 0.7 answers that with a collection scan
        (718 ms for five conversations among 20,000 entries, against 1.8 ms for this method on new
        ones: ``benchmarks/storage_ops.py``).

        Raises :class:`StorageUnavailable` when MongoDB does not answer (Redis alone is never trusted).
        """
        convs = list(dict.fromkeys(convs))
        if not convs:
            return {}
        redis_last = await self.recent_last_seqs(convs) or dict.fromkeys(convs, 0)
        known = [c for c in convs if redis_last[c] > 0]
        unknown = [c for c in convs if redis_last[c] == 0]
        mongo_last: dict[str, int] = {}
        with storage_errors("last seq read"):
            for piece in chunks(known, LAST_READS_AT_ONCE):
                found = await asyncio.gather(*(self._mongo_last(c, redis_last[c]) for c in piece))
                mongo_last.update(zip(piece, found, strict=True))
            for piece in chunks(unknown):
                match = {"conv": piece[0]} if len(piece) == 1 else {"conv": {"$in": list(piece)}}
                cursor = await self.messages.aggregate(
                    [{"$match": match}, {"$group": {"_id": "$conv", "last": {"$max": "$seq"}}}]
                )
                mongo_last.update({d["_id"]: int(d["last"]) async for d in cursor})
        return {c: max(redis_last[c], mongo_last.get(c, 0)) for c in convs}

    async def system_entries(self, conv: str, after: int) -> list[dict[str, Any]]:
        """The ``system`` entries of ``conv`` with seq > ``after``, ascending (membership changes
        since a group document's checkpoint). Raises :class:`StorageUnavailable` when MongoDB does
        not answer: MongoDB is read, never Redis, since a change must never be missed."""
        with storage_errors("system entries read"):
            cursor = self.messages.find({"conv": conv, "seq": {"$gt": after}, "kind": "system"})
            docs = [_clean(d) async for d in cursor]
        return sorted(docs, key=lambda d: int(d["seq"]))

    async def read_range(self, conv: str, after: int, upto: int) -> list[dict[str, Any]]:
        """Entries with ``after < seq <= upto``, ascending: Redis first, MongoDB for what it lacks.

        Read in pieces of :data:`READ_CHUNK` seqs (a 500-entry sync is five small reads, not one
        big one); a read of more than one piece is bulk work. Raises :class:`StorageUnavailable`
        when an entry is in neither reachable store.
        """
        if upto <= after:
            return []
        seqs = list(range(after + 1, upto + 1))
        async with self._bulk_work(len(seqs), small=READ_CHUNK):  # a default sync (100) never waits
            out: list[dict[str, Any]] = []
            for piece in chunks(seqs, READ_CHUNK):
                out.extend(await self._read_piece(conv, list(piece)))
        if len(out) != len(seqs):
            raise StorageUnavailable(f"{conv}: {len(seqs) - len(out)} committed entries could not be read")
        return out

    async def _read_piece(self, conv: str, seqs: list[int]) -> list[dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        try:
            raws = await self.redis.mget([self._entry_key(conv, s) for s in seqs])
            for seq, raw in zip(seqs, raws, strict=False):
                if raw is not None:
                    found[seq] = msgpack.unpackb(raw, raw=False)
        except RedisError as exc:
            log.info("Redis read failed, reading MongoDB: %s", exc)
        missing = [s for s in seqs if s not in found]
        if missing:
            with storage_errors("history read"):
                cursor = self.messages.find({"conv": conv, "seq": {"$gte": missing[0], "$lte": missing[-1]}})
                async for doc in cursor:
                    found.setdefault(int(doc["seq"]), _clean(doc))
        return [found[s] for s in seqs if s in found]


@ray.remote(num_cpus=0, max_restarts=-1)
@answers_internal
class StoreWriter(Vitals):
    """Store writer actor: commits batches of entries (a thin shell over :class:`Store`)."""

    async def __init__(self, config: Config) -> None:  # type: ignore[misc]  # Ray awaits it
        from im_actors import metrics

        self._store = Store(config)
        self._metrics = m = metrics.for_actor(config, "store", self.stats)
        self._store.stats = m.probe(
            self._store.stats, mongo_ms_total="im_store_mongo_ms", redis_ms_total="im_store_redis_ms"
        )
        m.start()

    async def ready(self) -> bool:
        """Create the indexes; True once MongoDB answered."""
        await self._store.setup()
        return True

    def stats(self) -> dict[str, float]:
        """Counters: commits, ambiguous_commits (a MongoDB error left the outcome unknown and it was read
        back), bulk_waits, mongo_ms_total and redis_ms_total (time in each part of the commits, ms)."""
        return dict(self._store.stats)

    async def commit(self, entries: list[dict[str, Any]]) -> CommitResult:
        """See :meth:`Store.commit`."""
        return await self._store.commit(entries)
