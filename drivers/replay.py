"""Corpus replay (DESIGN.md section 10): real chat, rooms become groups, senders become users.

Reads the first N messages of a gzip JSON Lines corpus in the format of ``fluid_irc_replay.jsonl.gz``
(``{"ts": seconds, "room", "sender", "text", ...}``, sorted by time) and turns them into a
:class:`~drivers.workload.Plan`:

- every sender is a user ``f"{run_prefix}{sender}"`` (one client, device ``d1``);
- every room is a group whose members are the senders seen in that room within those N messages,
  created by its first sender before the replay starts;
- every message is a send of its text to its room's group, in corpus order, at its corpus time
  with every idle gap capped at ``gap_cap_s`` (corpus seconds), then scaled so the N messages fit
  ``duration_s`` wall seconds (or divided by ``speed``, a compression factor).

The runner (:mod:`drivers.run`) schedules each send at its time, keeping each sender's sends in order.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from drivers.workload import DEFAULTS, GroupSpec, Plan, PlannedSend

__all__ = ["CorpusMessage", "read_corpus", "compress_times", "plan_replay", "ReplayWorkload"]


@dataclass(frozen=True)
class CorpusMessage:
    """One corpus line: ``ts`` seconds since the corpus start, ``room``, ``sender`` and ``text``."""

    ts: float
    room: str
    sender: str
    text: str


def read_corpus(path: str | Path, limit: int) -> list[CorpusMessage]:
    """The first ``limit`` messages of the gzip JSON Lines file at ``path`` (blank lines skipped)."""
    out: list[CorpusMessage] = []
    if limit <= 0:
        return out
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            out.append(CorpusMessage(float(rec["ts"]), str(rec["room"]), str(rec["sender"]), str(rec.get("text", ""))))
            if len(out) >= limit:
                break
    return out


def compress_times(
    ts: Sequence[float], duration_s: float | None = None, gap_cap_s: float | None = 60.0, speed: float | None = None
) -> list[float]:
    """Send offsets (wall seconds from the start) for corpus times ``ts`` (seconds, ascending).

    Every gap between consecutive messages is capped at ``gap_cap_s`` corpus seconds (None: no cap),
    so the first message is at 0; then the times are scaled: to end exactly at ``duration_s`` when it
    is given, else divided by ``speed`` (``speed=60`` plays an hour in a minute); ``speed``, when given,
    wins over ``duration_s``. Messages that share a corpus time share a send time. Raises ValueError
    when neither is given or speed is not positive.
    """
    if duration_s is None and speed is None:
        raise ValueError("give duration_s or speed")
    if speed is not None and speed <= 0:
        raise ValueError("speed must be positive")
    if not ts:
        return []
    capped = [0.0]
    for prev, cur in zip(ts, ts[1:], strict=False):
        gap = max(cur - prev, 0.0)
        capped.append(capped[-1] + (gap if gap_cap_s is None else min(gap, gap_cap_s)))
    if speed is not None:
        factor = 1.0 / speed
    else:
        assert duration_s is not None
        factor = duration_s / capped[-1] if capped[-1] > 0 else 0.0
    return [t * factor for t in capped]


def plan_replay(
    messages: Sequence[CorpusMessage],
    run_prefix: str = "",
    duration_s: float | None = 60.0,
    gap_cap_s: float | None = 60.0,
    speed: float | None = None,
    name: str = "replay",
) -> Plan:
    """The :class:`~drivers.workload.Plan` of replaying ``messages`` (see the module docstring).

    ``duration_s`` wall seconds for the whole replay, or ``speed`` (which wins when given).
    Group keys are the room names; group names are ``f"{run_prefix}{room}"``.
    """
    times = compress_times([m.ts for m in messages], duration_s, gap_cap_s, speed)
    users: dict[str, None] = {}
    rooms: dict[str, dict[str, None]] = {}
    sends: list[PlannedSend] = []
    for i, (m, at) in enumerate(zip(messages, times, strict=True)):
        user = f"{run_prefix}{m.sender}"
        users.setdefault(user)
        rooms.setdefault(m.room, {}).setdefault(user)
        sends.append(PlannedSend(index=i, at_s=at, sender=user, body=m.text, group=m.room))
    groups = tuple(
        GroupSpec(key=room, name=f"{run_prefix}{room}", creator=next(iter(members)), members=tuple(members))
        for room, members in rooms.items()
    )
    span = messages[-1].ts - messages[0].ts if messages else 0.0
    return Plan(
        name=name,
        users=tuple(users),
        groups=groups,
        sends=tuple(sends),
        duration_s=times[-1] if times else 0.0,
        info={
            "corpus_messages": len(messages),
            "corpus_span_s": span,
            "gap_cap_s": gap_cap_s,
            "rooms": {room: len(members) for room, members in rooms.items()},
        },
    )


@dataclass(frozen=True)
class ReplayWorkload:
    """The replay of the first ``messages`` lines of the corpus at ``path`` (a :class:`~drivers.workload.Workload`).

    ``duration_s``: wall seconds the replay should last (``speed``, when given, wins); ``gap_cap_s``:
    longest idle gap kept, in corpus seconds.
    """

    path: str
    messages: int = DEFAULTS.messages
    duration_s: float | None = DEFAULTS.duration_s
    gap_cap_s: float | None = DEFAULTS.gap_cap_s
    speed: float | None = None

    def build(self, run_prefix: str) -> Plan:
        """Read the corpus and plan the replay (user ids and group names prefixed with ``run_prefix``)."""
        return plan_replay(
            read_corpus(self.path, self.messages), run_prefix, self.duration_s, self.gap_cap_s, self.speed
        )
