"""The asyncio client library: one device of one user speaking PROTOCOL.md to im-actors.

Typical use::

    client = Client("http://127.0.0.1:8080", "alice", on_msg=print)
    await client.connect()                       # router lookup, dev login, WebSocket, auth, baseline
    ack = await client.send(direct_conv("alice", "bob"), "hi")   # Ack(conv, seq, ts, dup)
    ...
    await client.close()

What the library guarantees to the application (PROTOCOL.md section 5): every committed entry of every
conversation the user belongs to is handed over once, in seq order, per conversation. The ordering is
decided by :class:`~im_actors.delivery.Delivery` (no I/O; its docstring has the rules): a ``msg`` at
or below the highest seq delivered is a duplicate and is dropped; the next one is delivered; one
further ahead is a gap, buffered and filled with ``sync`` (one fill at a time per conversation). A
conversation the user already had when the client first connected starts at the ``last`` that
``convs`` reported then (older entries are history, not news); one that appears later starts at 0, so
it is delivered from its first entry. This module is the I/O around it: the WebSocket, requests and
their answers, reconnects, and the tasks that fill gaps.

The connection goes through the states of :class:`ConnState`, changed in one method
(``Client._set_state``) and logged on every change (logger ``im_actors.client``)::

    NEW --connect()--> CONNECTING --ready--> OPEN <----- ready from another hub -----+
                           |                  |                                       |
                           |                  +--- lost, the code allows it ---> RECONNECTING
                           |                  |                                       |
                           +- connect failed -+- final close code -> FAILED <- reconnect refused
    any state but CLOSED --close()--> CLOSED

Failures: a retryable error answer (``unavailable``, ``internal``, ``rate_limited``), a request timeout
or a lost connection make :meth:`Client.send` resend *the same cmid* (after reconnecting when needed)
with jittered exponential backoff until its deadline; the server's cmid dedup makes this safe. A
socket closed with a code other than :data:`NO_RECONNECT_CLOSE_CODES` is reopened on another hub
(``exclude`` the failed one), re-authenticated and caught up (``convs``, then ``sync`` from ``held``
for every conversation whose ``last`` is ahead). A code in :data:`NO_RECONNECT_CLOSE_CODES` is final:
pending and later calls raise :class:`~im_actors.errors.CloseConnection`.

Every background task (the reader of each connection, the reconnect loop, the catch-up after a
reconnect, gap fills, the dispatcher of coroutine callbacks) is started by ``Client._spawn``; an
error that escapes one is logged, and :meth:`Client.close` cancels and awaits all of them.

Times are seconds (``*_s``) for timeouts and delays, integer milliseconds since the epoch for server
times (``ts``), as in PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import itertools
import logging
import random
import ssl
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.typing import Subprotocol

from im_actors.delivery import Delivery, FillNext, Step
from im_actors.errors import (
    CLOSE_AUTH,
    CLOSE_RATE,
    NO_RECONNECT_CLOSE_CODES,
    RECONNECT_CLOSE_CODES,
    TOKEN_EXPIRED,
    CloseConnection,
    ImError,
    Unauthorized,
    error_from_frame,
)
from im_actors.protocol import PROTO_VERSION, SERVER_LIMITS, SUBPROTOCOL_MSGPACK, SUBPROTOCOLS, decode, encode

__all__ = [
    "Ack",
    "Msgs",
    "Client",
    "ClientClosed",
    "ConnectFailed",
    "ConnectionLost",
    "NO_RECONNECT_CLOSE_CODES",
    "backoff_delay",
]

log = logging.getLogger(__name__)

_ABNORMAL = 1006
_ANSWER_TYPES = frozenset({"ack", "msgs", "convs", "ok", "group", "err", "contacts", "presence"})
_EVENT_TYPES = frozenset({"receipt", "typing", "presence"})
#: A gap fill whose ``sync`` answers make no progress this many times in a row gives up (a later
#: catch-up tries again).
_MAX_STALLS = 8

MsgCallback = Callable[[dict[str, Any]], Any]


class ClientClosed(ImError):
    """The client was closed (or never connected): call :meth:`Client.connect` first."""


class ConnectionLost(ImError):
    """The WebSocket closed while a request was in flight; ``close_code`` says how (1006: abnormal)."""

    def __init__(self, close_code: int = _ABNORMAL, reason: str = "") -> None:
        super().__init__(f"connection lost ({close_code}{': ' + reason if reason else ''})")
        self.close_code = close_code
        self.reason = reason


class ConnectFailed(ImError):
    """No hub could be reached (router down, no live hub, handshake failed) within the connect timeout.

    ``hub`` names the hub that failed, when one was reached.
    """

    def __init__(self, msg: str, hub: str | None = None) -> None:
        super().__init__(msg)
        self.hub = hub


class _NoHub(ConnectFailed):
    """The router answered 503 ``no_hub``."""


class ConnState(enum.Enum):
    """The state of a :class:`Client`'s connection (see the module docstring for the drawing)."""

    #: Made, :meth:`Client.connect` not called yet: calls raise :class:`ClientClosed`.
    NEW = "new"
    #: :meth:`Client.connect` is looking for a hub: calls wait.
    CONNECTING = "connecting"
    #: An authenticated WebSocket is open: calls go out on it.
    OPEN = "open"
    #: The WebSocket was lost with a code that allows a reconnect: the reconnect task looks for a hub,
    #: calls wait (up to their deadline).
    RECONNECTING = "reconnecting"
    #: Final: connect() failed, a code in :data:`NO_RECONNECT_CLOSE_CODES` closed the socket, or a
    #: reconnect was refused; calls raise the error that caused it.
    FAILED = "failed"
    #: :meth:`Client.close` was called: calls raise :class:`ClientClosed`.
    CLOSED = "closed"


