"""The webhook provider against a local aiohttp server on 127.0.0.1, and the provider registry."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from im_actors.config import load_config
from im_actors.errors import ConfigError
from im_actors.push.jobs import make_job
from im_actors.push.providers import PROVIDERS, LogProvider, WebhookProvider, make_provider
from im_actors.push.providers.base import Outcome, OutcomeKind
from im_actors.push.providers.webhook import (
    WEBHOOK_FIELDS,
    classify_status,
    is_public_address,
    parse_retry_after,
    sign,
    webhook_body,
)

SECRET = "s3cret"


class Hook:
    """A webhook receiver: answers by path, records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.app = web.Application()
        self.app.router.add_post("/{name}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, dict(request.headers), body))
        name = request.match_info["name"]
        if name == "ok":
            return web.Response(status=200, text="fine")
        if name == "created":
            return web.Response(status=204)
        if name == "gone":
            return web.Response(status=410)
        if name == "missing":
            return web.Response(status=404)
        if name == "busy":
            return web.Response(status=429, headers={"Retry-After": "3"})
        if name == "down":
            return web.Response(status=503)
        if name == "down-later":
            return web.Response(status=503, headers={"Retry-After": "7"})
        if name == "slow":
            await asyncio.sleep(2)
            return web.Response(status=200)
        if name == "bad":
            return web.Response(status=400)
        if name == "moved":
            return web.Response(status=302, headers={"Location": "/ok"})
        return web.Response(status=500)


@pytest.fixture
async def hook() -> AsyncIterator[tuple[Hook, TestServer]]:
    receiver = Hook()
    server = TestServer(receiver.app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield receiver, server
    finally:
        await server.close()


def _job(token: str, **over: object) -> dict:
    fields: dict = dict(
        user="bob",
        device="phone",
        provider="webhook",
        token=token,
        conv="g:grp1",
        seq=42,
        sender="alice",
        body="hi there",
        badge=2,
        created_ms=1,
    )
    fields.update(over)
    return make_job(**fields)


async def test_delivered_with_signed_exact_body(hook: tuple[Hook, TestServer]) -> None:
    receiver, server = hook
    provider = WebhookProvider(load_config(webhook_allow_private=True, webhook_secret=SECRET, push_timeout_s=2))
    try:
        job = _job(str(server.make_url("/ok")))
        outcome = await provider.send(job)
    finally:
        await provider.close()
    assert outcome.kind is OutcomeKind.DELIVERED
    [(path, headers, body)] = receiver.requests
    assert path == "/ok"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Im-Job"] == "bob/phone/g:grp1/42"
    assert headers["X-Im-Attempt"] == "0"
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Im-Signature"] == expected
    assert body == webhook_body(job)
    payload = json.loads(body)
    assert set(payload) == set(WEBHOOK_FIELDS)
    assert payload == {
        "user": "bob",
        "device": "phone",
        "conv": "g:grp1",
        "seq": 42,
        "sender": "alice",
        "preview": "hi there",
        "badge": 2,
        "collapse_key": "g:grp1",
        "job_id": "bob/phone/g:grp1/42",
    }
    assert "token" not in payload


async def test_unsigned_without_secret(hook: tuple[Hook, TestServer]) -> None:
    receiver, server = hook
    provider = WebhookProvider(load_config(webhook_allow_private=True, webhook_secret="", push_timeout_s=2))
    try:
        assert (await provider.send(_job(str(server.make_url("/created"))))).kind is OutcomeKind.DELIVERED
    finally:
        await provider.close()
    [(_, headers, _)] = receiver.requests
    assert "X-Im-Signature" not in headers
    assert headers["X-Im-Job"] == "bob/phone/g:grp1/42"


@pytest.mark.parametrize(
    ("path", "kind", "retry_after_ms"),
    [
        ("/gone", OutcomeKind.INVALID_TOKEN, None),
        ("/missing", OutcomeKind.INVALID_TOKEN, None),
        ("/busy", OutcomeKind.RETRY, 3000),
        ("/down", OutcomeKind.RETRY, None),
        ("/down-later", OutcomeKind.RETRY, 7000),
        ("/bad", OutcomeKind.FAILED, None),
        ("/moved", OutcomeKind.FAILED, None),
        ("/other", OutcomeKind.RETRY, None),  # 500
    ],
)
async def test_classification(
    hook: tuple[Hook, TestServer], path: str, kind: OutcomeKind, retry_after_ms: int | None
) -> None:
    receiver, server = hook
    provider = WebhookProvider(load_config(webhook_allow_private=True, webhook_secret=SECRET, push_timeout_s=2))
    try:
        outcome = await provider.send(_job(str(server.make_url(path))))
    finally:
        await provider.close()
    assert outcome.kind is kind, outcome
    assert outcome.retry_after_ms == retry_after_ms
    assert [r[0] for r in receiver.requests] == [path]  # exactly one request, redirects not followed


async def test_slow_answer_is_a_timeout_and_retried(hook: tuple[Hook, TestServer]) -> None:
    _, server = hook
    provider = WebhookProvider(load_config(webhook_allow_private=True, push_timeout_s=0.2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        outcome = await provider.send(_job(str(server.make_url("/slow"))))
    finally:
        await provider.close()
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.detail == "timeout"
    assert loop.time() - started < 1.5


async def test_connection_refused_is_retried() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = WebhookProvider(load_config(webhook_allow_private=True, push_timeout_s=2))
    try:
        outcome = await provider.send(_job(f"http://127.0.0.1:{port}/hook"))
    finally:
        await provider.close()
    assert outcome.kind is OutcomeKind.RETRY


@pytest.mark.parametrize("token", ["not a url", "ftp://127.0.0.1/x", "/relative/path", "http://"])
async def test_unusable_token_is_invalid(token: str) -> None:
    provider = WebhookProvider(load_config(webhook_allow_private=True))
    try:
        assert (await provider.send(_job(token))).kind is OutcomeKind.INVALID_TOKEN
    finally:
        await provider.close()


def test_retry_after_parsing() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("12") == 12000
    assert parse_retry_after("soon") is None
    now = datetime(2030, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now_s=now.timestamp()) == 30000
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier, now_s=now.timestamp()) == 0


def test_classify_status_table() -> None:
    assert classify_status(200).kind is OutcomeKind.DELIVERED
    assert classify_status(299).kind is OutcomeKind.DELIVERED
    assert classify_status(410).kind is OutcomeKind.INVALID_TOKEN
    assert classify_status(429, "1") == Outcome.retry(1000, "HTTP 429")
    assert classify_status(599).kind is OutcomeKind.RETRY
    assert classify_status(401).kind is OutcomeKind.FAILED
    assert classify_status(301).kind is OutcomeKind.FAILED


def test_sign_matches_hmac() -> None:
    assert sign("k", b"body") == "sha256=" + hmac.new(b"k", b"body", hashlib.sha256).hexdigest()


async def test_log_provider_delivers() -> None:
    provider = make_provider("log", load_config())
    assert isinstance(provider, LogProvider)
    assert (await provider.send(_job("anything", provider="log"))).kind is OutcomeKind.DELIVERED
    await provider.close()


def test_registry() -> None:
    assert {"webhook", "log"} <= set(PROVIDERS)
    assert isinstance(make_provider("webhook", load_config()), WebhookProvider)
    with pytest.raises(ConfigError):
        make_provider("carrier-pigeon", load_config())


def test_public_addresses_are_told_from_internal_ones() -> None:
    internal = ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0"]
    internal += ["224.0.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1"]
    assert [a for a in internal if is_public_address(a)] == []
    assert all(is_public_address(a) for a in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])


async def test_webhook_urls_into_the_deployments_network_are_refused_without_a_request(
    hook: tuple[Hook, TestServer],
) -> None:
    receiver, server = hook
    provider = WebhookProvider(load_config(push_timeout_s=2))  # webhook_allow_private off: the default
    try:
        for url in (
            f"http://127.0.0.1:{server.port}/ok",  # a literal loopback address
            f"http://localhost:{server.port}/ok",  # a name that resolves to loopback
            "http://169.254.169.254/latest/meta-data/",  # the cloud metadata address
            f"http://[::ffff:127.0.0.1]:{server.port}/ok",
        ):
            outcome = await provider.send(_job(url))
            assert outcome.kind is OutcomeKind.FAILED, (url, outcome)  # dead queue, never retried
            assert "not a public address" in outcome.detail or "non-public" in outcome.detail, outcome
    finally:
        await provider.close()
    assert receiver.requests == []
    allowed = WebhookProvider(load_config(push_timeout_s=2, webhook_allow_private=True))
    try:
        assert (await allowed.send(_job(f"http://localhost:{server.port}/ok"))).kind is OutcomeKind.DELIVERED
    finally:
        await allowed.close()
    assert len(receiver.requests) == 1
