"""The client protocol, version 1 (PROTOCOL.md): frames, codec, validation.

A pure module: no I/O, no asyncio, no Ray (STYLE.md rule 1). The hub feeds it the bytes or text of
a WebSocket frame and gets a validated :class:`Request` back, or an exception from
:mod:`im_actors.errors` that says how to answer (an ``err`` frame or a close code).

Frames are maps. On ``im.v1.msgpack`` a frame is one MessagePack map in a binary WebSocket frame;
on ``im.v1.json`` it is one JSON object in a text frame, where a binary ``body`` travels as
``{"b64": "<base64>"}`` in both directions (PROTOCOL.md section 2).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import msgpack

from im_actors import ids
from im_actors.errors import CLOSE_INVALID_UTF8, CLOSE_PROTOCOL, BadRequest, CloseConnection, TooLarge

__all__ = [
    "PROTO_VERSION",
    "SUBPROTOCOL_MSGPACK",
    "SUBPROTOCOL_JSON",
    "SUBPROTOCOLS",
    "Limits",
    "SERVER_LIMITS",
    "Request",
    "REQUEST_TYPES",
    "encode",
    "decode",
    "parse_auth",
    "parse_request",
    "msg_frame",
    "answer_frame",
    "body_size",
]

PROTO_VERSION = 1
SUBPROTOCOL_MSGPACK = "im.v1.msgpack"
SUBPROTOCOL_JSON = "im.v1.json"
SUBPROTOCOLS = (SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON)

_SYNC_DEFAULT_LIMIT = 100
_SYNC_MAX_LIMIT = 500
_PUSH_PROVIDERS = frozenset({"apns", "fcm", "webhook", "huawei", "xiaomi", "log"})


@dataclass(frozen=True)
class Limits:
    """Bounds applied while decoding and validating.

    ``max_body_bytes`` (bytes, ``too_large`` above), ``max_members`` (user ids in one list,
    ``bad_request`` above), ``max_meta_keys`` (keys of ``meta``, ``bad_request`` above) are checked
    by :func:`parse_request`. ``max_items`` (entries of any one map or list) and ``max_depth``
    (nesting of maps and lists, the frame itself being depth 1) are checked by :func:`decode`,
    which closes with 4400 above them: only a hostile client gets near them.
    """

    max_body_bytes: int = 65536
    max_members: int = 10000
    max_meta_keys: int = 32
    max_items: int = 10000
    max_depth: int = 16


#: Limits for frames coming from the server (client side): as wide as any answer can be.
SERVER_LIMITS = Limits(max_items=1 << 24, max_depth=64)


@dataclass(frozen=True)
class Request:
    """A validated request: its type ``t``, its ``id`` (None only for ``typing``) and its fields."""

    t: str
    id: int | None
    fields: dict[str, Any] = field(default_factory=dict)


# --- codec -------------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode(frame: dict[str, Any], subprotocol: str) -> bytes | str:
    """Encode one frame: ``bytes`` (MessagePack) or ``str`` (JSON) for ``subprotocol``."""
    if subprotocol == SUBPROTOCOL_MSGPACK:
        return msgpack.packb(frame, use_bin_type=True)
    return json.dumps(frame, default=_json_default, separators=(",", ":"), ensure_ascii=False)


def decode(data: bytes | str, subprotocol: str, limits: Limits = Limits()) -> dict[str, Any]:
    """Decode one frame into a map.

    Raises :class:`CloseConnection` 4400 for undecodable data, a frame of the wrong kind (text on
    MessagePack, binary on JSON), a frame that is not a map, MessagePack extension types, JSON
    ``NaN``/``Infinity``, or a map or list over ``limits.max_items`` entries or nested deeper than
    ``limits.max_depth``; 1007 for invalid UTF-8 in a text frame; :class:`BadRequest` for a JSON
    binary body that is not ``{"b64": "<base64>"}``. Nothing else (property-tested).
    """
    if subprotocol == SUBPROTOCOL_MSGPACK:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CloseConnection(CLOSE_PROTOCOL, "text frame on im.v1.msgpack")
        try:
            frame = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                max_array_len=limits.max_items,
                max_map_len=limits.max_items,
                max_ext_len=0,  # extension types are not part of the protocol
            )
        except UnicodeDecodeError as exc:
            raise CloseConnection(CLOSE_PROTOCOL, "invalid UTF-8 in a MessagePack string") from exc
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
            raise CloseConnection(CLOSE_PROTOCOL, "undecodable MessagePack frame") from exc
        if not isinstance(frame, dict):
            raise CloseConnection(CLOSE_PROTOCOL, "a frame must be a map")
        _check_shape(frame, limits)
        return frame
    if isinstance(data, (bytes, bytearray, memoryview)):
        raise CloseConnection(CLOSE_PROTOCOL, "binary frame on im.v1.json")
    try:
        frame = json.loads(data, parse_constant=_no_constant)
    except UnicodeError as exc:
        raise CloseConnection(CLOSE_INVALID_UTF8, "invalid UTF-8") from exc
    except RecursionError as exc:
        raise CloseConnection(CLOSE_PROTOCOL, f"frame nested deeper than {limits.max_depth}") from exc
    except ValueError as exc:
        raise CloseConnection(CLOSE_PROTOCOL, "undecodable JSON frame") from exc
    if not isinstance(frame, dict):
        raise CloseConnection(CLOSE_PROTOCOL, "a frame must be a map")
    _check_shape(frame, limits)
    if isinstance(frame.get("body"), dict):
        frame["body"] = _from_b64(frame["body"])
    return frame


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_shape(frame: dict[str, Any], limits: Limits) -> None:
    """Walk a decoded frame level by level (iteratively: a deep frame cannot exhaust the stack) and
    close with 4400 when a map or list has more than ``limits.max_items`` entries or nests deeper
    than ``limits.max_depth``. Its cost is linear in the frame, whose size the WebSocket layer
    bounds; a flat frame (every value a scalar, as most are) costs one pass over its values."""
    level: list[Any] = [frame]
    depth = 1
    while level:
        if depth > limits.max_depth:
            raise CloseConnection(CLOSE_PROTOCOL, f"frame nested deeper than {limits.max_depth}")
        deeper: list[Any] = []
        for value in level:
            children = value.values() if isinstance(value, dict) else value
            if len(children) > limits.max_items:
                raise CloseConnection(CLOSE_PROTOCOL, f"a map or list in the frame has over {limits.max_items} entries")
            for child in children:
                if isinstance(child, (dict, list)):
                    deeper.append(child)
        level = deeper
        depth += 1


def _from_b64(value: dict[str, Any]) -> bytes:
    if set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise BadRequest('a binary body is {"b64": "<base64>"}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("body.b64 is not valid base64") from exc


def body_size(body: str | bytes) -> int:
    """Size of a message body in bytes (UTF-8 for text)."""
    return len(body.encode()) if isinstance(body, str) else len(body)


def msg_frame(entry: dict[str, Any]) -> dict[str, Any]:
    """The unsolicited ``msg`` frame of a committed entry (PROTOCOL.md section 5)."""
    out = {
        "t": "msg",
        "conv": entry["conv"],
        "seq": entry["seq"],
        "from": entry["sender"],
        "ts": entry["ts"],
        "cmid": entry["cmid"],
        "kind": entry["kind"],
        "body": entry["body"],
    }
    if entry.get("meta"):
        out["meta"] = entry["meta"]
    if "trace" in entry:  # stage timestamps of a sampled send (config trace_sample); never stored
        out["trace"] = entry["trace"]
    return out


def answer_frame(request_id: int | None, answer: dict[str, Any]) -> dict[str, Any]:
    """The frame answering ``send`` request ``request_id`` from a conversation shard's answer
    (:data:`im_actors.wire.Answer`): ``{"t": "ack", "id", "conv", "seq", "ts", "dup"}``, or
    ``{"t": "err", "id", "code", "msg", "retry", ...}`` with the error's extra fields such as
    ``retry_after_ms`` (PROTOCOL.md sections 4 and 6)."""
    if "err" in answer:
        extra = {k: v for k, v in answer.items() if k not in ("err", "msg", "retry")}
        return {
            "t": "err",
            "id": request_id,
            "code": answer["err"],
            "msg": answer["msg"],
            "retry": answer["retry"],
            **extra,
        }
    return {
        "t": "ack",
        "id": request_id,
        "conv": answer["conv"],
        "seq": answer["seq"],
        "ts": answer["ts"],
        "dup": answer["dup"],
    }


# --- validation --------------------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    """An integer of the protocol: a Python ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def _req_id(frame: dict[str, Any]) -> int:
    rid = frame.get("id")
    if not _is_int(rid):
        raise BadRequest("id must be an integer")
    return rid


