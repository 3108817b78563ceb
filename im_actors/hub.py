"""Hubs: they hold clients' WebSocket connections (PROTOCOL.md sections 2-7).

A :class:`Hub` authenticates each connection, validates its frames with :mod:`im_actors.protocol`,
batches sends per conversation shard (``hub_batch_max`` frames or ``hub_batch_ms``) and answers
other requests by calling the shard that owns them. Deliveries from session shards arrive in
batches; each entry is encoded once per subprotocol and the same bytes are queued on every
target connection.

Backpressure is visible (STYLE.md rule 9): each connection has a send queue bounded in frames
(``send_queue_frames``) and bytes (``send_queue_bytes``); a connection that overflows it is
closed with 4508 and catches up with ``sync`` when it returns.

Hostile clients (docs/security.md) cost at most their own connection: frames over
``max_frame_bytes`` are refused by the WebSocket layer from their header (1009) and at most
``read_queue_frames`` are buffered per connection; frames are decoded within ``max_frame_items``
and ``max_frame_depth`` (4400 above); every request passes the user's token buckets
(:mod:`im_actors.limits`, ``rate_limited``, 4429 for a connection that keeps going); handshakes pass
a per-address bucket (HTTP 429) and, when configured, an ``Origin`` allow-list (HTTP 403).

Lifecycle: ``GET /ready`` on the hub's port answers 200 ``ready`` while the hub serves and 503
``draining`` once :meth:`Hub.drain` started (load balancers and ``im-actors restart hubs`` probe
it). A draining hub refuses new WebSocket handshakes with 503 (clients ask the router for another
hub) and closes its clients with 1001 at random times spread over the drain window.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse
from websockets.protocol import State
from websockets.server import ServerProtocol

from im_actors import ids, protocol
from im_actors.auth import verify_token_expiry
from im_actors.batching import Batcher
from im_actors.config import Config
from im_actors.errors import (
    CLOSE_AUTH,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_GOING_AWAY,
    CLOSE_PROTOCOL,
    CLOSE_RATE,
    CLOSE_SLOW,
    TOKEN_EXPIRED,
    BadRequest,
    CloseConnection,
    Internal,
    RateLimited,
    RequestError,
    Unavailable,
)
from im_actors.limits import AddressRates, RefusalWindow, UserRates
from im_actors.refs import ConvShardRef, GroupShardRef, Peers, RouterRef, SessionShardRef
from im_actors.tls import server_context
from im_actors.vitals import Vitals
from im_actors.wire import SendItem, err_answer, stamp

__all__ = ["Connection", "Hub", "HubActor", "WS_PATH", "READY_PATH"]

log = logging.getLogger(__name__)

WS_PATH = "/v1/ws"
#: Readiness check on the hub's own port: 200 while it serves, 503 while it drains.
READY_PATH = "/ready"

#: How long a new connection waits for a conversation shard to take its route (s), see Hub._route.
ROUTE_TIMEOUT_S = 2.0


@dataclass(eq=False)
class Connection:
    """One authenticated client connection and its bounded send queue."""

    id: int
    user: str
    device: str
    ws: ServerConnection
    subprotocol: str
    max_frames: int
    max_bytes: int
    queue: deque[bytes | str] = field(default_factory=deque)
    queued_bytes: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    pending: int = 0  # requests read and not answered yet
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set while pending is under the bound
    refusals: RefusalWindow | None = None  # rate_limited answers in the current window
    writing: bool = False  # the writer task is sending the queue (a direct write would overtake it)

    def answered(self) -> None:
        """One request got its answer: reading may go on if it had stopped."""
        self.pending -= 1
        self.room.set()

    def enqueue(self, data: bytes | str) -> bool:
        """Queue one encoded frame; False when the queue is full (the caller closes with 4508)."""
        if self.closing:
            return True
        size = len(data)
        if len(self.queue) >= self.max_frames or self.queued_bytes + size > self.max_bytes:
            return False
        self.queue.append(data)
        self.queued_bytes += size
        self.wake.set()
        return True


class Hub:
    """Plain core of a hub: its connections, their requests and deliveries."""

    def __init__(self, config: Config, name: str, peers: Peers) -> None:
        self.config = config
        self.name = name
        self.peers = peers
        self.url = ""
        self.conns: dict[int, Connection] = {}
        # Connection ids start at a random point so that a restarted hub never reuses an id that a
        # session shard may still hold for a connection of its previous incarnation.
        self._ids = itertools.count(secrets.randbits(52) << 10)
        #: Tells this process of the hub from a restarted one (the router clears a drain mark on a new one).
        self.incarnation = secrets.token_hex(6)
        #: Set for good by :meth:`drain`: no new connections, ``GET /ready`` answers 503.
        self.draining = False
        self._server: Server | None = None
        self._sends: Batcher[int] = Batcher(
            self._send_batch, config.hub_batch_max, config.hub_batch_ms, config.hub_inflight
        )
        self._trace_sample = config.trace_sample
        self._via_routes = config.fanout_via == "conv"
        self._direct_write = config.hub_direct_write and DIRECT_WRITE_SUPPORTED
        self._batch_ms_ewma = 1.0  # recent duration of a send batch's call (ms), for retry_after_ms
        self._limits = protocol.Limits(
            max_body_bytes=config.max_body_bytes,
            max_members=config.max_group_members,
            max_items=config.max_frame_items,
            max_depth=config.max_frame_depth,
        )
        self._rates = UserRates(
            config.rate_send_per_s, config.rate_send_burst, config.rate_request_per_s, config.rate_request_burst
        )
        self._addresses = AddressRates(
            config.conn_rate_per_address_per_s, config.conn_burst_per_address, config.max_conns_per_address
        )
        self._exempt = [ipaddress.ip_network(net, strict=False) for net in config.conn_limit_exempt]
        self.stats: dict[str, float] = {
            "frames_in": 0,
            "frames_out": 0,
            "sends": 0,
            "slow_closed": 0,
            "tokens_expired": 0,
            "rate_limited": 0,
            "rate_closed": 0,
            "handshakes_refused": 0,
            "connections_total": 0,
            "send_batches": 0,
            "send_batch_ms_total": 0.0,
            "overload_refused": 0,
            "routes_retried": 0,
        }
        self.answers: dict[str, int] = {}  # acks ("ack") and error frames by code, for im_actors.metrics

    # --- server ------------------------------------------------------------------------------

    async def start(self, port: int) -> str:
        """Listen on ``config.host:port`` (0 = any free port); returns the hub's WebSocket URL
        (``wss://`` when TLS is configured). Raises :class:`ConfigError` for unusable TLS files."""
        ssl_context = server_context(self.config)
        origins: list[Any] | None = None
        if self.config.allowed_origins:
            origins = [*self.config.allowed_origins, None]  # None: clients that send no Origin
        self._server = await serve(
            self._handler,
            self.config.host,
            port,
            subprotocols=[protocol.SUBPROTOCOL_MSGPACK, protocol.SUBPROTOCOL_JSON],  # type: ignore[list-item]
            # websockets refuses a frame from its header alone when it claims more (1009), and
            # stops reading the socket while read_queue_frames frames wait to be handled.
            max_size=self.config.max_frame_bytes,
            max_queue=self.config.read_queue_frames,
            ping_interval=self.config.ping_interval_s,
            ping_timeout=self.config.ping_timeout_s,
            process_request=self._check_request,
            origins=origins,
            ssl=ssl_context,
        )
        sock_port = self._server.sockets[0].getsockname()[1]
        host = self.config.advertise_host or self.config.host
        self.url = f"{'wss' if ssl_context else 'ws'}://{host}:{sock_port}{WS_PATH}"
        return self.url

    def _check_request(self, conn: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        """Handshake checks: the readiness path (200/503), the path (404), a draining hub (503),
        then the per-address connection limits (429)."""
        path = request.path.split("?", 1)[0]
        if path == READY_PATH:
            return conn.respond(503, "draining\n") if self.draining else conn.respond(200, "ready\n")
        if path != WS_PATH:
            return conn.respond(404, f"WebSocket endpoint is {WS_PATH}\n")
        if self.draining:
            return conn.respond(503, "hub draining, ask the router for another hub\n")
        address = _address_key(conn)
        if self._is_exempt(address):
            return None
        wait = self._addresses.admit(address, time.monotonic())
        if wait > 0:
            self.stats["handshakes_refused"] += 1
            response = conn.respond(429, "too many connections from this address\n")
            response.headers["Retry-After"] = str(max(1, round(wait + 0.5)))
            return response
        return None

    async def stop(self) -> None:
        """Close every connection with 1001 (going away) and stop listening."""
        for conn in list(self.conns.values()):
            await self._close(conn, CLOSE_GOING_AWAY, "hub shutting down")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def drain(self, window_s: float, rng: random.Random | None = None) -> dict[str, Any]:
        """Drain the hub: refuse new connections, then close every client with 1001 ("hub
        draining") at a time drawn uniformly from ``[0, window_s]`` s, so that the clients reconnect
        to other hubs spread over the window rather than in one storm (the router stops handing
        a draining hub out: :meth:`load` reports ``draining``).

        Connections that finished their handshake after the drain began are closed at the end of
        the window. The hub stays draining (``GET /ready`` 503) until its process is replaced.
        Returns ``{"hub", "connections", "closed", "window_s", "first_close_s", "last_close_s",
        "spread_s"}``: close times in s since the drain began (None when there was no client).
        """
        self.draining = True
        rng = rng or random.Random()
        loop = asyncio.get_running_loop()
        began = loop.time()
        closed_at: list[float] = []

        async def close_later(delay_s: float, conn: Connection) -> None:
            await asyncio.sleep(delay_s)
            if conn.closing or conn.id not in self.conns:
                return  # it went on its own meanwhile
            closed_at.append(loop.time() - began)
            await self._close(conn, CLOSE_GOING_AWAY, "hub draining")

        planned = list(self.conns.values())
        await asyncio.gather(
            *(close_later(rng.uniform(0.0, window_s) if window_s > 0 else 0.0, conn) for conn in planned)
        )
        late = [c for c in self.conns.values() if not c.closing]
        await asyncio.gather(*(close_later(0.0, conn) for conn in late))
        first = min(closed_at, default=None)
        last = max(closed_at, default=None)
        return {
            "hub": self.name,
            "connections": len(planned) + len(late),
            "closed": len(closed_at),
            "window_s": window_s,
            "first_close_s": None if first is None else round(first, 3),
            "last_close_s": None if last is None else round(last, 3),
            "spread_s": None if first is None or last is None else round(last - first, 3),
        }

    def load(self) -> dict[str, Any]:
        """``{"hub", "url", "connections", "draining", "incarnation"}`` for the router's heartbeat."""
        return {
            "hub": self.name,
            "url": self.url,
            "connections": len(self.conns),
            "draining": self.draining,
            "incarnation": self.incarnation,
        }

    # --- one connection ----------------------------------------------------------------------

    def _is_exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_network(address, strict=False)
        except ValueError:
            return False
        return any(ip.version == net.version and ip.subnet_of(net) for net in self._exempt)  # type: ignore[arg-type]

    async def _handler(self, ws: ServerConnection) -> None:
        address = _address_key(ws)
        counted = not self._is_exempt(address)
        if counted:
            self._addresses.opened(address)
        try:
            await self._serve(ws)
        finally:
            if counted:
                self._addresses.closed(address)

    async def _serve(self, ws: ServerConnection) -> None:
        if self.config.socket_send_buffer_bytes:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.socket_send_buffer_bytes)
        sub = ws.subprotocol
        if sub not in protocol.SUBPROTOCOLS:
            await ws.close(CLOSE_PROTOCOL, "subprotocol must be im.v1.msgpack or im.v1.json")
            return
        try:
            user, device, expires = await self._authenticate(ws, sub)
        except CloseConnection as exc:
            await ws.close(exc.close_code, exc.reason)
            return
        except ConnectionClosed:
            return
        conn = Connection(
            id=next(self._ids),
            user=user,
            device=device,
            ws=ws,
            subprotocol=sub,
            max_frames=self.config.send_queue_frames,
            max_bytes=self.config.send_queue_bytes,
            refusals=RefusalWindow(self.config.rate_refusals_max, self.config.rate_refusals_window_s),
        )
        self.conns[conn.id] = conn
        self.stats["connections_total"] += 1
        now = time.monotonic()
        if len(self._rates.users) > 2 * len(self.conns) + 1000:
            self._rates.prune(now)
        self._rates.opened(user, now)
        loop = asyncio.get_running_loop()
        writer = loop.create_task(self._writer(conn))
        # The token's lifetime is the connection's: past exp (and the configured leeway) it is closed
        # 4401 "token expired", and the client comes back with a fresh token (PROTOCOL.md section 7).
        expiry = loop.call_later(max(0.0, expires + self.config.jwt_leeway_s - time.time()), self._expire, conn)
        try:
            try:
                await SessionShardRef(self.peers.session(user)).connect(
                    user, device, self.name, conn.id, self.config.max_connections_per_user
                )
            except Unavailable:
                await ws.close(CLOSE_GOING_AWAY, "session unavailable, reconnect")
                return
            except CloseConnection as exc:  # over max_connections_per_user
                await ws.close(exc.close_code, exc.reason)
                return
            if self._via_routes:
                await self._route(conn)
            ready = {"t": "ready", "user": user, "device": device, "hub": self.name, "server_ms": _now_ms()}
            self._push(conn, ready)
            await self._read_loop(conn)
        finally:
            conn.closing = True
            self.conns.pop(conn.id, None)
            self._rates.closed(user)
            expiry.cancel()
            writer.cancel()
            for task in list(conn.tasks):
                task.cancel()
            SessionShardRef(self.peers.session(user)).disconnect(user, device, self.name, conn.id)
            if self._via_routes:
                for shard in self.peers.convs:
                    ConvShardRef(shard).unroute((user, device, self.name, conn.id))

    async def _route(self, conn: Connection) -> None:
        """Give every conversation shard the new connection's route before ``ready``, so every
        entry fanned out after the client's catch-up reaches it live (``fanout_via = "conv"``).

        A shard that does not answer within :data:`ROUTE_TIMEOUT_S` (restarting, or on a lost node)
        does not hold the connection up: the route is retried in the background until it lands or
        the connection ends, and a restarted shard asks every hub for its routes anyway. Meanwhile
        that shard's entries miss this connection's live copy, never the client: it catches up with
        ``sync`` (:mod:`im_actors.routes`)."""
        route = (conn.user, conn.device, self.name, conn.id)
        routed = await asyncio.gather(
            *(ConvShardRef(shard).route(route, timeout=ROUTE_TIMEOUT_S) for shard in self.peers.convs),
            return_exceptions=True,
        )
        for index, result in enumerate(routed):
            if isinstance(result, BaseException):
                self.stats["routes_retried"] += 1
                task = asyncio.get_running_loop().create_task(self._route_later(conn, index))
                conn.tasks.add(task)
                task.add_done_callback(conn.tasks.discard)

    async def _route_later(self, conn: Connection, index: int) -> None:
        delay = 0.1
        while not conn.closing:
            await asyncio.sleep(delay)
            try:
                await ConvShardRef(self.peers.convs[index]).route((conn.user, conn.device, self.name, conn.id))
                return
            except Unavailable:
                delay = min(2 * delay, 2.0)

    def _expire(self, conn: Connection) -> None:
        """The connection's token ran out: close it 4401 (unless it is closing already)."""
        if conn.closing:
            return
        self.stats["tokens_expired"] += 1
        task = asyncio.get_running_loop().create_task(self._close(conn, CLOSE_AUTH, TOKEN_EXPIRED))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    async def _authenticate(self, ws: ServerConnection, sub: str) -> tuple[str, str, float]:
        """``(user, device, token exp in s since the epoch)`` from the auth frame; raises
        :class:`CloseConnection` 4408 (no auth in time), 4400 (bad frame) or 4401 (bad token)."""
        try:
            data = await asyncio.wait_for(ws.recv(), self.config.auth_timeout_s)
        except TimeoutError:
            raise CloseConnection(CLOSE_AUTH_TIMEOUT, "no auth frame in time") from None
        try:
            frame = protocol.decode(data, sub, self._limits)
        except RequestError as exc:  # e.g. a bad {"b64"} body: before auth, any bad frame closes
            raise CloseConnection(CLOSE_PROTOCOL, f"bad auth frame: {exc.msg}") from None
        token, device = protocol.parse_auth(frame)
        user, expires = verify_token_expiry(self.config, token)
        return user, device, expires

    async def _read_loop(self, conn: Connection) -> None:
        try:
            async for data in conn.ws:
                self.stats["frames_in"] += 1
                while conn.pending >= self.config.max_pending_requests:
                    # Backpressure: stop reading this socket (TCP pushes back on the client) until
                    # answers go out, so a client cannot queue unbounded work in the hub.
                    conn.room.clear()
                    await conn.room.wait()
                try:
                    frame = protocol.decode(data, conn.subprotocol, self._limits)
                    request = protocol.parse_request(frame, self._limits)
                except CloseConnection as exc:
                    await self._close_and_drain(conn, exc.close_code, exc.reason)
                    return
                except RequestError as exc:
                    self._push(conn, exc.frame(exc.request_id))
                    continue
                except Exception:  # noqa: BLE001 - a bug in validation costs one answer, not the hub
                    log.exception(
                        "frame from %s/%s not handled",
                        conn.user,
                        conn.device,
                        extra={"user": conn.user, "device": conn.device},
                    )
                    self._push(conn, Internal("frame not handled").frame(None))
                    continue
                admitted = await self._admit(conn, request)
                if admitted == "closed":
                    return
                if admitted == "dispatch":
                    self._dispatch(conn, request)
        except ConnectionClosed:
            pass

    async def _admit(self, conn: Connection, req: protocol.Request) -> Literal["dispatch", "refused", "closed"]:
        """Pass ``req`` through the user's token buckets.

        ``"dispatch"``: go on. ``"refused"``: answered ``rate_limited`` with ``retry_after_ms`` (a
        ``typing`` without id is dropped unanswered). ``"closed"``: the refusal was one over
        ``rate_refusals_max`` in the window, and the connection is closed with 4429.
        """
        now = time.monotonic()
        wait_ms = self._rates.check(conn.user, req.t, now)
        if not wait_ms:
            return "dispatch"
        self.stats["rate_limited"] += 1
        # What identifies a resend of this request (limits.RefusalWindow): (conv, cmid) for a send
        # (how clients retry, PROTOCOL.md section 3), the type and scalar fields for the others.
        f = req.fields
        key = (
            ("send", f["conv"], f["cmid"])
            if req.t == "send"
            else (req.t, *sorted((k, v) for k, v in f.items() if isinstance(v, (str, int))))
        )
        if conn.refusals is not None and conn.refusals.refused(now, key, wait_ms / 1000):
            self.stats["rate_closed"] += 1
            await self._close_and_drain(conn, CLOSE_RATE, "rate limit abused")
            return "closed"
        if req.id is not None:
            self._push(conn, RateLimited(f"over the {req.t} rate", retry_after_ms=wait_ms).frame(req.id))
        return "refused"

    async def _writer(self, conn: Connection) -> None:
        try:
            while True:
                await conn.wake.wait()
                conn.wake.clear()
                conn.writing = True
                while conn.queue:
                    data = conn.queue.popleft()
                    conn.queued_bytes -= len(data)
                    await conn.ws.send(data)
                    self.stats["frames_out"] += 1
                conn.writing = False
        except ConnectionClosed:
            pass

    def _push(self, conn: Connection, frame: dict[str, Any]) -> None:
        if frame["t"] in ("ack", "err"):
            self.answers[frame.get("code", "ack")] = self.answers.get(frame.get("code", "ack"), 0) + 1
        self._enqueue(conn, protocol.encode(frame, conn.subprotocol))

    def _writes_now(self, conn: Connection) -> bool:
        """A frame for ``conn`` may be written at once: direct writes on, nothing of it waiting."""
        return self._direct_write and not conn.queue and not conn.writing and not conn.closing

    def _enqueue(self, conn: Connection, data: bytes | str) -> None:
        if self._writes_now(conn) and write_now(conn.ws, (data,)):
            self.stats["frames_out"] += 1
            return
        self._queue(conn, data)

    def _enqueue_many(self, conn: Connection, frames: list[bytes | str]) -> int:
        """:meth:`_enqueue` of ``frames`` in order, in one write when the connection is idle; returns
        how many were written or queued (the rest are dropped once a full queue closes it 4508)."""
        if self._writes_now(conn) and write_now(conn.ws, frames):
            self.stats["frames_out"] += len(frames)
            return len(frames)
        for n, data in enumerate(frames):
            if conn.closing:
                return n
            self._queue(conn, data)
        return len(frames)

    def _queue(self, conn: Connection, data: bytes | str) -> None:
        """Queue ``data`` for the connection's writer task; past its bound, close it 4508."""
        if not conn.enqueue(data):
            self.stats["slow_closed"] += 1
            conn.closing = True
            task = asyncio.get_running_loop().create_task(self._close(conn, CLOSE_SLOW, "send queue overflow"))
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)

    async def _close_and_drain(self, conn: Connection, code: int, reason: str) -> None:
        """Close from the read loop: send the close frame and discard what the client still sends,
        so that its close reply is read (the WebSocket layer stops reading while its queue of
        unread frames is full, which would hold the connection for its whole close timeout)."""
        closing = asyncio.ensure_future(self._close(conn, code, reason))
        try:
            async for _data in conn.ws:
                pass
        except ConnectionClosed:
            pass
        await closing

    async def _close(self, conn: Connection, code: int, reason: str) -> None:
        conn.closing = True
        try:
            await conn.ws.close(code, reason)
        except ConnectionClosed:
            pass

    # --- requests ----------------------------------------------------------------------------

    def _dispatch(self, conn: Connection, req: protocol.Request) -> None:
        conn.pending += 1
        if req.t == "send":
            f = req.fields
            self.stats["sends"] += 1
            shard = self.peers.conv_index(f["conv"])
            if self._sends.queued(shard) >= self.config.hub_send_queue_max:
                self._refuse_overload(conn, req.id, shard)
                return
            item = SendItem(conn.user, f["conv"], f["cmid"], f["body"], f["kind"], f["meta"])
            if self._trace_sample and random.random() < self._trace_sample:
                item.trace = {}
                stamp(item.trace, "hub_in")
            self._sends.add(shard, (conn, req.id, item))
            return
        task = asyncio.get_running_loop().create_task(self._answer(conn, req))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    def _refuse_overload(self, conn: Connection, rid: int | None, shard: int) -> None:
        """Admission control: conversation shard ``shard`` is behind by ``hub_send_queue_max`` sends
        queued here. The send is refused at once, not queued behind them where it would wait for
        seconds and time out (and be resent: the congestion collapse of an unbounded queue). The
        answer is ``unavailable`` (nothing committed; resend the same cmid) with ``retry_after_ms``,
        the time the queue takes to drain at the shard's recent pace, with up to 50 % jitter so
        refused clients do not come back together."""
        self.stats["overload_refused"] += 1
        batches = self._sends.queued(shard) / self.config.hub_batch_max + 1
        wait_ms = int(min(max(batches * self._batch_ms_ewma, 10.0), 5000.0) * random.uniform(1.0, 1.5))
        self._push(conn, Unavailable("server overloaded, resend later", retry_after_ms=wait_ms).frame(rid))
        conn.answered()

    async def _send_batch(self, shard: int, batch: list[tuple[Connection, int, SendItem]]) -> None:
        started = time.perf_counter()
        try:
            answers = await ConvShardRef(self.peers.convs[shard]).send_batch([item for _, _, item in batch], self.name)
        except RequestError as exc:
            answers = [err_answer(exc)] * len(batch)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._batch_ms_ewma += 0.2 * (elapsed_ms - self._batch_ms_ewma)
        self.stats["send_batches"] += 1
        self.stats["send_batch_ms_total"] += elapsed_ms
        for (conn, rid, _item), ans in zip(batch, answers, strict=False):
            self._push(conn, protocol.answer_frame(rid, ans))
            conn.answered()
            copies = ans.get("copies")
            if copies is not None:  # this hub's share of the entry's fan-out, after its ack
                self.deliver([copies])

    async def _answer(self, conn: Connection, req: protocol.Request) -> None:
        try:
            frame = await self._handle(conn, req)
        except RequestError as exc:
            if isinstance(exc, Internal):  # a bug in the actor that answered (its log has the details)
                log.error(
                    "request %s id=%s of %s answered internal by a peer",
                    req.t,
                    req.id,
                    conn.user,
                    extra=_request_ids(conn, req),
                )
            frame = exc.frame(req.id)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - answered as internal, logged with the request id
            log.exception("request %s id=%s of %s failed", req.t, req.id, conn.user, extra=_request_ids(conn, req))
            frame = Internal("internal error").frame(req.id)
        if frame is not None:
            self._push(conn, frame)
        conn.answered()

    async def _handle(self, conn: Connection, req: protocol.Request) -> dict[str, Any] | None:
        f, rid, user = req.fields, req.id, conn.user
        if req.t == "sync":
            res = await ConvShardRef(self.peers.conv(f["conv"])).sync(user, f["conv"], f["after"], f["limit"])
            return self._msgs(rid, f["conv"], res)
        if req.t == "history":
            res = await ConvShardRef(self.peers.conv(f["conv"])).history(user, f["conv"], f["before"], f["limit"])
            return self._msgs(rid, f["conv"], res)
        if req.t == "convs":
            convs = await SessionShardRef(self.peers.session(user)).convs(user)
            return {"t": "convs", "id": rid, "convs": convs}
        if req.t == "read":
            await ConvShardRef(self.peers.conv(f["conv"])).read(user, f["conv"], f["seq"], (self.name, conn.id))
            return {"t": "ok", "id": rid}
        if req.t == "typing":
            await ConvShardRef(self.peers.conv(f["conv"])).typing(user, f["conv"], (self.name, conn.id))
            return None if rid is None else {"t": "ok", "id": rid}
        if req.t == "group.create":
            shard = self.peers.groups[ids.shard_of(f"{user}:{rid}:{_now_ms()}", len(self.peers.groups))]
            res = await GroupShardRef(shard).create(user, f["name"], f["members"])
            return {"t": "ok", "id": rid, "group": res["group"], "conv": res["conv"]}
        if req.t == "group.add":
            await GroupShardRef(self.peers.group(f["group"])).add(user, f["group"], f["users"])
            return {"t": "ok", "id": rid}
        if req.t == "group.info":
            res = await GroupShardRef(self.peers.group(f["group"])).info(user, f["group"])
            return {"t": "group", "id": rid, **res}
        if req.t == "group.remove":
            await GroupShardRef(self.peers.group(f["group"])).remove(user, f["group"], f["users"])
            return {"t": "ok", "id": rid}
        if req.t == "group.leave":
            await GroupShardRef(self.peers.group(f["group"])).leave(user, f["group"])
            return {"t": "ok", "id": rid}
        if req.t == "group.role":
            await GroupShardRef(self.peers.group(f["group"])).role(user, f["group"], f["user"], f["role"])
            return {"t": "ok", "id": rid}
        if req.t == "group.rename":
            await GroupShardRef(self.peers.group(f["group"])).rename(user, f["group"], f["name"])
            return {"t": "ok", "id": rid}
        if req.t.startswith("contact.") and req.t != "contact.list":
            op = req.t.removeprefix("contact.")
            await GroupShardRef(self.peers.contact_host(user, f["user"])).contact(op, user, f["user"])
            return {"t": "ok", "id": rid}
        if req.t == "contact.list":
            contacts = await GroupShardRef(self.peers.contact_host(user, user)).contact_list(user)
            return {"t": "contacts", "id": rid, "contacts": contacts}
        if req.t == "presence.get":
            by_shard = ids.split_by_shard(f["users"], self.peers.session_index)
            answers = await asyncio.gather(
                *(SessionShardRef(self.peers.sessions[i]).presence(users) for i, users in by_shard.items())
            )
            return {"t": "presence", "id": rid, "users": {u: p for a in answers for u, p in a.items()}}
        if req.t == "push.register":
            await SessionShardRef(self.peers.session(user)).register_push(user, conn.device, f["provider"], f["token"])
            return {"t": "ok", "id": rid}
        if req.t == "push.unregister":
            await SessionShardRef(self.peers.session(user)).unregister_push(user, conn.device)
            return {"t": "ok", "id": rid}
        raise BadRequest(f"{req.t} is not implemented by this server version yet")

    @staticmethod
    def _msgs(rid: int | None, conv: str, res: dict[str, Any]) -> dict[str, Any]:
        return {
            "t": "msgs",
            "id": rid,
            "conv": conv,
            "msgs": [protocol.msg_frame(e) for e in res["msgs"]],
            "last": res["last"],
            "more": res["more"],
        }

    # --- deliveries --------------------------------------------------------------------------

    def deliver(self, items: list[tuple[dict[str, Any], list[int]]]) -> int:
        """Queue committed entries on their target connections: ``[(entry, [conn id, ...])]``.

        Returns the number of frames queued; ids of connections that are gone are skipped (their
        clients catch up with sync).
        """
        for entry, _ in items:
            if "trace" in entry:
                stamp(entry["trace"], "hub_queued")
        return self._queue_frames((protocol.msg_frame(entry), conn_ids) for entry, conn_ids in items)

    def deliver_events(self, items: list[tuple[dict[str, Any], list[int]]]) -> int:
        """Queue unstored events (``receipt``, ``typing``): ``[(frame, [conn id, ...])]``."""
        return self._queue_frames(items)

    def _queue_frames(self, items: Iterable[tuple[dict[str, Any], list[int]]]) -> int:
        """Encode each frame once per subprotocol and queue the same bytes on every target.

        With direct writes, a call of several frames (a batch of entries, under load) gathers each
        connection's frames first and writes them in one ``transport.write`` (:func:`write_now`):
        one send to the kernel per connection per call instead of one per frame, which was most of
        a hub's CPU in a 200-member group's fan-out (py-spy: 42 % of its samples in that send). A
        connection's frames keep their order; there is no order between connections."""
        batch = list(items)
        per_conn: dict[int, list[bytes | str]] | None = {} if self._direct_write and len(batch) > 1 else None
        queued = 0
        for frame, conn_ids in batch:
            encoded: dict[str, bytes | str] = {}
            for cid in conn_ids:
                conn = self.conns.get(cid)
                if conn is None or conn.closing:
                    continue
                data = encoded.get(conn.subprotocol)
                if data is None:
                    data = encoded[conn.subprotocol] = protocol.encode(frame, conn.subprotocol)
                if per_conn is None:
                    self._enqueue(conn, data)
                    queued += 1
                else:
                    per_conn.setdefault(cid, []).append(data)
        for cid, frames in (per_conn or {}).items():
            queued += self._enqueue_many(self.conns[cid], frames)  # nothing was awaited: still connected
        return queued

    async def close_conn(self, conn_id: int, code: int, reason: str) -> None:
        """Close connection ``conn_id`` with ``code`` (4409 when a newer one replaced it)."""
        conn = self.conns.get(conn_id)
        if conn is not None:
            await self._close(conn, code, reason)


