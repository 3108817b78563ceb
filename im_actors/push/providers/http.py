"""What the HTTP push services share: one ``httpx.AsyncClient`` per provider, a whole-exchange timeout,
transport errors turned into :class:`~im_actors.push.providers.base.Outcome` values, and a cache of
OAuth 2.0 / JWT bearer tokens that refreshes them before they expire.

Used by the APNs, FCM, Huawei and Xiaomi providers; the webhook provider predates it and uses aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from im_actors.push.providers.base import Outcome
from im_actors.push.providers.webhook import parse_retry_after

__all__ = [
    "Answer",
    "TokenCache",
    "TokenError",
    "post",
    "json_body",
    "transient_status",
    "retry_after_of",
    "fetch_access_token",
]


@dataclass(frozen=True)
class Answer:
    """A service's HTTP answer: ``status``, ``headers`` (lower-case names) and the raw ``body``."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; ``{}`` when it is empty, not JSON or not an object."""
        return json_body(self.body)


class TokenError(Exception):
    """Getting an access token failed; :attr:`outcome` says what the job's outcome is (retry or failed)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


def json_body(body: bytes) -> dict[str, Any]:
    """``body`` parsed as a JSON object, or ``{}``."""
    try:
        value = json.loads(body) if body else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def transient_status(status: int) -> bool:
    """True for the HTTP statuses every push service means as "try again later": 429 and 5xx."""
    return status == 429 or 500 <= status < 600


def retry_after_of(answer: Answer) -> int | None:
    """The answer's ``Retry-After`` as ms (seconds or an HTTP date), or None."""
    return parse_retry_after(answer.headers.get("retry-after"))


async def post(client: httpx.AsyncClient, url: str, timeout_s: float, **kwargs: Any) -> Answer | Outcome:
    """POST with ``client`` and read the whole answer within ``timeout_s`` seconds.

    Returns the :class:`Answer`, or an :meth:`Outcome.retry` for a timeout or a transport error
    (connection refused or reset, protocol error). ``kwargs`` go to ``client.post`` (``json``,
    ``data``, ``headers``, ``content``). Never raises except ``CancelledError``.
    """
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.post(url, **kwargs)
            body = await response.aread()
    except TimeoutError:
        return Outcome.retry(None, "timeout")
    except httpx.TimeoutException:
        return Outcome.retry(None, "timeout")
    except (httpx.TransportError, OSError) as exc:
        return Outcome.retry(None, f"{type(exc).__name__}: {exc}")
    return Answer(response.status_code, response.headers, body)


async def fetch_access_token(
    client: httpx.AsyncClient, url: str, timeout_s: float, form: dict[str, str]
) -> tuple[str, float]:
    """An OAuth 2.0 access token from the token endpoint ``url`` (RFC 6749 section 5.1: the form
    ``form`` POSTed, ``{"access_token", "expires_in"}`` answered): ``(token, lifetime_s)``, the
    lifetime 3600 s when not given. Raises :class:`TokenError`: retry for a network failure, 429 or
    5xx (honouring ``Retry-After``), failed for any other refusal."""
    answer = await post(client, url, timeout_s, data=form)
    if isinstance(answer, Outcome):
        raise TokenError(Outcome.retry(None, f"access token: {answer.detail}"))
    body = json_body(answer.body)
    token = body.get("access_token")
    if answer.status != 200 or not isinstance(token, str):
        detail = f"access token: HTTP {answer.status} {body.get('error', '')}".strip()
        if transient_status(answer.status):
            raise TokenError(Outcome.retry(retry_after_of(answer), detail))
        raise TokenError(Outcome.failed(detail))
    expires_in = body.get("expires_in", 3600)
    return token, float(expires_in) if isinstance(expires_in, int | float) else 3600.0


class TokenCache:
    """One bearer token at a time, fetched by ``fetch() -> (token, lifetime_s)`` on first use and again
    ``margin_s`` seconds before its lifetime ends (or after :meth:`invalidate`). Concurrent callers share
    one fetch. ``clock`` is ``time.monotonic`` unless a test gives another."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[tuple[str, float]]],
        margin_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._margin = margin_s
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def get(self) -> str:
        """The current token, fetched first when there is none or it is due. Raises what ``fetch`` raises
        (:class:`TokenError` for the providers here)."""
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        async with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                token, lifetime_s = await self._fetch()
                self.fetches += 1
                self._token = token
                self._refresh_at = self._clock() + max(0.0, lifetime_s - self._margin)
            return self._token

    def invalidate(self, token: str | None = None) -> None:
        """Forget the token (only if it is still ``token``, when given): the service refused it."""
        if token is None or token == self._token:
            self._token = None
