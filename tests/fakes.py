"""Fakes of the peers and the store, so plain core objects run without Ray or servers."""

from __future__ import annotations

import asyncio
from typing import Any

from im_actors.errors import StorageUnavailable
from im_actors.membership import Membership
from im_actors.store import CommitResult


class FakeTable:
    """Documents of one kind keyed by ``_id``, and a switch that makes every call to them fail."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.down = False

    def check(self) -> None:
        if self.down:
            raise StorageUnavailable("MongoDB unreachable: fake")


class FakeStore:
    """In-memory stand-in for :class:`im_actors.store.Store` with the same commit semantics."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], dict[str, Any]] = {}
        self.cmids: dict[tuple[str, str, str], int] = {}
        self.redis_last: dict[str, int] = {}
        self.redis_down = False
        self.down = False
        self.commits: list[list[dict[str, Any]]] = []
        self.user_convs_rows: set[tuple[str, str]] = set()
        self.cursors: dict[tuple[str, str], int] = {}
        self.gate: asyncio.Event | None = None
        self.groups = FakeTable()
        self.contacts = FakeTable()
        self.devices = FakeTable()  # _id = token

    async def commit(self, entries: list[dict[str, Any]]) -> CommitResult:
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StorageUnavailable("MongoDB unreachable: fake")
        self.commits.append(entries)
        for i, e in enumerate(entries):
            key = (e["conv"], e["sender"], e["cmid"])
            if key in self.cmids:
                return CommitResult(i, "cmid", dict(self.entries[(e["conv"], self.cmids[key])]))
            if (e["conv"], e["seq"]) in self.entries:
                return CommitResult(i, "seq", None, self._last(e["conv"]))
            self.entries[(e["conv"], e["seq"])] = dict(e)
            self.cmids[key] = e["seq"]
            if e["seq"] == 1 and e["conv"].startswith("d:"):  # the first entry lists it (store.py)
                self.user_convs_rows |= {(u, e["conv"]) for u in e["conv"].split(":")[1:]}
            self.redis_last[e["conv"]] = max(self.redis_last.get(e["conv"], 0), e["seq"])
        return CommitResult(len(entries))

    def _last(self, conv: str) -> int:
        return max((s for c, s in self.entries if c == conv), default=0)

    async def last_seq(self, conv: str) -> int:
        if self.down:
            raise StorageUnavailable("MongoDB unreachable: fake")
        return max(self._last(conv), self.redis_last.get(conv, 0))

    async def last_seqs(self, convs: list[str]) -> dict[str, int]:
        return {c: await self.last_seq(c) for c in convs}

    async def recent_last_seqs(self, convs: list[str]) -> dict[str, int] | None:
        if self.redis_down:
            return None
        return {c: self.redis_last.get(c, 0) for c in convs}

    async def read_range(self, conv: str, after: int, upto: int) -> list[dict[str, Any]]:
        return [self.entries[(conv, s)] for s in range(after + 1, upto + 1)]

    async def system_entries(self, conv: str, after: int) -> list[dict[str, Any]]:
        if self.down:
            raise StorageUnavailable("MongoDB unreachable: fake")
        return [e for (c, s), e in sorted(self.entries.items()) if c == conv and s > after and e["kind"] == "system"]

    async def add_user_convs(self, conv: str, users: list[str]) -> None:
        self.user_convs_rows |= {(u, conv) for u in users}

    async def add_user_convs_many(self, convs: dict[str, list[str]]) -> None:
        if convs and self.down:
            raise StorageUnavailable("MongoDB unreachable: fake")
        for conv, users in convs.items():
            await self.add_user_convs(conv, users)

    async def set_read(self, user: str, conv: str, seq: int) -> None:
        self.cursors[(user, conv)] = max(self.cursors.get((user, conv), 0), seq)

    async def group_doc(self, gid: str) -> dict[str, Any] | None:
        self.groups.check()
        doc = self.groups.docs.get(gid)
        return None if doc is None else dict(doc)

    async def insert_group(self, doc: dict[str, Any]) -> None:
        self.groups.check()
        self.groups.docs[doc["_id"]] = dict(doc)

    async def checkpoint_group(self, gid: str, fields: dict[str, Any]) -> None:
        self.groups.check()
        self.groups.docs[gid].update(fields)
        self.groups.docs[gid].pop("members", None)  # as Store.checkpoint_group's $unset

    async def contact_states(self, a: str, b: str) -> tuple[str | None, str | None]:
        self.contacts.check()
        mine, theirs = self.contacts.docs.get(f"{a}|{b}"), self.contacts.docs.get(f"{b}|{a}")
        return (mine or {}).get("state"), (theirs or {}).get("state")

    async def contact_states_many(self, pairs: list[tuple[str, str]]) -> list[tuple[str | None, str | None]]:
        return [await self.contact_states(a, b) for a, b in pairs]

    async def set_contact_sides(self, sides: list[tuple[str, str, str | None]], ms: int) -> None:
        self.contacts.check()
        for user, other, state in sides:
            if state is None:
                self.contacts.docs.pop(f"{user}|{other}", None)
            else:
                self.contacts.docs[f"{user}|{other}"] = {"user": user, "other": other, "state": state, "ms": ms}

    async def contact_sides_many(self, users: list[str]) -> dict[str, dict[str, str]]:
        self.contacts.check()
        out: dict[str, dict[str, str]] = {}
        for d in self.contacts.docs.values():
            if d["user"] in users:
                out.setdefault(d["user"], {})[d["other"]] = d["state"]
        return out

    async def contacts_of(self, user: str) -> list[tuple[str, str]]:
        self.contacts.check()
        return [(d["other"], d["state"]) for d in self.contacts.docs.values() if d["user"] == user]

    async def accepted_contacts(self, user: str) -> list[str]:
        return [other for other, state in await self.contacts_of(user) if state == "accepted"]

    async def push_tokens(self, users: list[str]) -> dict[str, dict[str, tuple[str, str]]]:
        self.devices.check()
        found: dict[str, dict[str, tuple[str, str]]] = {u: {} for u in users}
        for token, d in self.devices.docs.items():
            if d["user"] in found:
                found[d["user"]][d["device"]] = (d["provider"], token)
        return found

    async def register_token(self, user: str, device: str, provider: str, token: str) -> None:
        self.devices.check()
        for t in [t for t, d in self.devices.docs.items() if (d["user"], d["device"]) == (user, device)]:
            del self.devices.docs[t]
        self.devices.docs[token] = {"user": user, "device": device, "provider": provider}

    async def unregister_tokens(self, user: str, device: str) -> None:
        self.devices.check()
        for t in [t for t, d in self.devices.docs.items() if (d["user"], d["device"]) == (user, device)]:
            del self.devices.docs[t]