#: The allowed transitions: ``state -> states it may change to``. ``Client._set_state`` enforces them.
_TRANSITIONS: Mapping[ConnState, frozenset[ConnState]] = {
    ConnState.NEW: frozenset({ConnState.CONNECTING, ConnState.CLOSED}),
    ConnState.CONNECTING: frozenset({ConnState.OPEN, ConnState.FAILED, ConnState.CLOSED}),
    ConnState.OPEN: frozenset({ConnState.RECONNECTING, ConnState.FAILED, ConnState.CLOSED}),
    ConnState.RECONNECTING: frozenset({ConnState.OPEN, ConnState.FAILED, ConnState.CLOSED}),
    ConnState.FAILED: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset(),
}
#: Calls waiting for a connection wake up when the state becomes one of these.
_SETTLED = frozenset({ConnState.OPEN, ConnState.FAILED, ConnState.CLOSED})


@dataclass(frozen=True)
class Ack:
    """A committed send: ``seq`` in ``conv``, server time ``ts`` (ms); ``dup`` when the cmid was already
    committed (a resend), in which case seq and ts are the original ones."""

    conv: str
    seq: int
    ts: int
    dup: bool = False


@dataclass(frozen=True)
class Msgs:
    """A ``sync`` or ``history`` answer: ``msgs`` ascending by seq, ``last`` the conversation's newest seq,
    ``more`` true when another page follows (sync)."""

    conv: str
    msgs: list[dict[str, Any]]
    last: int
    more: bool


def backoff_delay(attempt: int, base_s: float = 0.05, max_s: float = 5.0) -> float:
    """Jittered exponential backoff (seconds) before retry number ``attempt`` (0 = first retry).

    "Equal jitter": half of ``min(max_s, base_s * 2**attempt)`` plus a uniform random share of the
    other half, so retries spread out without ever collapsing to zero.
    """
    cap = min(max_s, base_s * (2 ** min(attempt, 30)))
    return cap / 2 + random.uniform(0, cap / 2)


class _Connection:
    """One open, authenticated WebSocket and the requests waiting for their answer on it."""

    def __init__(self, ws: ClientConnection, hub: str, subprotocol: str, ready: dict[str, Any]) -> None:
        self.ws = ws
        self.hub = hub
        self.subprotocol = subprotocol
        self.ready = ready
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.lost: ConnectionLost | None = None


def _ssl_context(value: ssl.SSLContext | str | None) -> ssl.SSLContext | None:
    """An SSL context from a context (as is) or a PEM CA file path (trusting that CA)."""
    if value is None or isinstance(value, ssl.SSLContext):
        return value
    return ssl.create_default_context(cafile=value)


def _exclude_after(exc: ConnectFailed, exclude: list[str]) -> None:
    """Update the hubs to ``exclude`` from the next router lookup after a failed attempt: the hub that
    failed joins them; a 503 ``no_hub`` (only excluded hubs are left, or none) clears them, so any
    hub is tried again."""
    if isinstance(exc, _NoHub):
        exclude.clear()
    elif exc.hub and exc.hub not in exclude:
        exclude.append(exc.hub)


def _close_info(exc: ConnectionClosed) -> tuple[int, str]:
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    return _ABNORMAL, ""


