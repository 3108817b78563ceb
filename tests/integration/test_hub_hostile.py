"""Hostile clients against a real hub (its WebSocket server and code unchanged, peers faked in process).

Each test asserts the exact close code or error frame of PROTOCOL.md sections 6 and 7, and that the
hub still serves a well-behaved client afterwards. No Ray: see tests/hubkit.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from im_actors import ids
from im_actors.protocol import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, decode, encode
from tests.hubkit import HubKit, hub_config

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


def masked_frame(opcode: int, payload: bytes, claimed_len: int | None = None) -> bytes:
    """A client-to-server WebSocket frame written by hand (RFC 6455 section 5.2), masked; its header
    may claim ``claimed_len`` bytes whatever the payload holds."""
    n = len(payload) if claimed_len is None else claimed_len
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


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
    for frame in (
        {"t": "send", "id": 1},
        {"t": "auth", "token": kit.token("alice"), "device": "d1", "proto": 2},
        {"t": "auth", "token": 5, "device": "d1", "proto": 1},
        {"t": "auth", "token": kit.token("alice"), "device": "bad device", "proto": 1},
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
