"""Identifiers: user, device and conversation ids, actor names, shard choice.

Rules from PROTOCOL.md section 3. Actor names are formatted and parsed here and nowhere else
(STYLE.md rule 5).
"""

from __future__ import annotations

import re
import secrets
import zlib
from collections.abc import Callable, Iterable

from im_actors.errors import BadRequest

__all__ = [
    "NAMESPACE",
    "split_by_shard",
    "ROLES",
    "placement_group_name",
    "valid_id",
    "check_id",
    "direct_conv",
    "group_conv",
    "conv_kind",
    "direct_members",
    "group_id_of",
    "new_group_id",
    "actor_name",
    "parse_actor_name",
    "shard_of",
]

#: Ray namespace that holds every im-actors actor.
NAMESPACE = "im"

#: Actor roles of DESIGN.md section 1, as used in actor names.
ROLES = ("router", "hub", "session", "conv", "group", "store", "push")

# Used with fullmatch only: "$" also matches before a final newline, so "alice\n" would pass (found
# by benchmarks/fuzz.py).
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_GROUP_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def valid_id(value: object) -> bool:
    """True when ``value`` is a user or device id: 1..64 of ``[A-Za-z0-9_.-]``."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def check_id(value: object, field: str) -> str:
    """Return ``value`` when it is a valid user/device id, else raise :class:`BadRequest` naming ``field``."""
    if not valid_id(value):
        raise BadRequest(f"{field} must be 1..64 characters of [A-Za-z0-9_.-]")
    assert isinstance(value, str)
    return value


def direct_conv(a: str, b: str) -> str:
    """The direct conversation id of users ``a`` and ``b``: ``d:<lo>:<hi>`` in byte order."""
    lo, hi = sorted((a, b), key=lambda s: s.encode())
    return f"d:{lo}:{hi}"


def group_conv(group_id: str) -> str:
    """The conversation id of group ``group_id``: ``g:<group id>``."""
    return f"g:{group_id}"


def conv_kind(conv: object) -> str:
    """``"direct"`` or ``"group"`` for a well-formed conversation id; raises :class:`BadRequest` otherwise."""
    if isinstance(conv, str):
        if conv.startswith("d:"):
            parts = conv.split(":")
            if len(parts) == 3 and valid_id(parts[1]) and valid_id(parts[2]) and parts[1].encode() < parts[2].encode():
                return "direct"
        elif conv.startswith("g:") and _GROUP_RE.fullmatch(conv[2:]):
            return "group"
    raise BadRequest("conv must be d:<a>:<b> with a < b, or g:<group id>")


def direct_members(conv: str) -> tuple[str, str]:
    """The two users of a direct conversation id (validated by :func:`conv_kind` first)."""
    _, a, b = conv.split(":")
    return a, b


def group_id_of(conv: str) -> str:
    """The group id inside a group conversation id."""
    return conv[2:]


def new_group_id() -> str:
    """A fresh, unguessable group id (16 url-safe characters)."""
    return secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")


def actor_name(role: str, index: int = 0, prefix: str = "") -> str:
    """Name of actor ``index`` of ``role``: ``<prefix>im-<role>-<index>``.

    ``prefix`` separates deployments sharing one Ray cluster (tests use a unique one).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return f"{prefix}im-{role}-{index}"


def placement_group_name(prefix: str = "") -> str:
    """Name of the deployment's placement group (one bundle per node for ``placement = "spread"``)."""
    return f"{prefix}im-placement"


def parse_actor_name(name: str, prefix: str = "") -> tuple[str, int]:
    """Inverse of :func:`actor_name`: ``(role, index)``; raises ``ValueError`` for other names."""
    if not name.startswith(prefix + "im-"):
        raise ValueError(f"not an im-actors name: {name!r}")
    role, _, index = name[len(prefix) + 3 :].rpartition("-")
    if role not in ROLES or not index.isdigit():
        raise ValueError(f"not an im-actors name: {name!r}")
    return role, int(index)


def shard_of(key: str, shards: int) -> int:
    """Stable shard index of ``key`` over ``shards`` shards (CRC-32, the same in every process)."""
    return zlib.crc32(key.encode()) % shards


def split_by_shard(keys: Iterable[str], index: Callable[[str], int]) -> dict[int, list[str]]:
    """``keys`` grouped by the shard hosting each (``index(key)``, e.g. ``Peers.session_index``):
    ``{shard index: [key, ...]}``, keys in their first order within each shard. The one place a
    batch of users or conversations is cut by shard before one call per shard."""
    out: dict[int, list[str]] = {}
    for key in keys:
        out.setdefault(index(key), []).append(key)
    return out
