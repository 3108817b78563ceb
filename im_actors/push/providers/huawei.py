"""The ``huawei`` provider: Huawei Push Kit (HMS Core) server API with an OAuth 2.0 client-credentials token.

Access token::

    POST <huawei_token_url>        form: grant_type=client_credentials&client_id=<app id>&client_secret=<secret>
    -> {"access_token": ..., "expires_in": s, "token_type": "Bearer"}      cached until 60 s before expiry

Send::

    POST <huawei_url>/v1/<app id>/messages:send
    Authorization: Bearer <access token>
    {"validate_only": false,
     "message": {"token": [<token>],
                 "data": "<JSON string: conv, seq, sender, job_id>",
                 "android": {"notification": {"title": sender, "body": preview, "tag": collapse_key,
                                              "click_action": {"type": 3}}}}}

Answers: a JSON ``code`` (a string) next to the HTTP status. ``80000000`` success; ``80300007`` (all
tokens invalid) and ``80100000`` (some tokens invalid: with our single token, it is the invalid one)
invalid token; ``80200001`` (OAuth authentication error) and ``80200003`` (OAuth token expired) drop the
access token and retry; ``81000001`` (internal error), HTTP 429, 502 and 503 (flow control) and other
5xx, timeouts retry; any other code (``80100001`` bad parameters, ``80100003`` bad structure,
``80300002`` no permission, ``80300008`` body too large, ...) failed. Source: Huawei Push Kit server
API reference, "Response codes".
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from im_actors.config import Config
from im_actors.push.jobs import PushJob
from im_actors.push.providers.base import Outcome, Provider
from im_actors.push.providers.http import (
    Answer,
    TokenCache,
    TokenError,
    fetch_access_token,
    post,
    retry_after_of,
    transient_status,
)

__all__ = ["HuaweiProvider", "HUAWEI_SUCCESS", "huawei_message", "classify_huawei"]

#: Result code of an accepted message.
HUAWEI_SUCCESS = "80000000"

_INVALID = frozenset({"80300007", "80100000"})
_AUTH = frozenset({"80200001", "80200003"})
_TRANSIENT = frozenset({"81000001"})


def huawei_message(job: PushJob) -> dict[str, Any]:
    """The request body for ``job`` (module docstring)."""
    data = {"conv": job["conv"], "seq": job["seq"], "sender": job["sender"], "job_id": job["job_id"]}
    return {
        "validate_only": False,
        "message": {
            "token": [job["token"]],
            "data": json.dumps(data, separators=(",", ":"), sort_keys=True),
            "android": {
                "notification": {
                    "title": job["sender"],
                    "body": job["preview"],
                    "tag": job["collapse_key"],
                    "click_action": {"type": 3},
                }
            },
        },
    }


def classify_huawei(answer: Answer) -> Outcome:
    """The :class:`Outcome` of a Push Kit answer (module docstring); OAuth codes are retry."""
    body = answer.json()
    code = str(body.get("code", ""))
    detail = f"HTTP {answer.status} {code} {body.get('msg', '')}".strip()
    if answer.status == 200 and code == HUAWEI_SUCCESS:
        return Outcome.delivered(str(body.get("requestId", "")))
    if code in _INVALID:
        return Outcome.invalid_token(detail)
    if code in _AUTH or code in _TRANSIENT or transient_status(answer.status) or answer.status == 401:
        return Outcome.retry(retry_after_of(answer), detail)
    return Outcome.failed(detail)


class HuaweiProvider(Provider):
    """Sends jobs through Huawei Push Kit (module docstring). ``client`` lets a test pass its own
    ``httpx.AsyncClient``."""

    name = "huawei"

    def __init__(self, config: Config, client: httpx.AsyncClient | None = None) -> None:
        self._app_id = config.huawei_app_id
        self._secret = config.huawei_client_secret
        self._token_url = config.huawei_token_url
        self._send_url = f"{config.huawei_url.rstrip('/')}/v1/{self._app_id}/messages:send"
        self._timeout_s = config.push_timeout_s
        self._client = client or httpx.AsyncClient()
        self._own_client = client is None
        self._token = TokenCache(self._fetch_token, margin_s=60.0)

    async def _fetch_token(self) -> tuple[str, float]:
        return await fetch_access_token(
            self._client,
            self._token_url,
            self._timeout_s,
            {"grant_type": "client_credentials", "client_id": self._app_id, "client_secret": self._secret},
        )

    async def send(self, job: PushJob) -> Outcome:
        """POST ``job`` to Push Kit and classify the answer; never raises except ``CancelledError``."""
        try:
            bearer = await self._token.get()
        except TokenError as exc:
            return exc.outcome
        answer = await post(
            self._client,
            self._send_url,
            self._timeout_s,
            json=huawei_message(job),
            headers={"Authorization": f"Bearer {bearer}"},
        )
        if isinstance(answer, Outcome):
            return answer
        outcome = classify_huawei(answer)
        if str(answer.json().get("code", "")) in _AUTH or answer.status == 401:
            self._token.invalidate(bearer)
        return outcome

    @property
    def token_fetches(self) -> int:
        """Access tokens fetched so far."""
        return self._token.fetches

    async def close(self) -> None:
        """Close the HTTP client this provider made (idempotent)."""
        if self._own_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return f"HuaweiProvider(app_id={self._app_id!r}, url={self._send_url!r})"
