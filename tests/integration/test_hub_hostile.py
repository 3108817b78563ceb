"""Hostile clients against a real hub (its WebSocket server and code unchanged, peers faked in process).

Each test asserts the exact close code or error frame of PROTOCOL.md sections 6 and 7, and that the
hub still serves a well-behaved client afterwards. No Ray: see tests/hubkit.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlparse

import jwt
import msgpack
import pytest
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.typing import Origin, Subprotocol

from im_actors import ids
from im_actors.client import Client, ConnectFailed
from im_actors.protocol import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, decode, encode
from im_actors.router import HubTable, make_app
from im_actors.tls import server_context
from tests.hubkit import HubKit, hub_config, masked_frame

pytestmark = pytest.mark.integration

MP, JS = SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON


@pytest.fixture
async def make_kit() -> AsyncIterator[Callable[..., Any]]:
    kits: list[HubKit] = []

    async def make(**overrides: Any) -> HubKit:
        kit = HubKit(hub_config(**overrides))
        await kit.start()
        kits.append(kit)
        return kit

    yield make
    for kit in kits:
        await kit.stop()


async def raw(kit: HubKit, sub: str = MP, **kwargs: Any) -> ClientConnection:
    """An unauthenticated WebSocket to the hub."""
    kwargs.setdefault("compression", None)
    return await connect(kit.url, subprotocols=[Subprotocol(sub)], max_size=None, **kwargs)


async def authed(kit: HubKit, user: str, device: str = "d1", sub: str = MP, **kwargs: Any) -> ClientConnection:
    """A WebSocket that has sent auth and received ready."""
    ws = await raw(kit, sub, **kwargs)
    await ws.send(encode({"t": "auth", "token": kit.token(user), "device": device, "proto": 1}, sub))
    ready = decode(await asyncio.wait_for(ws.recv(), 5), sub)
    assert ready["t"] == "ready" and ready["user"] == user, ready
    return ws


async def close_code(ws: ClientConnection, timeout: float = 10.0) -> int:
    """Read until the server closes; the close code it sent (1006 when none)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else 1006
    raise AssertionError("unreachable")


async def ask(ws: ClientConnection, frame: dict[str, Any], sub: str = MP) -> dict[str, Any]:
    """Send a request and return the answer with its id (skipping unsolicited frames)."""
    await ws.send(encode(frame, sub))
    async with asyncio.timeout(10):
        while True:
            answer = decode(await ws.recv(), sub)
            if answer.get("id") == frame.get("id") and answer["t"] not in ("msg", "receipt", "typing"):
                return answer


async def still_serves(kit: HubKit, user: str = "healthy") -> None:
    """A fresh, well-behaved client is served: auth, a send, its ack."""
    ws = await authed(kit, user)
    conv = ids.direct_conv(user, "other")
    answer = await ask(ws, {"t": "send", "id": 1, "conv": conv, "cmid": f"c{time.time_ns()}", "body": "hi"})
    assert answer["t"] == "ack", answer
    await ws.close()


# --- 1. frame and field limits -----------------------------------------------------------------------


async def test_header_claiming_1_gib_is_closed_1009_before_buffering(make_kit: Any) -> None:
    kit = await make_kit()
    for authenticated in (False, True):
        ws = await (authed(kit, "alice") if authenticated else raw(kit))
        ws.transport.write(masked_frame(0x2, b"x" * 16, claimed_len=1 << 30))
        assert await close_code(ws) == 1009
    await still_serves(kit)


async def test_frame_over_max_frame_bytes_is_closed_1009(make_kit: Any) -> None:
    kit = await make_kit(max_frame_bytes=4096)
    ws = await authed(kit, "alice")
    await ws.send(b"\x80" * 5000)
    assert await close_code(ws) == 1009
    await still_serves(kit)


async def test_compression_bomb_is_closed_1009(make_kit: Any) -> None:
    kit = await make_kit(max_frame_bytes=65536)
    ws = await authed(kit, "alice", compression="deflate")
    await ws.send(b"\x00" * (8 << 20))  # 8 MiB of zeros deflate to a few KiB on the wire
    assert await close_code(ws) == 1009
    await still_serves(kit)


