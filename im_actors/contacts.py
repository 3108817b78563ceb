"""The contact book (friend list): requests, acceptance, removal, blocks (DESIGN.md section 1).

Hosted in the group shards. The pair ``(a, b)`` lives on one shard, chosen from the pair
(:meth:`im_actors.refs.Peers.contact_host`), where its changes run one at a time; each user's side
is one document in MongoDB ``contacts``: ``{_id: "<user>|<other>", user, other, state, ms}``.

States of ``user``'s side (PROTOCOL.md section 4, ``contact.list``):

- ``pending_out``: user asked other; ``pending_in``: other asked user;
- ``accepted``: both sides agreed; ``blocked``: user blocked other (one-sided, hidden from other).

:func:`transition` is the whole rule set, as a pure function. A direct message between a pair is
refused (``forbidden``) when either side blocked the other, and, under ``dm_policy = "contacts"``,
unless both sides are ``accepted``. After each change the pair's direct conversation is told to ask
again (:meth:`im_actors.conversation.ConversationShard.contact_changed`) and both users' session
shards forget their cached contact lists (presence goes to accepted contacts).

The question "may these two exchange direct messages?" is asked once per first-seen direct
conversation, which is what 1:1 chat between many people mostly is (issue 10: 200 users make
19,900 pairs), by the conversation shard hosting it, which answers it itself from a
:class:`SideCache`: each user's sides, read once per user and kept (:data:`USERS_KEPT` users, least
recently used dropped first), so 200 users cost 200 reads, not 19,900, and no call reaches the
contact book. Keeping them is safe because the pair ``(a, b)`` is asked about only by the shard of
its conversation, and the book tells that shard of every change of the pair once it is written
(:meth:`ContactBook._changed`, before answering): a change of ``(a, x)`` goes to another
conversation's shard and touches a side this one never answers with. The shard then forgets both
users; a read that was on its way across that notice is not kept (a change counter), so a late
read never restores a side the change replaced.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections import OrderedDict
from collections.abc import Sequence

from im_actors import ids
from im_actors.config import Config
from im_actors.errors import BadRequest, Forbidden, StorageUnavailable, Unavailable
from im_actors.refs import ConvShardRef, Peers, SessionShardRef
from im_actors.store import Store

__all__ = ["ContactBook", "SideCache", "transition", "accepted_contacts", "STATES", "OPS"]

#: States of one side of a pair; None (no document) means no relation.
STATES = ("pending_out", "pending_in", "accepted", "blocked")
#: Operations, named after the requests ``contact.<op>``.
OPS = ("request", "accept", "remove", "block", "unblock")

State = str | None

#: Users whose sides a contact book keeps (:class:`ContactBook`, least recently used dropped first).
USERS_KEPT = 100_000
#: A user with more sides than this is not kept (their pairs are read one batch at a time instead).
SIDES_KEPT_MAX = 1_000


def transition(op: str, mine: State, theirs: State) -> tuple[State, State]:
    """The pair's new ``(mine, theirs)`` after ``op`` by the user whose side is ``mine``.

    - request: both ``pending`` (or ``accepted`` when the other had asked already; a no-op when
      accepted); :class:`Forbidden` when either side blocked the other;
    - accept: both ``accepted``; :class:`Forbidden` without a request from the other;
    - remove: the relation ends on both sides, blocks stay;
    - block: mine ``blocked``; theirs ends unless they blocked too;
    - unblock: my block ends (no relation afterwards).

    The two sides are two documents written one after the other: a resend after a failure
    between them converges (a side already ``accepted`` completes the other side, ...).
    Raises :class:`BadRequest` for an unknown ``op``.
    """
    if op == "request":
        if mine == "blocked" or theirs == "blocked":
            raise Forbidden("not allowed to contact this user")
        if mine in ("accepted", "pending_in"):
            return "accepted", "accepted"
        return "pending_out", "pending_in"
    if op == "accept":
        if mine == "accepted" and theirs != "blocked":
            return "accepted", "accepted"
        if mine != "pending_in":
            raise Forbidden("no contact request from this user")
        return "accepted", "accepted"
    if op == "remove":
        return (mine if mine == "blocked" else None), (theirs if theirs == "blocked" else None)
    if op == "block":
        return "blocked", (theirs if theirs == "blocked" else None)
    if op == "unblock":
        return (None if mine == "blocked" else mine), theirs
    raise BadRequest(f"unknown contact operation {op!r}")


async def accepted_contacts(store: Store, user: str) -> list[str]:
    """The users whose contact request ``user`` accepted or who accepted theirs (both sides
    ``accepted``). Raises :class:`StorageUnavailable` when MongoDB does not answer."""
    return await store.accepted_contacts(user)


class SideCache:
    """Each user's contact sides, read once from storage and kept, to answer "may these two
    exchange direct messages?" (the module docstring says why keeping them is safe).

    Held by each conversation shard for its direct conversations' checks. :attr:`version` moves
    on every :meth:`forget`; a read that was on its way across one is not kept, and a caller
    keeping an answer (a sequencer's ``dm_allowed``) compares the version from before it asked.
    """

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._sides: OrderedDict[str, dict[str, str]] = OrderedDict()  # user -> {other: state}
        self.version = 0
        self.stats: dict[str, float] = {"side_reads": 0, "dm_answers": 0}

    def forget(self, *users: str) -> None:
        """The sides of ``users`` may have changed (unknown how): read them again when asked."""
        self.version += 1
        for u in users:
            self._sides.pop(u, None)

    async def allowed_many(self, pairs: Sequence[tuple[str, str]]) -> builtins.list[bool]:
        """May each of ``pairs`` exchange direct messages (in order)? False when either blocked the
        other; under ``dm_policy = "contacts"`` only when both sides are ``accepted``. One storage
        read for the users not kept yet, none when all are; the pairs of a user with too many
        sides to keep (:data:`SIDES_KEPT_MAX`) are read pair by pair, in one read for the batch.
        Raises :class:`StorageUnavailable`."""
        users = builtins.list(dict.fromkeys(u for pair in pairs for u in pair))
        missing = [u for u in users if u not in self._sides]
        if missing:
            version = self.version
            read = await self.store.contact_sides_many(missing)
            self.stats["side_reads"] += 1
            if version == self.version:  # no change meanwhile: the read is current
                for u in missing:
                    sides = read.get(u, {})
                    if len(sides) <= SIDES_KEPT_MAX:
                        self._sides[u] = sides
                while len(self._sides) > USERS_KEPT:
                    self._sides.popitem(last=False)
        answers: dict[int, bool] = {}
        unkept: builtins.list[int] = []
        for i, (a, b) in enumerate(pairs):
            mine, theirs = self._sides.get(a), self._sides.get(b)
            if mine is None or theirs is None:
                unkept.append(i)
                continue
            self._sides.move_to_end(a)
            self._sides.move_to_end(b)
            answers[i] = self.allowed(mine.get(b), theirs.get(a))
        if unkept:
            states = await self.store.contact_states_many([pairs[i] for i in unkept])
            for i, (mine_s, theirs_s) in zip(unkept, states, strict=True):
                answers[i] = self.allowed(mine_s, theirs_s)
        self.stats["dm_answers"] += len(pairs)
        return [answers[i] for i in range(len(pairs))]

    def allowed(self, mine: State, theirs: State) -> bool:
        """The rule itself, on the pair's two sides."""
        if "blocked" in (mine, theirs):
            return False
        if self.config.dm_policy == "contacts":
            return mine == theirs == "accepted"
        return True


class ContactBook:
    """Plain core of the contact book hosted by one group shard."""

    def __init__(self, config: Config, peers: Peers, store: Store) -> None:
        self.config = config
        self.peers = peers
        self.store = store
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def _states(self, a: str, b: str) -> tuple[State, State]:
        return await self.store.contact_states(a, b)

    async def change(self, op: str, user: str, other: str) -> None:
        """Apply ``contact.<op>`` by ``user`` on ``other`` (see :func:`transition`).

        Raises :class:`BadRequest` for oneself or an unknown op, :class:`Forbidden` as
        :func:`transition` says, :class:`StorageUnavailable` when MongoDB does not answer (a resend
        converges: every operation is idempotent).
        """
        if user == other:
            raise BadRequest("a contact is another user")
        key = (min(user, other), max(user, other))
        async with self._locks.setdefault(key, asyncio.Lock()):
            mine, theirs = await self._states(user, other)
            new_mine, new_theirs = transition(op, mine, theirs)
            sides = [
                (a, b, new)
                for a, b, old, new in ((user, other, mine, new_mine), (other, user, theirs, new_theirs))
                if old != new
            ]
            if not sides:
                return
            try:
                await self.store.set_contact_sides(sides, int(time.time() * 1000))
            except StorageUnavailable:
                # Part of it may be written: the caches are told all the same.
                await self._changed(user, other)
                raise
        await self._changed(user, other)

    async def _changed(self, a: str, b: str) -> None:
        """Tell the pair's direct conversation before answering, so a send after the answer sees
        the change (its shard forgets both users' kept sides); a shard that does not answer is
        restarting and will read afresh anyway."""
        conv = ids.direct_conv(a, b)
        for u in (a, b):
            SessionShardRef(self.peers.session(u)).contacts_changed(u)
        try:
            await ConvShardRef(self.peers.conv(conv)).contact_changed(conv)
        except Unavailable:
            pass

    async def list(self, user: str) -> list[dict[str, str]]:
        """``[{"user", "state"}]`` of ``user``'s side, sorted by user (``contact.list``)."""
        sides = await self.store.contacts_of(user)
        return sorted(({"user": other, "state": state} for other, state in sides), key=lambda c: c["user"])
