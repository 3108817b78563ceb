"""A TCP proxy on loopback that slows or cuts one server's replies (the storage chaos kinds).

:class:`TcpProxy` listens on a free loopback port and forwards every connection to one upstream
``(host, port)``: bytes pass unchanged both ways, so it works in front of any server (a private
SecantusDB, or a given real ``mongod``: the proxy never talks to the server on its own). Two faults
can be switched on and off while connections are open:

- **slow** (:meth:`TcpProxy.slow`): every chunk the server sends is handed to the client
  ``delay_ms`` after it arrived, in order. The delay is added once per reply, not once per chunk
  (the chunks of one reply arrive together and leave together), and it does not throttle: a
  connection with several replies under way holds them all at once (up to ``max_held`` chunks,
  then the proxy stops reading from the server: backpressure, not memory).
- **cut** (:meth:`TcpProxy.cut`): a connection that receives a reply while cutting is on gets the
  first half of that chunk, then both of its sockets are closed: the client sees a reply that
  stops in the middle (a connection dropped mid-reply), the server a client that went away after
  its request. New connections are accepted and cut the same way at their first reply (the
  client's handshake), so reconnects fail until :meth:`TcpProxy.heal`. ``ratio`` < 1 cuts only
  that share of replies (drawn from the proxy's ``rng``).
- **idle timeout** (:meth:`TcpProxy.drop_idle`, awaited in any event loop): close every connection
  that carried no byte either way for a while, as a server or load balancer with an idle timeout
  does (SecantusDB drops a client idle for 300 s): the client finds its pooled connection closed at
  its next use, while a connection in use (a driver's monitor) stays.

The requests (client to server) are never delayed or cut: a cut reply means the request may well
have been carried out, which is the ambiguity the commit path must settle (store.py: read back).

Use it in the caller's event loop (``await proxy.start()`` ... ``await proxy.aclose()``), or on a
thread of its own (:meth:`TcpProxy.start_thread` / :meth:`TcpProxy.stop_thread`) when the process
blocks between awaits: the demo deploys with blocking Ray calls while actors in other processes
already connect through the proxy. The fault switches may be called from any thread.

:func:`proxied_mongo_url` points a ``mongodb://`` URL at a proxy (one host only, with
``directConnection=true``, so the driver never learns and uses the server's own address).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["TcpProxy", "ProxyStats", "proxied_mongo_url", "mongo_upstream"]

log = logging.getLogger(__name__)


@dataclass
class ProxyStats:
    """Counters of one proxy since it started (bytes, connections, replies)."""

    #: Client connections accepted.
    connections: int = 0
    #: Connections open now.
    open: int = 0
    #: Connections closed at once because the upstream server did not accept (down, or too slow).
    refused: int = 0
    #: Server chunks held back by a delay (each is about one reply: see the module docstring).
    delayed: int = 0
    #: Connections cut mid-reply.
    cuts: int = 0
    #: Connections closed by :meth:`TcpProxy.drop_idle`.
    idle_drops: int = 0
    bytes_to_server: int = 0
    bytes_to_client: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain data for reports."""
        return asdict(self)


_CUT = object()  # in a delivery queue: close the connection after the chunk before it


@dataclass(eq=False)
class _Conn:
    """One proxied connection: when a byte last passed (either way; loop time, s), and the event
    that closes it."""

    last: float
    close: asyncio.Event