def _str(frame: dict[str, Any], key: str, max_len: int = 256) -> str:
    """A free-text field (a name, a token, a cmid): 1..``max_len`` characters, storable (no lone
    surrogates: BSON and JSON clients need valid Unicode). Every free-text field of every request
    goes through here or through :func:`_check_storable`; ids go through :mod:`im_actors.ids`,
    whose alphabet is ASCII (issue 14, defect 1: a group name cut in half inside an emoji was
    answered ``unavailable``, forever)."""
    value = frame.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise BadRequest(f"{key} must be a string of 1..{max_len} characters")
    _check_storable(value, key, 0)
    return value


def _nonneg_int(frame: dict[str, Any], key: str, default: int | None = None) -> int:
    value = frame.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{key} must be a non-negative integer")
    return value


def _conv(frame: dict[str, Any]) -> str:
    conv = frame.get("conv")
    ids.conv_kind(conv)
    assert isinstance(conv, str)
    return conv


def _users(frame: dict[str, Any], key: str, limits: Limits) -> list[str]:
    users = frame.get(key)
    if not isinstance(users, list) or len(users) > limits.max_members:
        raise BadRequest(f"{key} must be a list of at most {limits.max_members} user ids")
    return list(dict.fromkeys(ids.check_id(u, key) for u in users))


