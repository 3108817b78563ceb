"""Every Ray call to a peer goes through here (STYLE.md rule 4).

A :class:`Peer` names one actor; it resolves the handle lazily (so actors may start in any order
and a restarted actor is found again), bounds each call with a timeout, and turns Ray's errors into
:class:`~im_actors.errors.Unavailable`. :class:`Peers` gives the peer of a user, a conversation, a
group, a store writer or a hub from the configuration's shard counts. Tests replace it with a fake.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from im_actors import ids
from im_actors.config import Config
from im_actors.errors import CloseConnection, RequestError, Unavailable

__all__ = ["Peer", "Peers", "DEFAULT_CALL_TIMEOUT_S"]

#: Upper bound of one actor call (s); a commit waits for MongoDB, whose own timeout is lower.
DEFAULT_CALL_TIMEOUT_S = 30.0


class Peer:
    """One named actor of the ``im`` namespace, called as ``await peer.call("method", *args)``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._handle: Any = None

    def handle(self) -> Any:
        """The Ray handle, looked up by name on first use; raises :class:`Unavailable` if missing."""
        if self._handle is None:
            try:
                self._handle = ray.get_actor(self.name, namespace=ids.NAMESPACE)
            except ValueError as exc:
                raise Unavailable(f"{self.name} is not running") from exc
        return self._handle

    async def call(self, method: str, *args: Any, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> Any:
        """Call ``method`` on the actor and await its result.

        Our own :class:`RequestError` and :class:`CloseConnection` raised by the actor pass through
        unchanged; Ray's errors (actor dead or restarting, timeout) become :class:`Unavailable`.
        """
        handle = self.handle()
        try:
            ref = getattr(handle, method).remote(*args)
            return await asyncio.wait_for(ref, timeout)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (RequestError, CloseConnection)):
                raise cause from None
            raise Unavailable(f"{self.name}.{method} failed: {type(cause or exc).__name__}") from exc
        except (RequestError, CloseConnection):
            raise
        except (TimeoutError, RayActorError, GetTimeoutError, RayError) as exc:
            if isinstance(exc, RayActorError):
                self._handle = None  # look it up again: it may have been replaced
            raise Unavailable(f"{self.name}.{method}: {type(exc).__name__}") from exc

    def notify(self, method: str, *args: Any) -> None:
        """Fire a call whose result nobody needs (close a connection, ...); errors are ignored."""
        try:
            getattr(self.handle(), method).remote(*args)
        except (Unavailable, RayError):
            pass


class Peers:
    """The directory of peers of one deployment: who hosts a user, a conversation, a group."""

    def __init__(self, config: Config) -> None:
        self.config = config
        p = config.actor_prefix
        self.sessions = [Peer(ids.actor_name("session", i, p)) for i in range(config.session_shards)]
        self.convs = [Peer(ids.actor_name("conv", i, p)) for i in range(config.conv_shards)]
        self.groups = [Peer(ids.actor_name("group", i, p)) for i in range(config.group_shards)]
        self.stores = [Peer(ids.actor_name("store", i, p)) for i in range(config.store_writers)]
        self.hubs = {ids.actor_name("hub", i, p): Peer(ids.actor_name("hub", i, p)) for i in range(config.hubs)}
        self.router = Peer(ids.actor_name("router", 0, p))
        self._store_turn = itertools.count()

    def session_index(self, user: str) -> int:
        """Index of the session shard hosting ``user``."""
        return ids.shard_of(user, len(self.sessions))

    def session(self, user: str) -> Peer:
        """The session shard hosting ``user``."""
        return self.sessions[self.session_index(user)]

    def conv_index(self, conv: str) -> int:
        """Index of the conversation shard hosting ``conv``."""
        return ids.shard_of(conv, len(self.convs))

    def conv(self, conv: str) -> Peer:
        """The conversation shard hosting ``conv``."""
        return self.convs[self.conv_index(conv)]

    def group(self, group_id: str) -> Peer:
        """The group shard hosting ``group_id``."""
        return self.groups[ids.shard_of(group_id, len(self.groups))]

    def contact_host(self, a: str, b: str) -> Peer:
        """The group shard hosting the contact pair ``(a, b)`` (either order)."""
        lo, hi = sorted((a, b))
        return self.groups[ids.shard_of(f"{lo}|{hi}", len(self.groups))]

    def next_store(self) -> Peer:
        """Store writers in turn (a commit that fails on one is retried once on the next)."""
        return self.stores[next(self._store_turn) % len(self.stores)]

    def hub(self, name: str) -> Peer:
        """The hub named ``name`` (a name from :func:`ids.actor_name`)."""
        peer = self.hubs.get(name)
        if peer is None:
            peer = self.hubs[name] = Peer(name)
        return peer
