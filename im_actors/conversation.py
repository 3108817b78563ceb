"""Conversation shards: per-conversation sequencers hosted many to a Ray actor (DESIGN.md 1-3).

A :class:`Sequencer` is the logical actor of one conversation: its last seq, its members, the
cmids it committed recently, and the sends waiting for a seq. :class:`ConversationShard` hosts
many and runs their commits; :class:`ConversationShardActor` is the Ray shell.

Order is a value (STYLE.md rule 6): seqs are assigned in :meth:`ConversationShard._take_batch`,
plain synchronous code with no ``await`` between reading and writing ``last``. A conversation has
at most one commit in flight, so a failed commit never leaves a hole: its sends are answered
``unavailable`` and ``last`` stays where it was; a commit that ended as a committed prefix plus a
conflict (see :class:`im_actors.store.CommitResult`) answers the prefix, settles the conflicting
send, and puts the rest back at the head of the queue to be numbered again.

Every conversation operation checks membership here, and answers a non-member ``forbidden``
whether or not the conversation exists.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack
import ray

from im_actors import ids
from im_actors.batching import Batcher
from im_actors.config import Config
from im_actors.errors import Conflict, Forbidden, RequestError, StorageUnavailable, Unavailable
from im_actors.membership import Membership
from im_actors.protocol import body_size
from im_actors.refs import Peers
from im_actors.store import CommitResult, Store

__all__ = ["Sequencer", "PendingSend", "ConversationShard", "ConversationShardActor", "SendItem", "body_digest"]

log = logging.getLogger(__name__)

#: Recently committed cmids kept per conversation (older resends are caught by the unique index).
RECENT_CMIDS = 4096

#: Conversation ids found not to exist, remembered (least recently asked dropped first) so a probe
#: asked again is answered from memory like a conversation that is active: the same timing class.
ABSENT_KEPT = 10000

#: The one answer to anyone who may not read or write a conversation, whether or not it exists
#: (PROTOCOL.md section 6): the same code, message and fields on every path.
NOT_A_MEMBER = "not a member of this conversation"
#: The answer to a direct message refused by a block or by the direct-message policy.
DM_REFUSED = "not allowed to message this user"


def body_digest(kind: str, body: str | bytes, meta: dict[str, Any] | None) -> bytes:
    """Digest telling a resend (same digest) from a conflicting reuse of a cmid."""
    return hashlib.blake2b(msgpack.packb([kind, body, meta or {}], use_bin_type=True), digest_size=16).digest()


@dataclass
class SendItem:
    """One send as the hub hands it over: who, where, what."""

    sender: str
    conv: str
    cmid: str
    body: str | bytes
    kind: str = "text"
    meta: dict[str, Any] | None = None


@dataclass
class PendingSend:
    """A send waiting for its seq; ``change`` for a membership change (a system entry whose
    ``meta`` :meth:`Membership.apply` reads)."""

    item: SendItem
    digest: bytes
    future: asyncio.Future[dict[str, Any]]
    change: bool = False


@dataclass
class Sequencer:
    """State of one conversation. Touched only by its shard, one step at a time.

    ``membership`` is exact as of ``last``: a change applies when its entry commits.
    ``dm_allowed`` caches the contacts host's answer for a direct conversation (None: ask).
    """

    conv: str
    last: int = 0
    membership: Membership = field(default_factory=Membership)
    exists: bool = False
    dm_allowed: bool | None = None
    cmids: OrderedDict[tuple[str, str], tuple[int, int, bytes]] = field(default_factory=OrderedDict)
    pending: list[PendingSend] = field(default_factory=list)
    inflight: bool = False
    indexed: bool = False  # direct conversation recorded in user_convs by this activation (before its commit)

    @property
    def members(self) -> frozenset[str]:
        """The current members."""
        return self.membership.frozen()

    def remember(self, sender: str, cmid: str, seq: int, ts: int, digest: bytes) -> None:
        """Record a committed cmid, forgetting the oldest beyond :data:`RECENT_CMIDS`."""
        self.cmids[(sender, cmid)] = (seq, ts, digest)
        if len(self.cmids) > RECENT_CMIDS:
            self.cmids.popitem(last=False)

    def find_pending(self, sender: str, cmid: str) -> PendingSend | None:
        """The queued send with this cmid, if any (a resend while the first is in flight)."""
        for p in self.pending:
            if p.item.sender == sender and p.item.cmid == cmid:
                return p
        return None


def _fit(msgs: list[dict[str, Any]], max_bytes: int, newest: bool) -> list[dict[str, Any]]:
    """The longest run of ``msgs`` whose bodies fit in ``max_bytes`` (at least one entry), taken
    from the oldest end (sync pages forward) or the newest end (history pages backward): a page
    must fit a connection's send queue, or the client could never catch up."""
    order = reversed(msgs) if newest else iter(msgs)
    kept: list[dict[str, Any]] = []
    size = 0
    for m in order:
        size += body_size(m["body"])
        if kept and size > max_bytes:
            break
        kept.append(m)
    return kept[::-1] if newest else kept


