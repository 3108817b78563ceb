"""Membership of a group conversation as a value: who belongs, since which seq, with which role.

A pure module (no I/O). The group conversation's seq stream is the source of truth: every change
(created, added, removed, left, role, renamed) is a ``system`` entry whose ``meta`` says what
changed, and :meth:`Membership.apply` turns that entry into the new state *at its seq*. The
conversation's sequencer applies each change when its entry commits (so fan-out and checks of the
entries after it see the new members), and the group shard applies the same entry to its own copy;
both rebuild from the group document (a checkpoint, with the seq it covers) plus the system entries
after it (DESIGN.md section 3: "membership changes are entries in the same stream").

Each user keeps spans ``[joined seq, left seq]`` (``left`` 0 while a member): a user reads exactly
the entries inside their spans, both ends included, so a member sees the entry that added them
and the one that removed them, and nothing between a removal and a re-join.

Meta of a change entry (``users``: user ids):

- ``{"event": "created", "users", "owner", "name"}``: the founders join; ``owner`` owns the group.
- ``{"event": "added", "users"}`` / ``{"event": "removed", "users"}`` / ``{"event": "left", "users"}``.
- ``{"event": "role", "users": [user], "role": "owner" | "admin" | "member"}``: a new owner makes
  the previous owner an admin (ownership is handed over, never shared).
- ``{"event": "renamed", "name"}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Membership", "ROLES", "CHANGE_EVENTS"]

#: Roles of a group member, strongest first.
ROLES = ("owner", "admin", "member")

#: ``meta["event"]`` values of system entries that change a group.
CHANGE_EVENTS = frozenset({"created", "added", "removed", "left", "role", "renamed"})


@dataclass
class Membership:
    """Members, roles, name and per-user spans of one group conversation, as of seq ``seq``.

    ``spans``: user -> ``[[joined, left], ...]`` oldest first, ``left`` 0 while a member.
    ``roles`` holds only admins and the owner (everyone else is ``member``).
    """

    name: str = ""
    owner: str = ""
    seq: int = 0
    spans: dict[str, list[list[int]]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    members: set[str] = field(default_factory=set)
    _frozen: frozenset[str] | None = field(default=None, repr=False, compare=False)

    # --- building ---

    @classmethod
    def direct(cls, a: str, b: str) -> Membership:
        """Both users of a direct conversation, members from its first entry on."""
        return cls(spans={a: [[1, 0]], b: [[1, 0]]}, members={a, b})

    @classmethod
    def fixed(cls, users: list[str], joined: int = 1) -> Membership:
        """``users`` as members since ``joined`` (tests; groups stored before spans existed)."""
        return cls(spans={u: [[joined, 0]] for u in users}, members=set(users))

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Membership:
        """From a group document: ``name``, ``owner``, ``seq``, ``spans`` as ``[[user, joined, left]...]``,
        ``roles`` as ``[[user, role]...]`` (lists, since user ids may hold dots, which MongoDB keys
        must not). A document of the first format (``members`` and no ``spans``) gets its members
        joined at seq 1."""
        if "spans" not in doc:
            m = cls.fixed(list(doc.get("members") or []))
            m.name, m.owner = str(doc.get("name", "")), str(doc.get("owner", ""))
            roles = doc.get("roles") or {}
            m.roles = dict(roles) if isinstance(roles, dict) else {u: r for u, r in roles}
            return m
        m = cls(name=str(doc.get("name", "")), owner=str(doc.get("owner", "")), seq=int(doc.get("seq", 0)))
        for user, joined, left in doc["spans"]:
            m.spans.setdefault(user, []).append([int(joined), int(left)])
        m.members = {u for u, sp in m.spans.items() if sp[-1][1] == 0}
        m.roles = {u: r for u, r in doc.get("roles") or []}
        return m

    def to_doc(self) -> dict[str, Any]:
        """The fields :meth:`from_doc` reads. The current members are the spans still open; they
        are not stored a second time as an array: a group's conversations per user are the
        ``user_convs`` rows, and an indexed ``members`` array made every checkpoint of a
        10,000-member group re-index 10,000 keys in one write (493 ms on SecantusDB, stalling
        the commits beside it: issue 14)."""
        return {
            "name": self.name,
            "owner": self.owner,
            "seq": self.seq,
            "spans": [[u, j, left] for u, sp in sorted(self.spans.items()) for j, left in sp],
            "roles": sorted([u, r] for u, r in self.roles.items()),
        }

    # --- reading ---

    def frozen(self) -> frozenset[str]:
        """The current members as a frozenset (cached until the next change)."""
        if self._frozen is None:
            self._frozen = frozenset(self.members)
        return self._frozen

    def role(self, user: str) -> str | None:
        """``owner``, ``admin`` or ``member`` for a current member; None for anyone else."""
        if user not in self.members:
            return None
        return self.roles.get(user, "member")

    def ranges(self, user: str, last: int) -> list[tuple[int, int]]:
        """The seqs ``user`` may read when the newest is ``last``: ``[(lo, hi)]`` inclusive, ascending,
        empty ones dropped. Empty for a user who never belonged."""
        out: list[tuple[int, int]] = []
        for joined, left in self.spans.get(user, ()):
            hi = last if left == 0 else min(left, last)
            if joined <= hi:
                out.append((max(joined, 1), hi))
        return out

    def can_read(self, user: str, seq: int) -> bool:
        """True when ``seq`` lies inside one of ``user``'s spans."""
        return any(joined <= seq and (left == 0 or seq <= left) for joined, left in self.spans.get(user, ()))

    def ever(self, user: str) -> bool:
        """True when ``user`` belongs or belonged (may read what their spans cover)."""
        return user in self.spans

    # --- changing ---

    def apply(self, actor: str, meta: dict[str, Any], seq: int) -> bool:
        """Apply the change entry ``meta`` committed at ``seq`` by ``actor``.

        Returns False (and changes nothing) for an entry at or below :attr:`seq` (already applied:
        replays are idempotent) or one whose ``event`` is not a change. Users already in the state
        asked for (an add of a member, a removal of a non-member) are skipped.
        """
        event = meta.get("event")
        if seq <= self.seq or event not in CHANGE_EVENTS:
            return False
        self.seq = seq
        users = [str(u) for u in meta.get("users") or []]
        if event == "created":
            self.name = str(meta.get("name", self.name))
            self.owner = str(meta.get("owner", actor))
            self._join(users, seq)
            self.roles[self.owner] = "owner"
        elif event == "added":
            self._join(users, seq)
        elif event in ("removed", "left"):
            for u in users:
                if u in self.members:
                    self.spans[u][-1][1] = seq
                    self.members.discard(u)
                    self.roles.pop(u, None)
                    if u == self.owner:
                        self.owner = ""
        elif event == "role":
            role = str(meta.get("role", "member"))
            for u in users:
                if u not in self.members:
                    continue
                if role == "owner":
                    if self.owner and self.owner != u:
                        self.roles[self.owner] = "admin"
                    self.owner = u
                    self.roles[u] = "owner"
                elif role == "admin":
                    self.roles[u] = "admin"
                else:
                    self.roles.pop(u, None)
        elif event == "renamed":
            self.name = str(meta.get("name", self.name))
        self._frozen = None
        return True

    def _join(self, users: list[str], seq: int) -> None:
        for u in users:
            if u not in self.members:
                self.spans.setdefault(u, []).append([seq, 0])
                self.members.add(u)
