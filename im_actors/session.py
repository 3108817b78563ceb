"""Session shards: per-user sessions hosted many to a Ray actor (DESIGN.md section 1).

A :class:`UserSession` knows which hub holds each connected device of one user (the Ray handle
of that hub is the route: no lookup table elsewhere) and the user's push tokens.
:class:`SessionShard` hosts many: it forwards fanned-out entries to hubs, batched per hub, and
turns entries for devices that have a push token but no live connection into push jobs.

Presence: a user is online while at least one device has a live connection (a device counts
offline once its connection is gone: closed, missed pings, or its hub dropped). A change is
announced as a ``presence`` event to the user's accepted contacts that are online, debounced per
user (``presence_debounce_ms``): the state is read when the window ends and announced only if it
differs from the last announcement, so a flapping connection costs at most one event per window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from im_actors import ids
from im_actors.batching import Batcher
from im_actors.config import Config
from im_actors.contacts import accepted_contacts
from im_actors.errors import CLOSE_RATE, CLOSE_REPLACED, BadRequest, CloseConnection, StorageUnavailable, Unavailable
from im_actors.push.planner import JobSink, PushPlanner
from im_actors.refs import ConvShardRef, HubRef, Peers, SessionShardRef, answers_internal, ask_hubs_to_reannounce
from im_actors.store import Store
from im_actors.vitals import Vitals
from im_actors.wire import stamp

__all__ = ["UserSession", "SessionShard", "SessionShardActor", "JobSink"]  # JobSink: from push.planner

log = logging.getLogger(__name__)


@dataclass
class UserSession:
    """One user: connected devices ``{device: (hub name, connection id)}`` and push tokens."""

    user: str
    devices: dict[str, tuple[str, int]] = field(default_factory=dict)
    tokens: dict[str, tuple[str, str]] | None = None  # device -> (provider, token); None = not loaded
    last_seen_ms: int = 0
    contacts: list[str] | None = None  # accepted contacts; None = not loaded
    contacts_version: int = 0  # bumped by each contacts_changed (a load that raced one is not kept)
    announced: bool = False  # the online state last announced to contacts
    presence_due: bool = False  # an announcement is scheduled


class SessionShard:
    """Plain core of a session shard."""

    def __init__(self, config: Config, peers: Peers, store: Store, push: JobSink | None) -> None:
        self.config = config
        self.peers = peers
        self.store = store
        self.push = push
        self.planner = PushPlanner(config, push) if push is not None else None
        self.users: dict[str, UserSession] = {}
        self._to_hubs: Batcher[str] = Batcher(self._send_to_hub, config.fanout_batch_max, config.fanout_batch_ms)
        self._events_to_hubs: Batcher[str] = Batcher(
            self._send_events_to_hub, config.fanout_batch_max, config.fanout_batch_ms
        )
        self.stats = {"fanout_entries": 0, "deliveries": 0, "presence_events": 0, "presence_errors": 0}
        self._presence_tasks: set[asyncio.Task[None]] = set()
        self.index = 0  # this shard's index among the session shards (set by the actor)

    def _session(self, user: str) -> UserSession:
        s = self.users.get(user)
        if s is None:
            s = self.users[user] = UserSession(user)
        return s

    # --- connections -------------------------------------------------------------------------

    def connect(
        self, user: str, device: str, hub: str, conn_id: int, max_connections: int = 0
    ) -> tuple[str, int] | None:
        """Record that ``device`` of ``user`` is connected on ``hub`` as ``conn_id``.

        Returns the connection it replaces, if any; the caller closes that one with 4409. Raises
        :class:`CloseConnection` 4429 when ``max_connections`` (> 0) other devices of the user are
        connected already, over all hubs (``max_connections_per_user``, docs/security.md).
        """
        s = self._session(user)
        old = s.devices.get(device)
        if max_connections and old is None and len(s.devices) >= max_connections:
            raise CloseConnection(CLOSE_RATE, f"over {max_connections} connected devices for this user")
        s.devices[device] = (hub, conn_id)
        if self.planner is not None:
            self.planner.device_connected(user, device)  # online now: no push held for it goes out
        s.last_seen_ms = int(time.time() * 1000)
        self._presence_touch(s)
        return old if old != (hub, conn_id) else None

    def disconnect(self, user: str, device: str, hub: str, conn_id: int) -> None:
        """Forget the connection unless a newer one of the same device replaced it."""
        s = self.users.get(user)
        if s is not None and s.devices.get(device) == (hub, conn_id):
            del s.devices[device]
            s.last_seen_ms = int(time.time() * 1000)
            self._presence_touch(s)

    def hub_gone(self, hub: str) -> int:
        """Forget every connection on ``hub`` (it died); returns how many."""
        n = 0
        for s in self.users.values():
            gone = [d for d, (h, _) in s.devices.items() if h == hub]
            for device in gone:
                del s.devices[device]
                n += 1
            if gone:
                s.last_seen_ms = int(time.time() * 1000)
                self._presence_touch(s)
        return n

    def online(self, user: str) -> dict[str, tuple[str, int]]:
        """The connected devices of ``user``."""
        s = self.users.get(user)
        return dict(s.devices) if s else {}

    # --- presence ----------------------------------------------------------------------------

    def presence(self, users: list[str]) -> dict[str, dict[str, Any]]:
        """``{user: {"online", "last_seen"}}`` for ``users`` hosted here (``presence.get``).

        ``last_seen``: ms of the last connect or disconnect of any device (now for an online
        user); 0 when this shard has not seen the user since it started.
        """
        now = int(time.time() * 1000)
        out: dict[str, dict[str, Any]] = {}
        for user in users:
            s = self.users.get(user)
            online = bool(s and s.devices)
            out[user] = {"online": online, "last_seen": now if online else (s.last_seen_ms if s else 0)}
        return out

    def contacts_changed(self, user: str) -> None:
        """``user``'s accepted contacts changed: load them again, and when the user is online
        announce it (debounced like any change) so a new contact learns it."""
        s = self.users.get(user)
        if s is not None:
            s.contacts = None
            s.contacts_version += 1
            if s.devices:
                s.announced = False
                self._presence_touch(s)

    def _presence_touch(self, s: UserSession) -> None:
        """The devices of ``s`` changed: schedule one announcement at the end of the window."""
        if s.presence_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a synchronous caller): nothing can be announced
        s.presence_due = True
        loop.call_later(self.config.presence_debounce_ms / 1000, self._presence_due, s.user)

    def _presence_due(self, user: str) -> None:
        task = asyncio.get_running_loop().create_task(self._announce(user))
        self._presence_tasks.add(task)
        task.add_done_callback(self._presence_tasks.discard)

    async def _announce(self, user: str) -> None:
        try:
            await self._announce_now(user)
        except Exception:  # noqa: BLE001 - a task nobody awaits: log, never lose the error
            self.stats["presence_errors"] += 1
            log.exception("presence of %s not announced", user, extra={"user": user})

    async def _announce_now(self, user: str) -> None:
        s = self._session(user)
        s.presence_due = False
        online = bool(s.devices)
        if online == s.announced:
            return  # flapped back within the window: nothing to tell
        s.announced = online
        contacts = s.contacts
        try:
            while contacts is None:
                version = s.contacts_version
                loaded = await accepted_contacts(self.store, user)
                if version == s.contacts_version:  # no change arrived while loading
                    contacts = s.contacts = loaded
        except Unavailable as exc:
            log.info("presence of %s not announced: %s", user, exc, extra={"user": user})
            return
        frame = {"t": "presence", "user": user, "online": online, "last_seen": s.last_seen_ms}
        by_shard = ids.split_by_shard(contacts, self.peers.session_index)
        for index, contacts in by_shard.items():
            self.stats["presence_events"] += 1
            if index == self.index:
                self.events([(frame, contacts, None)])
                continue
            try:
                await SessionShardRef(self.peers.sessions[index]).events([(frame, contacts, None)])
            except Unavailable as exc:
                log.info("presence of %s to session shard %d dropped: %s", user, index, exc, extra={"user": user})

    # --- push tokens -------------------------------------------------------------------------

    async def _load_tokens(self, users: list[str]) -> None:
        todo = [u for u in users if self._session(u).tokens is None]
        if not todo:
            return
        found = await self.store.push_tokens(todo)  # in bounded pieces, one bulk read at a time
        for u, tokens in found.items():
            self._session(u).tokens = tokens

    async def register_push(self, user: str, device: str, provider: str, token: str) -> None:
        """Give ``token`` to (``user``, ``device``): it leaves any other holder; one token per device.

        Raises :class:`BadRequest` when ``provider`` is not one of this deployment's
        ``push_providers`` (a job for it could never be delivered; PROTOCOL.md lists the known
        names, the configuration says which are enabled), :class:`StorageUnavailable` when MongoDB
        does not answer.
        """
        if provider not in self.config.push_providers:
            enabled = ", ".join(self.config.push_providers) or "none"
            raise BadRequest(f"push provider {provider} is not enabled on this server (enabled: {enabled})")
        await self.store.register_token(user, device, provider, token)
        await self._load_tokens([user])
        s = self._session(user)
        assert s.tokens is not None
        s.tokens[device] = (provider, token)
        self.forget_token(token, user, device)
        # The token's former holder may be hosted by another shard: it drops its cached copy too, so it
        # makes no job for it (the push worker's ownership check in MongoDB stays the safety net).
        for peer in self.peers.sessions:
            try:
                SessionShardRef(peer).forget_token(token, user, device)
            except Exception as exc:  # a shard of an older version (rolling upgrade): the check suffices
                log.info("forget_token not sent to %s: %r", peer, exc)

    def forget_token(self, token: str, user: str, device: str) -> int:
        """``token`` now belongs to (``user``, ``device``): drop it from every other cached session
        here. Returns how many cached copies were dropped."""
        dropped = 0
        for other in self.users.values():
            if other.tokens:
                for d, (_, t) in list(other.tokens.items()):
                    if t == token and (other.user, d) != (user, device):
                        del other.tokens[d]
                        dropped += 1
        return dropped

    async def unregister_push(self, user: str, device: str) -> None:
        """Remove the push token of (``user``, ``device``); :class:`StorageUnavailable` when MongoDB
        does not answer."""
        await self.store.unregister_tokens(user, device)
        s = self._session(user)
        if s.tokens is not None:
            s.tokens.pop(device, None)

    # --- fan-out -----------------------------------------------------------------------------

    async def fanout(self, items: list[tuple[dict[str, Any], list[str]]]) -> None:
        """Forward committed entries to the hubs of their recipients, batched per hub.

        ``items``: ``[(entry, [user, ...]), ...]`` in commit order. Devices with a push token and
        no live connection get a push job instead (when push is configured).
        """
        await self._load_push_tokens(items)
        self._route(items)

    async def plan_push(self, items: list[tuple[dict[str, Any], list[str]]]) -> None:
        """Offline pushes only, for entries a conversation shard delivered to the hubs itself
        (``fanout_via = "conv"``): devices with a push token and no live connection get a job.
        ``items`` as for :meth:`fanout`."""
        if self.push is not None:
            await self._load_push_tokens(items)
            self._route(items, deliver=False)

    async def _load_push_tokens(self, items: list[tuple[dict[str, Any], list[str]]]) -> None:
        """Load the push tokens of the recipients not cached yet (when push is configured); a
        storage failure skips this batch's offline pushes, never its delivery."""
        if self.push is None:
            return
        unknown = {u for _, users in items for u in users if self._session(u).tokens is None}
        try:
            await self._load_tokens(sorted(unknown))
        except StorageUnavailable as exc:
            log.warning("push tokens not loaded (%s): offline pushes of this batch skipped", exc)

    def _route(self, items: list[tuple[dict[str, Any], list[str]]], deliver: bool = True) -> None:
        """Decide where each entry goes (synchronous), then hand it to the per-hub batcher
        (``deliver``) and offer the offline devices' pushes to the planner."""
        for entry, users in items:
            self.stats["fanout_entries"] += 1
            if "trace" in entry:
                stamp(entry["trace"], "fanout")
            per_hub: dict[str, list[int]] = {}
            for user in users:
                s = self._session(user)
                if deliver:
                    for hub, conn_id in s.devices.values():
                        per_hub.setdefault(hub, []).append(conn_id)
                if self.planner is not None and s.tokens:
                    for device, (provider, token) in s.tokens.items():
                        if device not in s.devices:  # never a connected device
                            self.planner.offer(user, device, provider, token, entry)
            for hub, conns in per_hub.items():
                self.stats["deliveries"] += len(conns)
                self._to_hubs.add(hub, (entry, conns))

    def events(self, items: list[tuple[dict[str, Any], list[str], tuple[str, int] | None]]) -> None:
        """Forward unstored events (receipt, typing) to the online devices of their users.

        ``items``: ``[(frame, [user, ...], origin)]``; ``origin`` (hub, connection id) is skipped.
        Offline devices get nothing: events are not entries and are never pushed.
        """
        for frame, users, origin in items:
            per_hub: dict[str, list[int]] = {}
            for user in users:
                s = self.users.get(user)
                if s is None:
                    continue
                for hub, conn_id in s.devices.values():
                    if (hub, conn_id) != origin:
                        per_hub.setdefault(hub, []).append(conn_id)
            for hub, conns in per_hub.items():
                self._events_to_hubs.add(hub, (frame, conns))

    async def _send_events_to_hub(self, hub: str, items: list[tuple[dict[str, Any], list[int]]]) -> None:
        try:
            await HubRef(self.peers.hub(hub)).deliver_events(items)
        except Unavailable as exc:
            log.info("%d events to %s dropped: %s", len(items), hub, exc)

    async def _send_to_hub(self, hub: str, items: list[tuple[dict[str, Any], list[int]]]) -> None:
        try:
            await HubRef(self.peers.hub(hub)).deliver(items)
        except Unavailable as exc:
            # The hub's clients reconnect elsewhere and catch up with sync.
            log.warning("delivery of %d entries to %s failed: %s", len(items), hub, exc)

    # --- conversations -----------------------------------------------------------------------

    async def convs(self, user: str) -> list[dict[str, Any]]:
        """Every conversation of ``user``: ``[{"conv", "last", "read"}]``, sorted by conv."""
        conv_ids, reads = await self.store.user_convs(user)
        by_shard = ids.split_by_shard(conv_ids, self.peers.conv_index)
        answers = await asyncio.gather(
            *(ConvShardRef(self.peers.convs[i]).last_seqs(user, convs) for i, convs in by_shard.items())
        )
        lasts: dict[str, int] = {}
        for answer in answers:
            lasts.update(answer)
        return [{"conv": c, "last": lasts[c], "read": reads.get(c, 0)} for c in sorted(lasts)]


