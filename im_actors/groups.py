"""Group shards: groups hosted many to a Ray actor; membership stored in MongoDB (DESIGN.md 1, 5).

Every change of a group (created, added, removed, left, a role, the name) is a ``system`` entry in
the group's conversation, committed by that conversation's sequencer, the one place where changes
are ordered with messages: it applies the change when the entry commits, so every member sees the
change in the same order as the messages around it (:mod:`im_actors.membership`). This shard
authorizes the change first, under a per-group lock (changes to one group run one at a time), then
applies the committed entry to its own copy and writes the group document as a checkpoint. The
stream is the truth: a document that missed a change (its write failed, the shard died) is brought
up to date by replaying the system entries after its checkpoint seq.

Roles: ``owner`` (the creator, one at a time), ``admin``, ``member``.

- add: owner and admins; remove: the owner removes anyone else, an admin removes members only;
- leave: any member, except the owner while others remain (hand over ownership first);
- role (``group.role``): the owner only, on another member; making someone owner hands the
  ownership over (the previous owner becomes an admin);
- rename (``group.rename``): owner and admins;
- at most ``max_group_members`` members (bad_request above).

A non-member and a group that does not exist get the same ``forbidden`` answer.

The shard also hosts the contact book (:mod:`im_actors.contacts`, DESIGN.md section 1).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from typing import Any

import ray

from im_actors import ids
from im_actors.config import Config
from im_actors.contacts import ContactBook
from im_actors.errors import BadRequest, Forbidden, StorageUnavailable
from im_actors.membership import ROLES, Membership
from im_actors.refs import Peers, answers_internal
from im_actors.store import Store
from im_actors.vitals import Vitals

__all__ = ["GroupShard", "GroupShardActor", "NOT_A_GROUP_MEMBER"]

log = logging.getLogger(__name__)

#: The one answer to a non-member, and to an id that names no group.
NOT_A_GROUP_MEMBER = "not a member of this group"

#: Group ids found not to exist, remembered (least recently asked dropped first) so a probe asked
#: again is answered from memory like a group this shard holds: the same timing class.
ABSENT_KEPT = 10000


class GroupShard:
    """Plain core of a group shard: create, add, remove, leave, role, rename, info, membership."""

    def __init__(self, config: Config, peers: Peers, store: Store, index: int = 0) -> None:
        self.config = config
        self.index = index
        self.peers = peers
        self.store = store
        self._cache: dict[str, Membership] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._absent: OrderedDict[str, None] = OrderedDict()

    async def _load(self, gid: str) -> Membership | None:
        """The group's membership: its document, then the change entries after its checkpoint."""
        m = self._cache.get(gid)
        if m is not None:
            return m
        if gid in self._absent:
            self._absent.move_to_end(gid)
            return None
        doc = await self.store.group_doc(gid)
        if doc is None:
            self._absent[gid] = None
            if len(self._absent) > ABSENT_KEPT:
                self._absent.popitem(last=False)
            return None
        m = Membership.from_doc(doc)
        for entry in await self.store.system_entries(ids.group_conv(gid), m.seq):
            m.apply(entry["sender"], entry.get("meta") or {}, entry["seq"])
        self._cache[gid] = m
        return m

    async def _member(self, user: str, gid: str) -> Membership:
        m = await self._load(gid)
        if m is None or user not in m.members:
            raise Forbidden(NOT_A_GROUP_MEMBER)
        return m

    def _lock(self, gid: str) -> asyncio.Lock:
        return self._locks.setdefault(gid, asyncio.Lock())

    async def _change(self, gid: str, m: Membership, actor: str, text: str, meta: dict[str, Any]) -> int:
        """Commit one change entry through the conversation's sequencer, then apply it here and
        checkpoint the document. Returns its seq. Call with the group's lock held.

        Raises :class:`Unavailable` when the commit failed or its outcome is unknown; the cached
        copy is then dropped and rebuilt from the stream at the next use.
        """
        conv = ids.group_conv(gid)
        try:
            ack = await self.peers.conv(conv).call(
                "append_system", conv, actor, text, meta, f"sys-{secrets.token_hex(8)}"
            )
        except Exception:
            self._cache.pop(gid, None)
            raise
        m.apply(actor, meta, int(ack["seq"]))
        try:
            await self.store.checkpoint_group(gid, m.to_doc())
        except StorageUnavailable as exc:
            # Committed in the stream: the next load replays it. The answer is still ok.
            log.warning("%s: group document not checkpointed at seq %d: %s", gid, m.seq, exc)
        return int(ack["seq"])

    async def create(self, owner: str, name: str, members: list[str], gid: str | None = None) -> dict[str, Any]:
        """Create a group owned by ``owner`` with ``members`` (the owner is added).

        Returns ``{"group", "conv"}`` once the ``created`` system entry is committed; raises
        :class:`BadRequest` above ``max_group_members``, :class:`Unavailable` on storage failure.
        """
        everyone = list(dict.fromkeys([owner, *members]))
        if len(everyone) > self.config.max_group_members:
            raise BadRequest(f"a group has at most {self.config.max_group_members} members")
        # The group's shard is chosen by its id: draw ids until one lands on this shard.
        while gid is None:
            candidate = ids.new_group_id()
            if self.peers.group(candidate) is self.peers.groups[self.index]:
                gid = candidate
        conv = ids.group_conv(gid)
        m = Membership()
        doc = {"_id": gid, **m.to_doc(), "name": name, "created_ms": int(time.time() * 1000)}
        async with self._lock(gid):
            await self.store.insert_group(doc)
            self._cache[gid] = m
            self._absent.pop(gid, None)
            await self.store.add_user_convs(conv, everyone)
            meta = {"event": "created", "name": name, "owner": owner, "users": everyone}
            await self._change(gid, m, owner, f"{owner} created {name}", meta)
        return {"group": gid, "conv": conv}

    async def add(self, actor: str, gid: str, users: list[str]) -> dict[str, Any]:
        """Add ``users`` to group ``gid``; ``actor`` must be its owner or an admin.

        Users already members are skipped (nothing is committed when none is left). Raises
        :class:`Forbidden` for anyone else (and for a group that does not exist: the same
        answer), :class:`BadRequest` above ``max_group_members``.
        """
        async with self._lock(gid):
            m = await self._member(actor, gid)
            if m.role(actor) not in ("owner", "admin"):
                raise Forbidden("only the owner and admins add members")
            new = [u for u in dict.fromkeys(users) if u not in m.members]
            if not new:
                return {}
            if len(m.members) + len(new) > self.config.max_group_members:
                raise BadRequest(f"a group has at most {self.config.max_group_members} members")
            conv = ids.group_conv(gid)
            await self.store.add_user_convs(conv, new)
            await self._change(gid, m, actor, f"{actor} added {', '.join(new)}", {"event": "added", "users": new})
        return {}

    async def remove(self, actor: str, gid: str, users: list[str]) -> dict[str, Any]:
        """Remove ``users`` from ``gid``: the owner removes anyone else, an admin members only.

        Non-members are skipped; removing oneself is :meth:`leave`. From the entry's seq on, the
        removed users' devices get nothing more and their reads stop there. Raises
        :class:`Forbidden` (also for a made-up group), :class:`BadRequest` for oneself.
        """
        async with self._lock(gid):
            m = await self._member(actor, gid)
            role = m.role(actor)
            if role not in ("owner", "admin"):
                raise Forbidden("only the owner and admins remove members")
            if actor in users:
                raise BadRequest("use group.leave to leave a group")
            gone = [u for u in dict.fromkeys(users) if u in m.members]
            if role == "admin" and any(m.role(u) != "member" for u in gone):
                raise Forbidden("admins remove members only")
            if not gone:
                return {}
            meta = {"event": "removed", "users": gone}
            await self._change(gid, m, actor, f"{actor} removed {', '.join(gone)}", meta)
        return {}

    async def leave(self, user: str, gid: str) -> dict[str, Any]:
        """``user`` leaves ``gid``. The owner may leave only as the last member (else
        :class:`Forbidden`: hand over ownership with :meth:`role` first)."""
        async with self._lock(gid):
            m = await self._member(user, gid)
            if m.owner == user and len(m.members) > 1:
                raise Forbidden("the owner hands over ownership (group.role) before leaving")
            await self._change(gid, m, user, f"{user} left", {"event": "left", "users": [user]})
        return {}

    async def role(self, actor: str, gid: str, user: str, role: str) -> dict[str, Any]:
        """Give member ``user`` of ``gid`` the role ``role`` (owner only; see the module doc).

        Raises :class:`BadRequest` for an unknown role or the owner's own role,
        :class:`Forbidden` for a non-owner or a target who is not a member.
        """
        if role not in ROLES:
            raise BadRequest(f"role must be one of {list(ROLES)}")
        async with self._lock(gid):
            m = await self._member(actor, gid)
            if m.owner != actor:
                raise Forbidden("only the owner changes roles")
            if user == actor:
                raise BadRequest("the owner hands over ownership by making another member owner")
            if user not in m.members:
                raise Forbidden(f"{user} is not a member of this group")
            if m.role(user) == role:
                return {}
            meta = {"event": "role", "users": [user], "role": role}
            await self._change(gid, m, actor, f"{actor} made {user} {role}", meta)
        return {}

    async def rename(self, actor: str, gid: str, name: str) -> dict[str, Any]:
        """Rename ``gid`` (owner and admins); :class:`Forbidden` for anyone else."""
        async with self._lock(gid):
            m = await self._member(actor, gid)
            if m.role(actor) not in ("owner", "admin"):
                raise Forbidden("only the owner and admins rename the group")
            if m.name == name:
                return {}
            meta = {"event": "renamed", "name": name}
            await self._change(gid, m, actor, f"{actor} renamed the group to {name}", meta)
        return {}

    async def info(self, user: str, gid: str) -> dict[str, Any]:
        """``{"group", "name", "members", "roles"}`` for a member; :class:`Forbidden` otherwise."""
        m = await self._member(user, gid)
        members = sorted(m.members)
        roles = {u: m.roles.get(u, "member") for u in members}
        return {"group": gid, "name": m.name, "members": members, "roles": roles}

    async def members(self, gid: str) -> list[str] | None:
        """The members of ``gid``, or None when it does not exist."""
        m = await self._load(gid)
        return None if m is None else sorted(m.members)

    async def membership(self, gid: str) -> dict[str, Any] | None:
        """The group's membership as a document (:meth:`Membership.to_doc`) with the seq it is
        exact at, or None when ``gid`` names no group (for activating its sequencer)."""
        m = await self._load(gid)
        return None if m is None else m.to_doc()


