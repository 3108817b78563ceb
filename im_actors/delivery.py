"""Per-conversation delivery order of one device, with no I/O (sans-I/O, as h11 and websockets' protocol).

The client library (:mod:`im_actors.client`) moves frames; this module decides. Feed a
:class:`Delivery` what arrived, and it answers with a :class:`Step`: the ``msg`` maps to hand to the
application now, in order, and the conversations whose gap needs a ``sync``. Nothing here awaits,
sleeps, logs or opens a socket, so unit tests drive it frame by frame.

The rules (PROTOCOL.md section 5: delivery over the socket is at least once; clients drop a ``msg``
whose (conv, seq) they already hold and fill any gap with ``sync``), per conversation, on a
:class:`Cursor`:

- ``held`` is the highest seq handed to the application; ``target`` the highest seq known to exist
  (from a ``msg``, a ``convs`` answer or a ``sync`` answer's ``last``); ``buffer`` the msgs received
  ahead of a gap, by seq.
- A ``msg`` at or below ``held``, or already buffered, is a duplicate and dropped. ``held + 1`` is
  delivered, followed by every buffered successor. One further ahead is buffered, and the range
  ``(held, target]`` is to be synced (:class:`SyncRange`).
- A ``sync`` answer returns every entry after ``after`` in ascending order, so a seq it skips does not
  exist on the server (a hole): the cursor jumps over it (counted in ``holes_skipped``) rather than
  wait for it forever.
- The baseline: a conversation the first ``convs`` answer lists starts at its ``last`` (older entries
  are history, not news); msgs that arrive before that answer are kept and placed after it. A
  conversation that appears later (a later ``convs`` answer, e.g. after a reconnect, or a live
  ``msg``) starts at 0, so it is delivered from its first entry, except a group the user just joined:
  its ``system`` ``added`` entry naming the user starts it at that entry.
- A conversation restored by the application (``held`` given to :class:`Delivery`) continues from
  the seq given.

Typical use (what :class:`~im_actors.client.Client` does)::

    delivery = Delivery("alice")
    step = delivery.receive_convs(convs_answer["convs"])   # the baseline
    step = delivery.receive_msg(frame)                      # every live ``msg``
    for msg in step.deliver: ...                            # to the application, in this order
    for gap in step.sync:                                   # one fill per conversation at a time:
        while (gap := delivery.gap(gap.conv)) is not None:
            answer = ...  # await sync(gap.request(limit))
            step = delivery.receive_sync(gap.conv, answer)  # deliver step.deliver; step.fill says
                                                            # DONE, CONTINUE or STALLED (retry later)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["Cursor", "Delivery", "FillNext", "Hole", "Step", "SyncRange"]


class FillNext(enum.Enum):
    """What a gap fill does after a ``sync`` answer (:meth:`Delivery.receive_sync`)."""

    #: ``held`` reached ``target``: nothing is missing, the fill ends.
    DONE = "done"
    #: The answer moved ``held`` forward and entries are still missing: sync the next page now.
    CONTINUE = "continue"
    #: The server says entries exist (``last``) that it did not return yet: wait, then sync again.
    STALLED = "stalled"


@dataclass(frozen=True)
class SyncRange:
    """Entries ``after < seq <= upto`` of ``conv`` are missing; ``sync`` from ``after`` fills them."""

    conv: str
    after: int
    upto: int

    def request(self, limit: int) -> dict[str, Any]:
        """The ``sync`` request frame (without ``id``) for one page of at most ``limit`` (1..500) entries."""
        return {"t": "sync", "conv": self.conv, "after": self.after, "limit": limit}


@dataclass(frozen=True)
class Hole:
    """Seqs ``first..last`` of ``conv`` that a ``sync`` answer showed do not exist on the server."""

    conv: str
    first: int
    last: int


class Step(NamedTuple):
    """What to do after feeding a frame (a named tuple: cheap to make once per ``msg``).

    ``deliver``: ``msg`` maps to hand to the application now, in this order (per conversation in seq
    order). ``sync``: conversations with a gap, at most one range each, to fill with ``sync`` (unless a
    fill of that conversation is already running: it picks the new range up through
    :meth:`Delivery.gap`). ``fill``: set by :meth:`Delivery.receive_sync` only. ``holes``: seqs skipped
    because the server does not have them (worth a warning).
    """

    deliver: tuple[dict[str, Any], ...] = ()
    sync: tuple[SyncRange, ...] = ()
    fill: FillNext | None = None
    holes: tuple[Hole, ...] = ()


_NOTHING = Step()


@dataclass
class Cursor:
    """Delivery state of one conversation: ``held`` = highest seq delivered, ``target`` = highest seq
    known to exist, ``buffer`` = msgs received ahead of a gap, by seq."""

    held: int = 0
    target: int = 0
    buffer: dict[int, dict[str, Any]] = field(default_factory=dict)

    def release(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """Deliver ``frame`` (its seq is ``held + 1``) and then every buffered successor."""
        out = [frame]
        self.held = int(frame["seq"])
        while self.buffer:
            nxt = self.buffer.pop(self.held + 1, None)
            if nxt is None:
                break
            out.append(nxt)
            self.held += 1
        return out


def _joined(frame: Mapping[str, Any], user: str) -> bool:
    """True for the ``system`` entry that added ``user`` to a group (PROTOCOL.md section 5)."""
    meta = frame.get("meta") or {}
    return (
        frame.get("kind") == "system"
        and isinstance(meta, Mapping)
        and meta.get("event") == "added"
        and user in (meta.get("users") or [])
    )


def _valid_seq(seq: object) -> bool:
    return isinstance(seq, int) and not isinstance(seq, bool)


class Delivery:
    """The cursors of every conversation of one device of ``user``.

    Args:
        user: the user id (to recognise the ``system`` entry that adds this user to a group).
        held: ``{conv: seq}`` restored by the application: those conversations continue from there.

    Counters (ints, read them any time): ``dups_dropped`` (live ``msg`` frames whose (conv, seq) was
    already held or buffered), ``holes_skipped`` (seqs a ``sync`` showed do not exist),
    ``bad_msgs`` (``msg`` frames without a string ``conv`` and an integer ``seq``, ignored).

    Errors: :meth:`receive_convs` and :meth:`receive_sync` raise ``KeyError``, ``TypeError`` or
    ``ValueError`` for an answer without the fields PROTOCOL.md gives it (``conv``, ``last``); the
    cursors are then left as the entries before the bad one made them.
    """

    def __init__(self, user: str, held: Mapping[str, int] | None = None) -> None:
        self.user = user
        self._cursors: dict[str, Cursor] = {conv: Cursor(held=seq, target=seq) for conv, seq in (held or {}).items()}
        #: True once the first ``convs`` answer was fed: until then ``msg`` frames wait in ``_early``.
        self.baseline_done = False
        self._early: list[tuple[str, int, dict[str, Any]]] = []
        self.dups_dropped = 0
        self.holes_skipped = 0
        self.bad_msgs = 0

    # --- reading the state ---------------------------------------------------------------------------

    @property
    def held(self) -> dict[str, int]:
        """A copy of ``{conv: highest seq delivered}``."""
        return {conv: cur.held for conv, cur in self._cursors.items()}

    def cursor(self, conv: str) -> Cursor | None:
        """The cursor of ``conv`` (None when the conversation is not known yet). Read it, do not change it."""
        return self._cursors.get(conv)

    def gap(self, conv: str) -> SyncRange | None:
        """The range of ``conv`` still missing (``held < target``), or None when nothing is."""
        cur = self._cursors.get(conv)
        if cur is None or cur.held >= cur.target:
            return None
        return SyncRange(conv, cur.held, cur.target)

    def lagging(self) -> list[SyncRange]:
        """Every conversation with a gap, as its :class:`SyncRange`."""
        return [SyncRange(conv, cur.held, cur.target) for conv, cur in self._cursors.items() if cur.held < cur.target]

    # --- feeding frames ------------------------------------------------------------------------------

    def receive_msg(self, frame: dict[str, Any]) -> Step:
        """A live ``msg`` frame arrived: deliver it (with buffered successors), drop it, or buffer it
        and ask for the gap's ``sync``. Before the baseline it is kept and placed by :meth:`receive_convs`."""
        conv, seq = frame.get("conv"), frame.get("seq")
        if not isinstance(conv, str) or not _valid_seq(seq):
            self.bad_msgs += 1
            return _NOTHING
        assert isinstance(seq, int)
        if not self.baseline_done:
            self._early.append((conv, seq, frame))
            return _NOTHING
        cur = self._cursors.get(conv)
        if cur is not None and seq == cur.held + 1 and not cur.buffer:  # the common case, kept short
            cur.held = seq
            if seq > cur.target:
                cur.target = seq
            return Step((frame,))
        deliver, sync = self._place(conv, seq, frame, live=True)
        return Step(deliver=tuple(deliver), sync=(sync,) if sync is not None else ())

    def receive_convs(self, convs: Iterable[Mapping[str, Any]]) -> Step:
        """A ``convs`` answer's list (``[{"conv", "last", ...}]``) arrived.

        The first one is the baseline (its conversations start at ``last``; the msgs kept until now are
        placed after it); in later ones (after a reconnect, or :meth:`Client.catch_up
        <im_actors.client.Client.catch_up>`) a conversation not seen before starts at 0. Every
        conversation whose ``last`` is ahead of ``held`` is in ``sync``.
        """
        first = not self.baseline_done
        syncs: dict[str, SyncRange] = {}
        for item in convs:
            conv, last = str(item["conv"]), int(item.get("last", 0))
            cur = self._cursors.get(conv)
            if cur is None:
                cur = self._cursors[conv] = Cursor(held=last if first else 0)
            cur.target = max(cur.target, last)
            if cur.held < cur.target:
                syncs[conv] = SyncRange(conv, cur.held, cur.target)
        deliver: list[dict[str, Any]] = []
        if first:
            self.baseline_done = True
            early, self._early = self._early, []
            for conv, seq, frame in early:
                out, sync = self._place(conv, seq, frame, live=False)
                deliver += out
                if sync is not None:
                    syncs[conv] = sync
        for conv in list(syncs):  # a frame placed later may have closed or widened the gap
            gap = self.gap(conv)
            if gap is None:
                del syncs[conv]
            else:
                syncs[conv] = gap
        return Step(deliver=tuple(deliver), sync=tuple(syncs.values()))

    def receive_sync(self, conv: str, answer: Mapping[str, Any]) -> Step:
        """A ``sync`` answer (``{"msgs": [...], "last": int, "more": bool}``) for ``conv`` arrived.

        Entries at or below ``held`` (delivered meanwhile by live msgs) are skipped; a seq the answer
        jumps over does not exist (a :class:`Hole`). ``fill`` says what the gap fill does next.
        """
        cur = self._cursors.get(conv)
        if cur is None:
            cur = self._cursors[conv] = Cursor()
        before = cur.held
        cur.target = max(cur.target, int(answer.get("last", 0)))
        deliver: list[dict[str, Any]] = []
        holes: list[Hole] = []
        for m in answer.get("msgs") or []:
            seq = m.get("seq")
            if not _valid_seq(seq) or seq <= cur.held:
                continue
            m.setdefault("t", "msg")
            m.setdefault("conv", conv)
            if seq > cur.held + 1:
                # sync returns every entry after ``after``: the seqs in between do not exist on the server.
                holes.append(Hole(conv, cur.held + 1, seq - 1))
                self.holes_skipped += seq - cur.held - 1
                for s in [s for s in cur.buffer if s < seq]:
                    del cur.buffer[s]
                cur.held = seq - 1
            cur.buffer.pop(seq, None)
            deliver += cur.release(m)
        if cur.held >= cur.target:
            fill = FillNext.DONE
        elif cur.held > before:
            fill = FillNext.CONTINUE
        else:
            fill = FillNext.STALLED
        return Step(deliver=tuple(deliver), fill=fill, holes=tuple(holes))

    def _place(
        self, conv: str, seq: int, frame: dict[str, Any], live: bool
    ) -> tuple[list[dict[str, Any]], SyncRange | None]:
        """Deliver, drop or buffer one msg; ``live`` msgs that are dropped count as duplicates."""
        cur = self._cursors.get(conv)
        if cur is None:
            cur = self._cursors[conv] = Cursor()
            if _joined(frame, self.user):
                cur.held = seq - 1  # a group this user just joined: the entries before the join are not theirs
        if seq <= cur.held or seq in cur.buffer:
            if live:
                self.dups_dropped += 1
            return [], None
        cur.target = max(cur.target, seq)
        if seq == cur.held + 1:
            return cur.release(frame), None
        cur.buffer[seq] = frame
        return [], SyncRange(conv, cur.held, cur.target)
