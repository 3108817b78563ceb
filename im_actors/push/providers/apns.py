"""The ``apns`` provider: Apple Push Notification service over HTTP/2 with token-based authentication.

Request (Apple, "Sending notification requests to APNs")::

    POST <apns_url>/3/device/<token>                HTTP/2 only (httpx with h2)
    authorization: bearer <JWT>                      ES256, header {alg, kid=apns_key_id},
                                                     claims {iss=apns_team_id, iat}; made once and reused
                                                     until it is 50 minutes old (Apple refuses tokens older
                                                     than 60 minutes and renewals more often than every 20)
    apns-topic: <apns_topic>
    apns-push-type: alert | background
    apns-priority: 10 (alert) | 5 (background)
    apns-expiration: <now + apns_expiration_s, Unix s> (0 when apns_expiration_s is 0)
    apns-collapse-id: <job collapse_key, cut to 64 bytes>
    apns-id: <UUID derived from the job id>          the same job always has the same apns-id

    {"aps": {"alert": {"title": sender, "body": preview}, "badge": n, "sound": "default", "thread-id": conv},
     "im": {"conv": ..., "seq": ..., "job_id": ...}}            (background: {"aps": {"content-available": 1}, ...})

Answers: 200 delivered; 410 (``Unregistered``) and 400 ``BadDeviceToken`` / ``DeviceTokenNotForTopic``
invalid token; 403 ``ExpiredProviderToken`` makes a new JWT and retries; 429 and 5xx retry (honouring a
``Retry-After`` if APNs sends one); a timeout or a broken connection retry; anything else failed (the
``reason`` is the detail). A token that is not hex digits is an invalid token without a request.
"""

from __future__ import annotations

import string
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from im_actors.config import Config
from im_actors.errors import ConfigError
from im_actors.push.jobs import PushJob
from im_actors.push.providers.base import Outcome, Provider
from im_actors.push.providers.http import Answer, TokenCache, post, retry_after_of, transient_status

__all__ = ["ApnsProvider", "APNS_JWT_LIFETIME_S", "APNS_JWT_REFRESH_S", "apns_payload", "classify_apns"]

#: Apple refuses a provider token older than this (s).
APNS_JWT_LIFETIME_S = 3600

#: A provider token is renewed once it is this old (s): under the hour, over Apple's 20-minute minimum.
APNS_JWT_REFRESH_S = 50 * 60

_INVALID_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered"})
_HEX = frozenset(string.hexdigits)


def apns_payload(job: PushJob, push_type: str) -> dict[str, Any]:
    """The JSON payload for ``job`` (module docstring); ``push_type`` is ``alert`` or ``background``."""
    im = {"conv": job["conv"], "seq": job["seq"], "job_id": job["job_id"]}
    if push_type == "background":
        return {"aps": {"content-available": 1}, "im": im}
    return {
        "aps": {
            "alert": {"title": job["sender"], "body": job["preview"]},
            "badge": job["badge"],
            "sound": "default",
            "thread-id": job["conv"],
        },
        "im": im,
    }


def classify_apns(answer: Answer) -> Outcome:
    """The :class:`Outcome` of an APNs answer (module docstring); 403 ExpiredProviderToken is retry."""
    reason = str(answer.json().get("reason", ""))
    detail = f"HTTP {answer.status} {reason}".strip()
    if answer.status == 200:
        return Outcome.delivered(answer.headers.get("apns-id", ""))
    if answer.status == 410 or reason in _INVALID_REASONS:
        return Outcome.invalid_token(detail)
    if transient_status(answer.status) or reason == "ExpiredProviderToken":
        return Outcome.retry(retry_after_of(answer), detail)
    return Outcome.failed(detail)


def _collapse_id(key: str) -> str:
    """``key`` cut to APNs' 64-byte limit on a character boundary."""
    data = key.encode()[:64]
    return data.decode(errors="ignore")


class ApnsProvider(Provider):
    """Sends jobs to APNs (module docstring). Reads and checks ``apns_key_file`` at creation: raises
    :class:`ConfigError` naming the key when it is unreadable or not a P-256 private key.

    ``client`` lets a test pass its own ``httpx.AsyncClient`` (then :meth:`close` leaves it open);
    ``clock`` (Unix seconds) lets a test move time for the token cache.
    """

    name = "apns"

    def __init__(self, config: Config, client: httpx.AsyncClient | None = None, clock: Any = time.time) -> None:
        try:
            pem = Path(config.apns_key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"apns_key_file: cannot read {config.apns_key_file!r}: {exc.strerror}") from None
        try:
            key = load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"apns_key_file: {config.apns_key_file!r} is not a PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ConfigError(f"apns_key_file: {config.apns_key_file!r} is not an ES256 (P-256) key")
        self._key = key
        self._key_id = config.apns_key_id
        self._team_id = config.apns_team_id
        self._topic = config.apns_topic
        self._push_type = config.apns_push_type
        self._expiration_s = config.apns_expiration_s
        self._timeout_s = config.push_timeout_s
        self._base = config.apns_url.rstrip("/")
        self._clock = clock
        # APNs speaks HTTP/2 only: h2 through ALPN for https, prior knowledge for a cleartext test server.
        self._client = client or httpx.AsyncClient(http1=False, http2=True)
        self._own_client = client is None
        self._jwt = TokenCache(self._sign, margin_s=APNS_JWT_LIFETIME_S - APNS_JWT_REFRESH_S, clock=clock)

    async def _sign(self) -> tuple[str, float]:
        token = jwt.encode(
            {"iss": self._team_id, "iat": int(self._clock())},
            self._key,
            algorithm="ES256",
            headers={"kid": self._key_id},
        )
        return token, APNS_JWT_LIFETIME_S

    def headers(self, job: PushJob, bearer: str) -> dict[str, str]:
        """The request headers for ``job`` with provider token ``bearer``."""
        expiration = 0 if self._expiration_s == 0 else int(self._clock()) + self._expiration_s
        return {
            "authorization": f"bearer {bearer}",
            "apns-topic": self._topic,
            "apns-push-type": self._push_type,
            "apns-priority": "10" if self._push_type == "alert" else "5",
            "apns-expiration": str(expiration),
            "apns-collapse-id": _collapse_id(job["collapse_key"]),
            "apns-id": str(uuid.uuid5(uuid.NAMESPACE_URL, job["job_id"])),
        }

    async def send(self, job: PushJob) -> Outcome:
        """POST ``job`` to APNs and classify the answer; never raises except ``CancelledError``."""
        token = job["token"]
        if not token or not set(token) <= _HEX:
            return Outcome.invalid_token("APNs device tokens are hex digits")
        bearer = await self._jwt.get()
        answer = await post(
            self._client,
            f"{self._base}/3/device/{token}",
            self._timeout_s,
            json=apns_payload(job, self._push_type),
            headers=self.headers(job, bearer),
        )
        if isinstance(answer, Outcome):
            return answer
        if answer.status == 403:
            self._jwt.invalidate(bearer)  # Expired/InvalidProviderToken: the next send signs a new one
        return classify_apns(answer)

    @property
    def jwt_signatures(self) -> int:
        """Provider tokens signed so far (one per 50 minutes, plus one after each 403)."""
        return self._jwt.fetches

    async def close(self) -> None:
        """Close the HTTP/2 connection this provider opened (idempotent)."""
        if self._own_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return f"ApnsProvider(url={self._base!r}, topic={self._topic!r}, kid={self._key_id!r})"