#: The websockets release in use has what :func:`write_now` needs (its Sans-I/O protocol object, with
#: ``data_to_send``, under ``ServerConnection.protocol``, websockets 13 to 17 at least); otherwise
#: every frame goes through the writer task.
DIRECT_WRITE_SUPPORTED = callable(getattr(ServerConnection, "send_data", None)) and callable(
    getattr(ServerProtocol, "data_to_send", None)
)


def write_now(ws: ServerConnection, frames: Sequence[bytes | str]) -> bool:
    """Write ``frames`` (one WebSocket message each, in order) to ``ws`` at once, from synchronous
    code, in one ``transport.write``, when its transport holds nothing unsent (the kernel took every
    byte so far); False, writing nothing, otherwise (the caller queues them for the connection's
    writer task, which awaits ``send`` and its flow control).

    Why (issue "the hot path", target 4): a group's fan-out writes one frame to each of hundreds of
    connections; through a writer task each costs a task wake-up and ``send``'s context manager:
    62.4 us of hub CPU per frame here against 30.6 us written at once (``benchmarks/hub_writes.py
    --connections 200 --messages 300 --rounds 3``). The frame is framed by websockets' own Sans-I/O
    protocol (``ws.protocol.send_binary`` / ``send_text``) and flushed as ``ws.send_data()`` does
    (what ``ws.send`` does inside its context), its chunks joined into one write; flow control is
    kept because nothing is written while the transport holds unsent bytes, so a slow reader's
    frames queue (bounded, 4508) as before."""
    proto = ws.protocol
    try:
        if proto.state is not State.OPEN or ws.transport.is_closing() or ws.transport.get_write_buffer_size():
            return False
        for data in frames:
            if isinstance(data, str):
                proto.send_text(data.encode())
            else:
                proto.send_binary(data)
    except Exception:  # noqa: BLE001 - not framed: the writer task's send meets the same state and ends
        return False
    try:
        chunks = proto.data_to_send()
        if all(chunks):
            ws.transport.write(b"".join(chunks))
        else:  # an end of stream among them (not while OPEN, but handled as websockets does)
            for chunk in chunks:
                if chunk:
                    ws.transport.write(chunk)
                elif ws.transport.can_write_eof():
                    ws.transport.write_eof()
    except Exception:  # noqa: BLE001 - framed, the transport failed: the connection's reader sees it end
        log.debug("direct write to a failing transport", exc_info=True)
    return True


