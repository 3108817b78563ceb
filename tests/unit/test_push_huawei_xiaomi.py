"""The Huawei Push Kit and Xiaomi MiPush providers against local stand-ins that answer as those services do."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from im_actors.config import Config, load_config
from im_actors.errors import ConfigError
from im_actors.push.jobs import make_job
from im_actors.push.providers import make_providers
from im_actors.push.providers.base import OutcomeKind
from im_actors.push.providers.huawei import HuaweiProvider
from im_actors.push.providers.xiaomi import XiaomiProvider, notify_id_of
from tests.push_services import Reply, Request, ServiceApp, running

APP_ID, SECRET = "101234567", "hms-secret"
MI_SECRET, PACKAGE = "mi-secret==", "org.example.im"


def _job(provider: str, token: str, seq: int = 3) -> dict[str, Any]:
    return make_job(
        user="bob",
        device="phone",
        provider=provider,
        token=token,
        conv="g:club",
        seq=seq,
        sender="alice",
        body="see you",
        badge=4,
        created_ms=1,
    )


# --- Huawei ---


class Huawei:
    """OAuth at /oauth2/v3/token, Push Kit at /v1/<app>/messages:send, answering by token."""

    def __init__(self) -> None:
        self.issued = 0
        self.expire_next = False

    def __call__(self, request: Request) -> Reply:
        if request.path == "/oauth2/v3/token":
            form = request.form()
            if form != {"grant_type": "client_credentials", "client_id": APP_ID, "client_secret": SECRET}:
                return Reply(400, {"error": 1102, "error_description": "invalid client"})
            self.issued += 1
            return Reply(200, {"access_token": f"hms{self.issued}", "expires_in": 3600, "token_type": "Bearer"})
        if self.expire_next:
            self.expire_next = False
            return Reply(401, {"code": "80200003", "msg": "OAuth token expired"})
        token = request.json()["message"]["token"][0]
        answers = {
            "gone": Reply(200, {"code": "80300007", "msg": "All the tokens are invalid", "requestId": "r"}),
            "partial": Reply(200, {"code": "80100000", "msg": '{"success":0,"failure":1,"illegal_tokens":["x"]}'}),
            "busy": Reply(503, {"code": "81000001", "msg": "flow control"}, {"Retry-After": "4"}),
            "internal": Reply(500, {"code": "81000001", "msg": "System inner error"}),
            "toolarge": Reply(400, {"code": "80300008", "msg": "The message body size exceeds the default value"}),
            "slow": Reply(200, {"code": "80000000", "msg": "Success"}, delay_s=2.0),
        }
        return answers.get(token, Reply(200, {"code": "80000000", "msg": "Success", "requestId": "req-1"}))


@pytest.fixture
async def huawei() -> AsyncIterator[tuple[ServiceApp, Huawei, Config]]:
    service = Huawei()
    app = ServiceApp(service)
    async with running(app) as url:
        config = load_config(
            push_providers=("huawei",),
            huawei_url=url,
            huawei_token_url=f"{url}/oauth2/v3/token",
            huawei_app_id=APP_ID,
            huawei_client_secret=SECRET,
            push_timeout_s=2.0,
        )
        yield app, service, config


async def test_huawei_token_then_message(huawei: tuple[ServiceApp, Huawei, Config]) -> None:
    app, service, config = huawei
    provider = HuaweiProvider(config)
    try:
        job = _job("huawei", "IQAAAACy0kYq")
        outcome = await provider.send(job)
        assert (await provider.send(_job("huawei", "IQAAAACy0kYq", 4))).kind is OutcomeKind.DELIVERED
    finally:
        await provider.close()
    assert outcome.kind is OutcomeKind.DELIVERED and outcome.detail == "req-1"
    assert service.issued == 1
    token_request, send, _ = app.requests
    assert token_request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert send.path == f"/v1/{APP_ID}/messages:send"
    assert send.headers["authorization"] == "Bearer hms1"
    body = send.json()
    assert body == {
        "validate_only": False,
        "message": {
            "token": ["IQAAAACy0kYq"],
            "data": body["message"]["data"],
            "android": {
                "notification": {"title": "alice", "body": "see you", "tag": "g:club", "click_action": {"type": 3}}
            },
        },
    }
    assert json.loads(body["message"]["data"]) == {
        "conv": "g:club",
        "seq": 3,
        "sender": "alice",
        "job_id": job["job_id"],
    }


async def test_huawei_expired_access_token_is_renewed(huawei: tuple[ServiceApp, Huawei, Config]) -> None:
    _, service, config = huawei
    provider = HuaweiProvider(config)
    try:
        assert (await provider.send(_job("huawei", "t"))).kind is OutcomeKind.DELIVERED
        service.expire_next = True
        expired = await provider.send(_job("huawei", "t", 4))
        assert expired.kind is OutcomeKind.RETRY and "80200003" in expired.detail
        assert (await provider.send(_job("huawei", "t", 5))).kind is OutcomeKind.DELIVERED
    finally:
        await provider.close()
    assert service.issued == 2


@pytest.mark.parametrize(
    ("token", "kind", "retry_after_ms"),
    [
        ("gone", OutcomeKind.INVALID_TOKEN, None),
        ("partial", OutcomeKind.INVALID_TOKEN, None),
        ("busy", OutcomeKind.RETRY, 4000),
        ("internal", OutcomeKind.RETRY, None),
        ("toolarge", OutcomeKind.FAILED, None),
    ],
)
async def test_huawei_answers_are_classified(
    huawei: tuple[ServiceApp, Huawei, Config], token: str, kind: OutcomeKind, retry_after_ms: int | None
) -> None:
    _, _, config = huawei
    provider = HuaweiProvider(config)
    try:
        outcome = await provider.send(_job("huawei", token))
    finally:
        await provider.close()
    assert outcome.kind is kind, outcome
    assert outcome.retry_after_ms == retry_after_ms


async def test_huawei_slow_answer_and_refused_credentials(huawei: tuple[ServiceApp, Huawei, Config]) -> None:
    _, _, config = huawei
    provider = HuaweiProvider(config.model_copy(update={"push_timeout_s": 0.3}))
    wrong = HuaweiProvider(config.model_copy(update={"huawei_client_secret": "wrong"}))
    try:
        slow = await provider.send(_job("huawei", "slow"))
        refused = await wrong.send(_job("huawei", "t"))
    finally:
        await provider.close()
        await wrong.close()
    assert slow.kind is OutcomeKind.RETRY and slow.detail == "timeout"
    assert refused.kind is OutcomeKind.FAILED and "access token: HTTP 400" in refused.detail


# --- Xiaomi ---


def _mipush(request: Request) -> Reply:
    if request.headers.get("authorization") != f"key={MI_SECRET}":
        return Reply(200, {"result": "error", "code": 21301, "reason": "Authentication failed"})
    token = request.form()["registration_id"]
    answers = {
        "gone": Reply(
            200, {"result": "error", "code": 20301, "reason": "No valid targets!", "description": "发送消息失败"}
        ),
        "limited": Reply(200, {"result": "error", "code": 10023, "reason": "User requests out of rate limit"}),
        "busy": Reply(429, b"", {"Retry-After": "2"}),
        "down": Reply(503, b""),
        "bad": Reply(200, {"result": "error", "code": 10017, "reason": "Invalid parameter"}),
        "slow": Reply(200, {"result": "ok", "code": 0, "data": {"id": "late"}}, delay_s=2.0),
    }
    default = Reply(200, {"result": "ok", "code": 0, "data": {"id": "scm01b"}, "description": "成功", "trace_id": "x"})
    return answers.get(token, default)


@pytest.fixture
async def mipush() -> AsyncIterator[tuple[ServiceApp, Config]]:
    app = ServiceApp(_mipush)
    async with running(app) as url:
        yield (
            app,
            load_config(
                push_providers=("xiaomi",),
                xiaomi_url=url,
                xiaomi_app_secret=MI_SECRET,
                xiaomi_package_name=PACKAGE,
                push_timeout_s=2.0,
            ),
        )


async def test_xiaomi_form_post(mipush: tuple[ServiceApp, Config]) -> None:
    app, config = mipush
    provider = XiaomiProvider(config)
    try:
        job = _job("xiaomi", "regid/+abc=")
        outcome = await provider.send(job)
    finally:
        await provider.close()
    assert outcome.kind is OutcomeKind.DELIVERED and outcome.detail == "scm01b"
    [request] = app.requests
    assert request.path == "/v3/message/regid"
    assert request.headers["authorization"] == f"key={MI_SECRET}"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = request.form()
    assert json.loads(form.pop("payload")) == {"conv": "g:club", "seq": 3, "sender": "alice", "job_id": job["job_id"]}
    assert form == {
        "registration_id": "regid/+abc=",
        "restricted_package_name": PACKAGE,
        "title": "alice",
        "description": "see you",
        "pass_through": "0",
        "notify_type": "-1",
        "notify_id": str(notify_id_of("g:club")),
        "extra.badge": "4",
    }
    assert 0 <= notify_id_of("g:club") < 2**31


@pytest.mark.parametrize(
    ("token", "kind", "retry_after_ms"),
    [
        ("gone", OutcomeKind.INVALID_TOKEN, None),
        ("limited", OutcomeKind.RETRY, None),
        ("busy", OutcomeKind.RETRY, 2000),
        ("down", OutcomeKind.RETRY, None),
        ("bad", OutcomeKind.FAILED, None),
    ],
)
async def test_xiaomi_answers_are_classified(
    mipush: tuple[ServiceApp, Config], token: str, kind: OutcomeKind, retry_after_ms: int | None
) -> None:
    _, config = mipush
    provider = XiaomiProvider(config)
    try:
        outcome = await provider.send(_job("xiaomi", token))
    finally:
        await provider.close()
    assert outcome.kind is kind, outcome
    assert outcome.retry_after_ms == retry_after_ms


async def test_xiaomi_slow_answer_and_wrong_secret(mipush: tuple[ServiceApp, Config]) -> None:
    _, config = mipush
    slow_provider = XiaomiProvider(config.model_copy(update={"push_timeout_s": 0.3}))
    wrong = XiaomiProvider(config.model_copy(update={"xiaomi_app_secret": "nope"}))
    try:
        slow = await slow_provider.send(_job("xiaomi", "slow"))
        refused = await wrong.send(_job("xiaomi", "t"))
    finally:
        await slow_provider.close()
        await wrong.close()
    assert slow.kind is OutcomeKind.RETRY and slow.detail == "timeout"
    assert refused.kind is OutcomeKind.FAILED and "21301" in refused.detail


def test_missing_keys_are_named_only_for_enabled_providers() -> None:
    load_config(push_providers=("webhook",))  # nothing of huawei or xiaomi needed
    with pytest.raises(ConfigError, match="huawei_client_secret"):
        load_config(push_providers=("huawei",), huawei_app_id=APP_ID)
    with pytest.raises(ConfigError, match="xiaomi_package_name"):
        load_config(push_providers=("xiaomi",), xiaomi_app_secret=MI_SECRET)
    providers = make_providers(
        load_config(
            push_providers=("huawei", "xiaomi"),
            huawei_app_id="a",
            huawei_client_secret="b",
            xiaomi_app_secret="c",
            xiaomi_package_name="d",
        )
    )
    assert set(providers) == {"huawei", "xiaomi"}