async def test_invalid_utf8_text_frame_is_closed_1007(make_kit: Any) -> None:
    kit = await make_kit()
    ws = await authed(kit, "alice", sub=JS)
    ws.transport.write(masked_frame(0x1, b'{"t":"\xff\xfe"}'))
    assert await close_code(ws) == 1007
    await still_serves(kit)


@pytest.mark.parametrize(
    "sub, data",
    [
        (MP, b"\xc1"),  # never used in MessagePack
        (MP, b"\x81\xa1t"),  # truncated
        (MP, msgpack.packb({"t": "sync", "x": msgpack.ExtType(5, b"x")})),  # extension type
        (MP, msgpack.packb({"t": "send", "x": list(range(20000))})),  # a list over max_frame_items
        (MP, msgpack.packb({"t": "send", "meta": {"a": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}})),  # too deep
        (MP, b"\x81\xa1t" + b"\x91" * 100000 + b"\xc0"),  # 100,000 deep
        (MP, "{}"),  # a text frame on the binary subprotocol
        (JS, "{not json"),
        (JS, '{"t":"sync","x":NaN}'),
        (JS, '{"t":' + "[" * 50000 + "]" * 50000 + "}"),  # deeper than the JSON decoder's recursion
        (JS, "[1, 2]"),  # not a map
        (JS, b"{}"),  # a binary frame on the text subprotocol
    ],
)
async def test_undecodable_or_oversized_structure_is_closed_4400(make_kit: Any, sub: str, data: Any) -> None:
    kit = await make_kit()
    ws = await authed(kit, "alice", sub=sub)
    await ws.send(data)
    assert await close_code(ws) == 4400


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "send", "id": 1, "conv": "d:alice:bob", "cmid": "c1"},  # no body
        {"t": "send", "id": 1, "conv": "d:alice:bob", "cmid": 5, "body": "x"},  # cmid not a string
        {"t": "send", "id": 1, "conv": ["d:alice:bob"], "cmid": "c", "body": "x"},
        {"t": "sync", "id": 1, "conv": "d:alice:bob", "after": -1},
        {"t": "sync", "id": 1, "conv": "d:alice:bob", "after": 0, "limit": 501},
        {"t": "nope", "id": 1},
        {"t": "auth", "id": 1, "token": "x", "device": "d", "proto": 1},  # no second auth
        {"t": "send", "id": 1, "conv": "d:alice:bob", "cmid": "c", "body": "x", "meta": {"$where": 1}},
        # Found by benchmarks/fuzz.py: a provider that is a map or a list was answered internal (a
        # TypeError in validation); ids with a trailing newline passed the id check.
        {"t": "push.register", "id": 1, "provider": {"a": 1}, "token": "t"},
        {"t": "push.register", "id": 1, "provider": [], "token": "t"},
        {"t": "contact.request", "id": 1, "user": "bob\n"},
        {"t": "presence.get", "id": 1, "users": ["bob", "carol\n"]},
        {"t": "read", "id": 1, "conv": "d:alice\n:bob", "seq": 1},
    ],
)
async def test_wrong_types_and_missing_fields_answer_bad_request_and_keep_the_connection(
    make_kit: Any, frame: dict[str, Any]
) -> None:
    kit = await make_kit()
    for sub in (MP, JS):
        ws = await authed(kit, "alice", sub=sub)
        answer = await ask(ws, frame, sub)
        assert answer == {"t": "err", "id": 1, "code": "bad_request", "msg": answer["msg"], "retry": False}
        ok = await ask(ws, {"t": "send", "id": 2, "conv": "d:alice:bob", "cmid": f"c{sub}", "body": "x"}, sub)
        assert ok["t"] == "ack"
        await ws.close()


async def test_body_over_max_body_bytes_answers_too_large(make_kit: Any) -> None:
    kit = await make_kit(max_body_bytes=1000)
    ws = await authed(kit, "alice")
    answer = await ask(ws, {"t": "send", "id": 1, "conv": "d:alice:bob", "cmid": "c", "body": b"x" * 1001})
    assert (answer["t"], answer["code"], answer["retry"]) == ("err", "too_large", False)
    answer = await ask(ws, {"t": "send", "id": 2, "conv": "d:alice:bob", "cmid": "c", "body": b"x" * 1000})
    assert answer["t"] == "ack"


# --- 2. authentication ------------------------------------------------------------------------------


