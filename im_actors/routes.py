"""Routes: where each connected device of a user is, held where fan-out happens (issue "the hot path").

With ``fanout_via = "conv"`` (the default) every conversation shard holds a :class:`Routes` table of
every live connection, ``user -> {device: (hub name, connection id)}``, and fans committed entries out
to the hubs itself: one batched one-way call per hub holding recipients, no session shard on the
path. The session shards stay the authority on connections (replacement with 4409,
``max_connections_per_user``, presence, offline push); the tables here are a copy kept by the hubs:

- a hub adds a connection to every conversation shard (awaited, up to 2 s) *before* it answers
  ``ready``, and removes it when the connection ends (one-way); a shard that does not answer in
  time (restarting) gets the route from a background retry, or asks for it on restart;
- a restarted conversation shard comes back empty; the router calls its ``ready`` every heartbeat,
  and its first ``ready`` has every hub announce its connections again (as for session shards);
- a hub declared gone by the router is dropped from every table; when it answers again it
  announces its connections again.

Why a stale route never loses an entry (DESIGN.md section 3 stays whole): the table only decides who
gets the *live* copy. A route to a connection that is gone costs one skipped id at its hub. A
connection missing from a table (added after a fan-out was routed, or during a restarted shard's
first heartbeat) misses a live copy; the entry is committed before any fan-out, so the client gets
it with ``sync``: its catch-up after ``ready`` reads every entry numbered before its route was added
(the route is added before ``ready``, and a ``sync`` answer's ``last`` is the shard's last committed
seq), and a gap it sees later in a conversation is filled as PROTOCOL.md section 5 says. A
duplicate live copy (two routes of one device during a 4409 replacement) is dropped by the client by
its (conv, seq).

Pure: no Ray, no asyncio; the conversation shard calls it synchronously.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Routes"]


class Routes:
    """``user -> {device: (hub, connection id)}`` of live connections, with a version that changes
    on every change (callers cache per-conversation targets against it)."""

    def __init__(self) -> None:
        self.users: dict[str, dict[str, tuple[str, int]]] = {}
        self.version = 0

    def add(self, user: str, device: str, hub: str, conn_id: int) -> None:
        """``device`` of ``user`` is connected on ``hub`` as ``conn_id`` (replacing an older one)."""
        self.users.setdefault(user, {})[device] = (hub, conn_id)
        self.version += 1

    def remove(self, user: str, device: str, hub: str, conn_id: int) -> bool:
        """Forget that connection, unless a newer one of the device replaced it; True if forgotten."""
        devices = self.users.get(user)
        if devices is None or devices.get(device) != (hub, conn_id):
            return False
        del devices[device]
        if not devices:
            del self.users[user]
        self.version += 1
        return True

    def hub_gone(self, hub: str) -> int:
        """Forget every connection on ``hub``; returns how many."""
        n = 0
        for user in list(self.users):
            devices = self.users[user]
            for device in [d for d, (h, _) in devices.items() if h == hub]:
                del devices[device]
                n += 1
            if not devices:
                del self.users[user]
        if n:
            self.version += 1
        return n

    def targets(self, users: Iterable[str], skip: tuple[str, int] | None = None) -> dict[str, list[int]]:
        """``{hub: [connection id, ...]}`` of every live connection of ``users``, without ``skip``
        (the connection an event came from)."""
        out: dict[str, list[int]] = {}
        for user in users:
            devices = self.users.get(user)
            if not devices:
                continue
            for hub, conn_id in devices.values():
                if (hub, conn_id) != skip:
                    out.setdefault(hub, []).append(conn_id)
        return out

    def __len__(self) -> int:
        """Live connections held."""
        return sum(len(d) for d in self.users.values())
