"""The frame codec and request validation (PROTOCOL.md), fed bytes: no I/O, no Ray."""

from __future__ import annotations

import json

import msgpack
import pytest

from im_actors import protocol
from im_actors.errors import BadRequest, CloseConnection, TooLarge

MP, JS = protocol.SUBPROTOCOL_MSGPACK, protocol.SUBPROTOCOL_JSON


def test_msgpack_round_trip_keeps_binary_body() -> None:
    frame = {"t": "send", "id": 1, "conv": "d:a:b", "cmid": "c1", "body": b"\x00\xff"}
    data = protocol.encode(frame, MP)
    assert isinstance(data, bytes)
    assert protocol.decode(data, MP) == frame


def test_json_binary_body_travels_as_b64_both_ways() -> None:
    frame = {"t": "msg", "body": b"\x00\xff"}
    text = protocol.encode(frame, JS)
    assert json.loads(text) == {"t": "msg", "body": {"b64": "AP8="}}
    assert protocol.decode(text, JS)["body"] == b"\x00\xff"


def test_json_bad_b64_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        protocol.decode('{"t":"send","body":{"b64":"***"}}', JS)


@pytest.mark.parametrize(
    "data, sub, code",
    [
        (b"\xc1", MP, 4400),  # 0xc1 is never used in MessagePack
        (msgpack.packb([1, 2]), MP, 4400),  # not a map
        ("{}", MP, 4400),  # text frame on the binary subprotocol
        ("{not json", JS, 4400),
        (b"{}", JS, 4400),  # binary frame on the text subprotocol
        ("[1]", JS, 4400),
    ],
)
def test_undecodable_frames_close_4400(data: bytes | str, sub: str, code: int) -> None:
    with pytest.raises(CloseConnection) as info:
        protocol.decode(data, sub)
    assert info.value.close_code == code


def test_parse_auth_accepts_version_1_only() -> None:
    assert protocol.parse_auth({"t": "auth", "token": "x", "device": "phone", "proto": 1}) == ("x", "phone")
    for bad in (
        {"t": "send"},
        {"t": "auth", "token": "x", "device": "phone", "proto": 2},
        {"t": "auth", "token": "", "device": "phone", "proto": 1},
        {"t": "auth", "token": "x", "device": "bad device", "proto": 1},
    ):
        with pytest.raises(CloseConnection) as info:
            protocol.parse_auth(bad)
        assert info.value.close_code == 4400


def test_send_is_validated_and_defaults_kind_text() -> None:
    req = protocol.parse_request({"t": "send", "id": 7, "conv": "d:a:b", "cmid": "c", "body": "hi"})
    assert req == protocol.Request(
        "send", 7, {"conv": "d:a:b", "cmid": "c", "body": "hi", "kind": "text", "meta": None}
    )


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "send", "id": 1, "conv": "d:b:a", "cmid": "c", "body": "x"},  # a > b
        {"t": "send", "id": 1, "conv": "x:1", "cmid": "c", "body": "x"},
        {"t": "send", "id": 1, "conv": "d:a:b", "body": "x"},  # no cmid
        {"t": "send", "id": 1, "conv": "d:a:b", "cmid": "c" * 65, "body": "x"},
        {"t": "send", "id": 1, "conv": "d:a:b", "cmid": "c", "body": 5},
        {"t": "send", "id": 1, "conv": "d:a:b", "cmid": "c", "body": "x", "kind": "system"},
        {"t": "sync", "id": 1, "conv": "d:a:b", "after": -1},
        {"t": "sync", "id": 1, "conv": "d:a:b", "after": 0, "limit": 501},
        {"t": "group.create", "id": 1, "name": "n", "members": ["ok", "not ok"]},
        {"t": "nope", "id": 1},
    ],
)
def test_bad_fields_answer_bad_request_with_the_id(frame: dict[str, object]) -> None:
    with pytest.raises(BadRequest) as info:
        protocol.parse_request(frame)
    assert info.value.request_id == 1
    assert info.value.frame(1)["code"] == "bad_request"


@pytest.mark.parametrize("provider", [{}, {"a": 1}, [], ["log"], [[1]], b"log"])
def test_a_push_provider_of_another_type_is_bad_request(provider: object) -> None:
    # Found by benchmarks/fuzz.py: a map or list raised TypeError (unhashable) inside validation,
    # which the hub answered internal without the request id.
    with pytest.raises(BadRequest) as info:
        protocol.parse_request({"t": "push.register", "id": 7, "provider": provider, "token": "t"})
    assert info.value.request_id == 7