async def test_no_auth_in_time_is_closed_4408(make_kit: Any) -> None:
    kit = await make_kit(auth_timeout_s=0.3)
    ws = await raw(kit)
    assert await close_code(ws) == 4408


def _claims(user: str, exp_in_s: int = 3600) -> dict[str, Any]:
    return {"sub": user, "exp": int(time.time()) + exp_in_s}


async def test_forged_malformed_and_expired_tokens_are_closed_4401(make_kit: Any) -> None:
    kit = await make_kit()
    secret = kit.config.jwt_secret
    bad_tokens = [
        jwt.encode(_claims("alice"), "not-the-secret-" * 4, algorithm="HS256"),  # forged
        jwt.encode(_claims("alice", exp_in_s=-10), secret, algorithm="HS256"),  # expired
        jwt.encode({"sub": "alice"}, secret, algorithm="HS256"),  # no exp
        jwt.encode({"exp": int(time.time()) + 60}, secret, algorithm="HS256"),  # no sub
        jwt.encode(_claims("bad user!"), secret, algorithm="HS256"),  # sub not a user id
        jwt.encode(_claims("alice"), None, algorithm="none"),  # unsigned
        jwt.encode(_claims("alice"), secret, algorithm="HS512"),  # not the configured algorithm
        "not.a.jwt",
        "x",
        kit.token("alice")[:-3] + "AAA",  # signature changed
    ]
    for token in bad_tokens:
        ws = await raw(kit)
        await ws.send(encode({"t": "auth", "token": token, "device": "d1", "proto": 1}, MP))
        assert await close_code(ws) == 4401, token
    await still_serves(kit)


async def test_malformed_auth_frame_is_closed_4400(make_kit: Any) -> None:
    kit = await make_kit()
    # Found by the end-to-end fuzzer: a JSON auth frame whose body is a map but not {"b64"} crashed
    # the connection handler (1011) instead of closing with 4400.
    for text in ('{"t":"auth","body":{"x":1}}', '{"t":"auth","body":{"b64":"***"}}'):
        ws = await raw(kit, JS)
        await ws.send(text)
        assert await close_code(ws) == 4400
    for frame in (
        {"t": "send", "id": 1},
        {"t": "auth", "token": kit.token("alice"), "device": "d1", "proto": 2},
        {"t": "auth", "token": 5, "device": "d1", "proto": 1},
        {"t": "auth", "token": kit.token("alice"), "device": "bad device", "proto": 1},
        {"t": "auth", "token": kit.token("alice"), "device": "d1\n", "proto": 1},  # found by benchmarks/fuzz.py
    ):
        ws = await raw(kit)
        await ws.send(encode(frame, MP))
        assert await close_code(ws) == 4400


