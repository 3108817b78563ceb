"""The pure parts of benchmarks/fuzz.py: the frame maker, its reading of PROTOCOL.md, the prediction
of what the hub does with a frame, and the answer checks. No hub, no Ray."""

from __future__ import annotations

import random

import msgpack
import pytest

from benchmarks import fuzz
from im_actors import protocol

LIMITS = protocol.Limits()
MAX_FRAME = 1 << 20


def _maker(seed: int) -> object:
    ctx = fuzz.Context(me="fz-0", peers=["fz-1", "fz-2"], bystanders=["alice"], foreign_convs=["d:alice:bob"])
    ctx.groups.append("abcDEF123")
    return fuzz.FrameMaker(random.Random(seed), ctx, LIMITS.max_body_bytes, MAX_FRAME)


def _frames(seed: int, n: int) -> list[object]:
    maker = _maker(seed)
    out: list[object] = []
    while len(out) < n:
        out.extend(maker.next(random.Random(len(out)).choice([fuzz.MP, fuzz.JS])))  # type: ignore[attr-defined]
    return out


def test_the_same_seed_makes_the_same_frames() -> None:
    a, b = _frames(5, 300), _frames(5, 300)
    assert [(f.data, f.opcode, f.what) for f in a] == [(f.data, f.opcode, f.what) for f in b]  # type: ignore[attr-defined]
    assert [f.data for f in _frames(6, 300)] != [f.data for f in a]  # type: ignore[attr-defined]


def test_every_request_type_of_the_table_is_fuzzed() -> None:
    # A type added to protocol.REQUEST_TYPES is drawn at once (with generic fields until it gets a
    # template): the fuzzer takes the table from the protocol module.
    seen = {f.t for f in _frames(1, 3000)}  # type: ignore[attr-defined]
    assert set(protocol.REQUEST_TYPES) <= seen
    assert set(fuzz.REQUIRED) == set(protocol.REQUEST_TYPES), "a request type without a template here"


def test_a_new_request_type_gets_generic_fields() -> None:
    maker = _maker(2)
    maker.types = ["thing.new"]  # type: ignore[attr-defined]
    frame = maker.template("thing.new")  # type: ignore[attr-defined]
    assert frame["t"] == "thing.new" and set(frame) - {"t", "id"} <= set(fuzz.FIELD_KIND)


def test_the_codec_answers_every_fuzzed_frame_with_an_error_or_a_close() -> None:
    # What the hub runs on each frame (decode, then parse_request) must raise only RequestError or
    # CloseConnection: anything else is answered internal. This caught push.register with a
    # provider that is a map (TypeError: unhashable) before the hub did.
    outcomes = {fuzz.predict(f, _sub(f), LIMITS, MAX_FRAME).code for f in _frames(3, 4000)}
    assert "internal" not in outcomes


def _sub(item: object) -> str:
    return fuzz.MP if item.opcode == "binary" and isinstance(item.data, bytes) else fuzz.JS  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "frame, broken",
    [
        ({"t": "send", "id": 1, "conv": "d:a:b", "cmid": "c", "body": "x"}, None),
        ({"t": "typing", "conv": "d:a:b"}, None),
        ({"t": "convs"}, "id must be an integer"),
        ({"t": "convs", "id": True}, "id must be an integer"),
        ({"t": "nope", "id": 1}, "unknown t 'nope'"),
        ({"t": "send", "id": 1, "conv": "d:a:b", "cmid": "c"}, "body missing"),
        ({"t": "contact.request", "id": 1, "user": "bob\n"}, "user: not a user id"),
        ({"t": "sync", "id": 1, "conv": "d:b:a", "after": 0}, "conv: not a conversation id"),
        ({"t": "sync", "id": 1, "conv": "d:a:b", "after": 0, "limit": 501}, "limit: over 500"),
        ({"t": "read", "id": 1, "conv": "g:x", "seq": -1}, "seq: not a seq (an integer >= 0)"),
        ({"t": "push.register", "id": 1, "provider": {}, "token": "t"}, "provider: not a provider"),
        ({"t": "send", "id": 1, "conv": "d:a:b", "cmid": "c" * 65, "body": "x"}, "cmid: not 1..64 characters"),
        ({"t": "group.create", "id": 1, "name": "n" * 500, "members": []}, None),  # a length the text leaves open
    ],
)
def test_spec_violation_reads_protocol_md(frame: dict[str, object], broken: str | None) -> None:
    assert fuzz.spec_violation(frame, 65536) == broken