class FakePeer:
    """A peer whose ``call`` runs a coroutine function of the test's choosing."""

    def __init__(self, handlers: dict[str, Any]) -> None:
        self.handlers = handlers
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def call(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        self.calls.append((method, args))
        result = self.handlers[method](*args)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def notify(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))


class FakePeers:
    """Peers of a conversation shard: one store writer, one group shard, N session shards."""

    def __init__(self, store: FakeStore, groups: dict[str, list[str]], session_shards: int = 2) -> None:
        self.store_peer = FakePeer({"commit": store.commit})
        self.stores = [self.store_peer]
        self.group_peer = FakePeer(
            {
                "members": lambda gid: groups.get(gid),
                "membership": lambda gid: Membership.fixed(groups[gid]).to_doc() if gid in groups else None,
            }
        )
        self.groups = [self.group_peer]
        # the contacts host: conversation shards never call it for direct-message checks (they read
        # the contact sides themselves, contacts.SideCache); a call shows up in its ``calls``
        self.contacts_peer = FakePeer({})
        self.conv_peer: FakePeer | None = None
        self.fanned: list[tuple[int, list[tuple[dict[str, Any], list[str]]]]] = []
        self.sessions = [
            FakePeer({"fanout": self._fanout(i), "plan_push": self._fanout(i)}) for i in range(session_shards)
        ]
        self.hub_peers: dict[str, FakePeer] = {}
        self.delivered: dict[str, list[tuple[dict[str, Any], list[int]]]] = {}
        self.hub_events: dict[str, list[tuple[dict[str, Any], list[int]]]] = {}

    def _fanout(self, index: int) -> Any:
        def handler(items: list[tuple[dict[str, Any], list[str]]]) -> None:
            self.fanned.append((index, items))

        return handler

    def contact_host(self, a: str, b: str) -> FakePeer:
        return self.contacts_peer

    def hub(self, name: str) -> FakePeer:
        """A hub that records what it is handed: ``delivered[name]`` and ``events[name]``."""
        peer = self.hub_peers.get(name)
        if peer is None:
            peer = self.hub_peers[name] = FakePeer(
                {
                    "deliver": lambda items: self.delivered.setdefault(name, []).extend(items),
                    "deliver_events": lambda items: self.hub_events.setdefault(name, []).extend(items),
                }
            )
        return peer

    def conv(self, conv: str) -> FakePeer:
        assert self.conv_peer is not None, "bind a conversation shard first"
        return self.conv_peer

    def next_store(self) -> FakePeer:
        return self.store_peer

    def group(self, gid: str) -> FakePeer:
        return self.group_peer

    def session_index(self, user: str) -> int:
        return sum(user.encode()) % len(self.sessions)
