"""Every Ray call to a peer goes through here (STYLE.md rule 4).

A :class:`Peer` names one actor; it resolves the handle lazily (so actors may start in any order
and a restarted actor is found again), bounds each call with a timeout, and turns what comes back
into our errors (PROTOCOL.md section 6):

==========================================================  ==================================
raised by the call                                          raised to the caller
==========================================================  ==================================
our :class:`RequestError` or :class:`CloseConnection`       unchanged (``StorageUnavailable``,
                                                            ``BadRequest``, ... keep their class)
the actor is dead, restarting or missing; the call timed    :class:`Unavailable` (transient:
out; inside the actor a ``TimeoutError`` or                 nothing was done, retrying may
``ConnectionError``                                         succeed)
any other exception inside the actor (a bug)                :class:`Internal`, logged with the
                                                            actor, the method and its traceback
==========================================================  ==================================

The texts that reach clients never name an actor (the logs do). :func:`answers_internal` is the
same rule on the actor's side: an actor shell decorated with it logs an unexpected exception in
its own log, with the method and its arguments, and raises :class:`Internal`.

:class:`Peers` gives the peer of a user, a conversation, a group, a store writer or a hub from the
configuration's shard counts. Tests replace it with a fake.

Every call between roles is typed: :class:`ConvShardRef`, :class:`SessionShardRef`,
:class:`GroupShardRef`, :class:`HubRef`, :class:`StoreRef` and :class:`RouterRef` wrap any peer (a
:class:`Peer`, or a test's fake with the same ``call`` and ``notify``) and give each remote method its
signature and answer type, so the actor's method and its callers cannot drift apart unseen
(tests/unit/test_refs.py holds each reference to its actor's signatures).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from im_actors import ids
from im_actors.config import Config
from im_actors.errors import CloseConnection, ImError, Internal, RequestError, Unavailable
from im_actors.wire import Answer, SendItem

if TYPE_CHECKING:
    from im_actors.store import CommitResult

__all__ = [
    "ask_hubs_to_reannounce",
    "ConvShardRef",
    "GroupShardRef",
    "HubRef",
    "RouterRef",
    "SessionShardRef",
    "StoreRef",
    "Peer",
    "Peers",
    "DEFAULT_CALL_TIMEOUT_S",
    "TRANSIENT",
    "answers_internal",
    "UNAVAILABLE_MSG",
]

log = logging.getLogger(__name__)

#: Upper bound of one actor call (s); a commit waits for MongoDB, whose own timeout is lower.
DEFAULT_CALL_TIMEOUT_S = 30.0

#: Exceptions that are transient wherever they are raised: answered ``unavailable``, not ``internal``.
TRANSIENT: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError, RayActorError, GetTimeoutError)

#: The text of an ``unavailable`` answer for a peer that could not be reached (no actor names).
UNAVAILABLE_MSG = "a server component is restarting or did not answer in time; retry"

#: The text of an ``internal`` answer (the log has the details).
INTERNAL_MSG = "internal error (logged on the server)"

_C = TypeVar("_C", bound=type)

#: What an actor method raises unchanged: our own errors and transient ones.
_PASS: tuple[type[BaseException], ...] = (ImError, *TRANSIENT)


def _brief(args: tuple[Any, ...]) -> str:
    """The arguments of a call for a log line: each value's repr cut to 80 characters, at most 6."""
    shown = [repr(a)[:80] for a in args[:6]]
    if len(args) > 6:
        shown.append(f"... {len(args) - 6} more")
    return ", ".join(shown)


def answers_internal(cls: _C) -> _C:
    """Class decorator for an actor shell (put it under ``@ray.remote``): every public method that
    raises anything but our own errors (:class:`~im_actors.errors.ImError`) or a :data:`TRANSIENT`
    one logs it here, in the actor, with the method, its arguments and the traceback, and raises
    :class:`Internal` instead, which :meth:`Peer.call` hands to the caller unchanged (issue 14,
    defect 1: a bug is answered ``internal``, never a retry-forever ``unavailable``)."""
    owner = cls.__name__
    for name, fn in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(fn):
            continue
        setattr(cls, name, _guarded(owner, name, fn))
    return cls