def _now_ms() -> int:
    return int(time.time() * 1000)


def _address_key(conn: ServerConnection) -> str:
    """The client's IP address as the per-address limits count it: IPv4 whole, IPv6 as its /64."""
    try:
        host = str(conn.remote_address[0])
        addr = ipaddress.ip_address(host)
    except (TypeError, IndexError, ValueError, OSError):
        return "?"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr.ipv4_mapped or addr) if isinstance(addr, ipaddress.IPv6Address) else str(addr)


def _request_ids(conn: Connection, req: protocol.Request) -> dict[str, Any]:
    """The ids that follow one request through the logs (user, device, request id, conv)."""
    return {"user": conn.user, "device": conn.device, "request_id": req.id, "conv": req.fields.get("conv")}


@ray.remote(num_cpus=0, max_restarts=-1)
class HubActor(Vitals):
    """Ray shell of :class:`Hub`: starts the WebSocket server and registers with the router."""

    async def __init__(self, config: Config, index: int) -> None:  # type: ignore[misc]  # Ray awaits it
        from im_actors import metrics

        # websockets logs every connection at INFO, with its connection object as an extra field that
        # Ray's JSON log encoding cannot write: its own lines stay at WARNING whatever log_level says.
        logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLogger().level))
        self._config = config
        self._index = index
        name = ids.actor_name("hub", index, config.actor_prefix)
        self._hub = Hub(config, name, Peers(config))
        self._starting = asyncio.Lock()
        self._metrics = metrics.for_actor(config, "hub", self.stats)
        self._metrics.start()
        self._delivery_ms = metrics.delivery_latency_ms

    async def ready(self) -> str:
        """Start listening (once) and register with the router; returns the hub's URL.

        Callers may overlap (deploy, and the router's heartbeat finding a restarted hub without a
        URL): the start is guarded so that a second call waits for the first instead of opening a
        second server."""
        async with self._starting:
            if not self._hub.url:
                port = self._config.hub_port + self._index if self._config.hub_port else 0
                if not self._config.advertise_host and self._config.host in ("0.0.0.0", "::"):
                    self._config = self._config.model_copy(update={"advertise_host": ray.util.get_node_ip_address()})
                    self._hub.config = self._config
                await self._hub.start(port)
                RouterRef(self._hub.peers.router).register(self._hub.name, self._hub.url)
        return self._hub.url

    def load(self) -> dict[str, Any]:
        """See :meth:`Hub.load`."""
        return self._hub.load()

    def deliver(self, items: list[tuple[dict[str, Any], list[int]]]) -> int:
        """See :meth:`Hub.deliver`; records each entry's delivery latency (``im_hub_delivery_ms``)."""
        if self._metrics.enabled:
            for ms in self._delivery_ms(items):
                self._metrics.observe("im_hub_delivery_ms", ms)
        return self._hub.deliver(items)

    async def reannounce(self, session_index: int) -> int:
        """Tell session shard ``session_index`` (new or restarted) about this hub's connections
        of its users; returns how many."""
        conns = [
            (c.user, c.device, self._hub.name, c.id)
            for c in self._hub.conns.values()
            if not c.closing and self._hub.peers.session_index(c.user) == session_index
        ]
        if conns:
            await SessionShardRef(self._hub.peers.sessions[session_index]).connect_many(conns)
        return len(conns)

    async def reannounce_routes(self, conv_index: int) -> int:
        """Tell conversation shard ``conv_index`` (new or restarted) the routes of this hub's
        connections (``fanout_via = "conv"``, :mod:`im_actors.routes`); returns how many."""
        conns = [(c.user, c.device, self._hub.name, c.id) for c in self._hub.conns.values() if not c.closing]
        if conns:
            await ConvShardRef(self._hub.peers.convs[conv_index]).route_many(conns)
        return len(conns)

    def deliver_events(self, items: list[tuple[dict[str, Any], list[int]]]) -> int:
        """See :meth:`Hub.deliver_events`."""
        return self._hub.deliver_events(items)

    async def close_conn(self, conn_id: int, code: int, reason: str) -> None:
        """See :meth:`Hub.close_conn`."""
        await self._hub.close_conn(conn_id, code, reason)

    async def drain(self, window_s: float = 0.0) -> dict[str, Any]:
        """Drain (:meth:`Hub.drain`: clients closed with 1001 spread over ``window_s`` s), then stop
        listening; returns the drain's figures. The actor stays up, empty, until it is killed."""
        result = await self._hub.drain(window_s)
        await self._hub.stop()
        return result

    def stats(self) -> dict[str, Any]:
        """Counters: frames in and out, sends, slow consumers closed, rate refusals, connections, the
        bytes now queued for sending (in all, and on the fullest connection), and ``answers``: acks
        (``"ack"``) and error frames by code."""
        queued = [c.queued_bytes for c in self._hub.conns.values()]
        return {
            **self._hub.stats,
            "answers": dict(self._hub.answers),
            "connections": len(self._hub.conns),
            "queued_bytes": sum(queued),
            "queued_bytes_max": max(queued, default=0),
        }
