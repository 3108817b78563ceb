"""Group shards: groups hosted many to a Ray actor; membership stored in MongoDB (DESIGN.md 1, 5).

Every membership change is also a ``system`` entry in the group's conversation, committed by the
conversation's sequencer, which applies the new member set when that entry commits: members see
the change in the same order as the messages around it.

Roles: ``owner`` (the creator), ``admin``, ``member``. Adding members takes an owner or an admin.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import ray
from pymongo.errors import PyMongoError

from im_actors import ids
from im_actors.config import Config
from im_actors.errors import BadRequest, Forbidden, Unavailable
from im_actors.refs import Peers
from im_actors.store import Store

__all__ = ["GroupShard", "GroupShardActor"]

log = logging.getLogger(__name__)


class GroupShard:
    """Plain core of a group shard: create, add, info, members."""

    def __init__(self, config: Config, peers: Peers, store: Store, index: int = 0) -> None:
        self.config = config
        self.index = index
        self.peers = peers
        self.store = store
        self.groups = store.db["groups"]
        self._cache: dict[str, dict[str, Any]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _load(self, gid: str) -> dict[str, Any] | None:
        group = self._cache.get(gid)
        if group is None:
            try:
                group = await self.groups.find_one({"_id": gid})
            except PyMongoError as exc:
                raise Unavailable(f"MongoDB: {type(exc).__name__}") from exc
            if group is not None:
                self._cache[gid] = group
        return group

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
        doc = {
            "_id": gid,
            "name": name,
            "owner": owner,
            "members": everyone,
            "roles": {owner: "owner"},
            "created_ms": int(time.time() * 1000),
        }
        try:
            await self.groups.insert_one(doc)
        except PyMongoError as exc:
            raise Unavailable(f"MongoDB: {type(exc).__name__}") from exc
        self._cache[gid] = doc
        await self.store.add_user_convs(conv, everyone)
        await self.peers.conv(conv).call(
            "append_system",
            conv,
            owner,
            f"{owner} created {name}",
            {"event": "created", "name": name, "users": everyone},
            everyone,
            f"sys-{secrets.token_hex(8)}",
        )
        return {"group": gid, "conv": conv}

    async def add(self, actor: str, gid: str, users: list[str]) -> dict[str, Any]:
        """Add ``users`` to group ``gid``; ``actor`` must be its owner or an admin.

        Changes to one group run one at a time (each system entry carries the whole member set, so
        two interleaved adds would drop a member). Raises :class:`Forbidden` for anyone else (and
        for a group that does not exist: the same answer), :class:`BadRequest` above
        ``max_group_members``.
        """
        lock = self._locks.setdefault(gid, asyncio.Lock())
        async with lock:
            return await self._add(actor, gid, users)

    async def _add(self, actor: str, gid: str, users: list[str]) -> dict[str, Any]:
        group = await self._load(gid)
        if group is None or actor not in group["members"]:
            raise Forbidden("not a member of this group")
        if group["roles"].get(actor) not in ("owner", "admin"):
            raise Forbidden("only the owner and admins add members")
        new = [u for u in dict.fromkeys(users) if u not in group["members"]]
        if not new:
            return {}
        members = [*group["members"], *new]
        if len(members) > self.config.max_group_members:
            raise BadRequest(f"a group has at most {self.config.max_group_members} members")
        conv = ids.group_conv(gid)
        try:
            await self.groups.update_one({"_id": gid}, {"$addToSet": {"members": {"$each": new}}})
        except PyMongoError as exc:
            raise Unavailable(f"MongoDB: {type(exc).__name__}") from exc
        group["members"] = members
        await self.store.add_user_convs(conv, new)
        await self.peers.conv(conv).call(
            "append_system",
            conv,
            actor,
            f"{actor} added {', '.join(new)}",
            {"event": "added", "users": new},
            members,
            f"sys-{secrets.token_hex(8)}",
        )
        return {}

    async def info(self, user: str, gid: str) -> dict[str, Any]:
        """``{"group", "name", "members", "roles"}`` for a member; :class:`Forbidden` otherwise."""
        group = await self._load(gid)
        if group is None or user not in group["members"]:
            raise Forbidden("not a member of this group")
        roles = {u: group["roles"].get(u, "member") for u in group["members"]}
        return {"group": gid, "name": group["name"], "members": list(group["members"]), "roles": roles}

    async def members(self, gid: str) -> list[str] | None:
        """The members of ``gid``, or None when it does not exist (for the conversation shard)."""
        group = await self._load(gid)
        return None if group is None else list(group["members"])


@ray.remote(num_cpus=0, max_restarts=-1)
class GroupShardActor:
    """Ray shell of :class:`GroupShard`."""

    def __init__(self, config: Config, index: int) -> None:
        self._store = Store(config)
        self._core = GroupShard(config, Peers(config), self._store, index)

    async def ready(self) -> bool:
        """True once constructed."""
        return True

    async def create(self, owner: str, name: str, members: list[str]) -> dict[str, Any]:
        """See :meth:`GroupShard.create`."""
        return await self._core.create(owner, name, members)

    async def add(self, actor: str, gid: str, users: list[str]) -> dict[str, Any]:
        """See :meth:`GroupShard.add`."""
        return await self._core.add(actor, gid, users)

    async def info(self, user: str, gid: str) -> dict[str, Any]:
        """See :meth:`GroupShard.info`."""
        return await self._core.info(user, gid)

    async def members(self, gid: str) -> list[str] | None:
        """See :meth:`GroupShard.members`."""
        return await self._core.members(gid)
