"""The FCM HTTP v1 provider against a local stand-in of Google's token endpoint and of FCM."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from im_actors.config import Config, load_config
from im_actors.errors import ConfigError
from im_actors.push.jobs import make_job
from im_actors.push.providers.base import OutcomeKind
from im_actors.push.providers.fcm import FCM_SCOPE, JWT_BEARER_GRANT, FcmProvider
from tests.push_services import Reply, Request, ServiceApp, running

PROJECT, EMAIL, KEY_ID = "im-test", "push@im-test.iam.gserviceaccount.com", "k1"


def _fcm_error(status: int, name: str, code: str, field: str | None = None) -> Reply:
    details: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
    ]
    if field:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": field}]})
    return Reply(status, {"error": {"code": status, "message": "...", "status": name, "details": details}})


class Google:
    """The token endpoint (/token) and FCM (/v1/projects/<p>/messages:send), answering by device token."""

    def __init__(self, public_key: Any) -> None:
        self.public_key = public_key
        self.issued = 0
        self.expires_in = 3600
        self.reject_next_token = False

    def __call__(self, request: Request) -> Reply:
        if request.path == "/token":
            form = request.form()
            assert form["grant_type"] == JWT_BEARER_GRANT
            claims = jwt.decode(
                form["assertion"], self.public_key, algorithms=["RS256"], audience=request.headers["x-token-uri"]
            )
            assert claims["iss"] == EMAIL and claims["scope"] == FCM_SCOPE and claims["exp"] - claims["iat"] == 3600
            assert jwt.get_unverified_header(form["assertion"])["kid"] == KEY_ID
            self.issued += 1
            return Reply(200, {"access_token": f"ya29.token{self.issued}", "expires_in": self.expires_in})
        bearer = request.headers.get("authorization", "")
        if self.reject_next_token:
            self.reject_next_token = False
            return _fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR")
        if not bearer.startswith("Bearer ya29.token"):
            return _fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR")
        token = request.json()["message"]["token"]
        if token == "gone":
            return _fcm_error(404, "NOT_FOUND", "UNREGISTERED")
        if token == "garbage":
            return _fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "message.token")
        if token == "mismatch":
            return _fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH")
        if token == "busy":
            reply = _fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
            reply.headers = {"Retry-After": "9"}
            return reply
        if token == "down":
            return _fcm_error(503, "UNAVAILABLE", "UNAVAILABLE")
        if token == "badmsg":
            return _fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "message.android.ttl")
        if token == "slow":
            return Reply(200, {"name": "late"}, delay_s=2.0)
        return Reply(200, {"name": f"projects/{PROJECT}/messages/0:{len(token)}"})


@pytest.fixture
def account(tmp_path: Path) -> tuple[dict[str, Any], Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": KEY_ID,
        "private_key": pem,
        "client_email": EMAIL,
        "token_uri": "",  # filled in with the local server's URL
    }
    return info, key.public_key()


@pytest.fixture
async def google(
    account: tuple[dict[str, Any], Any], tmp_path: Path
) -> AsyncIterator[tuple[ServiceApp, Google, Config]]:
    info, public = account
    service = Google(public)
    app = ServiceApp(service)
    async with running(app) as url:
        info["token_uri"] = f"{url}/token"
        path = tmp_path / "service-account.json"
        path.write_text(json.dumps(info))
        config = load_config(push_providers=("fcm",), fcm_credentials_file=str(path), fcm_url=url, push_timeout_s=2.0)
        yield app, service, config


def _job(token: str, seq: int = 5) -> dict[str, Any]:
    return make_job(
        user="bob",
        device="pixel",
        provider="fcm",
        token=token,
        conv="d:alice:bob",
        seq=seq,
        sender="alice",
        body="hello",
        badge=2,
        created_ms=1,
    )


async def _provider(config: Config, token_uri: str) -> FcmProvider:
    """A provider whose client tells the stand-in the token URI (to check the JWT's audience)."""
    return FcmProvider(config, client=httpx.AsyncClient(headers={"x-token-uri": token_uri}))


async def test_token_then_message_with_collapse_key(google: tuple[ServiceApp, Google, Config]) -> None:
    app, service, config = google
    provider = await _provider(config, json.loads(Path(config.fcm_credentials_file).read_text())["token_uri"])
    try:
        job = _job("device-token-1")
        outcome = await provider.send(job)
        again = await provider.send(_job("device-token-1", 6))
    finally:
        await provider._client.aclose()
    assert outcome.kind is OutcomeKind.DELIVERED and outcome.detail.startswith(f"projects/{PROJECT}/messages/")
    assert again.kind is OutcomeKind.DELIVERED
    assert service.issued == 1  # cached
    token_request, send, _ = app.requests
    assert token_request.path == "/token"
    assert token_request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert send.method == "POST" and send.path == f"/v1/projects/{PROJECT}/messages:send"
    assert send.headers["authorization"] == "Bearer ya29.token1"
    assert send.headers["content-type"] == "application/json"
    assert send.json() == {
        "message": {
            "token": "device-token-1",
            "notification": {"title": "alice", "body": "hello"},
            "data": {"conv": "d:alice:bob", "seq": "5", "sender": "alice", "job_id": job["job_id"], "badge": "2"},
            "android": {
                "collapse_key": "d:alice:bob",
                "priority": "high",
                "notification": {"tag": "d:alice:bob", "notification_count": 2},
            },
        }
    }


async def test_access_token_refreshed_before_expiry_and_after_401(google: tuple[ServiceApp, Google, Config]) -> None:
    _, service, config = google
    service.expires_in = 61  # 60 s margin: due again after 1 s
    provider = await _provider(config, json.loads(Path(config.fcm_credentials_file).read_text())["token_uri"])
    try:
        assert (await provider.send(_job("t"))).kind is OutcomeKind.DELIVERED
        time.sleep(1.1)
        assert (await provider.send(_job("t", 6))).kind is OutcomeKind.DELIVERED
        assert service.issued == 2
        service.expires_in = 3600
        service.reject_next_token = True
        unauthorized = await provider.send(_job("t", 7))
        assert unauthorized.kind is OutcomeKind.RETRY
        assert (await provider.send(_job("t", 8))).kind is OutcomeKind.DELIVERED
        assert service.issued == 3
    finally:
        await provider._client.aclose()


@pytest.mark.parametrize(
    ("token", "kind", "retry_after_ms"),
    [
        ("gone", OutcomeKind.INVALID_TOKEN, None),
        ("garbage", OutcomeKind.INVALID_TOKEN, None),
        ("mismatch", OutcomeKind.INVALID_TOKEN, None),
        ("busy", OutcomeKind.RETRY, 9000),
        ("down", OutcomeKind.RETRY, None),
        ("badmsg", OutcomeKind.FAILED, None),
    ],
)
async def test_answers_are_classified(
    google: tuple[ServiceApp, Google, Config], token: str, kind: OutcomeKind, retry_after_ms: int | None
) -> None:
    app, _, config = google
    provider = await _provider(config, json.loads(Path(config.fcm_credentials_file).read_text())["token_uri"])
    try:
        outcome = await provider.send(_job(token))
    finally:
        await provider._client.aclose()
    assert outcome.kind is kind, outcome
    assert outcome.retry_after_ms == retry_after_ms
    assert [r.path for r in app.requests] == ["/token", f"/v1/projects/{PROJECT}/messages:send"]


async def test_slow_answer_times_out(google: tuple[ServiceApp, Google, Config]) -> None:
    _, _, config = google
    config = config.model_copy(update={"push_timeout_s": 0.3})
    provider = await _provider(config, json.loads(Path(config.fcm_credentials_file).read_text())["token_uri"])
    try:
        outcome = await provider.send(_job("slow"))
    finally:
        await provider._client.aclose()
    assert outcome.kind is OutcomeKind.RETRY and outcome.detail == "timeout"


async def test_token_endpoint_down_is_retried_and_refusal_is_failed(tmp_path: Path, account: Any) -> None:
    info, _ = account
    app = ServiceApp(lambda r: Reply(503, {}) if r.path == "/token503" else Reply(400, {"error": "invalid_grant"}))
    async with running(app) as url:
        outcomes = []
        for path in ("/token503", "/token400"):
            info["token_uri"] = url + path
            creds = tmp_path / "sa.json"
            creds.write_text(json.dumps(info))
            provider = FcmProvider(load_config(push_providers=("fcm",), fcm_credentials_file=str(creds), fcm_url=url))
            try:
                outcomes.append(await provider.send(_job("t")))
            finally:
                await provider.close()
    assert [o.kind for o in outcomes] == [OutcomeKind.RETRY, OutcomeKind.FAILED]
    assert "invalid_grant" in outcomes[1].detail


def test_unusable_credentials_name_the_key(tmp_path: Path, account: Any) -> None:
    with pytest.raises(ConfigError, match="fcm_credentials_file"):
        load_config(push_providers=("fcm",))
    with pytest.raises(ConfigError, match="fcm_credentials_file: .*cannot read"):
        FcmProvider(load_config(push_providers=("fcm",), fcm_credentials_file=str(tmp_path / "none.json")))
    info, _ = account
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({k: v for k, v in info.items() if k != "client_email"} | {"token_uri": "x"}))
    with pytest.raises(ConfigError, match="fcm_credentials_file: .*lacks client_email"):
        FcmProvider(load_config(push_providers=("fcm",), fcm_credentials_file=str(partial)))