def _limit(frame: dict[str, Any]) -> int:
    limit = _nonneg_int(frame, "limit", _SYNC_DEFAULT_LIMIT)
    if not 1 <= limit <= _SYNC_MAX_LIMIT:
        raise BadRequest(f"limit must be 1..{_SYNC_MAX_LIMIT}")
    return limit


def _send(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    body = frame.get("body")
    if not isinstance(body, (str, bytes)):
        raise BadRequest("body must be a string or binary")
    if isinstance(body, str):
        _check_storable(body, "body", 0)
    if body_size(body) > limits.max_body_bytes:
        raise TooLarge(f"body over {limits.max_body_bytes} bytes")
    kind = frame.get("kind", "text")
    if not isinstance(kind, str) or not kind or len(kind) > 32 or kind == "system":
        raise BadRequest("kind must be a string of 1..32 characters other than system")
    meta = frame.get("meta")
    if meta is not None and (not isinstance(meta, dict) or len(meta) > limits.max_meta_keys):
        raise BadRequest(f"meta must be a map of at most {limits.max_meta_keys} keys")
    if meta is not None:
        _check_storable(meta, "meta", 0)
    cmid = _str(frame, "cmid", 64)
    _check_storable(kind, "kind", 0)
    return {"conv": _conv(frame), "cmid": cmid, "body": body, "kind": kind, "meta": meta}


_INT64 = range(-(2**63), 2**63)
_MAX_META_DEPTH = 8
_MAX_META_ITEMS = 256


def _check_storable(value: object, field: str, depth: int) -> None:
    """Refuse what the history store cannot keep exactly (BSON) or JSON clients cannot receive:
    non-string map keys, integers outside int64, Infinity and NaN, strings that are not valid
    Unicode (lone surrogates), extension types, deep or wide nesting. Raises :class:`BadRequest` naming ``field``."""
    if depth > _MAX_META_DEPTH:
        raise BadRequest(f"{field} is nested more than {_MAX_META_DEPTH} deep")
    if value is None or isinstance(value, (bool, bytes)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest(f"{field} holds Infinity or NaN, which JSON clients cannot receive")
        return
    if isinstance(value, int):
        if value not in _INT64:
            raise BadRequest(f"{field} holds an integer outside int64")
        return
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise BadRequest(f"{field} holds a string that is not valid Unicode") from None
        return
    if isinstance(value, (list, tuple)):
        if len(value) > _MAX_META_ITEMS:
            raise BadRequest(f"{field} holds a list of more than {_MAX_META_ITEMS} items")
        for item in value:
            _check_storable(item, field, depth + 1)
        return
    if isinstance(value, dict):
        if len(value) > _MAX_META_ITEMS:
            raise BadRequest(f"{field} holds a map of more than {_MAX_META_ITEMS} keys")
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("$") or "." in key or "\0" in key:
                raise BadRequest(f"{field} keys must be strings without a leading $, dots or NUL")
            _check_storable(key, field, depth + 1)
            _check_storable(item, field, depth + 1)
        return
    raise BadRequest(f"{field} holds a value of an unsupported type")


def _sync(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"conv": _conv(frame), "after": _nonneg_int(frame, "after"), "limit": _limit(frame)}


def _history(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"conv": _conv(frame), "before": _nonneg_int(frame, "before"), "limit": _limit(frame)}


def _read(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"conv": _conv(frame), "seq": _nonneg_int(frame, "seq")}


def _group_create(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"name": _str(frame, "name", 128), "members": _users(frame, "members", limits)}


def _group_change(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"group": _group(frame), "users": _users(frame, "users", limits)}


def _group(frame: dict[str, Any]) -> str:
    group = frame.get("group")
    if not isinstance(group, str):
        raise BadRequest("group must be a group id")
    ids.conv_kind(ids.group_conv(group))
    return group


def _group_only(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"group": _group(frame)}


_GROUP_ROLES = ("owner", "admin", "member")


def _group_role(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    role = frame.get("role")
    if not isinstance(role, str) or role not in _GROUP_ROLES:
        raise BadRequest(f"role must be one of {list(_GROUP_ROLES)}")
    return {"group": _group(frame), "user": ids.check_id(frame.get("user"), "user"), "role": role}


def _group_rename(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"group": _group(frame), "name": _str(frame, "name", 128)}


def _push_register(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    provider = frame.get("provider")
    if not isinstance(provider, str) or provider not in _PUSH_PROVIDERS:  # a map or list is unhashable
        raise BadRequest(f"provider must be one of {sorted(_PUSH_PROVIDERS)}")
    return {"provider": provider, "token": _str(frame, "token", 4096)}


def _none(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {}


def _user(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"user": ids.check_id(frame.get("user"), "user")}


def _presence_get(frame: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"users": _users(frame, "users", limits)}


_VALIDATORS: dict[str, Callable[[dict[str, Any], Limits], dict[str, Any]]] = {
    "send": _send,
    "sync": _sync,
    "history": _history,
    "convs": _none,
    "read": _read,
    "typing": lambda f, lim: {"conv": _conv(f)},
    "group.create": _group_create,
    "group.add": _group_change,
    "group.remove": _group_change,
    "group.leave": _group_only,
    "group.info": _group_only,
    # Additive to PROTOCOL.md section 4 (to be listed there): change a member's role, rename.
    "group.role": _group_role,
    "group.rename": _group_rename,
    "contact.request": _user,
    "contact.accept": _user,
    "contact.remove": _user,
    "contact.block": _user,
    "contact.unblock": _user,
    "contact.list": _none,
    "presence.get": _presence_get,
    "push.register": _push_register,
    "push.unregister": _none,
}


#: Every request type ``t`` a client may send (PROTOCOL.md section 4), in the validators' table order:
#: the fuzzer (benchmarks/fuzz.py) draws from it, so a new request type is fuzzed as soon as it exists.
REQUEST_TYPES: tuple[str, ...] = tuple(_VALIDATORS)


def parse_request(frame: dict[str, Any], limits: Limits = Limits()) -> Request:
    """Validate a decoded request frame (PROTOCOL.md section 4).

    Raises :class:`BadRequest` (or :class:`TooLarge`) with the request id in the exception's
    ``request_id`` (None when the id could not be read), so the hub can answer it with
    ``exc.frame(exc.request_id)``; an unknown ``t`` is ``bad_request``.
    """
    t = frame.get("t")
    rid: int | None = None
    try:
        if t == "typing":  # its id is optional: anything but an integer is no id (true is not 1)
            rid = frame.get("id") if _is_int(frame.get("id")) else None
        else:
            rid = _req_id(frame)
        validator = _VALIDATORS.get(t) if isinstance(t, str) else None
        if validator is None:
            raise BadRequest(f"unknown request type {t!r}")
        return Request(t=str(t), id=rid, fields=validator(frame, limits))
    except (BadRequest, TooLarge) as exc:
        exc.request_id = rid
        raise


def parse_auth(frame: dict[str, Any]) -> tuple[str, str]:
    """Validate the first frame ``{"t": "auth", "token", "device", "proto": 1}``: ``(token, device)``.

    Raises :class:`CloseConnection` 4400 for anything but a well-formed version-1 auth frame.
    """
    if frame.get("t") != "auth":
        raise CloseConnection(CLOSE_PROTOCOL, "the first frame must be auth")
    if frame.get("proto") != PROTO_VERSION:
        raise CloseConnection(CLOSE_PROTOCOL, f"proto must be {PROTO_VERSION}")
    token, device = frame.get("token"), frame.get("device")
    if not isinstance(token, str) or not token or len(token) > 8192:
        raise CloseConnection(CLOSE_PROTOCOL, "token must be a string")
    if not ids.valid_id(device):
        raise CloseConnection(CLOSE_PROTOCOL, "device must be 1..64 characters of [A-Za-z0-9_.-]")
    assert isinstance(device, str)
    return token, device
