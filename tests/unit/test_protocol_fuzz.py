"""Property-based tests of the frame codec (hypothesis): round trips, and arbitrary input never raises
anything but :class:`CloseConnection` or :class:`RequestError`."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from im_actors import protocol
from im_actors.errors import CloseConnection, RequestError

MP, JS = protocol.SUBPROTOCOL_MSGPACK, protocol.SUBPROTOCOL_JSON
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_text = st.text(max_size=40)  # includes lone surrogates, NUL, any plane
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_values = st.recursive(
    _scalars | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=30,
)
_frames = st.dictionaries(_text, _values, max_size=8)

_FIELDS = ["t", "id", "conv", "cmid", "body", "kind", "meta", "after", "before", "limit", "seq", "group", "users"]
_TYPES = sorted(protocol._VALIDATORS) + ["auth", "", "nope"]
_request_like = st.fixed_dictionaries(
    {"t": st.sampled_from(_TYPES) | _values, "id": st.integers(-5, 2**70) | _values},
    optional={k: _values | st.sampled_from(["d:a:b", "g:x", "d:b:a", "c1", "text"]) for k in _FIELDS[2:]},
)


def _no_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_no_surrogates(k) and _no_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_no_surrogates(v) for v in value)
    return True


@FUZZ
@given(_frames)
def test_msgpack_round_trip(frame: dict[str, Any]) -> None:
    if not _no_surrogates(frame):  # MessagePack strings are UTF-8: a lone surrogate cannot be encoded
        return
    if any(isinstance(v, int) and not -(2**63) <= v < 2**64 for v in _leaves(frame)):
        return
    data = protocol.encode(frame, MP)
    assert protocol.decode(data, MP, protocol.SERVER_LIMITS) == frame


@FUZZ
@given(_frames)
def test_json_round_trip_of_text_frames(frame: dict[str, Any]) -> None:
    frame = json.loads(json.dumps(frame, default=lambda b: b.hex()))  # JSON has no binary but the body
    frame.pop("body", None)
    assert protocol.decode(protocol.encode(frame, JS), JS, protocol.SERVER_LIMITS) == frame


@FUZZ
@given(st.binary(max_size=256) | st.text(max_size=256))
def test_arbitrary_input_raises_only_our_errors(data: bytes | str) -> None:
    for sub in (MP, JS):
        try:
            frame = protocol.decode(data, sub)
            protocol.parse_request(frame)
        except (CloseConnection, RequestError):
            pass


@FUZZ
@given(_frames)
def test_mutated_msgpack_raises_only_our_errors(frame: dict[str, Any]) -> None:
    if not _no_surrogates(frame):
        return
    try:
        data = msgpack.packb(frame, use_bin_type=True)
    except OverflowError:
        return
    for i in range(0, len(data), max(1, len(data) // 8)):
        for mutated in (
            data[:i],
            data[:i] + b"\xc1" + data[i + 1 :],
            data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :],
        ):
            try:
                protocol.parse_request(protocol.decode(mutated, MP))
            except (CloseConnection, RequestError):
                pass


@FUZZ
@given(_request_like)
def test_arbitrary_request_maps_raise_only_request_errors(frame: dict[str, Any]) -> None:
    try:
        req = protocol.parse_request(frame)
    except RequestError as exc:
        assert exc.code in ("bad_request", "too_large")
        return
    assert req.t == frame["t"]


@FUZZ
@given(_request_like)
def test_arbitrary_auth_frames_raise_only_close_connection(frame: dict[str, Any]) -> None:
    try:
        protocol.parse_auth(frame)
    except CloseConnection as exc:
        assert exc.close_code == 4400


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_in_meta_are_bad_request(value: float) -> None:
    # JSON has no Infinity or NaN: such a meta could not reach clients on im.v1.json
    frame = {"t": "send", "id": 1, "conv": "d:a:b", "cmid": "c", "body": "x", "meta": {"v": [value]}}
    with pytest.raises(RequestError) as info:
        protocol.parse_request(frame)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("sub", [MP, JS])
def test_limits_on_items_and_depth_close_4400(sub: str) -> None:
    limits = protocol.Limits(max_items=10, max_depth=4)
    ok = {"t": "x", "a": [1] * 10, "b": {"c": {"d": 1}}}
    assert protocol.decode(protocol.encode(ok, sub), sub, limits) == ok
    for bad in (
        {"t": "x", "a": [1] * 11},
        {"t": "x", "b": {"c": {"d": {"e": {"f": 1}}}}},
        {str(i): i for i in range(11)},
    ):
        with pytest.raises(CloseConnection) as info:
            protocol.decode(protocol.encode(bad, sub), sub, limits)
        assert info.value.close_code == 4400


@pytest.mark.parametrize("sub", [MP, JS])
def test_depth_is_counted_per_branch_and_every_container_is_bounded(sub: str) -> None:
    # The walk goes level by level: a deep branch beside shallow ones is found, a big list under a
    # small map is found, and a frame exactly at the depth limit passes.
    limits = protocol.Limits(max_items=4, max_depth=3)
    at_limit = {"t": "x", "a": {"b": [1, 2]}, "c": [{"d": 1}], "e": 1}
    assert protocol.decode(protocol.encode(at_limit, sub), sub, limits) == at_limit
    for bad in (
        {"t": "x", "a": {"b": 1}, "c": [1, [2, {"d": 1}]]},  # depth 4 in the second branch
        {"t": "x", "a": {"b": [1, 2, 3, 4, 5]}},  # 5 items two levels down
        {"t": "x", "a": [{}, {}, {"k": {"z": 1}}]},  # depth 4 in the last item
    ):
        with pytest.raises(CloseConnection) as info:
            protocol.decode(protocol.encode(bad, sub), sub, limits)
        assert info.value.close_code == 4400, bad
