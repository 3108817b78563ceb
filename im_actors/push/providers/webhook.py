"""The ``webhook`` provider: POSTs each job as JSON to the URL that is the device's token.

Request::

    POST <job["token"]>
    Content-Type: application/json
    X-Im-Job: <job_id>                     receivers deduplicate on it (delivery is at least once)
    X-Im-Attempt: <attempt>                0 for the first try
    X-Im-Signature: sha256=<hex>           HMAC-SHA256 of the exact body bytes with config.webhook_secret;
                                           only when the secret is set

    {"badge": int, "collapse_key": str, "conv": str, "device": str, "job_id": str, "preview": str,
     "sender": str, "seq": int, "user": str}        (keys sorted, no spaces: see :func:`webhook_body`)

Answers: 2xx delivered; 404 and 410 invalid_token; 429, 5xx, a timeout (``config.push_timeout_s`` for
the whole exchange) or a connection error retry, honouring ``Retry-After`` (seconds or an HTTP date);
any other status (3xx, since redirects are not followed, and the remaining 4xx) failed. A token that is
not an absolute http(s) URL is an invalid token.

Security: the URL comes from a client (``push.register``), which must not be able to make the push
workers POST into the deployment's own network (server-side request forgery). Unless
``config.webhook_allow_private`` is set, a URL whose host is, or resolves to, an address that is not
globally routable (loopback, private, link-local such as 169.254.169.254, multicast, reserved) is
refused: the job fails (dead queue) without a request. Names are checked by the resolver the
connection itself uses (:class:`PublicOnlyResolver`), so a name cannot pass the check and then
connect elsewhere. A caller-supplied ``session`` is the caller's choice: only literal addresses are
checked then.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from typing import Any

import aiohttp
from yarl import URL

from im_actors.config import Config
from im_actors.push.jobs import PushJob
from im_actors.push.providers.base import Outcome, Provider

__all__ = [
    "WebhookProvider",
    "PublicOnlyResolver",
    "WEBHOOK_FIELDS",
    "webhook_body",
    "sign",
    "parse_retry_after",
    "classify_status",
    "is_public_address",
]

#: Job keys sent in the webhook body.
WEBHOOK_FIELDS = ("user", "device", "conv", "seq", "sender", "preview", "badge", "collapse_key", "job_id")


def webhook_body(job: PushJob) -> bytes:
    """The exact JSON bytes POSTed for ``job`` (UTF-8, sorted keys, no spaces)."""
    fields = {key: job[key] for key in WEBHOOK_FIELDS}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: str, body: bytes) -> str:
    """The ``X-Im-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of ``body`` keyed by ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def parse_retry_after(value: str | None, now_s: float | None = None) -> int | None:
    """A ``Retry-After`` header value as a delay in ms: delta-seconds or an HTTP date; None when absent
    or unparseable; never negative."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    now = time.time() if now_s is None else now_s
    return max(0, int((when.timestamp() - now) * 1000))


def classify_status(status: int, retry_after: str | None = None) -> Outcome:
    """The :class:`Outcome` of an HTTP answer with ``status`` (and its ``Retry-After`` header)."""
    detail = f"HTTP {status}"
    if 200 <= status < 300:
        return Outcome.delivered(detail)
    if status in (404, 410):
        return Outcome.invalid_token(detail)
    if status == 429 or 500 <= status < 600:
        return Outcome.retry(parse_retry_after(retry_after), detail)
    return Outcome.failed(detail)


def is_public_address(address: str) -> bool:
    """Whether ``address`` (an IPv4 or IPv6 literal) is globally routable: not loopback, private,
    link-local, multicast, reserved or unspecified (Python's ``ipaddress`` ``is_global``, which
    follows the IANA special-purpose registries); IPv4-mapped IPv6 addresses are judged as IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_global) and not ip.is_multicast


class NotPublic(OSError):
    """A webhook host that is, or resolves to, an address that is not public."""


class PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """An aiohttp resolver that refuses a name resolving to any non-public address (:class:`NotPublic`)."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        """Resolve like aiohttp's threaded resolver; raise :class:`NotPublic` if any answer is not public."""
        results = await self._inner.resolve(host, port, family)
        private = [r["host"] for r in results if not is_public_address(r["host"])]
        if private:
            raise NotPublic(f"{host} resolves to a non-public address ({private[0]})")
        return list(results)

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()


class WebhookProvider(Provider):
    """POSTs jobs to their token URL with aiohttp (one session per provider, made on first use).

    ``session`` lets a caller share its own ``aiohttp.ClientSession`` (then :meth:`close` leaves it open).
    """

    name = "webhook"

    def __init__(self, config: Config, session: aiohttp.ClientSession | None = None) -> None:
        self._secret = config.webhook_secret
        self._timeout = aiohttp.ClientTimeout(total=config.push_timeout_s)
        self._session = session
        self._own_session = session is None
        self._allow_private = config.webhook_allow_private

    def _headers(self, job: PushJob, body: bytes) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "X-Im-Job": job["job_id"],
            "X-Im-Attempt": str(job["attempt"]),
        }
        if self._secret:
            headers["X-Im-Signature"] = sign(self._secret, body)
        return headers

    async def send(self, job: PushJob) -> Outcome:
        """POST ``job`` to ``job["token"]`` and classify the answer (module docstring); never raises
        except ``CancelledError``."""
        try:
            url = URL(job["token"])
        except (TypeError, ValueError):
            return Outcome.invalid_token("token is not a URL")
        if url.scheme not in ("http", "https") or not url.host:
            return Outcome.invalid_token("token is not an absolute http(s) URL")
        if not self._allow_private:
            try:
                literal = is_public_address(url.host)
            except ValueError:
                literal = True  # a name: the resolver of our session checks what it resolves to
            if not literal:
                return Outcome.failed(f"webhook host {url.host} is not a public address")
        body = webhook_body(job)
        if self._session is None:
            resolver = None if self._allow_private else PublicOnlyResolver()
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver))
        try:
            async with self._session.post(
                url, data=body, headers=self._headers(job, body), timeout=self._timeout, allow_redirects=False
            ) as response:
                await response.read()
                return classify_status(response.status, response.headers.get("Retry-After"))
        except aiohttp.InvalidURL:
            return Outcome.invalid_token("token is not a usable URL")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, NotPublic):
                return Outcome.failed(f"webhook host {url.host}: {exc.os_error}")
            return Outcome.retry(None, f"{type(exc).__name__}: {exc}")
        except TimeoutError:
            return Outcome.retry(None, "timeout")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome.retry(None, f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        """Close the session this provider made (idempotent)."""
        session, self._session = self._session, None
        if session is not None and self._own_session:
            await session.close()

    def __repr__(self) -> str:
        return f"WebhookProvider(signed={bool(self._secret)}, timeout_s={self._timeout.total})"