def _guarded(owner: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def report(exc: Exception, args: tuple[Any, ...]) -> Internal:
        log.error(
            "%s.%s(%s) raised %s: answered internal", owner, name, _brief(args[1:]), type(exc).__name__, exc_info=exc
        )
        return Internal(INTERNAL_MSG)

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def guarded_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except _PASS:
                raise
            except Exception as exc:
                raise report(exc, args) from exc

        return guarded_async

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _PASS:
            raise
        except Exception as exc:
            raise report(exc, args) from exc

    return guarded


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
                log.info("%s is not running", self.name)
                raise Unavailable(UNAVAILABLE_MSG) from exc
        return self._handle

    async def call(self, method: str, *args: Any, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> Any:
        """Call ``method`` on the actor and await its result.

        Raises what the module docstring's table says: our own :class:`RequestError` and
        :class:`CloseConnection` unchanged, :class:`Unavailable` for what is transient (actor
        dead, restarting or missing, ``timeout`` s passed, a timeout or lost connection inside
        the actor), :class:`Internal` for any other exception inside the actor (logged here).
        """
        handle = self.handle()
        try:
            ref = getattr(handle, method).remote(*args)
            return await asyncio.wait_for(ref, timeout)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (RequestError, CloseConnection)):
                raise cause from None
            if isinstance(cause, TRANSIENT):
                log.info("%s.%s: %r", self.name, method, cause)
                raise Unavailable(UNAVAILABLE_MSG) from exc
            log.error("%s.%s raised %s: answered internal\n%s", self.name, method, type(cause).__name__, exc)
            raise Internal(INTERNAL_MSG) from exc
        except (RequestError, CloseConnection):
            raise
        except (TimeoutError, RayActorError, GetTimeoutError, RayError) as exc:
            if isinstance(exc, RayActorError):
                self._handle = None  # look it up again: it may have been replaced
            log.info("%s.%s: %s", self.name, method, type(exc).__name__)
            raise Unavailable(UNAVAILABLE_MSG) from exc

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


async def ask_hubs_to_reannounce(hubs: dict[str, Peer], announced: set[str], method: str, index: int) -> int:
    """Ask every hub of ``hubs`` not in ``announced`` to call ``method(index)``: announce its
    connections to this (new or restarted) session or conversation shard. A hub that answers is added
    to ``announced`` (asked once per incarnation of the shard); one that does not (not up yet,
    restarting) is asked again at the next heartbeat. Returns how many hubs answered now."""
    answered = 0
    for name, hub in hubs.items():
        if name in announced:
            continue
        try:
            await hub.call(method, index, timeout=5.0)
        except Unavailable:
            continue
        announced.add(name)
        answered += 1
    return answered


class Caller(Protocol):
    """What a typed reference needs of a peer: :meth:`Peer.call` and :meth:`Peer.notify`."""

    async def call(self, method: str, *args: Any, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> Any: ...

    def notify(self, method: str, *args: Any) -> None: ...


#: A route: (user, device, hub name, connection id).
Route = tuple[str, str, str, int]
#: A fan-out batch for one hub: ``[(entry or event frame, [connection id, ...])]``.
HubItems = list[tuple[dict[str, Any], list[int]]]


class ConvShardRef:
    """Typed calls to a conversation shard (:class:`im_actors.conversation.ConversationShardActor`);
    each raises what :meth:`Peer.call` raises."""

    __slots__ = ("peer",)

    def __init__(self, peer: Caller) -> None:
        self.peer = peer

    async def send_batch(self, items: list[SendItem], hub: str) -> list[Answer]:
        """Sequence and commit ``items`` sent through ``hub``: one :data:`~im_actors.wire.Answer`
        per item, in order (an ack may carry ``copies`` for ``hub``)."""
        return cast("list[Answer]", await self.peer.call("send_batch", items, hub))

    async def sync(self, user: str, conv: str, after: int, limit: int) -> dict[str, Any]:
        """``{"msgs": [entry, ...], "last", "more"}``: ``user``'s entries of ``conv`` after ``after``."""
        return cast("dict[str, Any]", await self.peer.call("sync", user, conv, after, limit))

    async def history(self, user: str, conv: str, before: int, limit: int) -> dict[str, Any]:
        """``{"msgs", "last", "more"}``: ``user``'s entries of ``conv`` before ``before`` (0: newest)."""
        return cast("dict[str, Any]", await self.peer.call("history", user, conv, before, limit))

    async def read(self, user: str, conv: str, seq: int, origin: tuple[str, int]) -> None:
        """``user`` read ``conv`` up to ``seq`` from connection ``origin`` (hub, connection id)."""
        await self.peer.call("read", user, conv, seq, origin)

    async def typing(self, user: str, conv: str, origin: tuple[str, int]) -> None:
        """``user`` is typing in ``conv`` on connection ``origin``."""
        await self.peer.call("typing", user, conv, origin)

    async def route(self, route: Route, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        """Entries for the route's user reach that connection from now on (``fanout_via = "conv"``)."""
        await self.peer.call("route", *route, timeout=timeout)

    def unroute(self, route: Route) -> None:
        """That connection ended (one-way)."""
        self.peer.notify("unroute", *route)

    async def route_many(self, routes: list[Route]) -> int:
        """A hub announces its connections again; returns how many the shard took."""
        return cast(int, await self.peer.call("route_many", routes))

    async def last_seqs(self, user: str, convs: list[str]) -> dict[str, int]:
        """``{conv: last seq}`` of those of ``convs`` hosted here that ``user`` may read."""
        return cast("dict[str, int]", await self.peer.call("last_seqs", user, convs))

    async def contact_changed(self, conv: str) -> None:
        """The contact pair of direct ``conv`` changed: the shard forgets both users' kept sides."""
        await self.peer.call("contact_changed", conv)

    async def heartbeat(self, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> bool:
        """The router's supervision: a restarted shard has the hubs announce their routes again."""
        return cast(bool, await self.peer.call("heartbeat", timeout=timeout))

    def hub_gone(self, hub: str) -> None:
        """Every route through ``hub`` ended (one-way)."""
        self.peer.notify("hub_gone", hub)


#: A push-free event for a session shard: (frame, users, origin connection (hub, id) or None).
SessionEvent = tuple[dict[str, Any], list[str], "tuple[str, int] | None"]


class SessionShardRef:
    """Typed calls to a session shard (:class:`im_actors.session.SessionShardActor`); each raises
    what :meth:`Peer.call` raises."""

    __slots__ = ("peer",)

    def __init__(self, peer: Caller) -> None:
        self.peer = peer

    async def connect(
        self,
        user: str,
        device: str,
        hub: str,
        conn_id: int,
        max_connections: int,
        timeout: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        """(``user``, ``device``) is online on connection ``conn_id`` of ``hub``; raises
        :class:`CloseConnection` past ``max_connections`` of the user (0: no limit)."""
        await self.peer.call("connect", user, device, hub, conn_id, max_connections, timeout=timeout)

    def disconnect(self, user: str, device: str, hub: str, conn_id: int) -> None:
        """That connection ended (one-way)."""
        self.peer.notify("disconnect", user, device, hub, conn_id)

    async def connect_many(self, conns: list[Route]) -> None:
        """A hub announces its connections of this shard's users again."""
        await self.peer.call("connect_many", conns)

    def hub_gone(self, hub: str) -> None:
        """Every connection through ``hub`` ended (one-way)."""
        self.peer.notify("hub_gone", hub)

    async def heartbeat(self, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> bool:
        """The router's supervision: a restarted shard has the hubs announce their connections again."""
        return cast(bool, await self.peer.call("heartbeat", timeout=timeout))

    async def convs(self, user: str) -> list[dict[str, Any]]:
        """Every conversation of ``user``: ``[{"conv", "last", "read"}]``, sorted by conv."""
        return cast("list[dict[str, Any]]", await self.peer.call("convs", user))

    async def presence(self, users: list[str]) -> dict[str, dict[str, Any]]:
        """``{user: {"online", "last_seen"}}`` of ``users`` (all hosted here; ``last_seen`` in ms)."""
        return cast("dict[str, dict[str, Any]]", await self.peer.call("presence", users))

    async def events(self, items: list[SessionEvent]) -> None:
        """Queue unstored events (presence, receipts, typing) for the online devices of their users."""
        await self.peer.call("events", items)

    def contacts_changed(self, user: str) -> None:
        """``user``'s contacts changed: presence goes to the new set (one-way)."""
        self.peer.notify("contacts_changed", user)

    async def register_push(self, user: str, device: str, provider: str, token: str) -> None:
        """Give ``token`` of ``provider`` to (``user``, ``device``); raises
        :class:`~im_actors.errors.BadRequest` for a provider not enabled here."""
        await self.peer.call("register_push", user, device, provider, token)

    async def unregister_push(self, user: str, device: str) -> None:
        """(``user``, ``device``) gets no more offline push."""
        await self.peer.call("unregister_push", user, device)

    def forget_token(self, token: str, user: str, device: str) -> None:
        """``token`` now belongs to (``user``, ``device``): any other holder drops it (one-way)."""
        self.peer.notify("forget_token", token, user, device)


class GroupShardRef:
    """Typed calls to a group shard (:class:`im_actors.groups.GroupShardActor`), which hosts groups
    and contact pairs; each raises what :meth:`Peer.call` raises (a refused change is a
    :class:`~im_actors.errors.RequestError` of PROTOCOL.md section 6)."""

    __slots__ = ("peer",)

    def __init__(self, peer: Caller) -> None:
        self.peer = peer

    async def create(self, owner: str, name: str, members: list[str]) -> dict[str, Any]:
        """A new group owned by ``owner``: ``{"group", "conv", ...}``."""
        return cast("dict[str, Any]", await self.peer.call("create", owner, name, members))

    async def add(self, actor: str, gid: str, users: list[str]) -> dict[str, Any]:
        """``actor`` adds ``users`` to group ``gid``."""
        return cast("dict[str, Any]", await self.peer.call("add", actor, gid, users))

    async def remove(self, actor: str, gid: str, users: list[str]) -> dict[str, Any]:
        """``actor`` removes ``users`` from group ``gid``."""
        return cast("dict[str, Any]", await self.peer.call("remove", actor, gid, users))

    async def leave(self, user: str, gid: str) -> dict[str, Any]:
        """``user`` leaves group ``gid``."""
        return cast("dict[str, Any]", await self.peer.call("leave", user, gid))

    async def role(self, actor: str, gid: str, user: str, role: str) -> dict[str, Any]:
        """``actor`` gives ``user`` the ``role`` in group ``gid``."""
        return cast("dict[str, Any]", await self.peer.call("role", actor, gid, user, role))

    async def rename(self, actor: str, gid: str, name: str) -> dict[str, Any]:
        """``actor`` renames group ``gid``."""
        return cast("dict[str, Any]", await self.peer.call("rename", actor, gid, name))

    async def info(self, user: str, gid: str) -> dict[str, Any]:
        """The group as member ``user`` sees it (the ``group`` frame's fields)."""
        return cast("dict[str, Any]", await self.peer.call("info", user, gid))

    async def membership(self, gid: str) -> dict[str, Any] | None:
        """The group's document (its membership checkpoint), None for no such group."""
        return cast("dict[str, Any] | None", await self.peer.call("membership", gid))

    async def contact(self, op: str, user: str, other: str) -> None:
        """``contact.<op>`` by ``user`` on ``other`` (:meth:`im_actors.contacts.ContactBook.change`)."""
        await self.peer.call("contact", op, user, other)

    async def contact_list(self, user: str) -> list[dict[str, str]]:
        """``user``'s contacts: ``[{"user", "state"}]``."""
        return cast("list[dict[str, str]]", await self.peer.call("contact_list", user))


class HubRef:
    """Typed calls to a hub (:class:`im_actors.hub.HubActor`); each raises what :meth:`Peer.call` raises."""

    __slots__ = ("peer",)

    def __init__(self, peer: Caller) -> None:
        self.peer = peer

    async def deliver(self, items: HubItems, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> int:
        """Queue committed entries on their connections; returns the frames queued."""
        return cast(int, await self.peer.call("deliver", items, timeout=timeout))

    async def deliver_events(self, items: HubItems, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> int:
        """Queue unstored events (``receipt``, ``typing``) on their connections; returns the frames queued."""
        return cast(int, await self.peer.call("deliver_events", items, timeout=timeout))

    async def load(self, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> dict[str, Any]:
        """The router's heartbeat: ``{"url", "connections", "draining", "incarnation"}`` (no url: restarted)."""
        return cast("dict[str, Any]", await self.peer.call("load", timeout=timeout))

    async def ready(self, timeout: float = DEFAULT_CALL_TIMEOUT_S) -> str:
        """Start listening (once) and register with the router; the hub's URL."""
        return cast(str, await self.peer.call("ready", timeout=timeout))

    def reannounce(self, session_index: int) -> None:
        """Announce this hub's connections to session shard ``session_index`` again (one-way)."""
        self.peer.notify("reannounce", session_index)

    def reannounce_routes(self, conv_index: int) -> None:
        """Announce this hub's routes to conversation shard ``conv_index`` again (one-way)."""
        self.peer.notify("reannounce_routes", conv_index)

    def close_conn(self, conn_id: int, code: int, reason: str) -> None:
        """Close connection ``conn_id`` with ``code`` and ``reason`` (one-way)."""
        self.peer.notify("close_conn", conn_id, code, reason)


class StoreRef:
    """Typed calls to a store writer (:class:`im_actors.store.StoreWriter`)."""

    __slots__ = ("peer",)

    def __init__(self, peer: Caller) -> None:
        self.peer = peer

    async def commit(self, entries: list[dict[str, Any]]) -> CommitResult:
        """Write ``entries`` (MongoDB, then Redis); how it ended. Raises what :meth:`Peer.call`
        raises, :class:`~im_actors.errors.StorageUnavailable` among them."""
        return cast("CommitResult", await self.peer.call("commit", entries))


class RouterRef:
    """Typed calls to the router (:class:`im_actors.router.RouterActor`)."""

    __slots__ = ("peer",)

    def __init__(self, peer: Caller) -> None:
        self.peer = peer

    def register(self, name: str, url: str) -> None:
        """Hub ``name`` serves at ``url`` (one-way)."""
        self.peer.notify("register", name, url)
