"""What a workload is: users, groups to create first, and timed sends. Built by replay and synthetic.

A :class:`Plan` is plain data (picklable: the runner ships it to its worker processes). Sends name a
group by its key (the server makes the group id, so the conversation id is known only after the group
is created) or a peer user (the direct conversation ``d:<a>:<b>``). Every user is one client with one
device, ``"d1"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from drivers.oracle import device_key
from im_actors.ids import direct_conv

__all__ = ["DEVICE", "DEFAULTS", "WorkloadDefaults", "GroupSpec", "PlannedSend", "Plan", "Workload"]

#: The one device every simulated user connects with.
DEVICE = "d1"


@dataclass(frozen=True)
class WorkloadDefaults:
    """The workload defaults of every command line (``im-actors demo``, ``python -m drivers.run``) and
    of :class:`~drivers.replay.ReplayWorkload` and :class:`~drivers.synthetic.SyntheticWorkload`.

    ``messages``: corpus lines replayed; ``duration_s``: wall seconds of the send phase (replay and
    synthetic); ``gap_cap_s``: longest idle corpus gap kept (corpus seconds); ``users``, ``rate``
    (msgs/s in total), ``msg_bytes`` (bytes per body) and ``group_size`` (members per group) of the
    synthetic workload. The library class keeps ``group_size=0`` (direct messages only) unless asked;
    the command lines use :attr:`group_size`.
    """

    messages: int = 2000
    duration_s: float = 30.0
    gap_cap_s: float = 60.0
    users: int = 100
    rate: float = 200.0
    msg_bytes: int = 64
    group_size: int = 10


#: The one set of workload defaults.
DEFAULTS = WorkloadDefaults()


@dataclass(frozen=True)
class GroupSpec:
    """A group to create before the run: ``creator`` creates it with every one of ``members`` in it."""

    key: str
    name: str
    creator: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class PlannedSend:
    """Send number ``index`` (0-based, unique in the run): ``sender`` posts ``body`` at ``at_s`` seconds after
    the start, to group ``group`` (a :class:`GroupSpec` key) or to the direct conversation with ``peer``."""

    index: int
    at_s: float
    sender: str
    body: str
    group: str | None = None
    peer: str | None = None

    def conv(self, group_convs: Mapping[str, str]) -> str:
        """The conversation id of this send, given the group key -> conversation id map."""
        if self.group is not None:
            return group_convs[self.group]
        assert self.peer is not None
        return direct_conv(self.sender, self.peer)


@dataclass(frozen=True)
class Plan:
    """A complete workload: ``users`` (user ids), ``groups`` to create, ``sends`` sorted by ``at_s``,
    ``duration_s`` the planned length of the send phase, ``info`` a summary for the report."""

    name: str
    users: tuple[str, ...]
    groups: tuple[GroupSpec, ...]
    sends: tuple[PlannedSend, ...]
    duration_s: float
    info: dict[str, Any] = field(default_factory=dict)

    def recipients(self, group_convs: Mapping[str, str]) -> dict[str, list[str]]:
        """conv -> device keys expected to receive its entries (every member device, sender included)."""
        out: dict[str, list[str]] = {}
        for g in self.groups:
            if g.key in group_convs:
                out[group_convs[g.key]] = [device_key(u, DEVICE) for u in dict.fromkeys(g.members)]
        for s in self.sends:
            if s.peer is not None:
                conv = direct_conv(s.sender, s.peer)
                if conv not in out:
                    out[conv] = [device_key(s.sender, DEVICE), device_key(s.peer, DEVICE)]
        return out

    def sends_by_sender(self) -> dict[str, list[PlannedSend]]:
        """Each sender's sends, in plan order."""
        out: dict[str, list[PlannedSend]] = {}
        for s in self.sends:
            out.setdefault(s.sender, []).append(s)
        return out

    def summary(self) -> dict[str, Any]:
        """``{"name", "users", "groups", "sends", "planned_duration_s", ...info}`` for the report."""
        return {
            "name": self.name,
            "users": len(self.users),
            "groups": len(self.groups),
            "sends": len(self.sends),
            "planned_duration_s": round(self.duration_s, 3),
            **self.info,
        }


class Workload(Protocol):
    """Anything that builds a :class:`Plan`; ``run_prefix`` makes user ids and names unique per run."""

    def build(self, run_prefix: str) -> Plan: ...