class TcpProxy:
    """A loopback TCP proxy in front of ``upstream`` with switchable delay and cuts.

    Args:
        upstream: ``(host, port)`` of the server.
        host, port: where to listen (``port`` 0: a free port, known after :meth:`start`).
        connect_timeout_s: how long a new connection waits for the server to accept before the
            client's connection is closed (s).
        chunk_bytes: the most bytes read at once from either side.
        max_held: server chunks one connection may hold back under a delay before the proxy stops
            reading from the server.
        rng: draws which replies are cut when the cut ratio is below 1 (seed it to replay a run).
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        connect_timeout_s: float = 5.0,
        chunk_bytes: int = 65536,
        max_held: int = 256,
        rng: random.Random | None = None,
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.chunk_bytes = chunk_bytes
        self.max_held = max_held
        self.rng = rng or random.Random()
        self.stats = ProxyStats()
        self._delay_s = 0.0
        self._cut_ratio = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conns: set[_Conn] = set()
        self._closing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- faults (any thread) -------------------------------------------------------------------

    @property
    def delay_ms(self) -> float:
        """The delay added to every reply now (ms; 0 when not slowing)."""
        return self._delay_s * 1000.0

    @property
    def cutting(self) -> bool:
        """Whether replies are being cut now."""
        return self._cut_ratio > 0

    def slow(self, delay_ms: float) -> None:
        """Hand every reply that arrives from now on to its client ``delay_ms`` late (0: no delay).
        Raises ValueError for a negative delay."""
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        self._delay_s = delay_ms / 1000.0

    def cut(self, ratio: float = 1.0) -> None:
        """Cut connections mid-reply from now on: every reply (``ratio`` 1), or that share of
        them (0 < ratio < 1; 0 stops cutting). Raises ValueError outside [0, 1]."""
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("ratio must be within [0, 1]")
        self._cut_ratio = ratio

    def heal(self) -> None:
        """Stop delaying and cutting (replies already held keep their delay)."""
        self._delay_s = 0.0
        self._cut_ratio = 0.0

    # --- in the caller's event loop -----------------------------------------------------------

    async def start(self) -> int:
        """Listen; returns the port. Raises OSError when the address cannot be bound."""
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("tcp proxy 127.0.0.1:%d -> %s:%d", self.port, *self.upstream)
        return self.port

    async def aclose(self) -> None:
        """Stop listening and drop every open connection (both sides, at once)."""
        if self._server is not None:
            self._server.close()
        if self._closing is not None:
            self._closing.set()  # every connection's handler ends and closes both of its sockets
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def drop_idle(self, idle_s: float) -> int:
        """Close (both sides, at once) every connection that carried no byte either way for at
        least ``idle_s`` seconds, as a server's idle timeout does; returns how many once their
        handlers were woken. Await it in any event loop: on a proxy of its own thread
        (:meth:`start_thread`) the work runs in the proxy's loop."""
        loop = self._loop
        if loop is not None and loop is not asyncio.get_running_loop():
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._drop_idle(idle_s), loop))
        return await self._drop_idle(idle_s)

    async def _drop_idle(self, idle_s: float) -> int:
        now = asyncio.get_running_loop().time()
        idle = [c for c in self._conns if now - c.last >= idle_s]
        for c in idle:
            c.close.set()
        self.stats.idle_drops += len(idle)
        await asyncio.sleep(0)  # let the handlers close them
        return len(idle)

    # --- on a thread of its own ---------------------------------------------------------------

    def start_thread(self, timeout_s: float = 10.0) -> int:
        """Run the proxy on a daemon thread with its own event loop; returns the port once it
        listens. Raises OSError (could not bind) or TimeoutError (not listening in ``timeout_s``)."""
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.aclose())
                loop.close()

        self._thread = threading.Thread(target=main, name=f"tcpproxy-{self.upstream[1]}", daemon=True)
        self._thread.start()
        if not started.wait(timeout_s):
            raise TimeoutError(f"tcp proxy not listening within {timeout_s} s")
        if failure:
            raise failure[0]
        return self.port

    def stop_thread(self, timeout_s: float = 10.0) -> None:
        """Stop a proxy started with :meth:`start_thread` (drops its connections); idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = None

    # --- one connection -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.stats.connections += 1
        self.stats.open += 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, up = await asyncio.wait_for(asyncio.open_connection(*self.upstream), self.connect_timeout_s)
            except (OSError, TimeoutError):
                self.stats.refused += 1
                return
            up_writer = up
            conn = _Conn(asyncio.get_running_loop().time(), asyncio.Event())
            self._conns.add(conn)
            held: asyncio.Queue[Any] = asyncio.Queue(self.max_held)
            pumps = [
                asyncio.create_task(self._to_server(reader, up, conn)),
                asyncio.create_task(self._from_server(up_reader, held, conn)),
            ]
            deliver = asyncio.create_task(self._to_client(held, writer))
            assert self._closing is not None
            closing = asyncio.create_task(self._closing.wait())
            dropped = asyncio.create_task(conn.close.wait())
            tasks = [*pumps, deliver, closing, dropped]
            try:
                # The connection ends when the client leaves, when every held reply was handed
                # over after the server left (or a cut), when it is dropped as idle, or when the
                # proxy closes.
                await asyncio.wait([pumps[0], deliver, closing, dropped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._conns.discard(conn)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.stats.open -= 1
            for w in (writer, up_writer):
                if w is not None:
                    w.close()  # what was written is flushed first (a cut's half reply)
            if task is not None:
                self._tasks.discard(task)

    async def _to_server(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await reader.read(self.chunk_bytes):
                conn.last = loop.time()
                self.stats.bytes_to_server += len(data)
                up.write(data)
                await up.drain()

    async def _from_server(self, up: asyncio.StreamReader, held: asyncio.Queue[Any], conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await up.read(self.chunk_bytes):
                conn.last = loop.time()
                delay = self._delay_s
                if delay > 0:
                    self.stats.delayed += 1
                ratio = self._cut_ratio
                if ratio > 0 and (ratio >= 1.0 or self.rng.random() < ratio):
                    await held.put((loop.time() + delay, data[: len(data) // 2]))
                    await held.put(_CUT)
                    return
                await held.put((loop.time() + delay, data))
        except OSError:
            pass
        await held.put(None)  # the server closed: hand over what is held, then close

    async def _to_client(self, held: asyncio.Queue[Any], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                item = await held.get()
                if item is None:
                    return
                if item is _CUT:
                    self.stats.cuts += 1
                    return
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data:
                    self.stats.bytes_to_client += len(data)
                    writer.write(data)
                    await writer.drain()


def mongo_upstream(url: str) -> tuple[str, int]:
    """``(host, port)`` of a single-host ``mongodb://`` URL (port 27017 when absent).

    Raises ValueError for ``mongodb+srv://`` or several hosts (a replica set's members would be
    reached around the proxy)."""
    parts = urlsplit(url)
    if parts.scheme != "mongodb":
        raise ValueError(f"only mongodb:// URLs can be proxied, not {parts.scheme}://")
    hosts = parts.netloc.rpartition("@")[2]
    if "," in hosts:
        raise ValueError("a MongoDB URL with several hosts cannot be proxied (give one host)")
    host, _, port = hosts.rpartition(":") if not hosts.endswith("]") else (hosts, "", "")
    if not host:  # no port given
        host, port = hosts, ""
    return host.strip("[]") or "127.0.0.1", int(port or 27017)


def proxied_mongo_url(url: str, port: int, host: str = "127.0.0.1") -> str:
    """``url`` with its host replaced by the proxy's ``host:port`` and ``directConnection=true``
    (credentials, database and other options kept). Raises ValueError as :func:`mongo_upstream`."""
    mongo_upstream(url)  # validate
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() != "directconnection"]
    query.append(("directConnection", "true"))
    netloc = f"{userinfo}{at}{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", urlencode(query), parts.fragment))