def _forward(ranges: list[tuple[int, int]], after: int, limit: int) -> list[tuple[int, int]]:
    """The first ``limit`` readable seqs above ``after``, as inclusive segments of ``ranges``."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        lo = max(lo, after + 1)
        if lo > hi or limit <= 0:
            continue
        hi = min(hi, lo + limit - 1)
        out.append((lo, hi))
        limit -= hi - lo + 1
    return out


def _backward(ranges: list[tuple[int, int]], top: int, limit: int) -> list[tuple[int, int]]:
    """The newest ``limit`` readable seqs at or below ``top``, as inclusive segments, ascending."""
    out: list[tuple[int, int]] = []
    for lo, hi in reversed(ranges):
        hi = min(hi, top)
        if lo > hi or limit <= 0:
            continue
        lo = max(lo, hi - limit + 1)
        out.append((lo, hi))
        limit -= hi - lo + 1
    return out[::-1]


def _visible_last(ranges: list[tuple[int, int]]) -> int:
    """The newest seq a reader with these ranges may read (0: none yet)."""
    return ranges[-1][1] if ranges else 0


def _ack(conv: str, seq: int, ts: int, dup: bool) -> dict[str, Any]:
    return {"conv": conv, "seq": seq, "ts": ts, "dup": dup}


class ConversationShard:
    """Hosts the sequencers of the conversations that hash to this shard.

    ``peers`` reaches store writers, group shards and session shards; ``store`` serves reads.
    """

    def __init__(self, config: Config, peers: Peers, store: Store) -> None:
        self.config = config
        self.peers = peers
        self.store = store
        self.sequencers: dict[str, Sequencer] = {}
        self._splits: dict[str, tuple[frozenset[str], dict[int, list[str]]]] = {}  # conv -> members by shard
        self._absent: OrderedDict[str, None] = OrderedDict()  # made-up conversation ids, see ABSENT_KEPT
        self._activating: dict[str, asyncio.Future[Sequencer]] = {}
        self._inflight_convs: dict[str, list[PendingSend]] = {}
        self._ready: dict[str, None] = {}  # convs with sends waiting and no commit in flight, oldest first
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(config.store_inflight)
        self._loop_task: asyncio.Task[None] | None = None
        self._commits: set[asyncio.Task[None]] = set()
        self._fanout: Batcher[int] = Batcher(self._send_fanout, config.fanout_batch_max, config.fanout_batch_ms)
        self._events: Batcher[int] = Batcher(self._send_events, config.fanout_batch_max, config.fanout_batch_ms)
        self.stats: dict[str, float] = {
            "committed": 0,
            "dups": 0,
            "commits": 0,
            "unavailable": 0,
            "commit_ms_total": 0.0,
        }

    def start(self) -> None:
        """Start the commit loop (call from inside the event loop)."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._commit_loop())

    # --- activation --------------------------------------------------------------------------

    async def _load_membership(self, conv: str) -> tuple[Membership, bool]:
        """The membership of ``conv`` and whether it exists: a group's document (its checkpoint)
        from the group shard, then every change entry committed after that checkpoint."""
        if ids.conv_kind(conv) == "direct":
            return Membership.direct(*ids.direct_members(conv)), True
        gid = ids.group_id_of(conv)
        doc = await self.peers.group(gid).call("membership", gid)
        if doc is None:
            # The same storage reads as a group that exists (its stream after the checkpoint), so a
            # made-up id's first probe costs what a real group's first access costs: probing cannot
            # tell real ids by timing (issue 5; benchmarks/forbidden_timing.py measures it).
            await self.store.system_entries(conv, 0)
            return Membership(), False
        membership = Membership.from_doc(doc)
        for entry in await self.store.system_entries(conv, membership.seq):
            membership.apply(entry["sender"], entry.get("meta") or {}, entry["seq"])
        return membership, True

    async def sequencer(self, conv: str) -> Sequencer:
        """The sequencer of ``conv``, activated from storage on first use.

        Activation reads the last seq from Redis *and* MongoDB and takes the larger (DESIGN.md
        section 3); raises :class:`Unavailable` when MongoDB or the group shard does not answer.
        """
        seqr = self.sequencers.get(conv)
        if seqr is not None:
            return seqr
        if conv in self._absent:
            self._absent.move_to_end(conv)
            return Sequencer(conv=conv)
        waiting = self._activating.get(conv)
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut: asyncio.Future[Sequencer] = asyncio.get_running_loop().create_future()
        self._activating[conv] = fut
        try:
            membership, exists = await self._load_membership(conv)
            last = await self.store.last_seq(conv)  # 0 for a made-up id; read anyway, as above
            seqr = Sequencer(conv=conv, last=last, membership=membership, exists=exists)
            if exists:
                self.sequencers[conv] = seqr
            else:  # a made-up group id: only its id is kept, in a bounded set
                self._absent[conv] = None
                if len(self._absent) > ABSENT_KEPT:
                    self._absent.popitem(last=False)
            fut.set_result(seqr)
            return seqr
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters get it through shield
            raise
        finally:
            del self._activating[conv]

    @staticmethod
    def _precheck(user: str, conv: str) -> None:
        """Refuse a non-member of a direct conversation before activating anything."""
        if ids.conv_kind(conv) == "direct" and user not in ids.direct_members(conv):
            raise Forbidden(NOT_A_MEMBER)

    async def _member_sequencer(self, user: str, conv: str) -> Sequencer:
        """The sequencer of ``conv`` when ``user`` is a member now (send, read, typing)."""
        self._precheck(user, conv)
        seqr = await self.sequencer(conv)
        if user not in seqr.membership.members:
            raise Forbidden(NOT_A_MEMBER)
        return seqr

    async def _reader_sequencer(self, user: str, conv: str) -> Sequencer:
        """The sequencer of ``conv`` when ``user`` is or was a member (sync, history: what their
        spans cover). A conversation that does not exist takes the same path and answer."""
        self._precheck(user, conv)
        seqr = await self.sequencer(conv)
        if not seqr.membership.ever(user):
            raise Forbidden(NOT_A_MEMBER)
        return seqr

    async def _check_dm(self, seqr: Sequencer, sender: str) -> None:
        """Refuse a direct message that a block or the direct-message policy forbids.

        The contacts host answers once per activation; it tells this shard when the pair's contact
        state changes (:meth:`contact_changed`)."""
        if ids.conv_kind(seqr.conv) != "direct":
            return
        if seqr.dm_allowed is None:
            a, b = ids.direct_members(seqr.conv)
            seqr.dm_allowed = bool(await self.peers.contact_host(a, b).call("dm_allowed", a, b))
        if not seqr.dm_allowed:
            raise Forbidden(DM_REFUSED)

    def contact_changed(self, conv: str) -> None:
        """The contact state of a direct conversation's pair changed: ask again at the next send."""
        seqr = self.sequencers.get(conv)
        if seqr is not None:
            seqr.dm_allowed = None

    # --- sends -------------------------------------------------------------------------------

    async def send_batch(self, items: list[SendItem]) -> list[dict[str, Any]]:
        """Sequence and commit a batch of sends; one answer per item, in order.

        An answer is an ack ``{"conv", "seq", "ts", "dup"}`` or an error ``{"err": code, "msg",
        "retry"}``: a batch mixes conversations, so one item's failure does not fail the others.
        """
        waits = [self._enqueue(item) for item in items]
        results = await asyncio.gather(*waits, return_exceptions=True)
        out: list[dict[str, Any]] = []
        for res in results:
            if isinstance(res, RequestError):
                out.append({"err": res.code, "msg": res.msg, "retry": res.retry})
            elif isinstance(res, BaseException):
                log.error("send failed: %r", res)
                out.append({"err": "unavailable", "msg": f"{type(res).__name__}", "retry": True})
            else:
                out.append(res)
        return out

    async def _enqueue(self, item: SendItem, change: bool = False) -> dict[str, Any]:
        if change:
            self._absent.pop(item.conv, None)  # the group shard made it exist
            seqr = await self.sequencer(item.conv)
        else:
            seqr = await self._member_sequencer(item.sender, item.conv)
            await self._check_dm(seqr, item.sender)
        seqr = self.sequencers.setdefault(item.conv, seqr)  # a membership change makes the group exist
        digest = body_digest(item.kind, item.body, item.meta)
        known = seqr.cmids.get((item.sender, item.cmid))
        if known is not None:
            seq, ts, old = known
            if old != digest:
                raise Conflict("cmid already committed with a different body")
            self.stats["dups"] += 1
            return _ack(item.conv, seq, ts, True)
        queued = seqr.find_pending(item.sender, item.cmid) or self._find_inflight(item)
        if queued is not None:
            if queued.digest != digest:
                raise Conflict("cmid already sent with a different body")
            res = await asyncio.shield(queued.future)
            return {**res, "dup": True}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        seqr.pending.append(PendingSend(item, digest, fut, change))
        if not seqr.inflight:
            self._ready[seqr.conv] = None
        self._wake.set()
        return await fut

    def _find_inflight(self, item: SendItem) -> PendingSend | None:
        for p in self._inflight_convs.get(item.conv, ()):
            if p.item.sender == item.sender and p.item.cmid == item.cmid:
                return p
        return None

    async def append_system(self, conv: str, actor: str, text: str, meta: dict[str, Any], cmid: str) -> dict[str, Any]:
        """Commit a ``system`` entry that changes the group (``meta``: see :mod:`im_actors.membership`).

        The group shard has authorized ``actor``; this is the one place the change is ordered
        with messages. It takes effect when the entry commits: the entries after it fan out to
        the new members, sends queued behind it are checked against it, and the entry itself
        reaches the members before and after it (an added user sees their "added", a removed
        user their "removed" and nothing later). Resending the same ``cmid`` answers the first
        seq (``dup``). Returns the ack; raises :class:`Unavailable`.
        """
        item = SendItem(sender=actor, conv=conv, cmid=cmid, body=text, kind="system", meta=meta)
        return await self._enqueue(item, change=True)

    # --- the commit loop ---------------------------------------------------------------------

    def _take_batch(self) -> tuple[list[dict[str, Any]], list[PendingSend]]:
        """Assign seqs to waiting sends (synchronous: no await between reading and writing last).

        Returns the entries to commit and their sends, in (conv, seq) order; marks their
        conversations in flight. ``last`` itself only moves when the commit succeeds.
        """
        entries: list[dict[str, Any]] = []
        sends: list[PendingSend] = []
        now = int(time.time() * 1000)
        while self._ready:
            room = self.config.store_batch_max - len(entries)
            if room <= 0:
                break
            conv = next(iter(self._ready))
            del self._ready[conv]
            seqr = self.sequencers.get(conv)
            if seqr is None or not seqr.pending or seqr.inflight:
                continue
            take = self._admit(seqr, room)
            if not take:
                continue
            seqr.inflight = True
            self._inflight_convs[seqr.conv] = take
            for i, p in enumerate(take):
                it = p.item
                entries.append(
                    {
                        "conv": it.conv,
                        "seq": seqr.last + 1 + i,
                        "sender": it.sender,
                        "cmid": it.cmid,
                        "ts": now,
                        "kind": it.kind,
                        "body": it.body,
                        "meta": it.meta,
                    }
                )
                sends.append(p)
        return entries, sends

    @staticmethod
    def _admit(seqr: Sequencer, room: int) -> list[PendingSend]:
        """Take up to ``room`` sends off the head of ``seqr``'s queue, in order, checking each
        sender against the membership as it will be at that send's seq: a send queued behind the
        change that removes its sender is answered ``forbidden``, never committed after it."""
        added: set[str] = set()
        removed: set[str] = set()
        group = ids.conv_kind(seqr.conv) == "group"
        take: list[PendingSend] = []
        i = 0
        while i < len(seqr.pending) and len(take) < room:
            p = seqr.pending[i]
            i += 1
            if p.change:
                meta = p.item.meta or {}
                users = {str(u) for u in meta.get("users") or []}
                if meta.get("event") in ("created", "added"):
                    added |= users
                    removed -= users
                elif meta.get("event") in ("removed", "left"):
                    removed |= users
                    added -= users
                take.append(p)
                continue
            s = p.item.sender
            if group and (s in removed or (s not in added and s not in seqr.membership.members)):
                if not p.future.done():
                    p.future.set_exception(Forbidden(NOT_A_MEMBER))
                continue
            take.append(p)
        seqr.pending = seqr.pending[i:]
        return take

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                await self._slots.acquire()
                entries, sends = self._take_batch()
                if not entries:
                    self._slots.release()
                    break
                task = asyncio.get_running_loop().create_task(self._commit(entries, sends))
                self._commits.add(task)
                task.add_done_callback(self._commits.discard)

    async def _commit(self, entries: list[dict[str, Any]], sends: list[PendingSend]) -> None:
        convs = list(dict.fromkeys(e["conv"] for e in entries))
        started = time.perf_counter()
        try:
            await self._index_direct(convs)
            result = await self._commit_with_retry(entries)
            self.stats["commit_ms_total"] += (time.perf_counter() - started) * 1000
        except Exception as exc:  # noqa: BLE001 - every send must be answered, whatever failed
            result = None
            self.stats["unavailable"] += len(entries)
            msg = exc.msg if isinstance(exc, Unavailable) else f"commit failed: {type(exc).__name__}"
            if not isinstance(exc, Unavailable):
                log.exception("commit of %d entries failed", len(entries))
            for p in sends:
                if not p.future.done():
                    p.future.set_exception(Unavailable(msg))
            for conv in convs:
                # The outcome is unknown: re-seed from storage before numbering again.
                seqr = self.sequencers.pop(conv, None)
                self._splits.pop(conv, None)
                if seqr is not None and seqr.pending:
                    for p in seqr.pending:
                        if not p.future.done():
                            p.future.set_exception(Unavailable("conversation re-activating"))
        finally:
            for conv in convs:
                self._inflight_convs.pop(conv, None)
                seqr = self.sequencers.get(conv)
                if seqr is not None:
                    seqr.inflight = False
                    if seqr.pending:
                        self._ready[conv] = None
            self._slots.release()
            self._wake.set()
        if result is not None:
            await self._settle(entries, sends, result)

    async def _index_direct(self, convs: list[str]) -> None:
        """Record new direct conversations in ``user_convs`` *before* their first commit, once per
        activation (the upsert is idempotent). Written after the commit, a shard dying between the
        two (a node lost, seen in the node-removal test) left an acked entry in a conversation that
        ``convs`` never listed to its recipient: one whose live delivery was lost too could not
        catch up. Raises :class:`Unavailable` (the commit is then answered unavailable)."""
        for conv in convs:
            seqr = self.sequencers.get(conv)
            if seqr is not None and not seqr.indexed and ids.conv_kind(conv) == "direct":
                await self.store.add_user_convs(conv, sorted(seqr.members))
                seqr.indexed = True

    async def _commit_with_retry(self, entries: list[dict[str, Any]]) -> CommitResult:
        """Commit on one writer; if that writer is gone, once more on the next (DESIGN.md section 4).

        A :class:`StorageUnavailable` (storage itself did not answer) is not retried: every writer
        talks to the same storage. With ``store_writers = 0`` the shard commits through its own
        :class:`Store`.
        """
        if not self.peers.stores:
            return await self.store.commit(entries)
        try:
            return await self.peers.next_store().call("commit", entries)
        except StorageUnavailable:
            raise
        except Unavailable:
            return await self.peers.next_store().call("commit", entries)

    async def _settle(self, entries: list[dict[str, Any]], sends: list[PendingSend], result: CommitResult) -> None:
        committed = entries[: result.committed]
        self.stats["commits"] += 1
        self.stats["committed"] += len(committed)
        fanout: list[tuple[dict[str, Any], frozenset[str]]] = []
        for entry, p in zip(committed, sends, strict=False):
            seqr = self.sequencers[entry["conv"]]
            seqr.last = entry["seq"]
            recipients = seqr.members
            if p.change:
                seqr.membership.apply(entry["sender"], entry.get("meta") or {}, entry["seq"])
                seqr.exists = True
                recipients = recipients | seqr.members  # the removed see their removal, the added their add
            seqr.remember(entry["sender"], entry["cmid"], entry["seq"], entry["ts"], p.digest)
            p.future.set_result(_ack(entry["conv"], entry["seq"], entry["ts"], False))
            fanout.append((entry, recipients))
        rest = list(zip(entries[result.committed :], sends[result.committed :], strict=False))
        if result.conflict is not None and rest:
            (entry, p), rest = rest[0], rest[1:]
            seqr = self.sequencers[entry["conv"]]
            if result.conflict == "cmid" and result.existing is not None:
                ex = result.existing
                same = body_digest(ex.get("kind", "text"), ex["body"], ex.get("meta")) == p.digest
                if same:
                    seqr.remember(ex["sender"], ex["cmid"], ex["seq"], ex["ts"], p.digest)
                    seqr.last = max(seqr.last, int(ex["seq"]))
                    self.stats["dups"] += 1
                    if p.change:
                        seqr.membership.apply(ex["sender"], ex.get("meta") or {}, int(ex["seq"]))
                    p.future.set_result(_ack(entry["conv"], ex["seq"], ex["ts"], True))
                    # Stored by an attempt whose answer was lost (a writer or this shard died after
                    # the write): it may never have been fanned out. Delivery is at least once and
                    # clients drop a (conv, seq) they hold, so fan it out again, to the members
                    # who may read that seq (not to anyone who joined after it).
                    old = int(ex["seq"])
                    readers = frozenset(u for u in seqr.members if seqr.membership.can_read(u, old))
                    fanout.append((ex, readers))
                else:
                    p.future.set_exception(Conflict("cmid already committed with a different body"))
            else:
                log.warning(
                    "%s: seq %d taken in storage; moving last to %d", entry["conv"], entry["seq"], result.last_seq
                )
                seqr.last = max(seqr.last, result.last_seq)
                rest.insert(0, (entry, p))
        # Sends after the conflict were not written: back to the head of their queue, same order.
        requeue: dict[str, list[PendingSend]] = {}
        for entry, p in rest:
            requeue.setdefault(entry["conv"], []).append(p)
        for conv, ps in requeue.items():
            seqr = self.sequencers[conv]
            seqr.pending[:0] = ps
            if not seqr.inflight:
                self._ready[conv] = None
        if requeue:
            self._wake.set()
        for entry, members in fanout:
            self._fan_out(entry, members)

    # --- fan-out -----------------------------------------------------------------------------

    def _fan_out(self, entry: dict[str, Any], members: frozenset[str]) -> None:
        """Queue ``entry`` for ``members``, one item per session shard (batched per shard).

        The split of a member set by shard is kept per conversation until the set changes (a
        membership change makes a new set): a large group pays it once, not per message."""
        cached = self._splits.get(entry["conv"])
        if cached is not None and cached[0] is members:
            by_shard = cached[1]
        else:
            by_shard = {}
            for user in members:
                by_shard.setdefault(self.peers.session_index(user), []).append(user)
            if entry["conv"] in self.sequencers:
                self._splits[entry["conv"]] = (members, by_shard)
        for shard, users in by_shard.items():
            self._fanout.add(shard, (entry, users))

    async def _send_fanout(self, shard: int, items: list[tuple[dict[str, Any], list[str]]]) -> None:
        try:
            await self.peers.sessions[shard].call("fanout", items)
        except Unavailable as exc:
            # Committed entries are not lost: recipients catch up with sync (DESIGN.md section 4).
            log.warning("fan-out of %d entries to session shard %d failed: %s", len(items), shard, exc)

    # --- reads -------------------------------------------------------------------------------

    async def sync(self, user: str, conv: str, after: int, limit: int) -> dict[str, Any]:
        """Entries with seq > ``after`` that ``user`` may read, ascending, at most ``limit``:
        ``{"msgs", "last", "more"}``.

        A user reads the entries of their membership spans (:meth:`Membership.ranges`): a removed
        member's reads stop at their removal seq (``last`` is that seq) and resume at their
        re-join seq. ``last`` is fixed when the read starts: every entry up to it is in storage,
        so a page never skips one that commits meanwhile. Raises :class:`Forbidden` for a user
        who never belonged, the same whether or not the conversation exists.
        """
        seqr = await self._reader_sequencer(user, conv)
        ranges = seqr.membership.ranges(user, seqr.last)
        segments = _forward(ranges, after, limit)
        msgs = _fit(await self._read_segments(conv, segments), self.config.max_page_bytes, newest=False)
        upto = msgs[-1]["seq"] if msgs else after
        return {"msgs": msgs, "last": _visible_last(ranges), "more": any(hi > upto for _, hi in ranges)}

    async def history(self, user: str, conv: str, before: int, limit: int) -> dict[str, Any]:
        """The newest ``limit`` readable entries with seq < ``before`` (0 = the newest), ascending;
        spans and errors as in :meth:`sync`."""
        seqr = await self._reader_sequencer(user, conv)
        ranges = seqr.membership.ranges(user, seqr.last)
        visible = _visible_last(ranges)
        top = visible if before == 0 else min(before - 1, visible)
        segments = _backward(ranges, top, limit)
        msgs = _fit(await self._read_segments(conv, segments), self.config.max_page_bytes, newest=True)
        lo = msgs[0]["seq"] if msgs else 0
        return {"msgs": msgs, "last": visible, "more": any(r_lo < lo for r_lo, _ in ranges)}

    async def _read_segments(self, conv: str, segments: list[tuple[int, int]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for lo, hi in segments:
            out.extend(await self.store.read_range(conv, lo - 1, hi))
        return out

    async def last_seqs(self, user: str, convs: list[str]) -> dict[str, int]:
        """The newest seq ``user`` may read in each of ``convs`` (a former member's is their
        removal seq); conversations they never belonged to are left out."""
        out: dict[str, int] = {}
        for conv in convs:
            try:
                seqr = await self.sequencer(conv)
            except Unavailable:
                continue
            if seqr.membership.ever(user):
                out[conv] = _visible_last(seqr.membership.ranges(user, seqr.last))
        return out

    async def read(self, user: str, conv: str, seq: int, origin: tuple[str, int] | None = None) -> None:
        """Move ``user``'s read cursor in ``conv`` to ``seq`` (never backwards, never past last).

        Then every member's devices and the user's other devices get ``receipt`` (PROTOCOL.md 5);
        ``origin`` (hub, connection id) is the reading connection, which gets none.
        """
        seqr = await self._member_sequencer(user, conv)
        seq = min(seq, seqr.last)
        await self.store.set_read(user, conv, seq)
        self._emit({"t": "receipt", "conv": conv, "user": user, "seq": seq}, seqr.members, origin)

    async def typing(self, user: str, conv: str, origin: tuple[str, int] | None = None) -> None:
        """Tell the other members' online devices that ``user`` is typing; nothing is stored."""
        seqr = await self._member_sequencer(user, conv)
        await self._check_dm(seqr, user)
        self._emit({"t": "typing", "conv": conv, "user": user}, seqr.members - {user}, origin)

    def _emit(self, frame: dict[str, Any], users: frozenset[str], origin: tuple[str, int] | None) -> None:
        """Queue an unsolicited, unstored event for the online devices of ``users``, batched per shard."""
        by_shard: dict[int, list[str]] = {}
        for user in users:
            by_shard.setdefault(self.peers.session_index(user), []).append(user)
        for shard, shard_users in by_shard.items():
            self._events.add(shard, (frame, shard_users, origin))

    async def _send_events(self, shard: int, items: list[tuple[dict[str, Any], list[str], Any]]) -> None:
        try:
            await self.peers.sessions[shard].call("events", items)
        except Unavailable as exc:
            log.info("%d events to session shard %d dropped: %s", len(items), shard, exc)

    def is_member(self, user: str, conv: str) -> bool:
        """Membership as the active sequencer knows it (False when not active)."""
        seqr = self.sequencers.get(conv)
        return seqr is not None and user in seqr.members

    async def members(self, user: str, conv: str) -> list[str]:
        """The members of ``conv``, for a member ``user``; raises :class:`Forbidden` otherwise."""
        return sorted((await self._member_sequencer(user, conv)).members)


@ray.remote(num_cpus=0, max_restarts=-1)
class ConversationShardActor:
    """Ray shell of :class:`ConversationShard`."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._store = Store(config)
        self._shard = ConversationShard(config, Peers(config), self._store)

    async def ready(self) -> bool:
        """Start the commit loop (creating the indexes when there are no store writers)."""
        if self._config.store_writers == 0:
            await self._store.setup()
        self._shard.start()
        return True

    async def send_batch(self, items: list[SendItem]) -> list[dict[str, Any]]:
        """See :meth:`ConversationShard.send_batch`."""
        self._shard.start()
        return await self._shard.send_batch(items)

    async def append_system(self, conv: str, actor: str, text: str, meta: dict[str, Any], cmid: str) -> dict[str, Any]:
        """See :meth:`ConversationShard.append_system`."""
        self._shard.start()
        return await self._shard.append_system(conv, actor, text, meta, cmid)

    def contact_changed(self, conv: str) -> None:
        """See :meth:`ConversationShard.contact_changed`."""
        self._shard.contact_changed(conv)

    async def sync(self, user: str, conv: str, after: int, limit: int) -> dict[str, Any]:
        """See :meth:`ConversationShard.sync`."""
        return await self._shard.sync(user, conv, after, limit)

    async def history(self, user: str, conv: str, before: int, limit: int) -> dict[str, Any]:
        """See :meth:`ConversationShard.history`."""
        return await self._shard.history(user, conv, before, limit)

    async def last_seqs(self, user: str, convs: list[str]) -> dict[str, int]:
        """See :meth:`ConversationShard.last_seqs`."""
        return await self._shard.last_seqs(user, convs)

    async def read(self, user: str, conv: str, seq: int, origin: tuple[str, int] | None = None) -> None:
        """See :meth:`ConversationShard.read`."""
        await self._shard.read(user, conv, seq, origin)

    async def typing(self, user: str, conv: str, origin: tuple[str, int] | None = None) -> None:
        """See :meth:`ConversationShard.typing`."""
        await self._shard.typing(user, conv, origin)

    async def members(self, user: str, conv: str) -> list[str]:
        """See :meth:`ConversationShard.members`."""
        return await self._shard.members(user, conv)

    def stats(self) -> dict[str, float]:
        """Counters: committed, dups, commits, unavailable, commit_ms_total (time in store calls)."""
        store = {f"store_{k}": v for k, v in self._store.stats.items()}
        return {**self._shard.stats, **store, "active": len(self._shard.sequencers)}
