"""The ``xiaomi`` provider: Xiaomi MiPush server API, one registration id per request.

Request::

    POST <xiaomi_url>/v3/message/regid
    Authorization: key=<xiaomi_app_secret>
    Content-Type: application/x-www-form-urlencoded

    registration_id=<token>&restricted_package_name=<xiaomi_package_name>&title=<sender>
    &description=<preview>&payload=<JSON: conv, seq, sender, job_id>&pass_through=0&notify_type=-1
    &notify_id=<collapse id>&extra.badge=<badge>

``notify_id`` is a number derived from the job's collapse key (CRC-32, 31 bits): MiPush replaces a shown
notification by a new one with the same ``notify_id``, which is how pushes for one conversation collapse.

Answers: JSON ``{"result": "ok" | "error", "code": int, "reason": str, ...}``. ``code`` 0 delivered;
20301 ("No valid targets!": the registration id is unknown or unregistered) invalid token; 10001-10003
(system error, service paused, remote service error), 10022/10023 (request rate limits), HTTP 429 and
5xx, timeouts retry; any other code (10016 missing parameter, 10017 bad parameter, 21301 authentication
failed, ...) failed. Source: the MiPush server SDK's ``ErrorCode`` table; the numeric codes are the
least certain part of this module (no public machine-readable reference), so the ``reason`` is kept in
the outcome's detail for operators.
"""

from __future__ import annotations

import json
import zlib

import httpx

from im_actors.config import Config
from im_actors.push.jobs import PushJob
from im_actors.push.providers.base import Outcome, Provider
from im_actors.push.providers.http import Answer, post, retry_after_of, transient_status

__all__ = ["XiaomiProvider", "xiaomi_form", "classify_xiaomi", "notify_id_of"]

_INVALID = frozenset({20301})
_TRANSIENT = frozenset({10001, 10002, 10003, 10022, 10023})


def notify_id_of(collapse_key: str) -> int:
    """The MiPush ``notify_id`` of a collapse key: CRC-32 cut to 31 bits (a non-negative Java int)."""
    return zlib.crc32(collapse_key.encode()) & 0x7FFFFFFF


def xiaomi_form(job: PushJob, package_name: str) -> dict[str, str]:
    """The form fields for ``job`` (module docstring)."""
    payload = {"conv": job["conv"], "seq": job["seq"], "sender": job["sender"], "job_id": job["job_id"]}
    return {
        "registration_id": job["token"],
        "restricted_package_name": package_name,
        "title": job["sender"],
        "description": job["preview"],
        "payload": json.dumps(payload, separators=(",", ":"), sort_keys=True),
        "pass_through": "0",
        "notify_type": "-1",
        "notify_id": str(notify_id_of(job["collapse_key"])),
        "extra.badge": str(job["badge"]),
    }


def classify_xiaomi(answer: Answer) -> Outcome:
    """The :class:`Outcome` of a MiPush answer (module docstring)."""
    body = answer.json()
    code = body.get("code")
    detail = f"HTTP {answer.status} code={code} {body.get('reason', '')}".strip()
    if answer.status == 200 and code == 0 and body.get("result") == "ok":
        data = body.get("data")
        return Outcome.delivered(str(data.get("id", "")) if isinstance(data, dict) else "")
    if code in _INVALID:
        return Outcome.invalid_token(detail)
    if code in _TRANSIENT or transient_status(answer.status):
        return Outcome.retry(retry_after_of(answer), detail)
    return Outcome.failed(detail)


class XiaomiProvider(Provider):
    """Sends jobs through MiPush (module docstring). ``client`` lets a test pass its own
    ``httpx.AsyncClient``."""

    name = "xiaomi"

    def __init__(self, config: Config, client: httpx.AsyncClient | None = None) -> None:
        self._secret = config.xiaomi_app_secret
        self._package = config.xiaomi_package_name
        self._url = f"{config.xiaomi_url.rstrip('/')}/v3/message/regid"
        self._timeout_s = config.push_timeout_s
        self._client = client or httpx.AsyncClient()
        self._own_client = client is None

    async def send(self, job: PushJob) -> Outcome:
        """POST ``job`` to MiPush and classify the answer; never raises except ``CancelledError``."""
        if not job["token"]:
            return Outcome.invalid_token("empty registration id")
        answer = await post(
            self._client,
            self._url,
            self._timeout_s,
            data=xiaomi_form(job, self._package),
            headers={"Authorization": f"key={self._secret}"},
        )
        if isinstance(answer, Outcome):
            return answer
        return classify_xiaomi(answer)

    async def close(self) -> None:
        """Close the HTTP client this provider made (idempotent)."""
        if self._own_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return f"XiaomiProvider(package={self._package!r}, url={self._url!r})"