def _hs256_by_hand(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 JWT made without PyJWT (which refuses a PEM key as an HMAC secret)."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


async def test_rs256_tokens_and_algorithm_confusion(make_kit: Any) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    kit = await make_kit(jwt_algorithm="RS256", jwt_public_key=public_pem, jwt_private_key=private_pem)
    ws = await authed(kit, "alice")  # an RS256 token from the configured private key
    await ws.close()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for token in (
        jwt.encode(_claims("alice"), other, algorithm="RS256"),  # another key pair
        # HS256 "signed" with the public key as the secret: refused since only RS256 is accepted
        _hs256_by_hand(_claims("alice"), public_pem.encode()),
        jwt.encode(_claims("alice"), kit.config.jwt_secret, algorithm="HS256"),
    ):
        ws = await raw(kit)
        await ws.send(encode({"t": "auth", "token": token, "device": "d1", "proto": 1}, MP))
        assert await close_code(ws) == 4401


async def test_a_token_for_one_user_never_acts_as_another(make_kit: Any) -> None:
    kit = await make_kit()
    bob = await authed(kit, "bob")
    alice = await authed(kit, "alice")
    conv = ids.direct_conv("alice", "bob")
    # Fields naming another sender are ignored: the sender is the token's subject.
    frame = {"t": "send", "id": 1, "conv": conv, "cmid": "c1", "body": "hi", "from": "bob", "sender": "bob"}
    assert (await ask(alice, frame))["t"] == "ack"
    async with asyncio.timeout(10):
        while (msg := decode(await bob.recv(), MP))["t"] != "msg":
            pass
    assert msg["from"] == "alice"
    # A conversation of others is refused, whatever the frame claims.
    other = {"t": "send", "id": 2, "conv": ids.direct_conv("bob", "carol"), "cmid": "c2", "body": "x", "from": "bob"}
    assert (await ask(alice, other))["code"] == "forbidden"
    sync = {"t": "sync", "id": 3, "conv": ids.direct_conv("bob", "carol"), "after": 0, "user": "bob"}
    assert (await ask(alice, sync))["code"] == "forbidden"
    assert kit.peers.entries.get(ids.direct_conv("bob", "carol")) is None


# --- 3. rate limits ---------------------------------------------------------------------------------


async def test_sends_over_the_user_rate_answer_rate_limited_with_retry_after(make_kit: Any) -> None:
    kit = await make_kit(rate_send_per_s=2.0, rate_send_burst=3, rate_refusals_max=0)
    ws = await authed(kit, "alice")
    conv = ids.direct_conv("alice", "bob")
    answers = [await ask(ws, {"t": "send", "id": i, "conv": conv, "cmid": f"c{i}", "body": "x"}) for i in range(4)]
    assert [a["t"] for a in answers] == ["ack", "ack", "ack", "err"]
    refused = answers[3]
    assert (refused["code"], refused["retry"]) == ("rate_limited", True)
    assert 1 <= refused["retry_after_ms"] <= 500  # 2 sends/s: the next token within 500 ms
    # The same user on a second connection of this hub shares the bucket.
    ws2 = await authed(kit, "alice", "d2")
    again = await ask(ws2, {"t": "send", "id": 9, "conv": conv, "cmid": "c9", "body": "x"})
    assert again["code"] == "rate_limited"
    # Other requests have their own bucket; another user is not affected.
    assert (await ask(ws, {"t": "sync", "id": 10, "conv": conv, "after": 0}))["t"] == "msgs"
    assert (await ask(await authed(kit, "bob"), {"t": "send", "id": 1, "conv": conv, "cmid": "b", "body": "x"}))[
        "t"
    ] == "ack"
    await asyncio.sleep(refused["retry_after_ms"] / 1000)
    assert (await ask(ws, {"t": "send", "id": 11, "conv": conv, "cmid": "c3", "body": "x"}))["t"] == "ack"


async def test_all_requests_bucket(make_kit: Any) -> None:
    kit = await make_kit(rate_request_per_s=1.0, rate_request_burst=2, rate_refusals_max=0)
    ws = await authed(kit, "alice")
    conv = ids.direct_conv("alice", "bob")
    kinds = [await ask(ws, {"t": "sync", "id": i, "conv": conv, "after": 0}) for i in range(3)]
    assert [a["t"] for a in kinds] == ["msgs", "msgs", "err"]
    assert kinds[2]["code"] == "rate_limited" and 1 <= kinds[2]["retry_after_ms"] <= 1000


async def test_a_client_that_keeps_going_is_closed_4429(make_kit: Any) -> None:
    kit = await make_kit(rate_request_per_s=0.5, rate_request_burst=1, rate_refusals_max=5)
    ws = await authed(kit, "alice")
    conv = ids.direct_conv("alice", "bob")
    for i in range(10):  # 1 admitted, 5 refused, the 6th refusal closes
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode({"t": "sync", "id": i, "conv": conv, "after": 0}, MP))
    assert await close_code(ws) == 4429
    assert kit.hub.stats["rate_closed"] == 1
    await still_serves(kit)


async def test_new_connections_per_address_are_refused_429_in_the_handshake(make_kit: Any) -> None:
    kit = await make_kit(conn_rate_per_address_per_s=0.5, conn_burst_per_address=3, conn_limit_exempt=[])
    for _ in range(3):
        await (await raw(kit)).close()
    with pytest.raises(InvalidStatus) as info:
        await raw(kit)
    assert info.value.response.status_code == 429
    assert int(info.value.response.headers["Retry-After"]) >= 1
    exempt = await make_kit(conn_rate_per_address_per_s=0.5, conn_burst_per_address=3)  # loopback exempt
    for _ in range(10):
        await (await raw(exempt)).close()


async def test_open_connections_per_address_are_bounded(make_kit: Any) -> None:
    kit = await make_kit(max_conns_per_address=2, conn_limit_exempt=[])
    first, second = await authed(kit, "alice"), await authed(kit, "bob")
    with pytest.raises(InvalidStatus) as info:
        await raw(kit)
    assert info.value.response.status_code == 429
    await first.close()
    await asyncio.wait_for(_until(lambda: kit.hub._addresses.open.get("127.0.0.1", 0) < 2), 10)
    await (await authed(kit, "carol")).close()
    await second.close()


