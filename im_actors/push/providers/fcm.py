"""The ``fcm`` provider: Firebase Cloud Messaging HTTP v1 with a service-account OAuth 2.0 access token.

Access token (RFC 7523 JWT-bearer grant, as Google's service accounts use it)::

    POST <token_uri from the service-account JSON>     form-encoded
    grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>
        JWT: RS256, header kid=private_key_id; claims iss=client_email,
             scope=https://www.googleapis.com/auth/firebase.messaging, aud=token_uri, iat, exp=iat+3600
    -> {"access_token": ..., "expires_in": s, "token_type": "Bearer"}     cached until 60 s before expiry

(PyJWT rather than google-auth: google-auth refreshes through a blocking HTTP transport, which would
stall the worker's event loop; the grant is the same.)

Send::

    POST <fcm_url>/v1/projects/<project_id>/messages:send
    Authorization: Bearer <access token>
    {"message": {"token": ..., "notification": {"title": sender, "body": preview},
                 "data": {"conv", "seq", "sender", "job_id", "badge"} (strings),
                 "android": {"collapse_key": ..., "priority": "high",
                             "notification": {"tag": collapse_key, "notification_count": badge}}}}

Answers (FCM ``ErrorCode``): 200 delivered; ``UNREGISTERED`` (404), ``SENDER_ID_MISMATCH`` (403) and
``INVALID_ARGUMENT`` naming ``message.token`` invalid token; 401 drops the access token and retries;
429 ``QUOTA_EXCEEDED``, 500 ``INTERNAL``, 503 ``UNAVAILABLE``, timeouts retry (with ``Retry-After``);
any other 4xx failed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt

from im_actors.config import Config
from im_actors.errors import ConfigError
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

__all__ = ["FcmProvider", "FCM_SCOPE", "JWT_BEARER_GRANT", "fcm_message", "classify_fcm"]

#: OAuth 2.0 scope of the FCM HTTP v1 API.
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"

#: grant_type of the JWT-bearer grant (RFC 7523).
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

_ACCOUNT_FIELDS = ("project_id", "client_email", "private_key", "token_uri")


def fcm_message(job: PushJob) -> dict[str, Any]:
    """The request body for ``job`` (module docstring)."""
    return {
        "message": {
            "token": job["token"],
            "notification": {"title": job["sender"], "body": job["preview"]},
            "data": {
                "conv": job["conv"],
                "seq": str(job["seq"]),
                "sender": job["sender"],
                "job_id": job["job_id"],
                "badge": str(job["badge"]),
            },
            "android": {
                "collapse_key": job["collapse_key"],
                "priority": "high",
                "notification": {"tag": job["collapse_key"], "notification_count": job["badge"]},
            },
        }
    }


def _error_codes(error: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The FCM error codes and the fields named in violations of an ``error`` object."""
    codes: set[str] = set()
    fields: set[str] = set()
    for detail in error.get("details") or []:
        if not isinstance(detail, dict):
            continue
        if isinstance(detail.get("errorCode"), str):
            codes.add(detail["errorCode"])
        for violation in detail.get("fieldViolations") or []:
            if isinstance(violation, dict) and isinstance(violation.get("field"), str):
                fields.add(violation["field"])
    return codes, fields


def classify_fcm(answer: Answer) -> Outcome:
    """The :class:`Outcome` of an FCM v1 answer (module docstring); 401 is retry."""
    if answer.status == 200:
        return Outcome.delivered(str(answer.json().get("name", "")))
    error = answer.json().get("error")
    error = error if isinstance(error, dict) else {}
    codes, fields = _error_codes(error)
    status = str(error.get("status", ""))
    detail = f"HTTP {answer.status} {'/'.join(sorted(codes)) or status}".strip()
    if "UNREGISTERED" in codes or "SENDER_ID_MISMATCH" in codes:
        return Outcome.invalid_token(detail)
    if "INVALID_ARGUMENT" in (codes | {status}) and "message.token" in fields:
        return Outcome.invalid_token(detail)
    if transient_status(answer.status) or answer.status == 401:
        return Outcome.retry(retry_after_of(answer), detail)
    return Outcome.failed(detail)


class FcmProvider(Provider):
    """Sends jobs through FCM HTTP v1 (module docstring). Reads ``fcm_credentials_file`` at creation:
    raises :class:`ConfigError` naming the key when it is unreadable, not JSON, lacks a field or holds
    an unusable key. ``client`` lets a test pass its own ``httpx.AsyncClient``."""

    name = "fcm"

    def __init__(self, config: Config, client: httpx.AsyncClient | None = None) -> None:
        path = config.fcm_credentials_file
        try:
            account = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"fcm_credentials_file: cannot read {path!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"fcm_credentials_file: {path!r} is not JSON: {exc}") from None
        if not isinstance(account, dict):
            raise ConfigError(f"fcm_credentials_file: {path!r} is not a service-account object")
        missing = [f for f in _ACCOUNT_FIELDS if not isinstance(account.get(f), str) or not account[f]]
        if missing:
            raise ConfigError(f"fcm_credentials_file: {path!r} lacks {', '.join(missing)}")
        try:
            jwt.encode({"probe": 1}, account["private_key"], algorithm="RS256")
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise ConfigError(f"fcm_credentials_file: {path!r} has an unusable private_key: {exc}") from None
        self._account = account
        self._project = account["project_id"]
        self._timeout_s = config.push_timeout_s
        self._send_url = f"{config.fcm_url.rstrip('/')}/v1/projects/{self._project}/messages:send"
        self._client = client or httpx.AsyncClient()
        self._own_client = client is None
        self._token = TokenCache(self._fetch_token, margin_s=60.0)

    def assertion(self, now_s: float | None = None) -> str:
        """The signed JWT of the JWT-bearer grant (module docstring)."""
        iat = int(time.time() if now_s is None else now_s)
        claims = {
            "iss": self._account["client_email"],
            "scope": FCM_SCOPE,
            "aud": self._account["token_uri"],
            "iat": iat,
            "exp": iat + 3600,
        }
        headers = {"kid": self._account["private_key_id"]} if self._account.get("private_key_id") else None
        return jwt.encode(claims, self._account["private_key"], algorithm="RS256", headers=headers)

    async def _fetch_token(self) -> tuple[str, float]:
        return await fetch_access_token(
            self._client,
            self._account["token_uri"],
            self._timeout_s,
            {"grant_type": JWT_BEARER_GRANT, "assertion": self.assertion()},
        )

    async def send(self, job: PushJob) -> Outcome:
        """POST ``job`` to FCM and classify the answer; never raises except ``CancelledError``."""
        try:
            bearer = await self._token.get()
        except TokenError as exc:
            return exc.outcome
        answer = await post(
            self._client,
            self._send_url,
            self._timeout_s,
            json=fcm_message(job),
            headers={"Authorization": f"Bearer {bearer}"},
        )
        if isinstance(answer, Outcome):
            return answer
        if answer.status == 401:
            self._token.invalidate(bearer)
        return classify_fcm(answer)

    @property
    def token_fetches(self) -> int:
        """Access tokens fetched so far."""
        return self._token.fetches

    async def close(self) -> None:
        """Close the HTTP client this provider made (idempotent)."""
        if self._own_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return f"FcmProvider(project={self._project!r}, url={self._send_url!r})"
