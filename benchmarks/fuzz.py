"""Fuzz benchmark: a million mutated frames against one hub while well-behaved clients chat through it.

Issue 14 ("Reliability"): no hub crash, no ``internal`` answer to anything but a real bug, and the
chatting clients lose nothing. This script deploys im-actors locally (one hub, development login,
the backing services as the demo finds or starts them), then at the same time

- runs the **chat**: alice and bob in a direct conversation, alice, bob and carol in a group (the
  client library, default rate limits), each sending a few messages a second, every one checked by
  the delivery oracle (:mod:`drivers.oracle`: acked, then delivered exactly once and in order to
  every member device, after a final catch-up);
- runs ``--connections`` **fuzz connections** (both subprotocols, one asyncio process or
  ``--processes``) that send ``--frames`` frames in all: valid frames of every request type of
  :data:`im_actors.protocol.REQUEST_TYPES` (a type added there is fuzzed at once, with generic
  fields until it gets a template here), mutated: fields deleted, types swapped, huge, negative and
  overflowing integers, long strings, lone surrogates, NUL, trailing newlines, deep nesting, unknown
  fields, a wrong ``t``, bad ids and duplicated ids, duplicated cmids, bursts without waiting; and
  whole frames broken: truncated and bit-flipped MessagePack, invalid UTF-8 in JSON text, binary
  frames on ``im.v1.json`` and text frames on ``im.v1.msgpack``, JSON that is not a map or not JSON,
  extension types, frames over ``max_frame_bytes``, reserved opcodes, 1 GiB headers, bad ``auth``.

Each fuzz connection works in lock step: it sends a frame and waits for what the hub must do with it
(predicted by running :mod:`im_actors.protocol` on the same bytes: an answer with a given id, a
close, or nothing for a ``typing`` without id), so every answer is pinned to the frame that caused it.
A connection the hub closes (4400, 1007, 1009, 4429, ...: correct behaviour) reconnects and goes on.

Counted and printed: frames/s; answers by type and error code; closes by code; and the findings,
each with the frame that caused it:

- ``internal``: an ``internal`` answer (each is a bug); the frames are replayed alone at the end on
  a fresh connection to see whether they reproduce;
- ``close_1011``: a connection closed with 1011 (the hub's handler raised);
- ``accepted_invalid``: a frame that breaks PROTOCOL.md section 4 (checked by :func:`spec_violation`,
  written from the protocol text, not from the code) answered with anything but ``bad_request`` /
  ``too_large`` or a close;
- ``bad_answer``: an answer that breaks PROTOCOL.md (undecodable, an ``err`` whose ``retry`` is not
  its code's, an id that is not an integer, the wrong answer type for the request, error text naming
  an actor or showing a traceback);
- ``unanswered``: a request the hub should answer that got nothing within ``--answer-timeout`` s
  (:data:`ANSWER_BOUND_S` by default: the hub's own bound, a peer call's timeout twice, after which
  it answers ``unavailable`` itself; an answer that comes later still shows as a ``surprise``, an
  answer that matches no request);
- ``surprise``: the hub did something else than the protocol module says (closed where it should
  answer, or the reverse);
- hub restarts (Ray's restart count and pid of the hub actor, before and after) and the hub's own
  answer counters (its ``internal`` count is the one that matters).

Rate limits are the deployment's defaults: each fuzz connection speaks as its own user, and a user
closed 4429 comes back as a new one (``rate_closed`` counts them), so no knob is raised and the chat
runs under the same limits as everyone. ``push_workers`` is 0 (fuzzed ``push.register`` tokens are
URLs and device tokens that no worker should try). ``--seed`` fixes every fuzz connection's frame
stream (what it sends is a function of the seed and the connection's index; only server-made ids,
such as the groups it created, and where the hub's rate limits close it, differ between runs).

Storage: with no ``mongo_url`` it runs on a private SecantusDB, with MongoDB retryable writes off
(``retryWrites=false``; ``--retry-writes`` keeps them): SecantusDB 0.7.0b3 keeps up to 10,000
retryable-write records and sorts all of them on every write once it holds that many, so after the
first ten thousand writes the storage, not the hub, would set the pace of a long run. The store
does not rely on them (an ambiguous commit is settled by reading back, DESIGN.md section 2).

``--max-seconds``, SIGINT and SIGTERM stop the fuzzing early; the report then covers the frames sent
(``stopped_early`` says why) and everything is torn down as usual.

    python benchmarks/fuzz.py --frames 1000000
    python benchmarks/fuzz.py --frames 20000 --connections 8 --seed 7 --json fuzz.json

Exit status 1 when anything was found (an internal answer, a 1011, a hub restart, a lost, duplicated
or reordered chat message, an accepted invalid frame or a bad answer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import random
import re
import secrets
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus  # noqa: E402
from websockets.typing import Subprotocol  # noqa: E402

from im_actors import protocol  # noqa: E402
from im_actors.auth import issue_token  # noqa: E402
from im_actors.config import Config  # noqa: E402
from im_actors.errors import CloseConnection, RequestError  # noqa: E402
from im_actors.refs import DEFAULT_CALL_TIMEOUT_S  # noqa: E402
from tests.hubkit import masked_frame  # noqa: E402

log = logging.getLogger("fuzz")

MP, JS = protocol.SUBPROTOCOL_MSGPACK, protocol.SUBPROTOCOL_JSON

# --- what PROTOCOL.md says (the fuzzer's own reading of it, not the code's) -------------------------

#: Required fields of each request type (PROTOCOL.md section 4); ``id`` too, except for ``typing``.
REQUIRED: dict[str, tuple[str, ...]] = {
    "send": ("conv", "cmid", "body"),
    "sync": ("conv", "after"),
    "history": ("conv", "before"),
    "convs": (),
    "read": ("conv", "seq"),
    "typing": ("conv",),
    "group.create": ("name", "members"),
    "group.add": ("group", "users"),
    "group.remove": ("group", "users"),
    "group.leave": ("group",),
    "group.info": ("group",),
    "group.role": ("group", "user", "role"),
    "group.rename": ("group", "name"),
    "contact.request": ("user",),
    "contact.accept": ("user",),
    "contact.remove": ("user",),
    "contact.block": ("user",),
    "contact.unblock": ("user",),
    "contact.list": (),
    "presence.get": ("users",),
    "push.register": ("provider", "token"),
    "push.unregister": (),
}
#: Optional fields the templates sometimes carry.
OPTIONAL: dict[str, tuple[str, ...]] = {"send": ("kind", "meta"), "sync": ("limit",), "history": ("limit",)}
#: What each field holds: the fuzzer draws valid and invalid values by kind.
FIELD_KIND: dict[str, str] = {
    "conv": "conv",
    "cmid": "cmid",
    "body": "body",
    "kind": "kind",
    "meta": "meta",
    "after": "seq",
    "before": "seq",
    "seq": "seq",
    "limit": "limit",
    "name": "name",
    "members": "users",
    "users": "users",
    "group": "group",
    "user": "user",
    "role": "role",
    "provider": "provider",
    "token": "token",
}
#: The ``t`` of each request type's answer when it succeeds (PROTOCOL.md section 4).
ANSWER_T: dict[str, str] = {
    "send": "ack",
    "sync": "msgs",
    "history": "msgs",
    "convs": "convs",
    "group.info": "group",
    "contact.list": "contacts",
    "presence.get": "presence",
}
#: Every error code and its ``retry`` (PROTOCOL.md section 6).
ERROR_RETRY: dict[str, bool] = {
    "bad_request": False,
    "unauthorized": False,
    "forbidden": False,
    "too_large": False,
    "conflict": False,
    "rate_limited": True,
    "unavailable": True,
    "internal": True,
}
#: Close codes of PROTOCOL.md section 7 that refuse a bad frame.
REFUSING_CLOSES = frozenset({1007, 1009, 4400})
#: Unsolicited frames (PROTOCOL.md section 5).
UNSOLICITED = frozenset({"msg", "receipt", "typing", "presence"})
ROLES = ("owner", "admin", "member")
PROVIDERS = ("apns", "fcm", "huawei", "xiaomi", "webhook", "log")
_SPEC_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Error text that shows what clients must not see: actor names, tracebacks, Ray's exceptions.
_LEAK = re.compile(r"im-(router|hub|session|conv|group|store|push)-\d|Traceback|RayTaskError|ActorError|ray\.")


def _spec_id(value: object) -> bool:
    return isinstance(value, str) and _SPEC_ID.fullmatch(value) is not None


def _spec_conv(value: object) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith("d:"):
        parts = value.split(":")
        return len(parts) == 3 and _spec_id(parts[1]) and _spec_id(parts[2]) and parts[1].encode() < parts[2].encode()
    return value.startswith("g:") and len(value) > 2


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def spec_violation(frame: object, max_body_bytes: int) -> str | None:
    """What in ``frame`` (a request as sent, before encoding) breaks PROTOCOL.md section 4, or None
    when nothing the protocol text pins down is broken (the frame may still be refused for limits
    the text leaves to the server, such as a group name's length).

    Only what the text says: a known ``t``; an integer ``id`` (not for ``typing``); every required
    field present with the right type; ids of ``[A-Za-z0-9_.-]{1,64}``; conversations
    ``d:<a>:<b>`` with a < b or ``g:<id>``; ``cmid`` 1..64 characters; seqs >= 0; ``limit`` <= 500;
    ``role`` and ``provider`` from their lists; a body of at most ``max_body_bytes``.
    """
    if not isinstance(frame, dict):
        return "a frame must be a map"
    t = frame.get("t")
    if not isinstance(t, str) or t not in REQUIRED:
        return None if isinstance(t, str) and t in protocol.REQUEST_TYPES else f"unknown t {t!r:.40}"
    if t != "typing" and not _is_int(frame.get("id")):
        return "id must be an integer"
    for key in REQUIRED[t]:
        if key not in frame:
            return f"{key} missing"
    for key, value in frame.items():
        if key not in REQUIRED[t] and key not in OPTIONAL.get(t, ()):
            continue
        kind = FIELD_KIND.get(key)
        bad = _field_violation(kind, value, t, max_body_bytes)
        if bad:
            return f"{key}: {bad}"
    return None


def _field_violation(kind: str | None, value: object, t: str, max_body_bytes: int) -> str | None:
    if kind == "conv":
        return None if _spec_conv(value) else "not a conversation id"
    if kind == "user":
        return None if _spec_id(value) else "not a user id"
    if kind == "users":
        if not isinstance(value, list):
            return "not a list"
        return None if all(_spec_id(u) for u in value) else "holds something that is not a user id"
    if kind == "cmid":
        return None if isinstance(value, str) and 1 <= len(value) <= 64 else "not 1..64 characters"
    if kind == "body":
        if not isinstance(value, (str, bytes)):
            return "not a string or binary"
        size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(value)
        return None if size <= max_body_bytes else "over max_body_bytes"
    if kind == "seq":
        return None if _is_int(value) and value >= 0 else "not a seq (an integer >= 0)"  # type: ignore[operator]
    if kind == "limit":
        if not _is_int(value) or value < 0:  # type: ignore[operator]
            return "not a non-negative integer"
        return "over 500" if t == "sync" and value > 500 else None  # type: ignore[operator]
    if kind == "role":
        return None if value in ROLES else "not a role"
    if kind == "provider":
        return None if value in PROVIDERS else "not a provider"
    if kind in ("name", "token", "group", "kind"):
        return None if isinstance(value, str) else "not a string"
    if kind == "meta":
        return None if isinstance(value, dict) or value is None else "not a map"
    return None


# --- the frame generator (pure: no I/O) -------------------------------------------------------------


@dataclass
class Context:
    """What one fuzz connection knows: its user, other fuzz users, the chatting users (whose
    conversations and groups are not its own), the groups it created (from the hub's answers)."""

    me: str
    peers: list[str]
    bystanders: list[str] = field(default_factory=list)
    foreign_convs: list[str] = field(default_factory=list)
    foreign_groups: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    sent_cmids: deque[tuple[str, str, Any]] = field(default_factory=lambda: deque(maxlen=32))
    recent_ids: deque[int] = field(default_factory=lambda: deque(maxlen=16))


@dataclass
class Fuzzed:
    """One thing to send: ``data`` as a ``"binary"`` or ``"text"`` WebSocket frame (text given as bytes
    is sent as it is, valid UTF-8 or not), or ``"raw"`` bytes written to the socket (frames the
    client library would not make). ``what`` names the request type and the mutations; ``frame`` is
    the map before encoding (None when the bytes themselves were broken); ``violation`` what breaks
    PROTOCOL.md (:func:`spec_violation`)."""

    data: bytes | str
    opcode: Literal["binary", "text", "raw"]
    what: str
    t: str
    frame: dict[str, Any] | None = None
    violation: str | None = None


# Values a type swap puts in place of a field's value (JSON encodes bytes as {"b64"} and NaN as NaN).
_TYPE_POOL: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    7,
    1.5,
    float("nan"),
    float("inf"),
    "",
    "7",
    "x",
    [],
    ["a"],
    {},
    {"a": 1},
    b"\x00\x01",
    2**40,
]
#: Integers at and past the edges (MessagePack holds -2**63 .. 2**64-1; JSON any).
_INTS_MP = [2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63), -1, 0]
_INTS_JS = [*_INTS_MP, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**300]
#: Strings that are not user ids (PROTOCOL.md section 3).
_BAD_IDS = ["", "a" * 65, "a b", "a:b", "a\n", "\na", "a\x00", "é", "a/b", "a\t", " ", "a\u202e", "a\r\n", "👍"]
_UNICODE = ["👍", "\u202eRTL", "e\u0301", "\u200b", "\ufeff", "日本語", "\U0010ffff", "\x7f"]
_LONG = [65, 129, 257, 4097, 70000]
_PLACEHOLDER = "\u0800"  # UTF-8 e0 a0 80; turned into ed a0 80 (a lone surrogate, CESU-8) in MessagePack
_PLACEHOLDER_UTF8 = _PLACEHOLDER.encode()
_SURROGATE_UTF8 = b"\xed\xa0\x80"


