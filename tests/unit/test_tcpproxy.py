"""The chaos TCP proxy (drivers/tcpproxy.py) in front of a loopback server of the test's own (no Ray)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from drivers.tcpproxy import TcpProxy, mongo_upstream, proxied_mongo_url

#: Every request line is answered with this many bytes (one reply, written at once).
REPLY_BYTES = 1000


class ReplyServer:
    """Answers every line it reads with ``REPLY_BYTES`` bytes; records the lines."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ReplyServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return ("127.0.0.1", int(self.server.sockets[0].getsockname()[1]))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                self.lines.append(line)
                writer.write(b"r" * REPLY_BYTES)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _ask(port: int, line: bytes = b"q\n") -> tuple[bytes, float]:
    """Send one line on a new connection; returns what came back until the reply was whole or the
    connection closed, and the seconds that took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(line)
        await writer.drain()
        got = b""
        while len(got) < REPLY_BYTES:
            chunk = await asyncio.wait_for(reader.read(REPLY_BYTES), 10)
            if not chunk:
                break
            got += chunk
        return got, time.monotonic() - started
    finally:
        writer.close()


async def test_bytes_pass_unchanged_both_ways() -> None:
    async with ReplyServer() as server:
        proxy = TcpProxy(server.address)
        port = await proxy.start()
        try:
            got, _ = await _ask(port, b"hello\n")
            assert got == b"r" * REPLY_BYTES and server.lines == [b"hello\n"]
            assert proxy.stats.connections == 1 and proxy.stats.bytes_to_server == 6
            assert proxy.stats.bytes_to_client == REPLY_BYTES and proxy.stats.cuts == 0
        finally:
            await proxy.aclose()


async def test_slow_delays_every_reply_by_the_delay() -> None:
    async with ReplyServer() as server:
        proxy = TcpProxy(server.address)
        port = await proxy.start()
        try:
            proxy.slow(200)
            assert proxy.delay_ms == 200
            waits = [(await _ask(port))[1] for _ in range(3)]
            # Measured in: no reply is handed over before its delay (asyncio timers may fire up to
            # the clock's resolution early, hence the 10 ms).
            assert min(waits) >= 0.19, waits
            assert proxy.stats.delayed >= 3 and proxy.stats.bytes_to_client == 3 * REPLY_BYTES
            proxy.heal()
            got, _ = await _ask(port)
            assert got == b"r" * REPLY_BYTES and proxy.delay_ms == 0
        finally:
            await proxy.aclose()
    with pytest.raises(ValueError):
        proxy.slow(-1)


async def test_cut_closes_the_connection_mid_reply_after_the_request_went_through() -> None:
    async with ReplyServer() as server:
        proxy = TcpProxy(server.address)
        port = await proxy.start()
        try:
            proxy.cut()
            got, _ = await _ask(port, b"write 1\n")
            # Half of the reply, then the connection closed: the client saw a reply end mid-way...
            assert 0 < len(got) < REPLY_BYTES and got == b"r" * len(got)
            # ...while the server had the request (it may have been carried out).
            assert server.lines == [b"write 1\n"]
            got2, _ = await _ask(port, b"write 2\n")  # a reconnect is cut at its first reply too
            assert len(got2) < REPLY_BYTES
            assert proxy.stats.cuts == 2
            proxy.heal()
            got3, _ = await _ask(port, b"write 3\n")  # after the window: whole replies again
            assert got3 == b"r" * REPLY_BYTES and proxy.stats.cuts == 2
        finally:
            await proxy.aclose()
    with pytest.raises(ValueError):
        proxy.cut(1.5)


async def test_an_upstream_that_is_down_closes_the_client_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = ("127.0.0.1", int(s.getsockname()[1]))  # bound, never listening: refused
        proxy = TcpProxy(dead)
        port = await proxy.start()
        try:
            got, _ = await _ask(port)
            assert got == b"" and proxy.stats.refused == 1 and proxy.stats.open == 0
        finally:
            await proxy.aclose()


async def test_on_its_own_thread_it_serves_while_the_caller_blocks() -> None:
    async with ReplyServer() as server:
        proxy = TcpProxy(server.address)
        port = proxy.start_thread()

        def blocking_client() -> bytes:  # as a blocking Ray call in the demo's process would
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(b"q\n")
                got = b""
                while len(got) < REPLY_BYTES and (chunk := c.recv(REPLY_BYTES)):
                    got += chunk
                return got

        try:
            proxy.cut()  # switched from this thread while the proxy runs on its own
            assert len(await asyncio.to_thread(blocking_client)) < REPLY_BYTES
            proxy.heal()
            assert await asyncio.to_thread(blocking_client) == b"r" * REPLY_BYTES
        finally:
            proxy.stop_thread()
            proxy.stop_thread()  # idempotent
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_mongo_urls_are_pointed_at_the_proxy_with_a_direct_connection() -> None:
    assert mongo_upstream("mongodb://127.0.0.1:4567/?directConnection=true") == ("127.0.0.1", 4567)
    assert mongo_upstream("mongodb://user:pw@db.example:27018/im") == ("db.example", 27018)
    assert mongo_upstream("mongodb://localhost") == ("localhost", 27017)
    assert mongo_upstream("mongodb://[::1]:27019/") == ("::1", 27019)
    assert (
        proxied_mongo_url("mongodb://user:pw@db.example:27018/im?authSource=admin&directConnection=false", 9000)
        == "mongodb://user:pw@127.0.0.1:9000/im?authSource=admin&directConnection=true"
    )
    assert proxied_mongo_url("mongodb://127.0.0.1:4567", 9001) == "mongodb://127.0.0.1:9001/?directConnection=true"
    for url in ("mongodb+srv://cluster.example/im", "mongodb://a:1,b:2/?replicaSet=rs"):
        with pytest.raises(ValueError):
            mongo_upstream(url)


async def test_drop_idle_closes_only_the_connections_that_were_quiet_that_long() -> None:
    async with ReplyServer() as server:
        proxy = TcpProxy(server.address)
        port = await proxy.start()
        try:
            quiet_r, quiet_w = await asyncio.open_connection("127.0.0.1", port)
            busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(6):  # the busy one talks every 0.05 s, the quiet one never
                busy_w.write(b"q\n")
                await busy_w.drain()
                await busy_r.readexactly(REPLY_BYTES)
                await asyncio.sleep(0.05)
            assert await proxy.drop_idle(0.2) == 1
            assert await asyncio.wait_for(quiet_r.read(1), 5) == b""  # closed under the client
            busy_w.write(b"q\n")
            await busy_w.drain()
            assert len(await busy_r.readexactly(REPLY_BYTES)) == REPLY_BYTES  # still open
            assert proxy.stats.idle_drops == 1 and proxy.stats.open == 1
            quiet_w.close()
            busy_w.close()
        finally:
            await proxy.aclose()


async def test_drop_idle_works_on_a_proxy_running_on_its_own_thread() -> None:
    async with ReplyServer() as server:
        proxy = TcpProxy(server.address)
        port = await asyncio.to_thread(proxy.start_thread)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(50):  # the proxy's thread has accepted it
                if proxy.stats.open == 1:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            assert await proxy.drop_idle(0.1) == 1  # awaited here, done in the proxy's own loop
            assert await asyncio.wait_for(reader.read(1), 5) == b""
            writer.close()
        finally:
            await asyncio.to_thread(proxy.stop_thread)