@ray.remote(num_cpus=0, max_restarts=-1)
@answers_internal
class SessionShardActor(Vitals):
    """Ray shell of :class:`SessionShard`; owns the push publisher when push is configured."""

    async def __init__(self, config: Config, index: int = 0) -> None:  # type: ignore[misc]  # Ray awaits it
        from im_actors import metrics

        self._config = config
        self._index = index
        self._announced: set[str] = set()  # hubs that re-announced their connections to this incarnation
        self._store = Store(config)
        self._publisher: Any = None
        self._publisher_started = False
        if config.push_workers > 0 and config.rabbitmq_url:
            from im_actors.push.publisher import PushPublisher

            self._publisher = PushPublisher(config)
        self._core = SessionShard(config, Peers(config), self._store, self._publisher)
        self._core.index = index
        self._metrics = metrics.for_actor(config, "session", self.stats)
        self._metrics.start()

    async def ready(self) -> bool:
        """Start-up: start the push publisher (it connects in the background). Returns True."""
        await self._start_publisher()
        return True

    async def heartbeat(self) -> bool:
        """The router's call on every heartbeat: the first time this incarnation is asked, every hub
        re-announces its connections here, so a restarted shard knows its users' devices again
        within one heartbeat (DESIGN.md section 4); the publisher is started if a restart left it
        stopped. Returns True."""
        await self._start_publisher()
        await ask_hubs_to_reannounce(self._core.peers.hubs, self._announced, "reannounce", self._index)
        return True

    async def _start_publisher(self) -> None:
        if self._publisher is not None and not self._publisher_started:
            self._publisher_started = True
            await self._publisher.start()

    async def connect_many(self, conns: list[tuple[str, str, str, int]]) -> None:
        """A hub re-announces its connections ``[(user, device, hub, conn id)]`` after a restart."""
        for user, device, hub, conn_id in conns:
            await self.connect(user, device, hub, conn_id)

    async def connect(self, user: str, device: str, hub: str, conn_id: int, max_connections: int = 0) -> None:
        """See :meth:`SessionShard.connect`; closes a replaced connection with 4409. (Async, like
        every method that changes devices, so it runs on the event loop that announces presence.)"""
        old = self._core.connect(user, device, hub, conn_id, max_connections)
        if old is not None:
            HubRef(self._core.peers.hub(old[0])).close_conn(old[1], CLOSE_REPLACED, "replaced by a newer connection")

    async def disconnect(self, user: str, device: str, hub: str, conn_id: int) -> None:
        """See :meth:`SessionShard.disconnect`."""
        self._core.disconnect(user, device, hub, conn_id)

    async def hub_gone(self, hub: str) -> int:
        """See :meth:`SessionShard.hub_gone`."""
        return self._core.hub_gone(hub)

    async def fanout(self, items: list[tuple[dict[str, Any], list[str]]]) -> None:
        """See :meth:`SessionShard.fanout`."""
        await self._start_publisher()  # after a restart, before the router's next ready
        await self._core.fanout(items)

    async def plan_push(self, items: list[tuple[dict[str, Any], list[str]]]) -> None:
        """See :meth:`SessionShard.plan_push`."""
        await self._start_publisher()
        await self._core.plan_push(items)

    def events(self, items: list[tuple[dict[str, Any], list[str], tuple[str, int] | None]]) -> None:
        """See :meth:`SessionShard.events`."""
        self._core.events(items)

    def presence(self, users: list[str]) -> dict[str, dict[str, Any]]:
        """See :meth:`SessionShard.presence`."""
        return self._core.presence(users)

    def contacts_changed(self, user: str) -> None:
        """See :meth:`SessionShard.contacts_changed`."""
        self._core.contacts_changed(user)

    async def register_push(self, user: str, device: str, provider: str, token: str) -> None:
        """See :meth:`SessionShard.register_push`."""
        await self._core.register_push(user, device, provider, token)

    def forget_token(self, token: str, user: str, device: str) -> int:
        """See :meth:`SessionShard.forget_token` (another shard registered ``token`` for its user)."""
        return self._core.forget_token(token, user, device)

    async def unregister_push(self, user: str, device: str) -> None:
        """See :meth:`SessionShard.unregister_push`."""
        await self._core.unregister_push(user, device)

    async def convs(self, user: str) -> list[dict[str, Any]]:
        """See :meth:`SessionShard.convs`."""
        return await self._core.convs(user)

    async def flush_push(self, timeout_s: float = 10.0) -> bool:
        """Publish the jobs held for coalescing, then wait until every push job is confirmed by RabbitMQ;
        True when the outbox is empty."""
        if self._publisher is None:
            return True
        if self._core.planner is not None:
            self._core.planner.flush()
        return bool(await self._publisher.flush(timeout_s))

    def stats(self) -> dict[str, Any]:
        """Counters: entries fanned out, deliveries handed to hubs, push jobs, publisher stats."""
        out: dict[str, Any] = {**self._core.stats, "users": len(self._core.users)}
        if self._core.planner is not None:
            out["push_jobs"] = self._core.planner.stats["jobs"]
            out["push_planner"] = {**self._core.planner.stats, "held": self._core.planner.held}
        if self._publisher is not None:
            out["push"] = self._publisher.stats()
        return out