class FrameMaker:
    """Makes the fuzz frames of one connection from ``rng``: :meth:`next` returns a burst of one or
    more :class:`Fuzzed` to send back to back (one, mostly).

    ``max_body_bytes`` and ``max_frame_bytes`` are the hub's (they shape the too-large mutations);
    ``types`` the request types to draw from (default :data:`protocol.REQUEST_TYPES`);
    ``broken_share`` the share of frames broken below the map (:meth:`broken`; each closes the
    connection, and a reconnection costs the hub far more than a frame).
    """

    def __init__(
        self,
        rng: random.Random,
        ctx: Context,
        max_body_bytes: int,
        max_frame_bytes: int,
        types: Iterable[str] = protocol.REQUEST_TYPES,
        broken_share: float = 0.015,
    ) -> None:
        self.rng = rng
        self.broken_share = broken_share
        self.ctx = ctx
        self.max_body_bytes = max_body_bytes
        self.max_frame_bytes = max_frame_bytes
        self.types = list(types)
        self._ids = 0
        self._cmids = 0
        self._ops: list[tuple[Callable[[dict[str, Any], str], str], int]] = [
            (self._op_none, 8),
            (self._op_delete, 10),
            (self._op_type, 12),
            (self._op_int, 8),
            (self._op_string, 10),
            (self._op_bad_value, 12),
            (self._op_nest, 4),
            (self._op_extra, 6),
            (self._op_t, 6),
            (self._op_id, 8),
            (self._op_list, 5),
            (self._op_dup_cmid, 3),
        ]
        self._op_fns = [op for op, _ in self._ops]
        self._op_weights = [w for _, w in self._ops]

    # --- valid values ---

    def new_id(self) -> int:
        self._ids += 1
        self.ctx.recent_ids.append(self._ids)
        return self._ids

    def _peer(self) -> str:
        r = self.rng.random()
        if r < 0.04 and self.ctx.bystanders:
            return self.rng.choice(self.ctx.bystanders)
        if r < 0.08:
            return self.ctx.me
        if r < 0.12:
            return f"nobody{self.rng.randrange(1000)}"
        return self.rng.choice(self.ctx.peers) if self.ctx.peers else "nobody"

    def _dm(self) -> str:
        other = self._peer()
        while other == self.ctx.me:
            other = self.rng.choice(self.ctx.peers) if self.ctx.peers else "nobody"
        lo, hi = sorted((self.ctx.me, other), key=lambda s: s.encode())
        return f"d:{lo}:{hi}"

    def _group(self) -> str:
        r = self.rng.random()
        if self.ctx.groups and r < 0.7:
            return self.rng.choice(self.ctx.groups)
        if self.ctx.foreign_groups and r < 0.85:
            return self.rng.choice(self.ctx.foreign_groups)
        return "".join(self.rng.choice("abcdefghijkLMNOP0123456789") for _ in range(16))

    def valid(self, kind: str) -> Any:
        """A valid value of field kind ``kind`` (see :data:`FIELD_KIND`)."""
        rng = self.rng
        if kind == "conv":
            r = rng.random()
            if r < 0.25 and self.ctx.groups:
                return "g:" + rng.choice(self.ctx.groups)
            if r < 0.32 and self.ctx.foreign_convs:
                return rng.choice(self.ctx.foreign_convs)
            return self._dm()
        if kind == "cmid":
            self._cmids += 1
            return f"c{self._cmids}"
        if kind == "body":
            r = rng.random()
            if r < 0.2:
                return rng.randbytes(rng.randrange(0, 32))
            if r < 0.3:
                return rng.choice(_UNICODE) * rng.randrange(1, 4)
            return f"fuzz {rng.randrange(10**6)}"
        if kind == "kind":
            return rng.choice(["text", "bin", "x-custom", "image"])
        if kind == "meta":
            return rng.choice([{}, {"k": [1, 2]}, {"a": {"b": {"c": "d"}}}, {"n": 1.5, "t": None, "b": True}])
        if kind == "seq":
            return rng.choice([0, 0, 1, 2, 5, 10, 100])
        if kind == "limit":
            return rng.choice([1, 10, 100, 500])
        if kind == "name":
            return rng.choice([f"group {rng.randrange(1000)}", "日本語の部屋", "a", "👍" * 10])
        if kind == "users":
            return [self._peer() for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        if kind == "group":
            return self._group()
        if kind == "user":
            return self._peer()
        if kind == "role":
            return rng.choice(ROLES)
        if kind == "provider":
            return rng.choice(PROVIDERS)
        if kind == "token":
            return rng.choice([f"tok-{rng.randrange(10**9)}", "webhook-token-not-a-url", "a" * 200])
        raise ValueError(kind)

    def bad(self, kind: str, sub: str) -> Any:
        """A value of the right type that PROTOCOL.md refuses (or leaves to the server) for ``kind``."""
        rng = self.rng
        if kind in ("user", "users"):
            value = rng.choice(_BAD_IDS) if sub == MP or rng.random() < 0.8 else "a\ud800"
            return [self._peer(), value] if kind == "users" else value
        if kind == "conv":
            me, other = self.ctx.me, self._peer()
            lo, hi = sorted((me, other))
            return rng.choice(
                [
                    "",
                    "x",
                    f"d:{hi}:{lo}" if lo != hi else f"d:{me}:{me}",
                    f"d:{me}:{me}",
                    f"d:{me}",
                    f"d:{lo}:{hi}:x",
                    f"d:{lo}:{hi}\n",
                    f"d:{lo}\n:{hi}",
                    f"D:{lo}:{hi}",
                    f"d:{lo}:{rng.choice(_BAD_IDS)}",
                    "g:",
                    "g:a b",
                    "g:" + "x" * 65,
                    "g:" + rng.choice(_BAD_IDS),
                    f"g:{self._group()}\n",
                ]
            )
        if kind == "cmid":
            return rng.choice(["", "c" * 65, "c" * 1000])
        if kind == "body":
            return "x" * (self.max_body_bytes + rng.choice([1, 100]))
        if kind == "kind":
            return rng.choice(["", "system", "k" * 33, "text\x00"])
        if kind == "meta":
            return rng.choice(
                [
                    {"$where": 1},
                    {"a.b": 1},
                    {"a\x00": 1},
                    {f"k{i}": i for i in range(33)},
                    {"a": 2**63},
                    {"": 1},
                    _nested_map(9),
                    {"f": float("nan")},
                    {"l": list(range(300))},
                    [1, 2],
                    "meta",
                ]
            )
        if kind == "seq":
            return rng.choice([-1, -(2**63), -5])
        if kind == "limit":
            return rng.choice([0, 501, -1, 10**6])
        if kind == "name":
            return rng.choice(["", "n" * 129, "n" * 70000, "\x00", "a\n"])
        if kind == "group":
            return rng.choice(["", "a" * 65, "a b", "g:" + self._group(), "a.b", "a\n", "é"])
        if kind == "role":
            return rng.choice(["king", "", "OWNER", "owner\n"])
        if kind == "provider":
            return rng.choice(["sms", "", "APNS", "log\n"])
        if kind == "token":
            return rng.choice(["", "t" * 4097, "t\x00"])
        raise ValueError(kind)

    # --- templates ---

    def template(self, t: str) -> dict[str, Any]:
        """A valid request of type ``t`` (generic fields for a type without a template here)."""
        frame: dict[str, Any] = {"t": t}
        if t != "typing" or self.rng.random() < 0.5:
            frame["id"] = self.new_id()
        if t in REQUIRED:
            for key in REQUIRED[t]:
                frame[key] = self.valid(FIELD_KIND[key])
            for key in OPTIONAL.get(t, ()):
                if self.rng.random() < 0.4:
                    frame[key] = self.valid(FIELD_KIND[key])
            if t == "send":
                self.ctx.sent_cmids.append((frame["conv"], frame["cmid"], frame["body"]))
        else:
            for key in self.rng.sample(sorted(FIELD_KIND), self.rng.randrange(0, 4)):
                frame[key] = self.valid(FIELD_KIND[key])
        return frame

    # --- mutations of the map: each returns its name ---

    def _field(self, frame: dict[str, Any]) -> str | None:
        keys = [k for k in frame if k not in ("t", "id")]
        return self.rng.choice(keys) if keys else None

    def _op_none(self, frame: dict[str, Any], sub: str) -> str:
        return "valid"

    def _op_delete(self, frame: dict[str, Any], sub: str) -> str:
        if not frame:
            return "valid"
        key = self.rng.choice(list(frame))
        del frame[key]
        return f"delete({key})"

    def _op_type(self, frame: dict[str, Any], sub: str) -> str:
        key = self._field(frame) or "id"
        frame[key] = self.rng.choice(_TYPE_POOL)
        return f"type({key}={frame[key]!r:.20})"

    def _op_int(self, frame: dict[str, Any], sub: str) -> str:
        ints = [k for k, v in frame.items() if _is_int(v)] or ["id"]
        key = self.rng.choice(ints) if self.rng.random() < 0.8 else (self._field(frame) or "id")
        frame[key] = self.rng.choice(_INTS_MP if sub == MP else _INTS_JS)
        return f"int({key}={frame[key]})"

    def _op_string(self, frame: dict[str, Any], sub: str) -> str:
        strs = [k for k, v in frame.items() if isinstance(v, str) and k != "t"]
        key = self.rng.choice(strs) if strs else "name"
        base = frame.get(key) if isinstance(frame.get(key), str) else "x"
        assert isinstance(base, str)
        how = self.rng.choice(["long", "nul", "newline", "surrogate", "unicode", "space"])
        if how == "long":
            value = (base or "x") * (self.rng.choice(_LONG) // max(len(base), 1) + 1)
        elif how == "nul":
            at = self.rng.randrange(len(base) + 1)
            value = base[:at] + "\x00" + base[at:]
        elif how == "newline":
            value = base + self.rng.choice(["\n", "\r\n", "\r"])
        elif how == "surrogate":
            value = base + ("\ud800" if sub == JS else _PLACEHOLDER)
        elif how == "unicode":
            value = base + self.rng.choice(_UNICODE)
        else:
            value = f" {base} "
        frame[key] = value
        return f"string({key}:{how})"

    def _op_bad_value(self, frame: dict[str, Any], sub: str) -> str:
        keys = [k for k in frame if k in FIELD_KIND]
        if not keys:
            return self._op_extra(frame, sub)
        key = self.rng.choice(keys)
        frame[key] = self.bad(FIELD_KIND[key], sub)
        return f"bad({key})"

    def _op_nest(self, frame: dict[str, Any], sub: str) -> str:
        key = self._field(frame) or "meta"
        depth = self.rng.choice([2, 8, 9, 14, 15, 16, 17, 30])
        frame[key] = _nested_map(depth) if self.rng.random() < 0.5 else _nested_list(depth)
        return f"nest({key},{depth})"

    def _op_extra(self, frame: dict[str, Any], sub: str) -> str:
        how = self.rng.choice(["from", "user", "dollar", "empty", "longkey", "many", "proto", "other"])
        if how == "from":
            frame["from"] = self._peer()
            frame["sender"] = self._peer()
        elif how == "user":
            frame.setdefault("user", self._peer())
        elif how == "dollar":
            frame["$set"] = {"t": "x"}
        elif how == "empty":
            frame[""] = 1
        elif how == "longkey":
            frame["k" * 1000] = 1
        elif how == "many":
            for i in range(self.rng.choice([50, 500, 2000])):
                frame[f"x{i}"] = i
        elif how == "proto":
            frame["__proto__"] = {"admin": True}
        else:
            frame[self.rng.choice(sorted(FIELD_KIND))] = self.valid(FIELD_KIND[self.rng.choice(sorted(FIELD_KIND))])
        return f"extra({how})"

    def _op_t(self, frame: dict[str, Any], sub: str) -> str:
        r = self.rng.random()
        if r < 0.5:
            frame["t"] = self.rng.choice(self.types)  # another type's name over these fields
        elif r < 0.85:
            frame["t"] = self.rng.choice(
                ["sendd", "SEND", " send", "send\x00", "", "a" * 300, "msg", "ack", "auth", "ready", "group.", "."]
            )
        else:
            frame["t"] = self.rng.choice([1, None, [], {}, True, b"send"])
        return f"t({frame['t']!r:.20})"

    def _op_id(self, frame: dict[str, Any], sub: str) -> str:
        how = self.rng.choice(["missing", "type", "big", "negative", "zero", "dup", "dup"])
        if how == "missing":
            frame.pop("id", None)
        elif how == "type":
            frame["id"] = self.rng.choice(["1", 1.5, None, True, False, [], {"id": 1}])
        elif how == "big":
            frame["id"] = self.rng.choice(_INTS_MP if sub == MP else _INTS_JS)
        elif how == "negative":
            frame["id"] = -self.rng.randrange(1, 1000)
        elif how == "zero":
            frame["id"] = 0
        else:
            frame["id"] = self.rng.choice(self.ctx.recent_ids) if self.ctx.recent_ids else 1
        return f"id({how})"

    def _op_list(self, frame: dict[str, Any], sub: str) -> str:
        keys = [k for k in frame if FIELD_KIND.get(k) == "users"] or ["users"]
        key = self.rng.choice(keys)
        how = self.rng.choice(["empty", "me", "dups", "many", "huge", "types", "nested"])
        peer = self._peer()
        if how == "empty":
            frame[key] = []
        elif how == "me":
            frame[key] = [self.ctx.me]
        elif how == "dups":
            frame[key] = [peer] * self.rng.randrange(2, 50)
        elif how == "many":
            frame[key] = [f"nobody{i}" for i in range(self.rng.choice([100, 1000]))]
        elif how == "huge":
            frame[key] = ["u"] * 10001  # over max_frame_items: closed 4400
        elif how == "types":
            frame[key] = [peer, 1, None, ["x"], {"u": 1}]
        else:
            frame[key] = [[peer]]
        return f"list({key}:{how})"

    def _op_dup_cmid(self, frame: dict[str, Any], sub: str) -> str:
        if not self.ctx.sent_cmids:
            return "valid"
        conv, cmid, body = self.rng.choice(self.ctx.sent_cmids)
        same = self.rng.random() < 0.5
        frame.update({"t": "send", "conv": conv, "cmid": cmid, "body": body if same else "another body"})
        frame.setdefault("id", self.new_id())
        return f"dup_cmid({'same' if same else 'other'} body)"

    # --- whole frames ---

    def next(self, sub: str) -> list[Fuzzed]:
        """The next burst to send on a connection speaking ``sub``."""
        r = self.rng.random()
        if r < 0.03:  # a burst: frames sent without waiting, some sharing an id
            burst = [self.one(sub) for _ in range(self.rng.randrange(2, 6))]
            shared = self.new_id()
            for item in burst:
                if item.frame is not None and self.rng.random() < 0.5 and item.opcode != "raw":
                    item.frame["id"] = shared
                    item.what += "+id(shared)"
                    item.data, item.opcode = _encode(item.frame, sub)
                    item.violation = spec_violation(_as_sent(item.frame, item.data, sub), self.max_body_bytes)
            return burst
        return [self.one(sub)]

    def one(self, sub: str) -> Fuzzed:
        """One mutated frame (about 6 % of them broken below the map, which closes the connection)."""
        t = self.rng.choice(self.types)
        frame = self.template(t)
        if self.rng.random() < self.broken_share:
            return self.broken(frame, sub, t)
        names = []
        for _ in range(self.rng.choices([1, 2, 3], [70, 20, 10])[0]):
            op = self.rng.choices(self._op_fns, self._op_weights)[0]
            names.append(op(frame, sub))
        data, opcode = _encode(frame, sub)
        if isinstance(data, (bytes, str)) and len(data) > self.max_frame_bytes:
            names.append("over max_frame_bytes")
        violation = spec_violation(_as_sent(frame, data, sub), self.max_body_bytes)
        return Fuzzed(data, opcode, f"{t}:{'+'.join(names)}", t, frame, violation)

    def broken(self, frame: dict[str, Any], sub: str, t: str) -> Fuzzed:
        """The frame broken below the map: bytes, encoding or WebSocket framing."""
        rng = self.rng
        data, opcode = _encode(frame, sub)
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        how = rng.choices(
            [
                "truncate",
                "flip",
                "append",
                "wrong_opcode",
                "invalid_utf8",
                "not_a_map",
                "not_json",
                "msgpack_ext",
                "msgpack_int_key",
                "empty",
                "oversized",
                "reserved_opcode",
                "gib_header",
            ],
            [20, 20, 8, 10, 10, 8, 8, 5, 5, 3, 1, 1, 1],
        )[0]
        out: bytes | str
        if how == "truncate":
            out = raw[: rng.randrange(0, max(len(raw), 1))]
        elif how == "flip":
            buf = bytearray(raw)
            for _ in range(rng.randrange(1, 4)):
                if buf:
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
            out = bytes(buf)
        elif how == "append":
            out = raw + rng.choice([b"\x00", b"\xc1", b"{}", b" ", b"\x91\x01"])
        elif how == "wrong_opcode":  # text on MessagePack, binary on JSON
            return Fuzzed(
                raw if sub == JS else raw.decode("latin-1"), "binary" if sub == JS else "text", f"{t}:{how}", t
            )
        elif how == "invalid_utf8":
            return Fuzzed(rng.choice([b'{"t":"\xc3\x28"}', raw + b"\xff", b"\xed\xa0\x80"]), "text", f"{t}:{how}", t)
        elif how == "not_a_map":
            value = rng.choice([[frame.get("t"), 1], "send", 1, None, True, 1.5])
            out = msgpack.packb(value) if sub == MP else json.dumps(value).encode()
        elif how == "not_json":
            out = rng.choice(
                [b"NaN", b'{"t":"convs","id":1,"x":NaN}', b"{'t':1}", b'{"t":1,}', b"\xef\xbb\xbf{}", b"//c"]
            )
        elif how == "msgpack_ext":
            out = b"\x81\xa1t" + msgpack.packb(msgpack.ExtType(1, b"x")) if sub == MP else raw
        elif how == "msgpack_int_key":
            out = b"\x82\xa1t\xa5convs\x01\x01" if sub == MP else b'{"t":"convs","id":1,"t":2}'
        elif how == "empty":
            out = b""
        elif how == "oversized":
            out = raw + b" " * (self.max_frame_bytes + 1)
        elif how == "reserved_opcode":
            return Fuzzed(masked_frame(rng.choice([0x3, 0x4, 0xB]), b"xx"), "raw", f"{t}:{how}", t)
        else:
            return Fuzzed(masked_frame(0x2, b"x" * 8, 1 << 30), "raw", f"{t}:{how}", t)
        if sub == JS and how not in ("msgpack_ext",):
            return Fuzzed(out, "text", f"{t}:{how}", t)  # sent as text whatever its bytes are
        return Fuzzed(out, "binary" if sub == MP else "text", f"{t}:{how}", t)

    def auth(self, token: str, device: str) -> tuple[dict[str, Any] | bytes, str]:
        """A mutated ``auth`` frame (or bytes) and its mutation's name."""
        frame: dict[str, Any] = {"t": "auth", "token": token, "device": device, "proto": 1}
        how = self.rng.choice(
            ["proto", "t", "token", "device", "device_bad", "missing", "extra", "b64_body", "garbage", "nested"]
        )
        if how == "proto":
            frame["proto"] = self.rng.choice([0, 2, "1", None, 1.0, True, 2**64 - 1])
        elif how == "t":
            frame["t"] = self.rng.choice(["send", "AUTH", "", None])
        elif how == "token":
            frame["token"] = self.rng.choice(["", "x", token[:-3], token + "x", "a" * 9000, 1, None, "a.b.c"])
        elif how == "device":
            frame["device"] = self.rng.choice(_BAD_IDS + [1, None])
        elif how == "device_bad":
            frame["device"] = device + "\n"
        elif how == "missing":
            del frame[self.rng.choice(list(frame))]
        elif how == "extra":
            frame["user"] = "somebody-else"
        elif how == "b64_body":
            frame["body"] = {"b64": "!!"}
        elif how == "nested":
            frame["token"] = _nested_list(30)
        else:
            return self.rng.randbytes(self.rng.randrange(1, 64)), how
        return frame, how


def _nested_list(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _nested_map(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def _encode(frame: dict[str, Any], sub: str) -> tuple[bytes | str, Literal["binary", "text"]]:
    """Encode a (mutated) map as the subprotocol's frame; JSON with lone surrogates as ``\\ud800``
    escapes, MessagePack with the placeholder turned into a lone surrogate's bytes."""
    if sub == MP:
        try:
            data = msgpack.packb(frame, use_bin_type=True)
        except (OverflowError, TypeError, ValueError):
            data = msgpack.packb(_clamp(frame), use_bin_type=True)
        if _PLACEHOLDER_UTF8 in data:
            data = data.replace(_PLACEHOLDER_UTF8, _SURROGATE_UTF8)
        return data, "binary"
    try:
        text = json.dumps(frame, default=_json_default, separators=(",", ":"), ensure_ascii=False)
        text.encode()
    except UnicodeEncodeError:
        text = json.dumps(frame, default=_json_default, separators=(",", ":"), ensure_ascii=True)
    return text, "text"


def _as_sent(frame: dict[str, Any], data: bytes | str, sub: str) -> Any:
    """The map as the hub reads it from ``data`` (on JSON, bytes travel as ``{"b64"}`` maps and only a
    ``body`` map is binary again, PROTOCOL.md section 2); ``frame`` when ``data`` does not decode."""
    try:
        if sub == MP:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        sent = json.loads(data)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return frame
    body = sent.get("body") if isinstance(sent, dict) else None
    if isinstance(body, dict) and set(body) == {"b64"} and isinstance(body["b64"], str):
        sent["body"] = b""  # binary (its size does not matter past validity: too_large counts as a refusal)
        with contextlib.suppress(ValueError):
            import base64

            sent["body"] = base64.b64decode(body["b64"], validate=True)
    return sent


def _json_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        import base64

        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(type(value).__name__)


def _clamp(value: Any) -> Any:
    if _is_int(value):
        return max(min(value, 2**64 - 1), -(2**63))
    if isinstance(value, dict):
        return {k: _clamp(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clamp(v) for v in value]
    return value


# --- what the hub must do with a frame (from the protocol module) -------------------------------------


@dataclass(frozen=True)
class Expect:
    """What the hub does with a frame, by :mod:`im_actors.protocol`: ``"close"`` (with ``code``),
    ``"answer"`` (an answer with id ``rid``, for request type ``t``; ``code`` the error code when
    validation refuses it) or ``"silent"`` (a valid ``typing`` without id)."""

    outcome: Literal["close", "answer", "silent"]
    code: int | str | None = None
    rid: Any = None
    t: str | None = None


def predict(item: Fuzzed, sub: str, limits: protocol.Limits, max_frame_bytes: int) -> Expect:
    """What the hub must do with ``item`` on a connection speaking ``sub`` (after auth)."""
    if item.opcode == "raw":
        return Expect("close")
    data: bytes | str = item.data
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > max_frame_bytes:
        return Expect("close", 1009)
    if item.opcode == "text" and isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return Expect("close", 1007)
    if item.opcode == "binary" and isinstance(data, str):
        data = data.encode("latin-1")
    try:
        frame = protocol.decode(data, sub, limits)
    except CloseConnection as exc:
        return Expect("close", exc.close_code)
    except RequestError as exc:
        return Expect("answer", exc.code, exc.request_id)
    except Exception:  # noqa: BLE001 - a bug in the codec: the hub answers internal, id unknown
        return Expect("answer", "internal", None)
    try:
        request = protocol.parse_request(frame, limits)
    except RequestError as exc:
        t = frame.get("t") if isinstance(frame.get("t"), str) else None
        return Expect("answer", exc.code, exc.request_id, t)
    except Exception:  # noqa: BLE001 - a bug in validation: the hub answers internal without id
        return Expect("answer", "internal", None)
    if request.t == "typing" and request.id is None:
        return Expect("silent", t="typing")
    return Expect("answer", None, request.id, request.t)


def _fits(expect: Expect, answer: dict[str, Any]) -> bool:
    """Could ``answer`` be the answer to a request predicted ``expect``? A request that validation
    refuses gets exactly that code (validation comes before anything else); one that passes it gets
    any error, or its own answer type."""
    code = answer.get("code") if answer.get("t") == "err" else None
    if expect.code is not None:
        return code == expect.code
    if code is not None:
        return True  # refused past validation (forbidden, conflict, rate_limited, a shard's bad_request...)
    return expect.t is None or answer.get("t") == ANSWER_T.get(expect.t, "ok")


def _best_fit(queue: deque[_Pending], answer: dict[str, Any]) -> _Pending:
    """Of the requests waiting on one id, the oldest whose prediction fits ``answer``
    (:func:`_fits`), else the oldest."""
    return next((p for p in queue if _fits(p.expect, answer)), queue[0])


def _idkey(value: Any) -> tuple[str, Any]:
    """Answers are matched on the id's type and value (``True`` is not ``1``)."""
    return (type(value).__name__, value if isinstance(value, (int, str, type(None))) else repr(value))


# --- the tally of one run (mergeable) ----------------------------------------------------------------

#: Kinds of findings; each is a bug or a departure from PROTOCOL.md.
#: How long a request may take to be answered (s): the hub bounds each peer call at
#: :data:`~im_actors.refs.DEFAULT_CALL_TIMEOUT_S` and a send waits for its batch, then its call
#: (docs/design.md, "MongoDB replies slow"). A slower answer breaks the hub's contract; one under it
#: is the storage being slow, which a loaded machine is (a 15 s bound once flagged 9 of a million).
ANSWER_BOUND_S = 2 * DEFAULT_CALL_TIMEOUT_S

FINDINGS = ("internal", "close_1011", "accepted_invalid", "bad_answer", "unanswered", "surprise", "unavailable")
_EXAMPLES = 12


@dataclass
class Tally:
    """Counters of a fuzz run: frames sent, answers by type/code, closes by code, findings with up to
    :data:`_EXAMPLES` examples of each (the frame that caused it), connections made."""

    frames: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    unsolicited: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    handshake_failures: Counter[str] = field(default_factory=Counter)
    auth_fuzz: Counter[str] = field(default_factory=Counter)
    rate_closed: int = 0
    #: Seconds spent, summed over the connections: opening (TCP and handshake), auth to ready, closing.
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("connect", "auth", "close"), 0.0))
    findings: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def find(self, kind: str, item: Fuzzed | None, sub: str, detail: Any, where: str = "") -> None:
        """Count a finding of ``kind`` and keep the frame that caused it (the first examples)."""
        self.findings[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < _EXAMPLES:
            shown.append(
                {
                    "what": item.what if item else "",
                    "sub": sub,
                    "opcode": item.opcode if item else "",
                    "frame": _show(item.data) if item else "",
                    "data_hex": (
                        (item.data if isinstance(item.data, bytes) else item.data.encode("utf-8", "surrogatepass"))[
                            :2048
                        ].hex()
                        if item
                        else ""
                    ),
                    "detail": _show(detail, 400),
                    "where": where,
                }
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "answers": dict(self.answers),
            "closes": dict(self.closes),
            "unsolicited": dict(self.unsolicited),
            "mutations": dict(self.mutations),
            "connections": self.connections,
            "handshake_failures": dict(self.handshake_failures),
            "auth_fuzz": dict(self.auth_fuzz),
            "rate_closed": self.rate_closed,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "findings": dict(self.findings),
            "examples": self.examples,
        }

    def merge(self, other: dict[str, Any]) -> None:
        """Add another tally's :meth:`to_dict`."""
        self.frames += other["frames"]
        for name in ("answers", "closes", "unsolicited", "mutations", "handshake_failures", "auth_fuzz", "findings"):
            getattr(self, name).update(other[name])
        self.connections += other["connections"]
        self.rate_closed += other["rate_closed"]
        for key, seconds in other["timings_s"].items():
            self.timings[key] = self.timings.get(key, 0.0) + seconds
        for kind, shown in other["examples"].items():
            mine = self.examples.setdefault(kind, [])
            mine.extend(shown[: max(_EXAMPLES - len(mine), 0)])


def _show(value: Any, n: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


def check_answer(answer: dict[str, Any], expect: Expect | None) -> str | None:
    """What in a hub's answer breaks PROTOCOL.md, or None. ``expect`` is what the frame it answers
    was predicted to get (None when the answer matched no frame)."""
    t = answer.get("t")
    rid = answer.get("id")
    if rid is not None and not _is_int(rid):
        return f"answer id {rid!r} is not an integer"
    if t == "err":
        code = answer.get("code")
        if code not in ERROR_RETRY:
            return f"unknown error code {code!r}"
        if answer.get("retry") is not ERROR_RETRY[code]:
            return f"{code} with retry {answer.get('retry')!r}"
        msg = answer.get("msg")
        if not isinstance(msg, str):
            return "err without a msg string"
        if _LEAK.search(msg):
            return f"error text shows internals: {msg[:200]!r}"
        if code == "rate_limited" and not (_is_int(answer.get("retry_after_ms")) and answer["retry_after_ms"] >= 0):
            return "rate_limited without retry_after_ms"
        return None
    if expect is not None and expect.t is not None and expect.code is None:
        wanted = ANSWER_T.get(expect.t, "ok" if expect.t in REQUIRED else None)
        if wanted is not None and t != wanted:
            return f"{expect.t} answered {t!r}, PROTOCOL.md says {wanted!r}"
    return None


# --- one fuzz connection ------------------------------------------------------------------------------


#: Odds that a mutated map the hub must close the connection for is sent (see FuzzConnection._next).
KEEP_CLOSING = 0.3


@dataclass
class _Pending:
    item: Fuzzed
    expect: Expect
    #: Another request in flight had the same id: which answer is whose is a guess (_best_fit).
    shared: bool = False


class FuzzConnection:
    """One fuzz connection slot: connects as its own user, sends its share of frames in lock step,
    reconnects after every close (as a new user after 4429), counts everything into ``tally``."""

    def __init__(
        self,
        index: int,
        url: str,
        config: Config,
        frames: int,
        seed: int,
        run: str,
        tally: Tally,
        peers: list[str],
        bystanders: list[str],
        foreign_convs: list[str],
        foreign_groups: list[str],
        answer_timeout_s: float,
        progress: Any = None,
        stop: Any = None,
    ) -> None:
        self.index = index
        self.stop = stop  # an Event (threading or multiprocessing): set, the slot ends after its burst
        self.url = url
        self.config = config
        self.quota = frames
        self.run = run
        self.tally = tally
        self.answer_timeout_s = answer_timeout_s
        self.progress = progress
        self.rng = random.Random(f"{seed}:{index}")
        self.generation = 0
        self.ctx = Context(
            me=self._user(),
            peers=[p for p in peers if p != self._user()],
            bystanders=bystanders,
            foreign_convs=foreign_convs,
            foreign_groups=foreign_groups,
        )
        self.maker = FrameMaker(self.rng, self.ctx, config.max_body_bytes, config.max_frame_bytes)
        self.limits = protocol.Limits(
            max_body_bytes=config.max_body_bytes,
            max_members=config.max_group_members,
            max_items=config.max_frame_items,
            max_depth=config.max_frame_depth,
        )
        self.sent = 0
        self._by_id: dict[tuple[str, Any], deque[_Pending]] = {}
        self._silent: deque[_Pending] = deque()

    def _user(self) -> str:
        return f"fz{self.run}-{self.index}" + (f"-{self.generation}" if self.generation else "")

    def _more(self) -> bool:
        """Frames left to send, and no stop asked."""
        return self.sent < self.quota and not (self.stop is not None and self.stop.is_set())

    def _count_frame(self, n: int = 1) -> None:
        self.sent += n
        self.tally.frames += n
        if self.progress is not None:
            with self.progress.get_lock():
                self.progress.value += n

    async def run_all(self) -> None:
        """Send this slot's share of frames, reconnecting as needed."""
        failures = 0
        loop = asyncio.get_running_loop()
        while self._more():
            sub = MP if self.rng.random() < 0.5 else JS
            began = loop.time()
            try:
                ws = await connect(
                    self.url, subprotocols=[Subprotocol(sub)], compression=None, max_size=None, open_timeout=20
                )
            except InvalidStatus as exc:
                self.tally.handshake_failures[f"http {exc.response.status_code}"] += 1
                await asyncio.sleep(min(0.05 * 2**failures, 2.0))
                failures += 1
                continue
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.tally.handshake_failures[type(exc).__name__] += 1
                await asyncio.sleep(min(0.05 * 2**failures, 2.0))
                failures += 1
                continue
            failures = 0
            self.tally.connections += 1
            self.tally.timings["connect"] += loop.time() - began
            try:
                await self._session(ws, sub)
            finally:
                closing = loop.time()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 5)
                self.tally.timings["close"] += loop.time() - closing

    async def _session(self, ws: ClientConnection, sub: str) -> None:
        self.ctx.me = self._user()
        token = issue_token(self.config, self.ctx.me)
        self._by_id.clear()
        self._silent.clear()
        if self.rng.random() < 0.02:  # fuzz the auth frame itself
            await self._fuzz_auth(ws, sub, token)
            return
        loop = asyncio.get_running_loop()
        began = loop.time()
        await ws.send(protocol.encode({"t": "auth", "token": token, "device": "d", "proto": 1}, sub))
        try:
            while True:
                ready = protocol.decode(await asyncio.wait_for(ws.recv(), 20), sub, protocol.SERVER_LIMITS)
                if ready.get("t") == "ready":
                    break
            self.tally.timings["auth"] += loop.time() - began
        except ConnectionClosed:
            self._closed(ws, sub, None)
            return
        except TimeoutError:
            self.tally.closes["no ready in 20 s"] += 1
            return
        while self._more():
            burst, expects = self._next(sub)
            del burst[self.quota - self.sent :], expects[self.quota - self.sent :]  # the share, exactly
            for n, expect in enumerate(expects):  # nothing after a frame that closes the connection
                if expect.outcome == "close":
                    del burst[n + 1 :], expects[n + 1 :]
                    break
            sending: tuple[Fuzzed, Expect] | None = None
            try:
                for item, expect in zip(burst, expects, strict=True):
                    sending = (item, expect)
                    self.tally.mutations[item.what.split(":", 1)[1].split("+", 1)[0].split("(", 1)[0]] += 1
                    await self._send(ws, item)
                    self._count_frame()
                    if expect.outcome == "answer":
                        queue = self._by_id.setdefault(_idkey(expect.rid), deque())
                        for other in queue:
                            other.shared = True
                        queue.append(_Pending(item, expect, shared=bool(queue)))
                    elif expect.outcome == "silent":
                        self._silent.append(_Pending(item, expect))
                await self._await_outcomes(ws, sub, burst, expects)
            except ConnectionClosed:
                self._closed(ws, sub, *(sending or (None, None)))
                return

    def _next(self, sub: str) -> tuple[list[Fuzzed], list[Expect]]:
        """The next burst and what the hub must do with each frame. A mutated map that would close
        the connection (nested too deep, too many items, NaN in JSON, ...) is kept only with
        :data:`KEEP_CLOSING` odds and made again otherwise, so that closes stay a few percent of the
        frames (each costs a reconnection); frames broken on purpose are always kept."""
        for _ in range(8):
            burst = self.maker.next(sub)
            expects = [predict(item, sub, self.limits, self.config.max_frame_bytes) for item in burst]
            structural = any(e.outcome == "close" and i.frame is not None for i, e in zip(burst, expects, strict=True))
            if not structural or self.rng.random() < KEEP_CLOSING:
                break
        return burst, expects

    async def _send(self, ws: ClientConnection, item: Fuzzed) -> None:
        if item.opcode == "raw":
            assert isinstance(item.data, bytes)
            if ws.transport.is_closing():
                raise ConnectionClosed(None, None)
            try:
                ws.transport.write(item.data)
            except RuntimeError:
                raise ConnectionClosed(None, None) from None
            return
        if item.opcode == "text":
            await ws.send(
                item.data.encode("utf-8", "surrogatepass") if isinstance(item.data, str) else item.data, text=True
            )
        else:
            await ws.send(item.data if isinstance(item.data, bytes) else item.data.encode("latin-1"), text=False)

    async def _await_outcomes(self, ws: ClientConnection, sub: str, burst: list[Fuzzed], expects: list[Expect]) -> None:
        """Read until every frame of the burst got what it must get: its answer (or the close)."""
        waiting = {id(e) for e in expects if e.outcome == "answer"}
        closing = any(e.outcome == "close" for e in expects)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (10.0 if closing else self.answer_timeout_s)
        while waiting or closing:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                break
            answered = self._on_frame(data, sub)
            if answered is not None:
                waiting.discard(id(answered.expect))
        if closing:
            item = next(i for i, e in zip(burst, expects, strict=True) if e.outcome == "close")
            self.tally.find("surprise", item, sub, "predicted a close; the hub kept the connection open for 10 s")
            raise ConnectionClosed(None, None)
        for item, expect in zip(burst, expects, strict=True):
            if id(expect) in waiting:
                queue = self._by_id.get(_idkey(expect.rid))
                if queue:
                    with contextlib.suppress(ValueError):
                        queue.remove(next(p for p in queue if p.expect is expect))
                self.tally.find("unanswered", item, sub, f"expected an answer with id {expect.rid!r}")

    def _on_frame(self, data: bytes | str, sub: str) -> _Pending | None:
        """Count one frame from the hub; returns the pending request it answers, if any."""
        try:
            frame = protocol.decode(data, sub, protocol.SERVER_LIMITS)
        except Exception as exc:  # noqa: BLE001 - an undecodable answer is a finding, not a crash here
            self.tally.find("bad_answer", None, sub, f"undecodable frame from the hub: {exc!r}: {_show(data)}")
            return None
        t = frame.get("t")
        if t in UNSOLICITED and "id" not in frame:
            self.tally.unsolicited[str(t)] += 1
            return None
        rid = frame.get("id")
        # Matched on the id; an answer without id goes to the oldest request that must get one, else
        # to the oldest typing without id (whose shard may refuse it: an err with id null).
        queue = self._by_id.get(_idkey(rid))
        pending: _Pending | None = None
        if queue:
            pending = _best_fit(queue, frame)
        if rid is None and self._silent and (pending is None or not _fits(pending.expect, frame)):
            pending = self._silent[0]  # a typing without id refused by its shard, answered late
        if pending is not None:
            (queue if queue and pending in queue else self._silent).remove(pending)
        ambiguous = pending is not None and pending.shared  # its checks need to know which request it answers
        code = frame.get("code") if t == "err" else None
        self.tally.answers[f"err:{code}" if t == "err" else str(t)] += 1
        if (
            t == "ok"
            and isinstance(frame.get("group"), str)
            and pending is not None
            and pending.expect.t == "group.create"
        ):
            self.ctx.groups.append(frame["group"])
            del self.ctx.groups[:-20]
        item = pending.item if pending else None
        expect = pending.expect if pending else None
        bad = check_answer(frame, None if ambiguous else expect)
        if bad:
            self.tally.find("bad_answer", item, sub, {"problem": bad, "answer": frame})
        if pending is None:
            self.tally.find("surprise", None, sub, {"problem": "an answer that matches no request", "answer": frame})
            return None
        if code == "internal":
            self.tally.find("internal", item, sub, frame, f"connection {self.index}, frame {self.sent}")
        if code == "unavailable":
            self.tally.find("unavailable", item, sub, frame, f"connection {self.index}, frame {self.sent}")
        assert item is not None and expect is not None
        if item.violation and code not in ("bad_request", "too_large") and not (ambiguous and expect.code):
            self.tally.find("accepted_invalid", item, sub, {"violation": item.violation, "answer": frame})
        if expect.code is not None and code != expect.code and not ambiguous:
            self.tally.find("surprise", item, sub, {"predicted": expect.code, "answer": frame})
        return pending

    def _closed(self, ws: ClientConnection, sub: str, item: Fuzzed | None, expect: Expect | None = None) -> None:
        code = ws.close_code if ws.close_code is not None else 1006
        self.tally.closes[str(code)] += 1
        if code == 1011:
            self.tally.find("close_1011", item, sub, ws.close_reason)
        if code == 4429:
            self.tally.rate_closed += 1
            self.generation += 1  # come back as a new user: this one's buckets stay empty a while
        elif expect is not None and item is not None and expect.outcome != "close" and code not in (1000, 1001):
            self.tally.find("surprise", item, sub, f"closed {code} {ws.close_reason!r}; predicted {expect}")
        elif expect is not None and item is not None and expect.code is not None and code != expect.code:
            if not (code == 1002 and item.opcode == "raw"):
                self.tally.find("surprise", item, sub, f"closed {code}; predicted {expect.code}")

    async def _fuzz_auth(self, ws: ClientConnection, sub: str, token: str) -> None:
        frame, how = self.maker.auth(token, "d")
        data: bytes | str = frame if isinstance(frame, bytes) else protocol.encode(frame, sub)
        try:
            if isinstance(data, bytes) and sub == JS:
                await ws.send(data, text=False)
            else:
                await ws.send(data)
        except ConnectionClosed:
            pass
        self._count_frame()
        outcome = "?"
        try:
            got = protocol.decode(await asyncio.wait_for(ws.recv(), 10), sub, protocol.SERVER_LIMITS)
            outcome = str(got.get("t"))
        except ConnectionClosed:
            outcome = f"close {ws.close_code}"
            if ws.close_code == 1011:
                item = Fuzzed(data, "binary" if isinstance(data, bytes) else "text", f"auth:{how}", "auth")
                self.tally.find("close_1011", item, sub, ws.close_reason)
        except TimeoutError:
            outcome = "no answer in 10 s"
        self.tally.auth_fuzz[f"{how} -> {outcome}"] += 1


async def fuzz_hub(
    url: str,
    config: Config,
    frames: int,
    connections: int,
    seed: int,
    run: str,
    *,
    first_index: int = 0,
    total_connections: int | None = None,
    bystanders: list[str] | None = None,
    foreign_convs: list[str] | None = None,
    foreign_groups: list[str] | None = None,
    answer_timeout_s: float = ANSWER_BOUND_S,
    progress: Any = None,
    stop: Any = None,
) -> Tally:
    """Send ``frames`` fuzz frames to the hub at ``url`` over ``connections`` connection slots (indexes
    ``first_index`` ..), fewer if ``stop`` (an Event) is set meanwhile; returns the :class:`Tally`.
    ``bystanders``, ``foreign_convs`` and ``foreign_groups`` are the chatting users and their
    conversations and groups (the fuzzers try them too). Raises nothing for what the hub does; only
    for a broken setup (no hub at ``url``)."""
    total = total_connections or connections
    tally = Tally()
    peers = [f"fz{run}-{i}" for i in range(total)]
    shares = [frames // connections + (1 if i < frames % connections else 0) for i in range(connections)]
    slots = [
        FuzzConnection(
            first_index + i,
            url,
            config,
            shares[i],
            seed,
            run,
            tally,
            peers,
            bystanders or [],
            foreign_convs or [],
            foreign_groups or [],
            answer_timeout_s,
            progress,
            stop,
        )
        for i in range(connections)
    ]
    await asyncio.gather(*(slot.run_all() for slot in slots))
    return tally


async def replay(url: str, config: Config, examples: list[dict[str, Any]], run: str) -> list[dict[str, Any]]:
    """Send each example frame alone on a fresh connection (a new user); what the hub did with it."""
    out = []
    for n, ex in enumerate(examples):
        sub = ex["sub"]
        data = bytes.fromhex(ex["data_hex"])
        user = f"fz{run}-replay{n}"
        result: str
        try:
            async with connect(url, subprotocols=[Subprotocol(sub)], compression=None, max_size=None) as ws:
                await ws.send(
                    protocol.encode({"t": "auth", "token": issue_token(config, user), "device": "r", "proto": 1}, sub)
                )
                await asyncio.wait_for(ws.recv(), 10)
                if ex["opcode"] == "raw":
                    ws.transport.write(data)
                else:
                    await ws.send(data, text=ex["opcode"] == "text")
                try:
                    got = protocol.decode(await asyncio.wait_for(ws.recv(), 10), sub, protocol.SERVER_LIMITS)
                    result = json.dumps(got, default=repr)[:300]
                except ConnectionClosed:
                    result = f"closed {ws.close_code}"
                except TimeoutError:
                    result = "no answer in 10 s"
        except Exception as exc:  # noqa: BLE001 - a replay that cannot run is reported, not raised
            result = f"replay failed: {exc!r}"
        out.append({"what": ex["what"], "frame": ex["frame"], "replayed": result})
    return out


# --- the chatting clients -------------------------------------------------------------------------------


class Chat:
    """alice and bob (a direct conversation) and alice, bob and carol (a group), on hub ``hub`` (any
    when None), each sending ``rate`` messages/s per conversation it speaks in until :meth:`stop`;
    :meth:`report` is the oracle's verdict after a final catch-up."""

    def __init__(self, router_url: str, run: str, hub: str | None, rate: float) -> None:
        from drivers.oracle import Recorder

        self.router_url = router_url
        self.users = [f"chat{run}-alice", f"chat{run}-bob", f"chat{run}-carol"]
        self.hub = hub
        self.rate = rate
        self.recorder = Recorder()
        self.clients: dict[str, Any] = {}
        self.convs: dict[str, list[str]] = {}
        self.errors: Counter[str] = Counter()
        self.acks: dict[str, dict[str, int]] = {}  # conv -> cmid -> seq
        self.dup_acks = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect the three clients (on ``hub``) and make the group."""
        from drivers.oracle import device_key
        from im_actors import ids
        from im_actors.client import Client

        for user in self.users:
            for n in range(40):
                client = Client(self.router_url, user, f"d{n}", on_msg=self._on_msg_for(user), connect_timeout_s=60)
                await client.connect()
                if self.hub is None or client.hub == self.hub:
                    break
                await client.close()
            else:
                raise RuntimeError(f"the router never handed out {self.hub}")
            self.clients[user] = client
        alice, bob, carol = self.users
        dm = ids.direct_conv(alice, bob)
        group, gconv = await self.clients[alice].group_create("chat", [bob, carol])
        self.group = group
        self.convs = {dm: [alice, bob], gconv: [alice, bob, carol]}
        self.recorder.set_recipients(
            {conv: [device_key(u, self.clients[u].device) for u in members] for conv, members in self.convs.items()}
        )

    def _on_msg_for(self, user: str) -> Callable[[dict[str, Any]], None]:
        from drivers.oracle import device_key

        def on_msg(msg: dict[str, Any]) -> None:
            if msg.get("conv") in self.convs:
                self.recorder.record_msg(device_key(user, self.clients[user].device), msg, time.time() * 1000)

        return on_msg

    def run(self) -> None:
        """Start the senders: every member sends in every conversation it is in."""
        for conv, members in self.convs.items():
            for user in members:
                self._tasks.append(asyncio.get_running_loop().create_task(self._sender(user, conv)))

    async def _sender(self, user: str, conv: str) -> None:
        client = self.clients[user]
        n = 0
        period = 1.0 / self.rate
        next_at = asyncio.get_running_loop().time()
        while not self._stop.is_set():
            n += 1
            cmid = f"{user}-{n}"
            sent_ms = time.time() * 1000
            self.recorder.add_sent(1, sent_ms)
            try:
                ack = await client.send(conv, f"{user} says {n}", cmid=cmid, meta={"t": sent_ms})
            except Exception as exc:  # noqa: BLE001 - a failed send is counted: the verdict fails on it
                self.errors[type(exc).__name__] += 1
            else:
                self.recorder.add_ack(conv, ack.seq, sent_ms, time.time() * 1000)
                seen = self.acks.setdefault(conv, {})
                if cmid in seen or ack.seq in seen.values():
                    self.dup_acks += 1
                seen[cmid] = ack.seq
            next_at += period
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(next_at - asyncio.get_running_loop().time(), 0))

    def _missing(self) -> int:
        """Deliveries of acked entries not received yet (the oracle's ``lost``, without its report)."""
        p = self.recorder.partial()
        return sum(
            max(p.recipients.get(conv, 0) - p.received.get(conv, {}).get(seq, 0), 0)
            for conv, seqs in p.acked.items()
            for seq in seqs
        )

    @property
    def sent(self) -> int:
        return self.recorder.partial().sent

    @property
    def acked(self) -> int:
        return sum(len(v) for v in self.acks.values())

    async def stop(self, drain_s: float = 60.0) -> dict[str, Any]:
        """Stop sending, wait for the live deliveries, catch every client up, close them; the report:
        the oracle's counts, ``live_lost`` (missing before the catch-up), client stats, send errors."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while loop.time() < deadline and self._missing():
            await asyncio.sleep(0.2)
        live_lost = self._missing()
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.catch_up(30)
        final = self.recorder.partial().report()
        stats = {user: client.stats() for user, client in self.clients.items()}
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        keys = ("sent", "acked", "expected_deliveries", "delivered", "lost", "duplicates", "order_violations")
        return {
            **{k: final[k] for k in keys},
            "unexpected_deliveries": final["unexpected_deliveries"],
            "lost_entries": final["lost_entries"],
            "live_lost": live_lost,
            "dup_acks": self.dup_acks,
            "send_errors": dict(self.errors),
            "delivery_latency_ms": final["delivery_latency_ms"],
            "ack_latency_ms": final["ack_latency_ms"],
            "clients": stats,
        }


# --- the run ------------------------------------------------------------------------------------------


def _fuzz_process(
    url: str,
    config: Config,
    frames: int,
    connections: int,
    seed: int,
    run: str,
    first_index: int,
    total: int,
    bystanders: list[str],
    convs: list[str],
    groups: list[str],
    answer_timeout_s: float,
    progress: Any,
    stop: Any,
    out: Any,
) -> None:
    logging.basicConfig(level=logging.ERROR)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent asks this process to stop (``stop``)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        tally = asyncio.run(
            fuzz_hub(
                url,
                config,
                frames,
                connections,
                seed,
                run,
                first_index=first_index,
                total_connections=total,
                bystanders=bystanders,
                foreign_convs=convs,
                foreign_groups=groups,
                answer_timeout_s=answer_timeout_s,
                progress=progress,
                stop=stop,
            )
        )
        out.put(("tally", tally.to_dict()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        import traceback

        out.put(("error", f"{exc!r}\n{traceback.format_exc()}"))


def hub_record(config: Config, name: str | None = None) -> dict[str, Any]:
    """The hub actor's Ray record (``state``, ``restarts``, ``pid``) and its stats (answers by code);
    ``name`` defaults to the deployment's first hub."""
    import ray

    from im_actors import cluster, ids

    name = name or ids.actor_name("hub", 0, config.actor_prefix)
    info = cluster._actor_table({name}).get(name, {})  # noqa: SLF001 - the restart count without the dashboard
    stats: dict[str, Any]
    try:
        got: Any = ray.get(ray.get_actor(name, namespace=ids.NAMESPACE).stats.remote(), timeout=30)
        stats = dict(got)
    except Exception as exc:  # noqa: BLE001 - a hub that does not answer is what we report
        stats = {"error": repr(exc)}
    return {"name": name, **info, "stats": stats}


#: The knobs the report shows (the limits a fuzzer meets), all left at their defaults.
_KNOBS = (
    "hubs",
    "push_workers",
    "rate_send_per_s",
    "rate_send_burst",
    "rate_request_per_s",
    "rate_request_burst",
    "rate_refusals_max",
    "max_connections_per_user",
    "conn_rate_per_address_per_s",
    "max_frame_bytes",
    "max_body_bytes",
    "max_frame_items",
    "max_frame_depth",
    "max_pending_requests",
)


def actor_restarts(config: Config) -> dict[str, int]:
    """Ray's restart count of every actor of the deployment (a restart is a crash here)."""
    from im_actors import cluster

    table = cluster._actor_table(set(cluster._names(config)))  # noqa: SLF001 - without the dashboard
    return {name: int(rec.get("restarts", 0)) for name, rec in sorted(table.items())}


def _worker_errors(limit: int = 8) -> dict[str, Any]:
    """ERROR lines of this Ray session's worker logs (the hub's 'answered internal' and tracebacks)."""
    try:
        import ray

        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())  # noqa: SLF001
    except Exception:  # noqa: BLE001
        return {"count": 0, "lines": []}
    lines: list[str] = []
    count = 0
    for path in sorted(logs.glob("worker-*")):
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if '"ERROR"' in line or " ERROR " in line or "answered internal" in line:
                    count += 1
                    if len(lines) < limit:
                        lines.append(line[:600])
    return {"count": count, "lines": lines, "dir": str(logs)}


def main(argv: list[str] | None = None) -> int:
    """Deploy, chat and fuzz, print the report; exit 1 when anything was found."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000, help="fuzz frames in all")
    ap.add_argument("--connections", type=int, default=16, help="fuzz connections at a time")
    ap.add_argument("--processes", type=int, default=1, help="processes the fuzz connections are spread over")
    ap.add_argument("--seed", type=int, default=1, help="fixes every fuzz connection's frame stream")
    ap.add_argument("--chat-rate", type=float, default=2.0, help="messages/s of each chatting member per conversation")
    ap.add_argument(
        "--answer-timeout",
        type=float,
        default=ANSWER_BOUND_S,
        help="how long a request waits for its answer (s; default: the hub's own bound)",
    )
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop fuzzing after this long (s; 0: never)")
    ap.add_argument(
        "--retry-writes",
        action="store_true",
        help="keep MongoDB retryable writes on the private SecantusDB (see the module docstring: off by default)",
    )
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)

    import ray

    from im_actors.cluster import deploy, init_local_ray, teardown
    from im_actors.config import load_config
    from im_actors.services import describe_services, ensure_services, purge_deployment

    logging.basicConfig(level=logging.WARNING)
    run = secrets.token_hex(2)
    base = load_config(
        dev_login=True,
        jwt_secret=secrets.token_hex(32),
        router_port=0,
        push_workers=0,
        hubs=1,
        deployment=f"fz{secrets.token_hex(3)}",
    )
    private_mongo = not base.mongo_url
    base, services = ensure_services(base)
    if private_mongo and not args.retry_writes:
        # SecantusDB 0.7.0b3 keeps up to 10,000 retryable-write records and, once it holds that many,
        # sorts them all on every write (transactions.py, _prune_retryable_locked): after ~10k writes
        # each write costs milliseconds and the storage, not the hub, sets the pace. The store does
        # not need them (an ambiguous commit is settled by reading back, DESIGN.md section 2).
        sep = "&" if "?" in base.mongo_url else "?"
        base = base.model_copy(update={"mongo_url": f"{base.mongo_url}{sep}retryWrites=false"})
    report: dict[str, Any] = {
        "seed": args.seed,
        "frames_asked": args.frames,
        "connections": args.connections,
        # Every limit stays the default: each fuzz connection is its own user (a new one after 4429).
        "knobs": {k: getattr(base, k) for k in _KNOBS},
        "mongo_retry_writes": not private_mongo or args.retry_writes,
    }
    try:
        init_local_ray(base)
        report["services"] = describe_services(base)
        dep = deploy(base)
        try:
            (hub_name, hub_url), *_ = dep.hub_urls.items()
            before = hub_record(base)
            report["hub_before"] = {k: before.get(k) for k in ("state", "restarts", "pid")}
            report.update(asyncio.run(_drive(args, base, dep.router_url, hub_name, hub_url, run)))
            after = hub_record(base)
            report["hub_after"] = {k: after.get(k) for k in ("state", "restarts", "pid")}
            report["hub_stats"] = after.get("stats")
            report["hub_restarts"] = int(after.get("restarts", 0)) - int(before.get("restarts", 0))
            report["hub_pid_changed"] = after.get("pid") != before.get("pid")
            report["worker_errors"] = _worker_errors()
            report["actor_restarts"] = actor_restarts(base)
        finally:
            teardown(base)
            purge_deployment(base)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        services.stop()
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if problems(report) else 0


async def _drive(args: Any, config: Config, router_url: str, hub_name: str, hub_url: str, run: str) -> dict[str, Any]:
    chat = Chat(router_url, run, hub_name, args.chat_rate)
    await chat.start()
    chat.run()
    ctx = mp.get_context("spawn")
    progress = ctx.Value("q", 0)
    stop = ctx.Event()
    stopped: list[str] = []

    def stop_early(why: str) -> None:
        if not stop.is_set():
            stopped.append(why)
            print(f"# stopping: {why}; the report covers the frames sent so far", file=sys.stderr, flush=True)
            stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_early, f"signal {sig.name}")
    out = ctx.Queue()
    n_proc = max(1, min(args.processes, args.connections))
    conns = [args.connections // n_proc + (1 if i < args.connections % n_proc else 0) for i in range(n_proc)]
    frames = [args.frames * c // args.connections for c in conns]
    frames[0] += args.frames - sum(frames)
    procs = []
    first = 0
    for i in range(n_proc):
        procs.append(
            ctx.Process(
                target=_fuzz_process,
                args=(
                    hub_url,
                    config,
                    frames[i],
                    conns[i],
                    args.seed,
                    run,
                    first,
                    args.connections,
                    chat.users,
                    list(chat.convs),
                    [chat.group],
                    args.answer_timeout,
                    progress,
                    stop,
                    out,
                ),
                daemon=True,
            )
        )
        first += conns[i]
    started = time.perf_counter()
    for p in procs:
        p.start()
    tally = Tally()
    errors: list[str] = []
    done = 0
    last_print = started
    while done < n_proc:
        if args.max_seconds and time.perf_counter() - started > args.max_seconds:
            stop_early(f"--max-seconds {args.max_seconds:g} reached")
        try:
            kind, payload = await loop.run_in_executor(None, out.get, True, 5.0)
        except Exception:  # noqa: BLE001 - queue.Empty: print progress, check the processes
            now = time.perf_counter()
            if now - last_print >= 10:
                last_print = now
                n = progress.value
                print(
                    f"# {now - started:7.1f} s  {n:9,} frames  {n / (now - started):7.0f} frames/s  "
                    f"chat sent {chat.sent} acked {chat.acked} errors {sum(chat.errors.values())}",
                    file=sys.stderr,
                    flush=True,
                )
            if not any(p.is_alive() for p in procs) and out.empty():
                errors.append("a fuzz process exited without a report")
                break
            continue
        done += 1
        if kind == "error":
            errors.append(payload)
        else:
            tally.merge(payload)
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join(10)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    chat_report = await chat.stop()
    replayed = await replay(
        hub_url,
        config,
        tally.examples.get("internal", [])[:6] + tally.examples.get("unavailable", [])[:3],
        run,
    )
    return {
        "stopped_early": stopped[0] if stopped else None,
        "elapsed_s": round(elapsed, 1),
        "frames": tally.frames,
        "frames_per_s": round(tally.frames / elapsed, 1) if elapsed else 0.0,
        "fuzz": tally.to_dict(),
        "fuzz_errors": errors,
        "replayed": replayed,
        "chat": chat_report,
    }


def problems(report: dict[str, Any]) -> list[str]:
    """What makes the run fail: internal answers, 1011 closes, hub restarts, chat loss, accepted
    invalid frames, bad answers, unanswered requests, fuzz processes that died."""
    out = []
    findings = report.get("fuzz", {}).get("findings", {})
    for kind in ("internal", "close_1011", "accepted_invalid", "bad_answer", "unanswered"):
        if findings.get(kind):
            out.append(f"{findings[kind]} {kind}")
    stats = report.get("hub_stats") or {}
    if (stats.get("answers") or {}).get("internal"):
        out.append(f"hub answered internal {stats['answers']['internal']} times")
    if report.get("hub_restarts") or report.get("hub_pid_changed"):
        out.append("the hub restarted")
    restarted = {name: n for name, n in (report.get("actor_restarts") or {}).items() if n}
    if restarted:
        out.append(f"actors restarted: {restarted}")
    chat = report.get("chat", {})
    for key in ("lost", "duplicates", "order_violations", "dup_acks"):
        if chat.get(key):
            out.append(f"chat {key} {chat[key]}")
    if chat.get("send_errors"):
        out.append(f"chat send errors {chat['send_errors']}")
    if chat.get("sent", 0) != chat.get("acked", 0):
        out.append(f"chat sent {chat.get('sent')} acked {chat.get('acked')}")
    if report.get("fuzz_errors"):
        out.append("a fuzz process failed")
    return out


def _print(report: dict[str, Any]) -> None:
    fuzz = report.get("fuzz", {})
    print(
        f"frames      {report.get('frames', 0):,} in {report.get('elapsed_s')} s: {report.get('frames_per_s')} frames/s"
    )
    print(f"connections {fuzz.get('connections', 0):,} (rate-closed users {fuzz.get('rate_closed', 0)})")
    print(f"knobs       {report.get('knobs')} (all defaults)")
    print(
        "answers     "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(fuzz.get("answers", {}).items(), key=lambda kv: -kv[1]))
    )
    print(
        "closes      "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(fuzz.get("closes", {}).items(), key=lambda kv: -kv[1]))
    )
    print("unsolicited " + ", ".join(f"{k} {v:,}" for k, v in fuzz.get("unsolicited", {}).items()))
    if fuzz.get("handshake_failures"):
        print(f"handshakes refused {fuzz['handshake_failures']}")
    print(
        f"auth fuzzed {sum(fuzz.get('auth_fuzz', {}).values())}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(fuzz.get("auth_fuzz", {}).items()))
    )
    print("findings    " + (", ".join(f"{k} {v}" for k, v in fuzz.get("findings", {}).items()) or "none"))
    for kind, shown in fuzz.get("examples", {}).items():
        for ex in shown[:5]:
            print(f"  {kind}: {ex['sub']} {ex['what']}\n      frame  {ex['frame']}\n      got    {ex['detail']}")
    for r in report.get("replayed", []):
        print(f"  replayed {r['what']}: {r['replayed']}")
    stats = report.get("hub_stats") or {}
    print(
        f"hub         restarts {report.get('hub_restarts')}, pid changed {report.get('hub_pid_changed')}, "
        f"answers {stats.get('answers')}"
    )
    print(f"actors      restarts {report.get('actor_restarts')}")
    chat = report.get("chat", {})
    print(
        f"chat        sent {chat.get('sent')} acked {chat.get('acked')} expected deliveries "
        f"{chat.get('expected_deliveries')} delivered {chat.get('delivered')} lost {chat.get('lost')} "
        f"(live {chat.get('live_lost')}) duplicates {chat.get('duplicates')} order violations "
        f"{chat.get('order_violations')} send errors {chat.get('send_errors')}"
    )
    latency = chat.get("delivery_latency_ms") or {}
    print(f"            delivery p50/p99/max ms {[latency.get(k) for k in ('p50', 'p99', 'max')]}")
    print(f"            clients {chat.get('clients')}")
    if report.get("worker_errors", {}).get("count"):
        print(f"worker log ERROR lines: {report['worker_errors']['count']}")
        for line in report["worker_errors"]["lines"][:4]:
            print(f"  {line[:300]}")
    if report.get("stopped_early"):
        print(
            f"STOPPED     early ({report['stopped_early']}): {report.get('frames', 0):,} of {report['frames_asked']:,}"
        )
    found = problems(report)
    print("VERDICT     " + ("FAILED: " + "; ".join(found) if found else "passed: nothing found"))


if __name__ == "__main__":
    sys.exit(main())