def test_a_typing_id_that_is_not_an_integer_is_no_id() -> None:
    # Found by benchmarks/fuzz.py: true passed as an id (bool is an int in Python) and was echoed.
    for rid in (True, False, 1.0, "1"):
        assert protocol.parse_request({"t": "typing", "id": rid, "conv": "d:a:b"}).id is None
    with pytest.raises(BadRequest) as info:
        protocol.parse_request({"t": "typing", "id": True, "conv": "nope"})
    assert info.value.request_id is None


def test_missing_id_is_bad_request_without_id() -> None:
    with pytest.raises(BadRequest) as info:
        protocol.parse_request({"t": "convs"})
    assert info.value.request_id is None


def test_body_over_limit_is_too_large() -> None:
    limits = protocol.Limits(max_body_bytes=4)
    frame = {"t": "send", "id": 2, "conv": "d:a:b", "cmid": "c", "body": "héllo"}
    with pytest.raises(TooLarge) as info:
        protocol.parse_request(frame, limits)
    assert info.value.frame(2) == {"t": "err", "id": 2, "code": "too_large", "msg": "body over 4 bytes", "retry": False}


def test_sync_default_limit_is_100() -> None:
    req = protocol.parse_request({"t": "sync", "id": 3, "conv": "g:abc", "after": 0})
    assert req.fields == {"conv": "g:abc", "after": 0, "limit": 100}


def test_typing_needs_no_id() -> None:
    assert protocol.parse_request({"t": "typing", "conv": "d:a:b"}).id is None


def test_msg_frame_of_entry() -> None:
    entry = {"conv": "d:a:b", "seq": 4, "sender": "a", "ts": 10, "cmid": "c", "kind": "text", "body": "x", "meta": None}
    assert protocol.msg_frame(entry) == {
        "t": "msg",
        "conv": "d:a:b",
        "seq": 4,
        "from": "a",
        "ts": 10,
        "cmid": "c",
        "kind": "text",
        "body": "x",
    }


@pytest.mark.parametrize(
    "extra",
    [
        {"meta": {"n": 2**63}},  # outside int64: MongoDB cannot store it
        {"meta": {b"k": 1}},
        {"meta": {"$where": 1}},
        {"meta": {"a.b": 1}},
        {"meta": {"t": msgpack.Timestamp(1)}},
        {"meta": {"deep": [[[[[[[[[[1]]]]]]]]]]}},
        {"cmid": "\ud800"},  # a lone surrogate (JSON lets one through)
        {"body": "x\udfff"},
    ],
)
def test_unstorable_fields_are_bad_request(extra: dict[str, object]) -> None:
    frame = {"t": "send", "id": 4, "conv": "d:a:b", "cmid": "c", "body": "x", **extra}
    with pytest.raises(BadRequest):
        protocol.parse_request(frame)


def test_storable_meta_passes() -> None:
    meta = {"t": 1795960000000, "tags": ["a", "b"], "nested": {"ok": True, "f": 1.5, "raw": b"\x00"}}
    req = protocol.parse_request({"t": "send", "id": 4, "conv": "d:a:b", "cmid": "c", "body": "x", "meta": meta})
    assert req.fields["meta"] == meta


def test_the_hub_imports_no_storage_client() -> None:
    """The hub never touches storage: the wire values it shares with the shards live in
    im_actors.wire, so importing it loads neither pymongo nor redis (a fresh interpreter)."""
    import subprocess
    import sys

    code = "import sys, im_actors.hub; print(sorted(m for m in ('pymongo', 'redis', 'aiormq') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_answer_frames_carry_the_ack_or_the_error_with_its_extras() -> None:
    from im_actors.errors import Unavailable
    from im_actors.protocol import answer_frame
    from im_actors.wire import ack_answer, err_answer

    assert answer_frame(3, ack_answer("d:a:b", 7, 1000, False)) == {
        "t": "ack",
        "id": 3,
        "conv": "d:a:b",
        "seq": 7,
        "ts": 1000,
        "dup": False,
    }
    refused = err_answer(Unavailable("server overloaded, resend later", retry_after_ms=40))
    assert answer_frame(4, refused) == {
        "t": "err",
        "id": 4,
        "code": "unavailable",
        "msg": "server overloaded, resend later",
        "retry": True,
        "retry_after_ms": 40,
    }