class Client:
    """One device (``user``, ``device``) connected to im-actors through the router at ``router_url``.

    Args:
        router_url: base URL of the router, e.g. ``"http://127.0.0.1:8080"``.
        user: user id (PROTOCOL.md section 3).
        device: device id; a second client with the same (user, device) replaces this one (4409).
        token: an auth token; when None the client uses the router's dev login (``POST /v1/login``).
        subprotocol: ``im.v1.msgpack`` (default) or ``im.v1.json``.
        on_msg: called with every delivered ``msg`` map, once, in seq order per conversation; a plain
            function or a coroutine function (awaited one at a time, in delivery order). When None,
            delivered msgs go to the queue returned by :meth:`messages`.
        on_event: called the same way with unsolicited ``receipt``, ``typing`` and ``presence`` maps.
        http: an aiohttp session to share between many clients (the drivers do); one is made if None.
        request_timeout_s: how long one request waits for its answer before it counts as lost.
        send_deadline_s: default overall deadline of :meth:`send`, resends included.
        connect_timeout_s: how long :meth:`connect` keeps trying before :class:`ConnectFailed`.
        backoff_base_s, backoff_max_s: the jittered exponential backoff (:func:`backoff_delay`).
        sync_limit: page size of the gap-filling ``sync`` (1..500).
        ping_interval_s: client-side WebSocket pings (None: only answer the server's pings).
        held: ``{conv: seq}`` a device restored from its own storage (what it had delivered before it
            went away): those conversations are caught up from there instead of from "now".
        ssl: TLS for ``https://`` routers and ``wss://`` hubs: an :class:`ssl.SSLContext`, or the path
            of a PEM CA file to trust (a self-signed deployment); None: the system's CAs.
    """

    def __init__(
        self,
        router_url: str,
        user: str,
        device: str = "d1",
        token: str | None = None,
        subprotocol: str = SUBPROTOCOL_MSGPACK,
        on_msg: MsgCallback | None = None,
        *,
        on_event: MsgCallback | None = None,
        http: aiohttp.ClientSession | None = None,
        request_timeout_s: float = 10.0,
        send_deadline_s: float = 30.0,
        connect_timeout_s: float = 30.0,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 5.0,
        sync_limit: int = 500,
        ping_interval_s: float | None = 20.0,
        held: Mapping[str, int] | None = None,
        ssl: SSLContext | str | None = None,
    ) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(f"subprotocol must be one of {SUBPROTOCOLS}")
        self.router_url = router_url.rstrip("/")
        self.user = user
        self.device = device
        self.subprotocol = subprotocol
        self._token = token
        self._own_token = token is None
        self._on_msg = on_msg
        self._on_event = on_event
        self._http = http
        self._own_http = http is None
        self._request_timeout_s = request_timeout_s
        self._send_deadline_s = send_deadline_s
        self._connect_timeout_s = connect_timeout_s
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._sync_limit = sync_limit
        self._ping_interval_s = ping_interval_s
        self._ssl: SSLContext | None = _ssl_context(ssl)

        self._ids = itertools.count(1)
        self._state = ConnState.NEW
        self._conn: _Connection | None = None  # set exactly while the state is OPEN
        self._fatal: BaseException | None = None  # set exactly while the state is FAILED
        self._settled = asyncio.Event()  # set while the state is in _SETTLED: waiting calls wake up
        self._tasks: set[asyncio.Task[Any]] = set()  # every background task, see _spawn
        self._catch_up_task: asyncio.Task[None] | None = None
        self._fills: dict[str, asyncio.Task[None]] = {}  # the running gap fill of each conversation
        self._delivery = Delivery(user, held)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._dispatch_q: asyncio.Queue[tuple[MsgCallback, dict[str, Any]] | Awaitable[Any]] | None = None
        self._coroutine_fns: dict[MsgCallback, bool] = {}
        self._undecodable = 0

        #: Name of the hub currently connected (None while disconnected).
        self.hub: str | None = None
        #: Successful reconnects after the first connect.
        self.reconnects = 0
        #: Gap fills started (each one or more ``sync`` pages for one conversation).
        self.gap_fills = 0
        #: Gap fills that gave up (deadline, non-retryable error); a later catch-up tries again.
        self.gap_fill_failures = 0
        #: Sends retried with the same cmid (each retry counts once).
        self.resends = 0
        #: Entries delivered to the application.
        self.delivered = 0
        #: Exceptions raised by ``on_msg`` / ``on_event`` (logged, delivery goes on).
        self.callback_errors = 0

    # --- public API ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while an authenticated WebSocket is open."""
        return self._state is ConnState.OPEN

    @property
    def state(self) -> ConnState:
        """The connection's :class:`ConnState`."""
        return self._state

    @property
    def held(self) -> dict[str, int]:
        """A copy of ``{conv: highest seq delivered to the application}``."""
        return self._delivery.held

    @property
    def dups_dropped(self) -> int:
        """``msg`` frames dropped because their (conv, seq) was already held or buffered."""
        return self._delivery.dups_dropped

    @property
    def holes_skipped(self) -> int:
        """Seqs that ``sync`` showed do not exist on the server (skipped so delivery goes on)."""
        return self._delivery.holes_skipped

    @property
    def bad_frames(self) -> int:
        """Frames from the server that could not be decoded, or ``msg`` frames without conv and seq (ignored)."""
        return self._undecodable + self._delivery.bad_msgs

    def stats(self) -> dict[str, int]:
        """The counters as a map: reconnects, gap_fills, gap_fill_failures, dups_dropped, resends,
        delivered, holes_skipped, bad_frames, callback_errors."""
        return {
            "reconnects": self.reconnects,
            "gap_fills": self.gap_fills,
            "gap_fill_failures": self.gap_fill_failures,
            "dups_dropped": self.dups_dropped,
            "resends": self.resends,
            "delivered": self.delivered,
            "holes_skipped": self.holes_skipped,
            "bad_frames": self.bad_frames,
            "callback_errors": self.callback_errors,
        }

    def messages(self) -> asyncio.Queue[dict[str, Any]]:
        """The queue of delivered ``msg`` maps, in order per conversation (fed only when ``on_msg`` is None)."""
        return self._queue

    async def connect(self) -> None:
        """Find a hub, log in (dev login when no token), open the WebSocket, authenticate, then take the
        baseline (``convs``).

        Retries the router (503 ``no_hub``, connection errors) and the hub with jittered exponential
        backoff for up to ``connect_timeout_s``. Raises :class:`ConnectFailed` when that runs out,
        :class:`~im_actors.errors.CloseConnection` (4401) or :class:`~im_actors.errors.Unauthorized`
        when the token or the dev login is refused (the client is then FAILED: later calls raise the
        same error). Raises ``RuntimeError`` when called a second time. Call :meth:`close` afterwards
        in every case.
        """
        if self._state is not ConnState.NEW:
            raise RuntimeError("connect() was already called" if self._state is not ConnState.CLOSED else "closed")
        self._set_state(ConnState.CONNECTING, "connect() called")
        if self._http is None:
            self._http = aiohttp.ClientSession()
        try:
            conn = await self._open_first()
        except Exception as exc:
            if self._state is ConnState.CONNECTING:
                self._set_state(ConnState.FAILED, f"connect failed: {exc!r}", error=exc)
            raise
        if self._state is not ConnState.CONNECTING:  # closed meanwhile
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), 2.0)
            raise ClientClosed("client closed")
        self._install(conn, "connected")
        await self._catch_up()

    async def _open_first(self) -> _Connection:
        """The first connection: :meth:`_open` retried with backoff for up to ``connect_timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout_s
        exclude: list[str] = []
        attempt = 0
        while True:
            if self._state is not ConnState.CONNECTING:
                raise ClientClosed("client closed")
            try:
                return await self._open(exclude)
            except ConnectFailed as exc:
                _exclude_after(exc, exclude)
                last = exc
            delay = self._backoff(attempt)
            attempt += 1
            if loop.time() + delay > deadline:
                raise ConnectFailed(f"no hub reachable within {self._connect_timeout_s} s: {last}") from last
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close the WebSocket and stop every background task (cancelled, then awaited); pending calls
        raise :class:`ClientClosed`. Closing twice is harmless."""
        if self._state is ConnState.CLOSED:
            return
        conn = self._conn
        self._set_state(ConnState.CLOSED, "close() called")
        me = asyncio.current_task()
        reader = conn.reader if conn is not None else None
        for task in list(self._tasks):
            if task is not me and task is not reader:
                task.cancel()
        if conn is not None:
            self._fail_pending(conn, ClientClosed("client closed"))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), 2.0)
        while True:  # a task may start another while it is being cancelled: until none is left
            tasks = [t for t in self._tasks if t is not me]
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_http and self._http is not None:
            await self._http.close()

    async def send(
        self,
        conv: str,
        body: str | bytes,
        cmid: str | None = None,
        kind: str | None = None,
        meta: dict[str, Any] | None = None,
        *,
        deadline_s: float | None = None,
    ) -> Ack:
        """Send ``body`` to ``conv`` and return its :class:`Ack` once committed.

        ``cmid`` (client message id, 1..64 chars) is generated when None; every retry uses the same one,
        so the message is committed at most once (a resend answered ``dup`` carries the original seq).
        Retries on ``unavailable``/``internal``/``rate_limited``, request timeouts and lost connections,
        with backoff, until ``deadline_s`` (default ``send_deadline_s``) seconds have passed; then the
        last failure is raised (:class:`~im_actors.errors.Unavailable`, ``TimeoutError``,
        :class:`ConnectionLost`, ...). Non-retryable answers raise at once: ``Forbidden``,
        ``BadRequest``, ``TooLarge``, ``Conflict``, ``Unauthorized``.
        """
        frame: dict[str, Any] = {"t": "send", "conv": conv, "cmid": cmid or uuid.uuid4().hex, "body": body}
        if kind is not None:
            frame["kind"] = kind
        if meta is not None:
            frame["meta"] = meta
        answer = await self._call(
            frame, retry_transport=True, deadline_s=self._send_deadline_s if deadline_s is None else deadline_s
        )
        return Ack(
            conv=str(answer.get("conv", conv)),
            seq=int(answer["seq"]),
            ts=int(answer.get("ts", 0)),
            dup=bool(answer.get("dup", False)),
        )

    async def sync(self, conv: str, after: int = 0, limit: int = 100) -> Msgs:
        """Entries of ``conv`` with seq > ``after`` (at most ``limit``, 1..500), ascending.

        A raw read: it does not deliver anything to ``on_msg`` (the client's own gap filling does).
        Retried across reconnects (it is idempotent).
        """
        answer = await self._call({"t": "sync", "conv": conv, "after": after, "limit": limit}, retry_transport=True)
        return self._msgs(conv, answer)

    async def history(self, conv: str, before: int, limit: int = 100) -> Msgs:
        """The newest ``limit`` entries of ``conv`` with seq < ``before``, ascending (``more`` is False)."""
        answer = await self._call(
            {"t": "history", "conv": conv, "before": before, "limit": limit}, retry_transport=True
        )
        return self._msgs(conv, answer)

    async def convs(self) -> list[dict[str, Any]]:
        """Every conversation of the user: ``[{"conv": str, "last": int, "read": int}, ...]``."""
        answer = await self._call({"t": "convs"}, retry_transport=True)
        return list(answer.get("convs") or [])

    async def group_create(self, name: str, members: Iterable[str]) -> tuple[str, str]:
        """Create a group and return ``(group id, conversation id)``.

        Not retried after a lost connection or a timeout (it is not idempotent: that could make two
        groups); only a ``retry: true`` error answer (nothing was done) is retried.
        """
        answer = await self._call({"t": "group.create", "name": name, "members": list(members)}, retry_transport=False)
        return str(answer["group"]), str(answer["conv"])

    async def group_add(self, group: str, users: Iterable[str]) -> None:
        """Add ``users`` to ``group`` (a ``system`` entry is committed in the group conversation)."""
        await self._call({"t": "group.add", "group": group, "users": list(users)}, retry_transport=True)

    async def group_info(self, group: str) -> dict[str, Any]:
        """``{"group", "name", "members": [...], "roles": {user: role}}`` of ``group``."""
        answer = await self._call({"t": "group.info", "group": group}, retry_transport=True)
        return {k: v for k, v in answer.items() if k not in ("t", "id")}

    async def group_remove(self, group: str, users: Iterable[str]) -> None:
        """Remove ``users`` from ``group`` (owner and admins; a ``system`` entry is committed)."""
        await self._call({"t": "group.remove", "group": group, "users": list(users)}, retry_transport=True)

    async def group_leave(self, group: str) -> None:
        """Leave ``group`` (the owner hands over ownership with :meth:`group_role` first)."""
        await self._call({"t": "group.leave", "group": group}, retry_transport=True)

    async def group_role(self, group: str, user: str, role: str) -> None:
        """Make member ``user`` of ``group`` ``owner``, ``admin`` or ``member`` (the owner only)."""
        await self._call({"t": "group.role", "group": group, "user": user, "role": role}, retry_transport=True)

    async def group_rename(self, group: str, name: str) -> None:
        """Rename ``group`` (owner and admins)."""
        await self._call({"t": "group.rename", "group": group, "name": name}, retry_transport=True)

    async def push_register(self, provider: str, token: str) -> None:
        """Register this device's push ``token`` with ``provider`` (``apns``, ``fcm``, ``webhook``)."""
        await self._call({"t": "push.register", "provider": provider, "token": token}, retry_transport=True)

    async def read(self, conv: str, seq: int) -> None:
        """Move the user's read cursor of ``conv`` to ``seq`` (the others receive a ``receipt``)."""
        await self._call({"t": "read", "conv": conv, "seq": seq}, retry_transport=True)

    async def typing(self, conv: str) -> None:
        """Tell the online members of ``conv`` that the user is typing (no answer; not retried)."""
        conn = await self._wait_ready(self._request_timeout_s)
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send(encode({"t": "typing", "conv": conv}, conn.subprotocol))

    async def request(self, t: str, *, idempotent: bool = True, **fields: Any) -> dict[str, Any]:
        """Any other request of PROTOCOL.md section 4 (``contact.list``, ``presence.get``, ...): the answer map.

        Raises the exception of an ``err`` answer; retried across reconnects only when ``idempotent``.
        """
        return await self._call({"t": t, **fields}, retry_transport=idempotent)

    async def catch_up(self, timeout_s: float = 30.0) -> bool:
        """Ask ``convs`` and fill every conversation whose ``last`` is ahead of ``held``; wait for the fills.

        Returns True when, within ``timeout_s``, every conversation is held up to the ``last`` seen.
        The drivers call it after the last send, before they count deliveries.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            await asyncio.wait_for(self._catch_up(), timeout_s)
        except (TimeoutError, ImError) as exc:
            log.warning("%s/%s: catch-up failed: %r", self.user, self.device, exc)
            return False
        while True:
            lagging = self._delivery.lagging()
            if not lagging:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            fills = [t for t in self._fills.values() if not t.done()]
            if fills:
                await asyncio.wait(fills, timeout=remaining)
            else:
                for gap in lagging:
                    self._ensure_fill(gap.conv)
                await asyncio.sleep(min(remaining, self._backoff(2)))

    # --- requests ------------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self._backoff_base_s, self._backoff_max_s)

    @staticmethod
    def _msgs(conv: str, answer: dict[str, Any]) -> Msgs:
        return Msgs(
            conv=str(answer.get("conv", conv)),
            msgs=list(answer.get("msgs") or []),
            last=int(answer.get("last", 0)),
            more=bool(answer.get("more", False)),
        )

    async def _wait_ready(self, timeout_s: float) -> _Connection:
        """The live connection, waiting up to ``timeout_s`` while connecting or reconnecting.

        Raises :class:`ClientClosed` before :meth:`connect` and after :meth:`close`, the error that made
        the client FAILED, or ``TimeoutError`` when no connection came up in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            state = self._state
            if state is ConnState.NEW:
                raise ClientClosed("not connected: call connect() first")
            if state is ConnState.CLOSED:
                raise ClientClosed("client closed")
            if state is ConnState.FAILED:
                assert self._fatal is not None
                raise self._fatal
            if state is ConnState.OPEN:
                assert self._conn is not None
                return self._conn
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("not connected")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), remaining)

    async def _request_on(self, conn: _Connection, frame: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one request on ``conn`` and wait for the answer with its id (an ``err`` map is returned)."""
        if conn.lost is not None:
            raise conn.lost
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        conn.pending[rid] = fut
        try:
            try:
                await conn.ws.send(encode({**frame, "id": rid}, conn.subprotocol))
            except ConnectionClosed as exc:
                raise ConnectionLost(*_close_info(exc)) from exc
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            conn.pending.pop(rid, None)
            if fut.done() and not fut.cancelled():
                # The connection was lost while the frame was still being written: the reader failed
                # this future too, and nobody awaits it now (asyncio would log it as never retrieved).
                fut.exception()

    async def _call(
        self, frame: dict[str, Any], *, retry_transport: bool, deadline_s: float | None = None
    ) -> dict[str, Any]:
        """Send a request and return its answer, retrying until ``deadline_s`` (default: request timeout
        x 3) on ``retry: true`` error answers and, when ``retry_transport``, on timeouts and lost
        connections. The frame (and so a send's cmid) is the same on every attempt."""
        loop = asyncio.get_running_loop()
        total = self._request_timeout_s * 3 if deadline_s is None else deadline_s
        deadline = loop.time() + total
        attempt = 0
        while True:
            failure: BaseException
            try:
                conn = await self._wait_ready(max(deadline - loop.time(), 0.0))
                timeout = min(self._request_timeout_s, max(deadline - loop.time(), 0.001))
                answer = await self._request_on(conn, frame, timeout)
            except (ConnectionLost, TimeoutError) as exc:
                if not retry_transport:
                    raise
                failure, delay = exc, self._backoff(attempt)
            else:
                if answer.get("t") != "err":
                    return answer
                err = error_from_frame(answer)
                if not bool(answer.get("retry", err.retry)):
                    raise err
                failure, delay = err, self._backoff(attempt)
                # rate_limited carries retry_after_ms (PROTOCOL.md section 6), and so does an
                # overloaded hub's unavailable (docs/protocol.md): resending sooner only adds to the load
                retry_after_ms = err.extra.get("retry_after_ms")
                if isinstance(retry_after_ms, (int, float)) and not isinstance(retry_after_ms, bool):
                    delay = max(delay, float(retry_after_ms) / 1000.0)
            if loop.time() + delay >= deadline:
                raise failure  # no time left for another attempt: the last failure stands
            attempt += 1
            if frame.get("t") == "send":
                self.resends += 1
            await asyncio.sleep(delay)

    # --- connection ----------------------------------------------------------------------------------

    async def _lookup(self, exclude: list[str]) -> tuple[str, str]:
        """``(hub name, ws url)`` from the router; raises :class:`_NoHub` on 503, ConnectFailed otherwise."""
        assert self._http is not None
        params = [("exclude", h) for h in exclude]
        try:
            async with self._http.get(
                f"{self.router_url}/v1/hub",
                params=params,
                timeout=aiohttp.ClientTimeout(total=10),
                ssl=self._ssl if self._ssl is not None else True,
            ) as resp:
                if resp.status == 503:
                    raise _NoHub("router: no live hub")
                if resp.status != 200:
                    raise ConnectFailed(f"router answered {resp.status}")
                data = await resp.json(content_type=None)
            return str(data["hub"]), str(data["url"])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            raise ConnectFailed(f"router lookup failed: {exc!r}") from exc

    async def _login(self) -> str:
        """A dev-login token for ``user``; Unauthorized when the router refuses (e.g. dev login disabled)."""
        assert self._http is not None
        try:
            async with self._http.post(
                f"{self.router_url}/v1/login",
                json={"user": self.user},
                timeout=aiohttp.ClientTimeout(total=10),
                ssl=self._ssl if self._ssl is not None else True,
            ) as resp:
                if 400 <= resp.status < 500:
                    raise Unauthorized(f"dev login refused ({resp.status})")
                if resp.status != 200:
                    raise ConnectFailed(f"login answered {resp.status}")
                data = await resp.json(content_type=None)
            return str(data["token"])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            raise ConnectFailed(f"dev login failed: {exc!r}") from exc

    async def _open(self, exclude: list[str]) -> _Connection:
        """One attempt: router lookup, token, WebSocket, auth/ready. The reader is not started yet."""
        hub, url = await self._lookup(exclude)
        for auth_try in range(2):
            if self._token is None:
                self._token = await self._login()
            try:
                ws = await ws_connect(
                    url,
                    subprotocols=[Subprotocol(self.subprotocol)],
                    compression=None,
                    proxy=None,
                    open_timeout=self._request_timeout_s,
                    ping_interval=self._ping_interval_s,
                    ping_timeout=self._ping_interval_s,
                    close_timeout=2,
                    max_size=64 * 2**20,
                    ssl=self._ssl if url.startswith("wss:") else None,
                )
            except (OSError, TimeoutError, WebSocketException) as exc:
                raise ConnectFailed(f"{hub}: {exc!r}", hub=hub) from exc
            subprotocol = ws.subprotocol or self.subprotocol
            try:
                ready = await self._auth(ws, subprotocol, hub)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 1.0)
                if isinstance(exc, CloseConnection) and exc.close_code == CLOSE_AUTH:
                    if self._own_token and auth_try == 0:
                        self._token = None  # an expired dev-login token: log in again, once
                        continue
                raise
            return _Connection(ws, hub, subprotocol, ready)  # the router's name: what ``exclude`` takes
        raise CloseConnection(CLOSE_AUTH, "authentication failed")  # pragma: no cover (loop returns/raises)

    async def _auth(self, ws: ClientConnection, subprotocol: str, hub: str) -> dict[str, Any]:
        auth = {"t": "auth", "token": self._token, "device": self.device, "proto": PROTO_VERSION}
        try:
            await ws.send(encode(auth, subprotocol))
            while True:
                frame = decode(await asyncio.wait_for(ws.recv(), self._request_timeout_s), subprotocol, SERVER_LIMITS)
                if frame.get("t") == "ready":
                    return frame
                if frame.get("t") == "err":
                    err = error_from_frame(frame)
                    if err.retry:
                        raise ConnectFailed(f"{hub}: auth answered {err.code}", hub=hub)
                    raise CloseConnection(CLOSE_AUTH, f"auth answered {err.code}: {err.msg}")
        except ConnectionClosed as exc:
            code, reason = _close_info(exc)
            if code in NO_RECONNECT_CLOSE_CODES:
                raise CloseConnection(code, reason or "closed during auth") from exc
            raise ConnectFailed(f"{hub}: closed during auth ({code})", hub=hub) from exc
        except TimeoutError as exc:
            raise ConnectFailed(f"{hub}: no ready in time", hub=hub) from exc

    def _install(self, conn: _Connection, why: str) -> None:
        """Make ``conn`` the live connection (state OPEN) and start its reader."""
        conn.reader = self._spawn(self._read_loop(conn), f"im-client-reader-{self.user}")
        self._set_state(ConnState.OPEN, f"{why} to {conn.hub}", conn=conn)

    async def _read_loop(self, conn: _Connection) -> None:
        code, reason = _ABNORMAL, ""
        try:
            async for data in conn.ws:
                try:
                    frame = decode(data, conn.subprotocol, SERVER_LIMITS)
                except CloseConnection:
                    self._undecodable += 1
                    continue
                self._dispatch(conn, frame)
            code, reason = conn.ws.close_code or _ABNORMAL, conn.ws.close_reason or ""
        except ConnectionClosed as exc:
            code, reason = _close_info(exc)
        except asyncio.CancelledError:
            code, reason = _ABNORMAL, "reader cancelled"
            raise
        except Exception as exc:  # a bug here must not leave the client silently dead
            log.exception("%s/%s: reader failed", self.user, self.device)
            code, reason = _ABNORMAL, repr(exc)
            with contextlib.suppress(Exception):
                await conn.ws.close()
        finally:
            self._connection_lost(conn, code, reason)

    @staticmethod
    def _fail_pending(conn: _Connection, exc: BaseException) -> None:
        for fut in conn.pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def _connection_lost(self, conn: _Connection, code: int, reason: str) -> None:
        """The reader of ``conn`` ended: fail its pending requests; when it was the live connection,
        reconnect or become FAILED, as the close code says (PROTOCOL.md section 7)."""
        if conn.lost is None:
            conn.lost = ConnectionLost(code, reason)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # The reader's coroutine closed by the garbage collector after its event loop ended (an
            # interpreter shutting down): no loop to fail the requests on or to reconnect from.
            return
        self._fail_pending(conn, conn.lost)
        if self._conn is not conn:  # an old connection, or close() already took it
            return
        why = f"{conn.hub} closed with {code}{' ' + reason if reason else ''}"
        if code == CLOSE_AUTH and reason == TOKEN_EXPIRED and self._own_token:
            self._token = None  # our development-login token ran out: log in again and reconnect
        elif code in NO_RECONNECT_CLOSE_CODES:
            self._set_state(ConnState.FAILED, why, error=CloseConnection(code, reason or "closed by the server"))
            return
        elif code not in RECONNECT_CLOSE_CODES:
            why += " (transport failure)"
        self._set_state(ConnState.RECONNECTING, why)
        self._spawn(self._reconnect(conn.hub, code), f"im-client-reconnect-{self.user}")

    async def _reconnect(self, failed_hub: str, code: int) -> None:
        exclude = [failed_hub]
        attempt = 3 if code == CLOSE_RATE else 0  # 4429: back off harder before the first try
        await asyncio.sleep(self._backoff(attempt) if attempt else random.uniform(0, self._backoff_base_s))
        while self._state is ConnState.RECONNECTING:
            try:
                conn = await self._open(exclude)
            except ConnectFailed as exc:
                _exclude_after(exc, exclude)
            except (CloseConnection, Unauthorized) as exc:
                fatal = exc if isinstance(exc, CloseConnection) else CloseConnection(CLOSE_AUTH, str(exc))
                if self._state is ConnState.RECONNECTING:
                    self._set_state(ConnState.FAILED, f"reconnect refused: {exc!r}", error=fatal)
                return
            except Exception:  # never let the reconnect loop die silently
                log.exception("%s/%s: reconnect attempt failed", self.user, self.device)
            else:
                if self._state is not ConnState.RECONNECTING:  # closed meanwhile
                    with contextlib.suppress(Exception):
                        await conn.ws.close()
                    return
                self.reconnects += 1
                self._install(conn, "reconnected")
                if self._catch_up_task is not None:
                    self._catch_up_task.cancel()
                self._catch_up_task = self._spawn(self._catch_up_logged(), f"im-client-catch-up-{self.user}")
                return
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1

    def _set_state(
        self,
        new: ConnState,
        why: str,
        *,
        conn: _Connection | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The one place the connection state changes: checks the transition against ``_TRANSITIONS``,
        keeps ``_conn`` (OPEN only), ``hub`` and ``_fatal`` (FAILED only) in step, wakes waiting calls,
        and logs the change (FAILED at WARNING, RECONNECTING at INFO, the others at DEBUG).

        Raises ``RuntimeError`` for a transition ``_TRANSITIONS`` does not allow (a bug in this module).
        """
        old = self._state
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"client state {old.value} -> {new.value} is not allowed ({why})")
        if (new is ConnState.OPEN) != (conn is not None) or (new is ConnState.FAILED) != (error is not None):
            raise RuntimeError(f"client state {new.value} needs a connection exactly when OPEN, an error when FAILED")
        self._state = new
        self._conn = conn
        self.hub = conn.hub if conn is not None else None
        self._fatal = error
        if new in _SETTLED:
            self._settled.set()
        else:
            self._settled.clear()
        level = {ConnState.FAILED: logging.WARNING, ConnState.RECONNECTING: logging.INFO}.get(new, logging.DEBUG)
        log.log(level, "%s/%s: %s -> %s: %s", self.user, self.device, old.value, new.value, why)

    # --- tasks ---------------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a background task: the only way this class starts one. :meth:`close` cancels and awaits
        every task started here; an exception that escapes one is logged, never dropped."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s/%s: task %s failed", self.user, self.device, task.get_name(), exc_info=task.exception())

    # --- delivery ------------------------------------------------------------------------------------

    async def _catch_up_logged(self) -> None:
        try:
            await self._catch_up()
        except (ImError, TimeoutError) as exc:
            log.warning("%s/%s: catch-up after reconnect failed: %r", self.user, self.device, exc)
        except Exception:
            log.exception("%s/%s: catch-up after reconnect failed", self.user, self.device)

    async def _catch_up(self) -> None:
        """``convs``, then fill every conversation whose ``last`` is ahead of ``held``.

        The first answer is the baseline (:meth:`Delivery.receive_convs
        <im_actors.delivery.Delivery.receive_convs>`).
        """
        answer = await self._call({"t": "convs"}, retry_transport=True, deadline_s=self._send_deadline_s)
        self._apply(self._delivery.receive_convs(answer.get("convs") or []))

    def _dispatch(self, conn: _Connection, frame: dict[str, Any]) -> None:
        t = frame.get("t")
        rid = frame.get("id")
        if rid is not None and t in _ANSWER_TYPES:
            fut = conn.pending.get(rid) if isinstance(rid, int) else None
            if fut is not None and not fut.done():
                fut.set_result(frame)
            return  # a late answer to a request that timed out: ignored
        if t == "msg":
            self._apply(self._delivery.receive_msg(frame))
        elif t in _EVENT_TYPES:
            if self._on_event is not None:
                self._call_back(self._on_event, frame)
        elif t == "err":
            log.warning("%s/%s: error without request: %s", self.user, self.device, frame)

    def _apply(self, step: Step) -> None:
        """Do what the delivery module decided: hand ``step.deliver`` over, start the fills it asks for."""
        for frame in step.deliver:
            self.delivered += 1
            if self._on_msg is None:
                self._queue.put_nowait(frame)
            else:
                self._call_back(self._on_msg, frame)
        for hole in step.holes:
            log.warning(
                "%s/%s: %s has no seq %d..%d, skipped", self.user, self.device, hole.conv, hole.first, hole.last
            )
        for gap in step.sync:
            self._ensure_fill(gap.conv)

    def _call_back(self, fn: MsgCallback, frame: dict[str, Any]) -> None:
        """Run an application callback; coroutines are awaited one at a time, in order, by a dispatcher."""
        is_coro = self._coroutine_fns.get(fn)
        if is_coro is None:  # asked once per callback: the inspect calls cost more than a plain callback
            is_coro = self._coroutine_fns[fn] = inspect.iscoroutinefunction(fn)
        if is_coro:
            self._dispatch_queue().put_nowait((fn, frame))
            return
        try:
            result = fn(frame)
        except Exception:
            self.callback_errors += 1
            log.exception("%s/%s: callback failed", self.user, self.device)
            return
        if result is not None and inspect.isawaitable(result):
            self._dispatch_queue().put_nowait(result)

    def _dispatch_queue(self) -> asyncio.Queue[Any]:
        if self._dispatch_q is None:
            self._dispatch_q = asyncio.Queue()
            self._spawn(self._dispatcher(self._dispatch_q), f"im-client-dispatcher-{self.user}")
        return self._dispatch_q

    async def _dispatcher(self, queue: asyncio.Queue[Any]) -> None:
        while True:
            item = await queue.get()
            try:
                if isinstance(item, tuple):
                    fn, frame = item
                    await fn(frame)
                else:
                    await item
            except Exception:
                self.callback_errors += 1
                log.exception("%s/%s: callback failed", self.user, self.device)

    def _ensure_fill(self, conv: str) -> None:
        """Start the gap fill of ``conv`` unless one is running (one fill at a time per conversation)."""
        running = self._fills.get(conv)
        if self._state is ConnState.CLOSED or (running is not None and not running.done()):
            return
        self._fills[conv] = self._spawn(self._fill(conv), f"im-client-fill-{conv}")

    async def _fill(self, conv: str) -> None:
        """``sync`` from ``held`` page by page until ``held`` reaches the highest seq known to exist."""
        self.gap_fills += 1
        stalls = 0
        try:
            while self._state is not ConnState.CLOSED:
                gap = self._delivery.gap(conv)
                if gap is None:
                    return
                answer = await self._call(
                    gap.request(self._sync_limit), retry_transport=True, deadline_s=self._send_deadline_s
                )
                step = self._delivery.receive_sync(conv, answer)
                self._apply(step)
                if step.fill is FillNext.STALLED:
                    # The server says entries exist that it did not return (yet): wait and retry.
                    stalls += 1
                    if stalls > _MAX_STALLS:
                        log.warning("%s/%s: %s stuck at %d < %d", self.user, self.device, conv, gap.after, gap.upto)
                        self.gap_fill_failures += 1
                        return
                    await asyncio.sleep(self._backoff(stalls))
        except (ImError, TimeoutError) as exc:
            if self._state is not ConnState.CLOSED:
                self.gap_fill_failures += 1
                log.warning("%s/%s: gap fill of %s failed: %r", self.user, self.device, conv, exc)
        except Exception:
            self.gap_fill_failures += 1
            log.exception("%s/%s: gap fill of %s failed", self.user, self.device, conv)
        finally:
            if self._fills.get(conv) is asyncio.current_task():
                del self._fills[conv]
