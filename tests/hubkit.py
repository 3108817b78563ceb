"""A real :class:`~im_actors.hub.Hub` on a local port, with its peers faked in the same process.

The hub's own code runs unchanged (WebSocket server, auth, decoding, limits, queues, fan-out); what
sits behind it is small: the session shard's connection table is the real :class:`SessionShard`
core, and one fake conversation shard assigns seqs, keeps entries (for ``sync``), checks membership
and hands every committed entry to :meth:`Hub.deliver` for every connection of every member. Used by
the hub's hostile-client tests and by ``benchmarks/hostile.py`` and ``benchmarks/fuzz.py`` (with
:func:`masked_frame`, a raw WebSocket frame); no Ray, no storage.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import struct
import time
from typing import Any

from im_actors import ids
from im_actors.auth import issue_token
from im_actors.config import Config, load_config
from im_actors.conversation import SendItem
from im_actors.errors import CLOSE_REPLACED, Forbidden
from im_actors.hub import Hub
from im_actors.session import SessionShard
from tests.fakes import FakePeer


def hub_config(**overrides: Any) -> Config:
    """A test configuration: a random HS256 secret, generous rate limits unless overridden."""
    base: dict[str, Any] = {"jwt_secret": secrets.token_hex(32), "deployment": f"k{secrets.token_hex(3)}"}
    base.update(overrides)
    return load_config(**base)


class _EmptyCursor:
    def __aiter__(self) -> _EmptyCursor:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration


class NoContactsStore:
    """A store for the kit's session core in benchmarks that open many connections: nobody has
    contacts, so presence is announced to nobody and nothing is read."""

    def __init__(self) -> None:
        self.db = {"contacts": self}

    def find(self, *args: Any, **kwargs: Any) -> _EmptyCursor:
        return _EmptyCursor()

    async def accepted_contacts(self, user: str) -> list[str]:
        return []


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


class RunningPeer(FakePeer):
    """A fake peer whose ``notify`` runs the handler too (a fire-and-forget call that happens)."""

    def notify(self, method: str, *args: Any) -> None:
        super().notify(method, *args)
        handler = self.handlers.get(method)
        if handler is not None:
            result = handler(*args)
            if asyncio.iscoroutine(result):
                task = asyncio.get_running_loop().create_task(result)
                _background.add(task)
                task.add_done_callback(_background.discard)


_background: set[asyncio.Task[Any]] = set()


class KitPeers:
    """The hub's peers: a session shard core, one conversation shard, a router that ignores calls."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sessions_core = SessionShard(config, self, None, None)  # type: ignore[arg-type]
        self.groups: dict[str, list[str]] = {}
        self.entries: dict[str, list[dict[str, Any]]] = {}
        self.cmids: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.hub: Hub | None = None
        self.session_peer = RunningPeer(
            {
                "connect": self._connect,
                "disconnect": self.sessions_core.disconnect,
                "convs": lambda user: [],
            }
        )
        self.conv_peer = FakePeer(
            {"send_batch": self._send_batch, "sync": self._sync, "route": lambda *conn: None}  # routes: see _send_batch
        )
        self.convs = [self.conv_peer]
        self.router = FakePeer({})

    async def _connect(self, user: str, device: str, hub: str, conn_id: int, max_connections: int = 0) -> None:
        """As SessionShardActor.connect: a replaced connection is closed with 4409."""
        old = self.sessions_core.connect(user, device, hub, conn_id, max_connections)
        if old is not None and self.hub is not None:
            await self.hub.close_conn(old[1], CLOSE_REPLACED, "replaced by a newer connection")

    def session(self, user: str) -> FakePeer:
        return self.session_peer

    def session_index(self, user: str) -> int:
        return 0

    def conv_index(self, conv: str) -> int:
        return 0

    def conv(self, conv: str) -> FakePeer:
        return self.conv_peer

    def members(self, conv: str) -> list[str]:
        if ids.conv_kind(conv) == "direct":
            return list(ids.direct_members(conv))
        return self.groups.get(conv, [])

    def _send_batch(self, items: list[SendItem], hub: str | None = None) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        deliveries: list[tuple[dict[str, Any], list[int]]] = []
        for item in items:
            members = self.members(item.conv)
            if item.sender not in members:
                answers.append({"err": Forbidden.code, "msg": "not a member", "retry": False})
                continue
            old = self.cmids.get((item.conv, item.sender, item.cmid))
            if old is not None:
                answers.append({"conv": item.conv, "seq": old["seq"], "ts": old["ts"], "dup": True})
                continue
            log = self.entries.setdefault(item.conv, [])
            entry = {
                "conv": item.conv,
                "seq": len(log) + 1,
                "sender": item.sender,
                "ts": int(time.time() * 1000),
                "cmid": item.cmid,
                "kind": item.kind,
                "body": item.body,
                "meta": item.meta,
            }
            log.append(entry)
            self.cmids[(item.conv, item.sender, item.cmid)] = entry
            answers.append({"conv": item.conv, "seq": entry["seq"], "ts": entry["ts"], "dup": False})
            targets = [cid for user in members for _hub, cid in self.sessions_core.online(user).values()]
            if hub is not None and ids.conv_kind(item.conv) == "direct":
                answers[-1]["copies"] = (entry, targets)  # as a conversation shard with answer_copies
            else:
                deliveries.append((entry, targets))
        if self.hub is not None and deliveries:
            self.hub.deliver(deliveries)
        return answers

    def _sync(self, user: str, conv: str, after: int, limit: int) -> dict[str, Any]:
        if user not in self.members(conv):
            raise Forbidden("not a member")
        log = self.entries.get(conv, [])
        page = log[after : after + limit]
        return {"msgs": page, "last": len(log), "more": after + limit < len(log)}


class HubKit:
    """A started hub and its fake peers; ``await kit.start()``, then ``await kit.stop()``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.peers = KitPeers(config)
        self.hub = Hub(config, "hub-kit", self.peers)  # type: ignore[arg-type]
        self.peers.hub = self.hub
        self.url = ""

    async def start(self) -> str:
        """Listen on a free port; returns the hub's WebSocket URL."""
        self.url = await self.hub.start(0)
        return self.url

    async def stop(self) -> None:
        await self.hub.stop()

    def token(self, user: str, ttl_s: int | None = None) -> str:
        return issue_token(self.config, user, ttl_s)