def test_predict_says_what_the_hub_must_do() -> None:
    def item(data: bytes | str, opcode: str = "binary") -> object:
        return fuzz.Fuzzed(data, opcode, "x", "x")

    sync = msgpack.packb({"t": "sync", "id": 4, "conv": "d:a:b", "after": 0})
    assert fuzz.predict(item(sync), fuzz.MP, LIMITS, MAX_FRAME) == fuzz.Expect("answer", None, 4, "sync")
    assert fuzz.predict(item(sync[:-3]), fuzz.MP, LIMITS, MAX_FRAME).outcome == "close"
    assert fuzz.predict(item(b'{"t":"\xc3\x28"}', "text"), fuzz.JS, LIMITS, MAX_FRAME) == fuzz.Expect("close", 1007)
    assert fuzz.predict(item(b"x" * (MAX_FRAME + 1)), fuzz.MP, LIMITS, MAX_FRAME) == fuzz.Expect("close", 1009)
    assert fuzz.predict(item('{"t":"typing","conv":"d:a:b"}', "text"), fuzz.JS, LIMITS, MAX_FRAME).outcome == "silent"
    bad = fuzz.predict(item('{"t":"sync","id":9,"conv":"x"}', "text"), fuzz.JS, LIMITS, MAX_FRAME)
    assert (bad.outcome, bad.code, bad.rid) == ("answer", "bad_request", 9)


@pytest.mark.parametrize(
    "answer, problem",
    [
        ({"t": "err", "id": 1, "code": "bad_request", "msg": "x", "retry": False}, None),
        ({"t": "err", "id": 1, "code": "bad_request", "msg": "x", "retry": True}, "bad_request with retry True"),
        ({"t": "err", "id": True, "code": "forbidden", "msg": "x", "retry": False}, "answer id True is not an integer"),
        ({"t": "err", "id": 1, "code": "nope", "msg": "x", "retry": False}, "unknown error code 'nope'"),
        (
            {"t": "err", "id": 1, "code": "rate_limited", "msg": "x", "retry": True},
            "rate_limited without retry_after_ms",
        ),
        (
            {"t": "err", "id": 1, "code": "unavailable", "msg": "t1-im-conv-0 died", "retry": True},
            "error text shows internals: 't1-im-conv-0 died'",
        ),
    ],
)
def test_answers_are_checked_against_protocol_md(answer: dict[str, object], problem: str | None) -> None:
    assert fuzz.check_answer(answer, None) == problem


def test_an_answer_of_the_wrong_type_is_found() -> None:
    expect = fuzz.Expect("answer", None, 1, "group.info")
    assert fuzz.check_answer({"t": "ok", "id": 1}, expect) == "group.info answered 'ok', PROTOCOL.md says 'group'"
    assert fuzz.check_answer({"t": "group", "id": 1}, expect) is None


def test_tallies_merge() -> None:
    a, b = fuzz.Tally(), fuzz.Tally()
    a.frames, b.frames = 3, 4
    a.answers["ok"] += 1
    b.answers["ok"] += 2
    b.find("internal", None, fuzz.MP, {"t": "err"})
    a.merge(b.to_dict())
    assert (a.frames, a.answers["ok"], a.findings["internal"], len(a.examples["internal"])) == (7, 3, 1, 1)
