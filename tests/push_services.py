"""Local stand-ins of the push services (APNs, FCM, Huawei, MiPush) for the provider tests.

:class:`ServiceApp` is a small ASGI application served by Hypercorn on 127.0.0.1: HTTP/1.1, and
HTTP/2 over cleartext with prior knowledge (h2c), which is how the APNs provider's ``httpx`` client
talks to it (``http1=False, http2=True``). Every request is recorded (method, path, lower-case headers,
body, HTTP version) and answered by the test's ``answer(request)`` function, which may also wait (to
play a slow service).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig


@dataclass
class Request:
    """One request the service received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    http_version: str

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode(), keep_blank_values=True).items()}


@dataclass
class Reply:
    """What the service answers: status, headers, a JSON body (or raw bytes) and a delay before it (s)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] | None = None
    delay_s: float = 0.0


Answerer = Callable[[Request], Reply | Awaitable[Reply]]


class ServiceApp:
    """ASGI app: records each request in :attr:`requests` and answers it with ``answer(request)``."""

    def __init__(self, answer: Answerer) -> None:
        self.answer = answer
        self.requests: list[Request] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = Request(
            method=scope["method"],
            path=scope["path"],
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=body,
            http_version=scope["http_version"],
        )
        self.requests.append(request)
        reply = self.answer(request)
        if not isinstance(reply, Reply):
            reply = await reply
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        raw = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body or {}).encode()
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in (reply.headers or {}).items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": raw})


@contextlib.asynccontextmanager
async def running(app: ServiceApp, certfile: str = "", keyfile: str = "") -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port (HTTP/1.1 and h2c); yields its base URL ``http://127.0.0.1:P``.

    With ``certfile`` and ``keyfile`` it serves TLS instead (ALPN ``h2`` and ``http/1.1``) and yields
    ``https://127.0.0.1:P``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns and closes the listening socket
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    if certfile:
        config.certfile = certfile
        config.keyfile = keyfile
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        for _ in range(100):  # until it accepts connections
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.02)
        yield f"{'https' if certfile else 'http'}://127.0.0.1:{port}"
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 5)
