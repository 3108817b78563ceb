"""The APNs provider against a local HTTP/2 (h2c) stand-in of APNs that answers as APNs does."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from im_actors.config import Config, load_config
from im_actors.errors import ConfigError
from im_actors.push.jobs import make_job
from im_actors.push.providers import make_providers
from im_actors.push.providers.apns import APNS_JWT_REFRESH_S, ApnsProvider
from im_actors.push.providers.base import OutcomeKind
from tests.push_services import Reply, Request, ServiceApp, running

KEY_ID, TEAM_ID, TOPIC = "ABC123DEFG", "TEAM123456", "org.example.im"
OK, GONE, BAD, BUSY, DOWN, SLOW, EXPIRED, TOO_BIG = "aa01", "dead", "bad0", "b051", "5030", "510e", "e4b1", "413a"


class Apns:
    """Answers like APNs: by device token; an ExpiredProviderToken once for EXPIRED."""

    def __init__(self) -> None:
        self.expired_once = False

    def __call__(self, request: Request) -> Reply:
        token = request.path.rsplit("/", 1)[-1]
        if token == GONE:
            return Reply(410, {"reason": "Unregistered", "timestamp": 1700000000000})
        if token == BAD:
            return Reply(400, {"reason": "BadDeviceToken"})
        if token == BUSY:
            return Reply(429, {"reason": "TooManyRequests"}, {"Retry-After": "5"})
        if token == DOWN:
            return Reply(503, {"reason": "ServiceUnavailable"})
        if token == SLOW:
            return Reply(200, b"", {"apns-id": request.headers.get("apns-id", "")}, delay_s=2.0)
        if token == EXPIRED and not self.expired_once:
            self.expired_once = True
            return Reply(403, {"reason": "ExpiredProviderToken"})
        if token == TOO_BIG:
            return Reply(413, {"reason": "PayloadTooLarge"})
        return Reply(200, b"", {"apns-id": request.headers.get("apns-id", "")})


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, ec.EllipticCurvePublicKey]:
    private = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "AuthKey.p8"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path, private.public_key()


@pytest.fixture
async def apns() -> AsyncIterator[tuple[ServiceApp, str]]:
    app = ServiceApp(Apns())
    async with running(app) as url:
        yield app, url


def _config(url: str, key_file: Path, **over: Any) -> Config:
    fields: dict[str, Any] = dict(
        push_providers=("apns",),
        apns_url=url,
        apns_key_file=str(key_file),
        apns_key_id=KEY_ID,
        apns_team_id=TEAM_ID,
        apns_topic=TOPIC,
        push_timeout_s=2.0,
    )
    fields.update(over)
    return load_config(**fields)


def _job(token: str, seq: int = 7) -> dict[str, Any]:
    return make_job(
        user="bob",
        device="iphone",
        provider="apns",
        token=token,
        conv="g:team",
        seq=seq,
        sender="alice",
        body="lunch?",
        badge=3,
        created_ms=1,
    )


async def test_delivered_over_http2_with_every_header_and_the_payload(
    apns: tuple[ServiceApp, str], key: tuple[Path, ec.EllipticCurvePublicKey]
) -> None:
    app, url = apns
    clock = Clock()
    provider = ApnsProvider(_config(url, key[0]), clock=clock)
    try:
        job = _job(OK)
        outcome = await provider.send(job)
    finally:
        await provider.close()
    assert outcome.kind is OutcomeKind.DELIVERED
    [request] = app.requests
    assert request.http_version == "2"
    assert request.method == "POST"
    assert request.path == f"/3/device/{OK}"
    headers = request.headers
    assert headers["apns-topic"] == TOPIC
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    assert headers["apns-expiration"] == str(int(clock.now) + 86400)
    assert headers["apns-collapse-id"] == "g:team"
    assert headers["apns-id"] == str(uuid.uuid5(uuid.NAMESPACE_URL, job["job_id"]))
    assert outcome.detail == headers["apns-id"]
    scheme, token = headers["authorization"].split(" ", 1)
    assert scheme == "bearer"
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": KEY_ID, "typ": "JWT"}
    claims = jwt.decode(token, key[1], algorithms=["ES256"])
    assert claims == {"iss": TEAM_ID, "iat": int(clock.now)}
    assert request.json() == {
        "aps": {"alert": {"title": "alice", "body": "lunch?"}, "badge": 3, "sound": "default", "thread-id": "g:team"},
        "im": {"conv": "g:team", "seq": 7, "job_id": job["job_id"]},
    }


async def test_background_push_type_and_no_expiration(
    apns: tuple[ServiceApp, str], key: tuple[Path, ec.EllipticCurvePublicKey]
) -> None:
    app, url = apns
    provider = ApnsProvider(_config(url, key[0], apns_push_type="background", apns_expiration_s=0))
    try:
        assert (await provider.send(_job(OK))).kind is OutcomeKind.DELIVERED
    finally:
        await provider.close()
    [request] = app.requests
    assert request.headers["apns-push-type"] == "background"
    assert request.headers["apns-priority"] == "5"
    assert request.headers["apns-expiration"] == "0"
    assert request.json()["aps"] == {"content-available": 1}


async def test_provider_token_is_reused_then_renewed_before_an_hour(
    apns: tuple[ServiceApp, str], key: tuple[Path, ec.EllipticCurvePublicKey]
) -> None:
    app, url = apns
    clock = Clock()
    provider = ApnsProvider(_config(url, key[0]), clock=clock)
    try:
        for seq in range(1, 4):
            assert (await provider.send(_job(OK, seq))).kind is OutcomeKind.DELIVERED
        clock.now += APNS_JWT_REFRESH_S - 1
        assert (await provider.send(_job(OK, 4))).kind is OutcomeKind.DELIVERED
        assert provider.jwt_signatures == 1
        clock.now += 2  # 50 minutes old: renewed, still under Apple's 60
        assert (await provider.send(_job(OK, 5))).kind is OutcomeKind.DELIVERED
        assert provider.jwt_signatures == 2
    finally:
        await provider.close()
    tokens = [r.headers["authorization"] for r in app.requests]
    assert len(set(tokens[:4])) == 1 and tokens[4] != tokens[0]
    renewed = jwt.decode(tokens[4].split(" ")[1], key[1], algorithms=["ES256"], options={"verify_iat": False})
    assert renewed["iat"] == int(clock.now)  # the fake clock is 50 minutes ahead of the real one


async def test_expired_provider_token_is_renewed_and_retried(
    apns: tuple[ServiceApp, str], key: tuple[Path, ec.EllipticCurvePublicKey]
) -> None:
    app, url = apns
    clock = Clock()
    provider = ApnsProvider(_config(url, key[0]), clock=clock)
    try:
        first = await provider.send(_job(EXPIRED))
        clock.now += 1
        second = await provider.send(_job(EXPIRED))
    finally:
        await provider.close()
    assert first.kind is OutcomeKind.RETRY and "ExpiredProviderToken" in first.detail
    assert second.kind is OutcomeKind.DELIVERED
    assert provider.jwt_signatures == 2
    assert app.requests[0].headers["authorization"] != app.requests[1].headers["authorization"]


@pytest.mark.parametrize(
    ("token", "kind", "retry_after_ms", "reason"),
    [
        (GONE, OutcomeKind.INVALID_TOKEN, None, "Unregistered"),
        (BAD, OutcomeKind.INVALID_TOKEN, None, "BadDeviceToken"),
        (BUSY, OutcomeKind.RETRY, 5000, "TooManyRequests"),
        (DOWN, OutcomeKind.RETRY, None, "ServiceUnavailable"),
        (TOO_BIG, OutcomeKind.FAILED, None, "PayloadTooLarge"),
    ],
)
async def test_answers_are_classified(
    apns: tuple[ServiceApp, str],
    key: tuple[Path, ec.EllipticCurvePublicKey],
    token: str,
    kind: OutcomeKind,
    retry_after_ms: int | None,
    reason: str,
) -> None:
    app, url = apns
    provider = ApnsProvider(_config(url, key[0]))
    try:
        outcome = await provider.send(_job(token))
    finally:
        await provider.close()
    assert outcome.kind is kind
    assert outcome.retry_after_ms == retry_after_ms
    assert reason in outcome.detail
    assert [r.path for r in app.requests] == [f"/3/device/{token}"]


async def test_slow_answer_times_out_and_is_retried(
    apns: tuple[ServiceApp, str], key: tuple[Path, ec.EllipticCurvePublicKey]
) -> None:
    app, url = apns
    provider = ApnsProvider(_config(url, key[0], push_timeout_s=0.3))
    started = time.monotonic()
    try:
        outcome = await provider.send(_job(SLOW))
    finally:
        await provider.close()
    assert outcome.kind is OutcomeKind.RETRY and outcome.detail == "timeout"
    assert time.monotonic() - started < 1.5
    assert len(app.requests) == 1


async def test_non_hex_token_is_invalid_without_a_request(
    apns: tuple[ServiceApp, str], key: tuple[Path, ec.EllipticCurvePublicKey]
) -> None:
    app, url = apns
    provider = ApnsProvider(_config(url, key[0]))
    try:
        assert (await provider.send(_job("../../etc"))).kind is OutcomeKind.INVALID_TOKEN
    finally:
        await provider.close()
    assert app.requests == []


def test_missing_configuration_names_the_key_only_when_enabled(tmp_path: Path) -> None:
    assert "apns" not in load_config().push_providers  # not enabled: nothing required
    with pytest.raises(ConfigError, match="apns_team_id"):
        load_config(push_providers=("apns",), apns_key_file="k.p8", apns_key_id=KEY_ID, apns_topic=TOPIC)
    with pytest.raises(ConfigError, match="apns_key_file"):
        make_providers(_config("http://127.0.0.1:1", tmp_path / "missing.p8"))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong = tmp_path / "rsa.pem"
    wrong.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match="apns_key_file.*ES256"):
        ApnsProvider(_config("http://127.0.0.1:1", wrong))


async def test_https_negotiates_http2_with_alpn(tmp_path: Path, key: tuple[Path, ec.EllipticCurvePublicKey]) -> None:
    """The production path: TLS to the APNs stand-in (a self-signed certificate for 127.0.0.1), HTTP/2
    chosen by ALPN, as with api.push.apple.com."""
    import datetime
    import ipaddress
    import ssl

    import httpx
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    tls_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(tls_key, hashes.SHA256())
    )
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        tls_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    trust = ssl.create_default_context(cafile=str(certfile))
    app = ServiceApp(Apns())
    async with running(app, str(certfile), str(keyfile)) as url:
        assert url.startswith("https://")
        client = httpx.AsyncClient(http1=False, http2=True, verify=trust)  # as ApnsProvider makes it
        provider = ApnsProvider(_config(url, key[0]), client=client)
        try:
            outcome = await provider.send(_job(OK))
        finally:
            await client.aclose()
    assert outcome.kind is OutcomeKind.DELIVERED
    [request] = app.requests
    assert request.http_version == "2"
    assert request.path == f"/3/device/{OK}" and request.headers["apns-topic"] == TOPIC
