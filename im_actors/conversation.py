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
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Collection
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import ray

from im_actors import ids
from im_actors.batching import Batcher
from im_actors.config import Config
from im_actors.contacts import SideCache
from im_actors.errors import Conflict, Forbidden, RequestError, StorageUnavailable, Unavailable
from im_actors.membership import Membership
from im_actors.protocol import body_size
from im_actors.refs import GroupShardRef, HubRef, Peers, SessionShardRef, StoreRef, ask_hubs_to_reannounce
from im_actors.routes import Routes
from im_actors.store import CommitResult, Store
from im_actors.vitals import Vitals
from im_actors.wire import Answer, SendItem, ack_answer, err_answer, stamp

__all__ = [  # SendItem and stamp live in im_actors.wire; named here for older imports
    "Sequencer",
    "PendingSend",
    "ConversationShard",
    "ConversationShardActor",
    "SendItem",
    "body_digest",
    "stamp",
]

log = logging.getLogger(__name__)

#: Upper bound of one delivery call to a hub (s), see ConversationShard._send_to_hub.
DELIVER_TIMEOUT_S = 10.0

#: Recently committed cmids kept per conversation by default (``conv_recent_cmids``; older resends
#: are caught by the unique index).
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
class PendingSend:
    """A send waiting for its seq; ``change`` for a membership change (a system entry whose
    ``meta`` :meth:`Membership.apply` reads)."""

    item: SendItem
    digest: bytes
    future: asyncio.Future[dict[str, Any]]
    change: bool = False
    reply_hub: str | None = None  # the hub awaiting the answer, when it may carry that hub's copies


@dataclass
class Sequencer:
    """State of one conversation. Touched only by its shard, one step at a time.

    ``membership`` is exact as of ``last``: a change applies when its entry commits.
    ``dm_allowed`` caches the direct-message check of a direct conversation (None: ask).
    ``verified``: ``last`` was read from MongoDB, or a commit numbered from it succeeded; False
    while it is Redis's guess (a sender's activation, see :meth:`ConversationShard._activate_many`),
    and then readers check it against MongoDB first (:meth:`ConversationShard._verified`).
    """

    conv: str
    last: int = 0
    membership: Membership = field(default_factory=Membership)
    exists: bool = False
    dm_allowed: bool | None = None
    cmids: OrderedDict[tuple[str, str], tuple[int, int, bytes]] = field(default_factory=OrderedDict)
    pending: list[PendingSend] = field(default_factory=list)
    inflight: bool = False
    verified: bool = True

    @property
    def members(self) -> frozenset[str]:
        """The current members."""
        return self.membership.frozen()

    def remember(self, sender: str, cmid: str, seq: int, ts: int, digest: bytes, keep: int = RECENT_CMIDS) -> None:
        """Record a committed cmid, forgetting the oldest beyond ``keep`` (``conv_recent_cmids``).

        What a conversation shard's memory grows by while its conversations fill this: about 460
        bytes per committed entry (tracemalloc in a corpus replay: the key's strings, the value
        tuple, the digest), up to ``keep`` per conversation, then flat."""
        self.cmids[(sender, cmid)] = (seq, ts, digest)
        if len(self.cmids) > keep:
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


async def _failed(exc: BaseException) -> dict[str, Any]:
    """An awaitable that raises ``exc`` (a send whose conversation could not be prepared)."""
    raise exc


async def _done(answer: Answer) -> Answer:
    """An awaitable that answers ``answer`` at once."""
    return answer


async def _dup_of(first: asyncio.Future[Answer], keep_copies: bool = False) -> Answer:
    """The answer of a resend while the first send of its cmid is queued or committing; without the
    first answer's ``copies`` unless ``keep_copies`` (the resend came through the same hub)."""
    res = await asyncio.shield(first)
    return {k: v for k, v in res.items() if keep_copies or k != "copies"} | {"dup": True}


def _entry_of(item: SendItem, seq: int, ts: int) -> dict[str, Any]:
    """The committed entry of ``item`` at ``seq`` (its body, kind and meta are the stored ones: a
    resend with another body is a conflict, refused before this)."""
    return {
        "conv": item.conv,
        "seq": seq,
        "sender": item.sender,
        "cmid": item.cmid,
        "ts": ts,
        "kind": item.kind,
        "body": item.body,
        "meta": item.meta,
    }