@ray.remote(num_cpus=0, max_restarts=-1)
@answers_internal
class GroupShardActor(Vitals):
    """Ray shell of :class:`GroupShard` and of the :class:`ContactBook` it hosts."""

    async def __init__(self, config: Config, index: int) -> None:  # type: ignore[misc]  # Ray awaits it
        from im_actors import metrics

        self._store = Store(config)
        peers = Peers(config)
        self._core = GroupShard(config, peers, self._store, index)
        self._contacts = ContactBook(config, peers, self._store)
        self._metrics = metrics.for_actor(config, "group", self.stats)
        self._metrics.start()

    async def ready(self) -> bool:
        """True once constructed."""
        return True

    def stats(self) -> dict[str, Any]:
        """``cached``: group memberships held in memory."""
        return {"cached": len(self._core._cache)}  # noqa: SLF001 - the shell reads its own core

    async def create(self, owner: str, name: str, members: list[str]) -> dict[str, Any]:
        """See :meth:`GroupShard.create`."""
        return await self._core.create(owner, name, members)

    async def add(self, actor: str, gid: str, users: list[str]) -> dict[str, Any]:
        """See :meth:`GroupShard.add`."""
        return await self._core.add(actor, gid, users)

    async def remove(self, actor: str, gid: str, users: list[str]) -> dict[str, Any]:
        """See :meth:`GroupShard.remove`."""
        return await self._core.remove(actor, gid, users)

    async def leave(self, user: str, gid: str) -> dict[str, Any]:
        """See :meth:`GroupShard.leave`."""
        return await self._core.leave(user, gid)

    async def role(self, actor: str, gid: str, user: str, role: str) -> dict[str, Any]:
        """See :meth:`GroupShard.role`."""
        return await self._core.role(actor, gid, user, role)

    async def rename(self, actor: str, gid: str, name: str) -> dict[str, Any]:
        """See :meth:`GroupShard.rename`."""
        return await self._core.rename(actor, gid, name)

    async def info(self, user: str, gid: str) -> dict[str, Any]:
        """See :meth:`GroupShard.info`."""
        return await self._core.info(user, gid)

    async def members(self, gid: str) -> list[str] | None:
        """See :meth:`GroupShard.members`."""
        return await self._core.members(gid)

    async def membership(self, gid: str) -> dict[str, Any] | None:
        """See :meth:`GroupShard.membership`."""
        return await self._core.membership(gid)

    async def contact(self, op: str, user: str, other: str) -> None:
        """See :meth:`ContactBook.change`."""
        await self._contacts.change(op, user, other)

    async def contact_list(self, user: str) -> list[dict[str, str]]:
        """See :meth:`ContactBook.list`."""
        return await self._contacts.list(user)