async def _until(pred: Callable[[], bool]) -> None:
    while not pred():
        await asyncio.sleep(0.01)


async def test_connections_per_user_are_bounded_and_the_extra_one_closed_4429(make_kit: Any) -> None:
    kit = await make_kit(max_connections_per_user=2)
    d1, d2 = await authed(kit, "alice", "d1"), await authed(kit, "alice", "d2")
    ws = await raw(kit)
    await ws.send(encode({"t": "auth", "token": kit.token("alice"), "device": "d3", "proto": 1}, MP))
    assert await close_code(ws) == 4429
    d1_again = await authed(kit, "alice", "d1")  # the same device replaces its old connection: allowed
    assert await close_code(d1) == 4409
    await d2.close()
    await asyncio.wait_for(_until(lambda: len(kit.peers.sessions_core.online("alice")) < 2), 10)
    await (await authed(kit, "alice", "d3")).close()
    await d1_again.close()


# --- 4. slow consumers ------------------------------------------------------------------------------


async def stalled(kit: HubKit, user: str) -> ClientConnection:
    """An authenticated client that never reads again: a 4 KiB receive buffer, one frame queued."""
    u = urlparse(kit.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((u.hostname, u.port))
    sock.setblocking(False)
    ws = await connect(kit.url, sock=sock, subprotocols=[Subprotocol(MP)], max_queue=1, compression=None)
    await ws.send(encode({"t": "auth", "token": kit.token(user), "device": "d1", "proto": 1}, MP))
    assert decode(await ws.recv(), MP)["t"] == "ready"
    return ws


async def test_a_client_that_never_reads_in_a_busy_group_is_closed_4508_and_the_others_get_everything(
    make_kit: Any,
) -> None:
    members, messages = 100, 300
    kit = await make_kit(
        send_queue_bytes=64 << 10,
        socket_send_buffer_bytes=16 << 10,
        rate_send_per_s=0,
        rate_request_per_s=0,
    )
    users = [f"u{i}" for i in range(members)]
    kit.peers.groups["g:busy"] = users
    got: dict[str, list[int]] = {u: [] for u in users[1:-1]}

    async def reader(user: str, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in ws:
                frame = decode(data, MP)
                if frame["t"] == "msg":
                    got[user].append(frame["seq"])

    readers = [await authed(kit, u) for u in users[1:-1]]
    tasks = [asyncio.create_task(reader(u, ws)) for u, ws in zip(users[1:-1], readers, strict=True)]
    slow = await stalled(kit, users[-1])
    sender = await authed(kit, users[0])
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max([peak, *(c.queued_bytes for c in kit.hub.conns.values())])
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    body = b"x" * 1024
    for start in range(0, messages, 25):  # 25 sends in flight at a time
        for i in range(start, start + 25):
            await sender.send(encode({"t": "send", "id": i, "conv": "g:busy", "cmid": f"c{i}", "body": body}, MP))
        acks = 0
        async with asyncio.timeout(30):
            while acks < 25:
                acks += decode(await sender.recv(), MP)["t"] == "ack"
    async with asyncio.timeout(60):
        while any(len(seqs) < messages for seqs in got.values()):
            await asyncio.sleep(0.05)
    sampler.cancel()
    assert all(seqs == list(range(1, messages + 1)) for seqs in got.values())
    assert kit.hub.stats["slow_closed"] == 1
    assert peak <= 64 << 10  # no connection's queue ever went over its bound
    slow_close = await close_code(slow, timeout=30)
    assert slow_close == 4508
    await asyncio.wait_for(_until(lambda: users[-1] not in {c.user for c in kit.hub.conns.values()}), 15)
    for ws in readers:
        await ws.close()
    await asyncio.gather(*tasks)


# --- 5. TLS and browser origins ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "im-actors test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_file), str(key_file)


async def test_wss_hub_and_https_router_with_the_client_library(make_kit: Any, tls_files: tuple[str, str]) -> None:
    cert_file, key_file = tls_files
    kit = await make_kit(tls_cert_file=cert_file, tls_key_file=key_file, dev_login=True)
    assert kit.url.startswith("wss://127.0.0.1:")
    table = HubTable()
    table.register(kit.hub.name, kit.url)
    runner = web.AppRunner(make_app(kit.config, table))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(kit.config))
    await site.start()
    router_url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        inbox: list[dict[str, Any]] = []
        client = Client(router_url, "alice", ssl=cert_file, on_msg=inbox.append)  # dev login over HTTPS too
        await client.connect()
        ack = await client.send(ids.direct_conv("alice", "bob"), "over TLS")
        assert ack.seq == 1
        await client.close()
        # Without trusting the certificate, neither the router nor the hub is believed.
        untrusting = Client(router_url, "alice", connect_timeout_s=0.5)
        with pytest.raises(ConnectFailed):
            await untrusting.connect()
        await untrusting.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(kit.url, subprotocols=[Subprotocol(MP)])
        # Plain ws:// to the TLS port gets no WebSocket.
        with pytest.raises((InvalidMessage, ConnectionError, OSError)):
            await connect(kit.url.replace("wss://", "ws://"), subprotocols=[Subprotocol(MP)], open_timeout=5)
    finally:
        await runner.cleanup()


async def test_origin_allow_list(make_kit: Any) -> None:
    kit = await make_kit(allowed_origins=["https://chat.example.com"])
    with pytest.raises(InvalidStatus) as info:
        await raw(kit, origin=Origin("https://evil.example.com"))
    assert info.value.response.status_code == 403
    await (await authed(kit, "alice", origin=Origin("https://chat.example.com"))).close()
    await (await authed(kit, "bob")).close()  # no Origin: not a browser, accepted
    open_kit = await make_kit()  # no allow-list: any Origin
    await (await authed(open_kit, "carol", origin=Origin("https://anything.example"))).close()


async def test_reserved_opcode_and_unmasked_frame_are_closed_1002(make_kit: Any) -> None:
    kit = await make_kit()
    ws = await authed(kit, "alice")
    ws.transport.write(masked_frame(0x3, b"xx"))  # opcode 3 is reserved (RFC 6455 section 5.2)
    assert await close_code(ws) == 1002
    ws = await authed(kit, "alice")
    ws.transport.write(bytes([0x82, 2]) + b"xx")  # client frames must be masked (section 5.3)
    assert await close_code(ws) == 1002
    await still_serves(kit)


async def test_a_connection_offering_neither_subprotocol_is_refused_in_the_handshake(make_kit: Any) -> None:
    kit = await make_kit()
    for offered in (None, [Subprotocol("im.v2.msgpack")], [Subprotocol("chat")]):
        with pytest.raises(InvalidStatus) as refused:
            await connect(kit.url, subprotocols=offered)
        assert refused.value.response.status_code == 400, offered
    ws = await authed(kit, "still-served")  # the hub serves the next client as usual
    await ws.close()


async def test_a_connection_is_closed_4401_when_its_token_runs_out(make_kit: Any) -> None:
    kit = await make_kit()
    ws = await raw(kit)
    await ws.send(encode({"t": "auth", "token": kit.token("brief", ttl_s=2), "device": "d1", "proto": 1}, MP))
    assert decode(await asyncio.wait_for(ws.recv(), 5), MP)["t"] == "ready"
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "token expired")
    assert time.monotonic() - started < 4  # at exp (about 2 s after issue), not at some later sweep
    assert kit.hub.stats["tokens_expired"] == 1


async def test_the_client_library_logs_in_again_when_its_dev_login_token_runs_out(make_kit: Any) -> None:
    kit = await make_kit(dev_login=True, jwt_ttl_s=2)
    table = HubTable()
    table.register(kit.hub.name, kit.url)
    runner = web.AppRunner(make_app(kit.config, table))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        client = Client(f"http://127.0.0.1:{runner.addresses[0][1]}", "renewing")
        await client.connect()
        conv = ids.direct_conv("renewing", "other")
        assert (await client.send(conv, "before")).seq == 1
        async with asyncio.timeout(15):
            while client.reconnects == 0:  # closed 4401 "token expired", then back with a new token
                await asyncio.sleep(0.05)
        assert (await client.send(conv, "after")).seq == 2
        assert kit.hub.stats["tokens_expired"] >= 1
        await client.close()
    finally:
        await runner.cleanup()