class ConversationShard:
    """Hosts the sequencers of the conversations that hash to this shard.

    ``peers`` reaches store writers, group shards and session shards; ``store`` serves reads.
    """

    def __init__(self, config: Config, peers: Peers, store: Store) -> None:
        self.config = config
        self.peers = peers
        self.store = store
        self.sides = SideCache(config, store)  # contact sides for direct-message checks
        # least recently used first (see _evict_idle); dict order is kept by move_to_end on every use
        self.sequencers: OrderedDict[str, Sequencer] = OrderedDict()
        self._splits: dict[str, tuple[frozenset[str], dict[int, list[str]]]] = {}  # conv -> members by shard
        self._absent: OrderedDict[str, None] = OrderedDict()  # made-up conversation ids, see ABSENT_KEPT
        self._activating: dict[str, asyncio.Future[Sequencer]] = {}
        # send batches prepared one at a time, in arrival order (only needed with hub_inflight > 1)
        self._arrivals: asyncio.Lock | None = asyncio.Lock() if config.hub_inflight > 1 else None
        self._inflight_convs: dict[str, list[PendingSend]] = {}
        self._ready: dict[str, None] = {}  # convs with sends waiting and no commit in flight, oldest first
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(config.store_inflight)
        self._loop_task: asyncio.Task[None] | None = None
        self._commits: set[asyncio.Task[None]] = set()
        self._fanout: Batcher[int] = Batcher(self._send_fanout, config.fanout_batch_max, config.fanout_batch_ms)
        self._events: Batcher[int] = Batcher(self._send_events, config.fanout_batch_max, config.fanout_batch_ms)
        # fanout_via = "conv": this shard routes entries to hubs itself (see im_actors.routes); session
        # shards then only plan offline pushes, and only when push is configured.
        self.routes = Routes()
        self._via_routes = config.fanout_via == "conv"
        self._push_on = config.push_workers > 0 and bool(config.rabbitmq_url)
        # Copies in the answer keep one channel per hub in seq order only while a hub's answers come
        # back one batch at a time (hub_inflight = 1): see send_batch.
        self._answer_copies = config.answer_copies and self._via_routes and config.hub_inflight == 1
        self._targets: dict[str, tuple[frozenset[str], int, dict[str, list[int]]]] = {}  # conv -> cached targets
        self._to_hubs: Batcher[str] = Batcher(self._send_to_hub, config.fanout_batch_max, config.fanout_batch_ms)
        self._events_to_hubs: Batcher[str] = Batcher(
            self._send_events_to_hub, config.fanout_batch_max, config.fanout_batch_ms
        )
        self.stats: dict[str, float] = {
            "committed": 0,
            "dups": 0,
            "commits": 0,
            "unavailable": 0,
            "commit_ms_total": 0.0,
            "activations": 0,
            "evictions": 0,
            "deliveries": 0,
            "answer_copies": 0,
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
        doc = await GroupShardRef(self.peers.group(gid)).membership(gid)
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
            self.sequencers.move_to_end(conv)
            return seqr
        if conv in self._absent:
            self._absent.move_to_end(conv)
            return Sequencer(conv=conv)
        waiting = self._activating.get(conv)
        if waiting is None:
            failed = await self._activate_many([conv])
            if conv in failed:
                raise failed[conv]
            return await self.sequencer(conv)
        return await asyncio.shield(waiting)

    async def _activate_many(self, convs: list[str], for_send: bool = False) -> dict[str, BaseException]:
        """Activate every conversation of ``convs`` that is neither active nor activating, together.

        Their last seqs: for a reader, the larger of Redis's and MongoDB's (:meth:`Store.last_seqs`);
        for a sender (``for_send``), Redis's alone, one ``MGET`` for the batch
        (:meth:`Store.recent_last_seqs`), the sequencer left unverified: the first commit
        numbered from it is the check, since the unique ``(conv, seq)`` index refuses a seq that is
        taken and the shard renumbers from MongoDB's last (:meth:`_settle`), before anything is
        acked. A new conversation (most first-seen ones) so costs no MongoDB read before its first
        commit. When Redis does not answer, MongoDB is read as for a reader. Run at the same time
        as the group shards' membership answers. A direct conversation needs no listing of its own
        first: its first entry carries it (:mod:`im_actors.store`). Returns the conversations whose
        activation failed, with the error (:class:`Unavailable` when MongoDB or a group shard did
        not answer); waiters of those get the same error.
        """
        todo = [
            c
            for c in dict.fromkeys(convs)
            if c not in self.sequencers and c not in self._absent and c not in self._activating
        ]
        if not todo:
            return {}
        loop = asyncio.get_running_loop()
        futs: dict[str, asyncio.Future[Sequencer]] = {c: loop.create_future() for c in todo}
        self._activating.update(futs)
        failed: dict[str, BaseException] = {}
        try:
            lasts_res, *loads = await asyncio.gather(
                self._last_seqs(todo, for_send),
                *(self._load_membership(c) for c in todo),
                return_exceptions=True,
            )
            for conv, fut, load in zip(todo, futs.values(), loads, strict=True):
                error = next((r for r in (lasts_res, load) if isinstance(r, BaseException)), None)
                if error is not None:
                    failed[conv] = error
                    fut.set_exception(error)
                    fut.exception()  # retrieved: waiters get it through shield
                    continue
                lasts, verified = cast(tuple[dict[str, int], bool], lasts_res)  # not an exception: checked above
                membership, exists = cast(tuple[Membership, bool], load)
                # 0 for a made-up id; read all the same, as _load_membership explains
                seqr = Sequencer(
                    conv=conv, last=lasts.get(conv, 0), membership=membership, exists=exists, verified=verified
                )
                if exists:
                    self.sequencers[conv] = seqr
                else:  # a made-up group id: only its id is kept, in a bounded set
                    self._absent[conv] = None
                    if len(self._absent) > ABSENT_KEPT:
                        self._absent.popitem(last=False)
                fut.set_result(seqr)
        except BaseException as exc:  # cancelled: nobody may wait forever
            for conv, fut in futs.items():
                if not fut.done():
                    failed[conv] = exc
                    fut.set_exception(exc)
                    fut.exception()
            raise
        finally:
            for conv in todo:
                del self._activating[conv]
        self.stats["activations"] += len(todo) - len(failed)
        self._evict_idle(keep=frozenset(todo))
        return failed

    async def _last_seqs(self, convs: list[str], for_send: bool) -> tuple[dict[str, int], bool]:
        """``({conv: last seq}, verified)``: Redis's guess for a sender when Redis answers, else
        the larger of Redis's and MongoDB's (see :meth:`_activate_many`)."""
        if for_send:
            guess = await self.store.recent_last_seqs(convs)
            if guess is not None:
                return guess, False
        return await self.store.last_seqs(convs), True

    async def _verified(self, seqr: Sequencer) -> Sequencer:
        """``seqr`` with ``last`` checked against MongoDB (a reader of a sender's fresh activation:
        sync, history and ``last`` must not stop short of an acked entry Redis forgot). ``last``
        only moves up; a commit in flight numbered from the guess then meets the unique index and
        is renumbered. Raises :class:`Unavailable` when MongoDB does not answer."""
        if not seqr.verified:
            stored = await self.store.last_seq(seqr.conv)
            seqr.last = max(seqr.last, stored)
            seqr.verified = True
        return seqr

    def _evict_idle(self, keep: Collection[str] = ()) -> None:
        """Keep at most ``conv_active_max`` sequencers: past it, drop the least recently used idle
        ones (no send waiting or in flight) down to nine tenths of the bound, so one pass serves
        many activations. ``keep``: conversations just activated for the caller, never dropped here.

        Dropping is what a failed commit already does (:meth:`_commit`): the next use re-activates
        from storage, with the larger of Redis's and MongoDB's last seq, and a resend of a cmid
        older than the new activation is settled by MongoDB's unique ``(conv, sender, cmid)`` index
        (answered ``dup`` with its first seq), so nothing is renumbered or lost; a holder of the old
        object across an await meets the new one in :meth:`_enqueue_now`. What it costs is one
        activation (a few storage reads) when a dropped conversation speaks again.
        """
        limit = self.config.conv_active_max
        if limit <= 0 or len(self.sequencers) <= limit:
            return
        excess = len(self.sequencers) - (limit - limit // 10)
        victims: list[str] = []
        for conv, seqr in self.sequencers.items():  # least recently used first
            if len(victims) >= excess:
                break
            if seqr.pending or seqr.inflight or conv in self._inflight_convs or conv in self._ready or conv in keep:
                continue
            victims.append(conv)
        for conv in victims:
            del self.sequencers[conv]
            self._splits.pop(conv, None)
            self._targets.pop(conv, None)
        self.stats["evictions"] += len(victims)

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
        return await self._verified(seqr)

    async def _check_dm(self, seqr: Sequencer, sender: str) -> None:
        """Refuse a direct message that a block or the direct-message policy forbids.

        Answered once per activation from the pair's kept contact sides (:class:`SideCache`, read
        from storage once per user); the contacts host tells this shard when the pair's contact
        state changes (:meth:`contact_changed`), before it answers the change."""
        if ids.conv_kind(seqr.conv) != "direct":
            return
        if seqr.dm_allowed is None:
            version = self.sides.version
            (allowed,) = await self.sides.allowed_many([ids.direct_members(seqr.conv)])
            if self.sides.version == version:  # else a change came meanwhile: ask again next time
                seqr.dm_allowed = allowed
            if not allowed:
                raise Forbidden(DM_REFUSED)
        elif not seqr.dm_allowed:
            raise Forbidden(DM_REFUSED)

    async def _dm_answers(self, convs: list[str]) -> tuple[dict[str, bool], dict[str, BaseException], int]:
        """Whether each direct conversation of ``convs`` may carry messages, from the kept contact
        sides (one storage read for the users not kept yet): ``({conv: allowed}, {conv: error},
        version)``, ``version`` the sides' version before asking (see :meth:`_prepare`)."""
        convs = list(dict.fromkeys(convs))
        version = self.sides.version
        if not convs:
            return {}, {}, version
        try:
            allowed = await self.sides.allowed_many([ids.direct_members(c) for c in convs])
        except StorageUnavailable as exc:
            return {}, dict.fromkeys(convs, exc), version
        return dict(zip(convs, allowed, strict=True)), {}, version

    def contact_changed(self, conv: str) -> None:
        """The contact state of a direct conversation's pair changed: forget both users' kept sides
        and ask again at the next send."""
        self.sides.forget(*ids.direct_members(conv))
        seqr = self.sequencers.get(conv)
        if seqr is not None:
            seqr.dm_allowed = None

    # --- sends -------------------------------------------------------------------------------

    async def send_batch(self, items: list[SendItem], hub: str | None = None) -> list[Answer]:
        """Sequence and commit a batch of sends; one answer per item, in order.

        An answer is an ack ``{"conv", "seq", "ts", "dup"}`` or an error ``{"err": code, "msg",
        "retry"}``: a batch mixes conversations, so one item's failure does not fail the others.

        ``hub``: the calling hub's name. With ``answer_copies`` the ack of a new entry of a direct
        conversation carries ``"copies": (entry, [connection id, ...])``, the entry's copies for
        that hub's connections (the sender's own devices there, the peer's when it is on the same
        hub), which the hub queues right after the ack, instead of a separate ``deliver`` call: the
        round trip the ack needs anyway carries them (issue "the hot path": one round trip before
        the ack, one one-way call per *other* hub). Order: a hub's answers from this shard come back
        one batch at a time, in seq order per conversation, as its deliver calls do; only a
        conversation with senders on two hubs at the same moment can see an entry through the one
        channel before an earlier one through the other, a gap the client fills with ``sync``
        (PROTOCOL.md section 5), nothing lost. Groups keep the single channel: their senders are on
        every hub all the time. A resend of a committed cmid is fanned out again, to every member's
        connections, this hub's copies on its ``dup`` answer: the first answer, and the copies that
        rode on it, may be what was lost (its hub gave up waiting for it), and clients drop a (conv,
        seq) they hold. A resend while the first send is in flight gets the first one's copies only
        through the same hub (connection ids are a hub's own).
        """
        for it in items:
            stamp(it.trace, "shard_in")
        waits: list[Awaitable[Answer]] = []
        # With hub_inflight > 1 a hub has several batches in flight: they are prepared and queued
        # one at a time, in the order they came, so its sends to one conversation keep their order.
        # Only the preparation is serialised; the commits of every batch overlap. With one batch in
        # flight per hub (the default) there is nothing to order and batches of hubs overlap.
        async with self._arrivals or contextlib.nullcontext():
            failed = await self._prepare(items)
            for item in items:
                if item.conv in failed:
                    waits.append(_failed(failed[item.conv]))
                    continue
                seqr = self.sequencers.get(item.conv)
                if seqr is None or not self._may_send(item, seqr):
                    waits.append(self._enqueue(item, reply_hub=hub))  # the general path, which refuses or waits
                    continue
                try:
                    waits.append(self._enqueue_now(item, seqr, reply_hub=hub))
                except RequestError as exc:
                    waits.append(_failed(exc))
        results = await asyncio.gather(*waits, return_exceptions=True)
        out: list[dict[str, Any]] = []
        for item, res in zip(items, results, strict=True):
            if isinstance(res, RequestError):
                out.append(err_answer(res))
            elif isinstance(res, BaseException):
                log.error("send failed: %r", res, extra={"user": item.sender, "conv": item.conv, "cmid": item.cmid})
                out.append(err_answer(Unavailable(f"{type(res).__name__}")))
            else:
                out.append(res)
        return out

    @staticmethod
    def _may_send(item: SendItem, seqr: Sequencer) -> bool:
        """``item``'s sender is a member now and, for a direct conversation, the contacts host's
        answer allows it (False: let :meth:`_enqueue` decide, and refuse)."""
        if item.sender not in seqr.membership.members:
            return False
        return ids.conv_kind(seqr.conv) != "direct" or seqr.dm_allowed is True

    async def _prepare(self, items: list[SendItem]) -> dict[str, BaseException]:
        """Activate the batch's first-seen conversations (see :meth:`_activate_many`) and, at the
        same time, ask the contacts hosts about the direct ones whose answer is not cached, before
        the sends queue one by one. Returns the conversations that could not be prepared, with the
        error every send to them is answered with. A sender who is not a member is left to
        :meth:`_enqueue` to refuse, so a non-member's send costs no storage work here."""
        new: list[str] = []
        ask: list[str] = []
        for it in items:
            direct = ids.conv_kind(it.conv) == "direct"
            if direct and it.sender not in ids.direct_members(it.conv):
                continue
            seqr = self.sequencers.get(it.conv)
            if seqr is None:
                new.append(it.conv)
            if direct and (seqr is None or seqr.dm_allowed is None):
                ask.append(it.conv)
        if not new and not ask:
            return {}
        activated, (answers, failed, version) = await asyncio.gather(
            self._activate_many(new, for_send=True), self._dm_answers(ask)
        )
        for conv, allowed in answers.items():
            seqr = self.sequencers.get(conv)
            if seqr is None:
                continue
            if self.sides.version == version:  # else a contact change came meanwhile: _enqueue asks again
                seqr.dm_allowed = allowed
        return {**failed, **activated}

    async def _enqueue(self, item: SendItem, change: bool = False, reply_hub: str | None = None) -> dict[str, Any]:
        if change:
            self._absent.pop(item.conv, None)  # the group shard made it exist
            seqr = await self.sequencer(item.conv)
        else:
            seqr = await self._member_sequencer(item.sender, item.conv)
            await self._check_dm(seqr, item.sender)
        return await self._enqueue_now(item, seqr, change, reply_hub)

    def _enqueue_now(
        self, item: SendItem, seqr: Sequencer, change: bool = False, reply_hub: str | None = None
    ) -> Awaitable[Answer]:
        """Queue ``item`` on its activated, authorized sequencer (synchronous: sends queued this way
        keep the order of the calls that made them); returns what to await for its answer. A
        resend of a committed cmid answers its seq (``dup``), of a queued one the first send's
        answer; raises :class:`Conflict` when the cmid came with another body. ``reply_hub``: the
        hub awaiting the answer (see :meth:`send_batch`)."""
        seqr = self.sequencers.setdefault(item.conv, seqr)  # a membership change makes the group exist
        self.sequencers.move_to_end(item.conv)
        digest = body_digest(item.kind, item.body, item.meta)
        if not (self._answer_copies and reply_hub is not None and ids.conv_kind(item.conv) == "direct"):
            reply_hub = None
        known = seqr.cmids.get((item.sender, item.cmid))
        if known is not None:
            seq, ts, old = known
            if old != digest:
                raise Conflict("cmid already committed with a different body")
            self.stats["dups"] += 1
            answer = ack_answer(item.conv, seq, ts, True)
            if reply_hub is not None:
                # The first answer, and the copies for its hub that rode on it, may be what was lost
                # (its hub gave up waiting): fan the entry out again, to every member's connections
                # (clients drop a (conv, seq) they hold), this hub's copies on this answer.
                entry = _entry_of(item, seq, ts)
                mine = self._fan_out(entry, seqr.members, reply_hub)
                if mine:
                    answer["copies"] = (entry, mine)
            return _done(answer)
        queued = seqr.find_pending(item.sender, item.cmid) or self._find_inflight(item)
        if queued is not None:
            if queued.digest != digest:
                raise Conflict("cmid already sent with a different body")
            # The first send's copies are for its hub's connections: only a resend through that hub
            # may carry them too (when that hub gave up on the first answer, they would be lost).
            return _dup_of(queued.future, keep_copies=reply_hub is not None and reply_hub == queued.reply_hub)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        seqr.pending.append(PendingSend(item, digest, fut, change, reply_hub))
        if not seqr.inflight:
            self._ready[seqr.conv] = None
        self._wake.set()
        return fut

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
                stamp(it.trace, "seq")
                entries.append(_entry_of(it, seqr.last + 1 + i, now))
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
            result = await self._commit_with_retry(entries)
            self.stats["commit_ms_total"] += (time.perf_counter() - started) * 1000
        except Exception as exc:  # noqa: BLE001 - every send must be answered, whatever failed
            result = None
            self.stats["unavailable"] += len(entries)
            msg = exc.msg if isinstance(exc, Unavailable) else f"commit failed: {type(exc).__name__}"
            if not isinstance(exc, Unavailable):
                log.exception("commit of %d entries failed", len(entries), extra={"conv": convs})
            for p in sends:
                if not p.future.done():
                    p.future.set_exception(Unavailable(msg))
            for conv in convs:
                # The outcome is unknown: re-seed from storage before numbering again.
                seqr = self.sequencers.pop(conv, None)
                self._splits.pop(conv, None)
                self._targets.pop(conv, None)
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
            self._settle(entries, sends, result)

    async def _commit_with_retry(self, entries: list[dict[str, Any]]) -> CommitResult:
        """Commit on one writer; if that writer is gone, once more on the next (DESIGN.md section 4).

        A :class:`StorageUnavailable` (storage itself did not answer) is not retried: every writer
        talks to the same storage. With ``store_writers = 0`` the shard commits through its own
        :class:`Store`.
        """
        if not self.peers.stores:
            return await self.store.commit(entries)
        try:
            return await StoreRef(self.peers.next_store()).commit(entries)
        except StorageUnavailable:
            raise
        except Unavailable:
            return await StoreRef(self.peers.next_store()).commit(entries)

    def _settle(self, entries: list[dict[str, Any]], sends: list[PendingSend], result: CommitResult) -> None:
        """Apply a commit's outcome (synchronous, like :meth:`_take_batch`: the sequencer's two
        transitions are plain code, the shard keeps only the awaits): the committed prefix moves
        ``last``, is remembered and acked, and fans out; a conflicting entry is settled (a resend
        of a stored cmid answers its seq and is fanned out again; a taken seq moves ``last`` from
        storage); the sends after it go back to the head of their queues to be numbered again."""
        committed = entries[: result.committed]
        self.stats["commits"] += 1
        self.stats["committed"] += len(committed)
        fanout: list[tuple[dict[str, Any], frozenset[str]]] = []
        for entry, p in zip(committed, sends, strict=False):
            seqr = self.sequencers[entry["conv"]]
            seqr.last = max(seqr.last, entry["seq"])
            seqr.verified = True  # seq taken nowhere: the guess it was numbered from was the last
            recipients = seqr.members
            if p.change:
                seqr.membership.apply(entry["sender"], entry.get("meta") or {}, entry["seq"])
                seqr.exists = True
                recipients = recipients | seqr.members  # the removed see their removal, the added their add
            seqr.remember(
                entry["sender"], entry["cmid"], entry["seq"], entry["ts"], p.digest, self.config.conv_recent_cmids
            )
            if p.item.trace is not None:  # a sampled send: its recipients get the stamps (never stored)
                stamp(p.item.trace, "committed")
                entry = {**entry, "trace": p.item.trace}
            answer = ack_answer(entry["conv"], entry["seq"], entry["ts"], False)
            # Fanned out before the ack leaves: the sender hub's copies (reply_hub) ride on it.
            mine = self._fan_out(entry, recipients, p.reply_hub)
            if mine:
                answer["copies"] = (entry, mine)
            p.future.set_result(answer)
        rest = list(zip(entries[result.committed :], sends[result.committed :], strict=False))
        if result.conflict is not None and rest:
            (entry, p), rest = rest[0], rest[1:]
            seqr = self.sequencers[entry["conv"]]
            if result.conflict == "cmid" and result.existing is not None:
                ex = result.existing
                same = body_digest(ex.get("kind", "text"), ex["body"], ex.get("meta")) == p.digest
                if same:
                    seqr.remember(
                        ex["sender"], ex["cmid"], ex["seq"], ex["ts"], p.digest, self.config.conv_recent_cmids
                    )
                    seqr.last = max(seqr.last, int(ex["seq"]))
                    self.stats["dups"] += 1
                    if p.change:
                        seqr.membership.apply(ex["sender"], ex.get("meta") or {}, int(ex["seq"]))
                    p.future.set_result(ack_answer(entry["conv"], ex["seq"], ex["ts"], True))
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
                # Expected once per conversation after Redis lost its keys (a sender's activation
                # numbers from Redis's last, see _activate_many); anything else is worth a look.
                (log.info if not seqr.verified else log.warning)(
                    "%s: seq %d taken in storage; moving last to %d",
                    entry["conv"],
                    entry["seq"],
                    result.last_seq,
                    extra={"conv": entry["conv"], "cmid": entry["cmid"], "user": entry["sender"]},
                )
                seqr.last = max(seqr.last, result.last_seq)
                seqr.verified = True
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

    def _fan_out(self, entry: dict[str, Any], members: frozenset[str], reply_hub: str | None = None) -> list[int]:
        """Queue ``entry`` for ``members``; returns the connection ids on ``reply_hub`` (the hub
        awaiting the send's answer, which carries them: see :meth:`send_batch`), not queued.

        With ``fanout_via = "conv"``: one item per hub holding a connection of a member (batched per
        hub, see :mod:`im_actors.routes`), plus, when push is configured, one item per session shard
        to plan the offline pushes. With ``"session"``: one item per session shard, which routes it.
        The split of a member set by shard is kept per conversation until the set changes (a
        membership change makes a new set), and the hub targets until the set or a route changes: a
        large group pays them once, not per message."""
        conv = entry["conv"]
        mine: list[int] = []
        if self._via_routes:
            if "trace" in entry:
                stamp(entry["trace"], "fanout")
            cached_targets = self._targets.get(conv)
            if cached_targets is not None and cached_targets[0] is members and cached_targets[1] == self.routes.version:
                targets = cached_targets[2]
            else:
                targets = self.routes.targets(members)
                if conv in self.sequencers:
                    self._targets[conv] = (members, self.routes.version, targets)
            for hub, conn_ids in targets.items():
                self.stats["deliveries"] += len(conn_ids)
                if hub == reply_hub:
                    mine = conn_ids
                    self.stats["answer_copies"] += len(conn_ids)
                else:
                    self._to_hubs.add(hub, (entry, conn_ids))
            if not self._push_on:
                return mine
        cached = self._splits.get(conv)
        if cached is not None and cached[0] is members:
            by_shard = cached[1]
        else:
            by_shard = ids.split_by_shard(members, self.peers.session_index)
            if conv in self.sequencers:
                self._splits[conv] = (members, by_shard)
        for shard, users in by_shard.items():
            self._fanout.add(shard, (entry, users))
        return mine

    async def _send_fanout(self, shard: int, items: list[tuple[dict[str, Any], list[str]]]) -> None:
        method = "plan_push" if self._via_routes else "fanout"
        try:
            await self.peers.sessions[shard].call(method, items)
        except Unavailable as exc:
            # Committed entries are not lost: recipients catch up with sync (DESIGN.md section 4).
            log.warning("%s of %d entries to session shard %d failed: %s", method, len(items), shard, exc)

    async def _send_to_hub(self, hub: str, items: list[tuple[dict[str, Any], list[int]]]) -> None:
        try:
            # Bounded well below a commit's timeout: a dead hub's restart must not hold the live copies
            # for its next incarnation's clients for long (they catch up with sync meanwhile).
            await HubRef(self.peers.hub(hub)).deliver(items, timeout=DELIVER_TIMEOUT_S)
        except Unavailable as exc:
            # The hub's clients reconnect elsewhere and catch up with sync.
            log.warning("delivery of %d entries to %s failed: %s", len(items), hub, exc)

    async def _send_events_to_hub(self, hub: str, items: list[tuple[dict[str, Any], list[int]]]) -> None:
        try:
            await HubRef(self.peers.hub(hub)).deliver_events(items, timeout=DELIVER_TIMEOUT_S)
        except Unavailable as exc:
            log.info("%d events to %s dropped: %s", len(items), hub, exc)

    # --- routes (fanout_via = "conv", see im_actors.routes) ------------------------------------

    def route(self, user: str, device: str, hub: str, conn_id: int) -> None:
        """A hub's new connection: entries for ``user`` go to it from now on."""
        self.routes.add(user, device, hub, conn_id)

    def unroute(self, user: str, device: str, hub: str, conn_id: int) -> None:
        """A connection ended (a newer one of the same device stays)."""
        self.routes.remove(user, device, hub, conn_id)

    def route_many(self, conns: list[tuple[str, str, str, int]]) -> int:
        """A hub re-announces its connections ``[(user, device, hub, conn id)]``; returns how many."""
        for user, device, hub, conn_id in conns:
            self.routes.add(user, device, hub, conn_id)
        return len(conns)

    def hub_gone(self, hub: str) -> int:
        """The router declared ``hub`` gone: forget its connections; returns how many."""
        return self.routes.hub_gone(hub)

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
                seqr = await self._verified(await self.sequencer(conv))
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
        seqr = await self._verified(await self._member_sequencer(user, conv))
        seq = min(seq, seqr.last)
        await self.store.set_read(user, conv, seq)
        self._emit({"t": "receipt", "conv": conv, "user": user, "seq": seq}, seqr.members, origin)

    async def typing(self, user: str, conv: str, origin: tuple[str, int] | None = None) -> None:
        """Tell the other members' online devices that ``user`` is typing; nothing is stored."""
        seqr = await self._member_sequencer(user, conv)
        await self._check_dm(seqr, user)
        self._emit({"t": "typing", "conv": conv, "user": user}, seqr.members - {user}, origin)

    def _emit(self, frame: dict[str, Any], users: frozenset[str], origin: tuple[str, int] | None) -> None:
        """Queue an unsolicited, unstored event for the online devices of ``users``, batched per hub
        (``fanout_via = "conv"``) or per session shard; ``origin`` (hub, connection id) gets none."""
        if self._via_routes:
            for hub, conn_ids in self.routes.targets(users, skip=origin).items():
                self._events_to_hubs.add(hub, (frame, conn_ids))
            return
        by_shard = ids.split_by_shard(users, self.peers.session_index)
        for shard, shard_users in by_shard.items():
            self._events.add(shard, (frame, shard_users, origin))

    async def _send_events(self, shard: int, items: list[tuple[dict[str, Any], list[str], Any]]) -> None:
        try:
            await SessionShardRef(self.peers.sessions[shard]).events(items)
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
class ConversationShardActor(Vitals):
    """Ray shell of :class:`ConversationShard`."""

    async def __init__(self, config: Config, index: int = 0) -> None:  # type: ignore[misc]  # Ray awaits it
        from im_actors import metrics

        self._config = config
        self._index = index
        self._store = Store(config)
        self._shard = ConversationShard(config, Peers(config), self._store)
        self._announced: set[str] = set()  # hubs that re-announced their connections to this incarnation
        self._indexes_made = False
        # Histograms from the increments the core counts already (im_actors.metrics.IncrementProbe).
        self._metrics = m = metrics.for_actor(
            config, "conv", self.stats, histograms_of=("store",) if config.store_writers == 0 else ()
        )
        self._shard.stats = m.probe(
            self._shard.stats, commit_ms_total="im_conv_commit_ms", committed="im_conv_commit_batch"
        )
        self._store.stats = m.probe(
            self._store.stats, mongo_ms_total="im_store_mongo_ms", redis_ms_total="im_store_redis_ms"
        )
        m.start()

    async def ready(self) -> bool:
        """Start-up: create the indexes when there are no store writers, and start the commit loop.
        Returns True."""
        if self._config.store_writers == 0 and not self._indexes_made:
            await self._store.setup()
            self._indexes_made = True
        self._shard.start()
        return True

    async def heartbeat(self) -> bool:
        """The router's call on every heartbeat (``fanout_via = "conv"``): the first time this
        incarnation is asked, every hub announces its connections here, so a restarted shard knows
        the routes again within one heartbeat (:mod:`im_actors.routes`). Returns True."""
        self._shard.start()
        if self._config.fanout_via == "conv":
            await ask_hubs_to_reannounce(self._shard.peers.hubs, self._announced, "reannounce_routes", self._index)
        return True

    def route(self, user: str, device: str, hub: str, conn_id: int) -> None:
        """See :meth:`ConversationShard.route`."""
        self._shard.route(user, device, hub, conn_id)

    def unroute(self, user: str, device: str, hub: str, conn_id: int) -> None:
        """See :meth:`ConversationShard.unroute`."""
        self._shard.unroute(user, device, hub, conn_id)

    def route_many(self, conns: list[tuple[str, str, str, int]]) -> int:
        """See :meth:`ConversationShard.route_many`."""
        return self._shard.route_many(conns)

    def hub_gone(self, hub: str) -> int:
        """See :meth:`ConversationShard.hub_gone` (a hub that answers again re-announces, told by the router)."""
        return self._shard.hub_gone(hub)

    async def send_batch(self, items: list[SendItem], hub: str | None = None) -> list[Answer]:
        """See :meth:`ConversationShard.send_batch`."""
        self._shard.start()
        return await self._shard.send_batch(items, hub)

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
        """Counters: committed, dups, commits, unavailable, commit_ms_total (time in store calls),
        activations (sequencers activated from storage); ``active``: sequencers now."""
        store = {f"store_{k}": v for k, v in self._store.stats.items()}
        return {**self._shard.stats, **store, "active": len(self._shard.sequencers), "routes": len(self._shard.routes)}
