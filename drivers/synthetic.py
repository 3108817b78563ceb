"""Synthetic workload: direct messages between random pairs and/or messages in groups of a given size.

``users`` users (``f"{run_prefix}s{i}"``), a total rate of ``rate`` messages per second for
``duration_s`` seconds, each body ``msg_bytes`` bytes of ASCII. A share ``direct_share`` of the sends go
to the direct conversation of a random pair; the rest go to a random group (``groups`` groups of
``group_size`` members, made from consecutive runs of a shuffled user list, so with the default
count every user is in at least one group) from a random member. Sends are evenly spaced
(``1 / rate`` apart) or, with ``poisson``, exponentially spaced at the same mean rate. With ``stages``
(k6 style, :func:`parse_stages`: ``30s:100,60s:1000``) the rate instead ramps linearly, stage by
stage, from the previous stage's target (0 before the first) to the stage's target over its duration,
and the plan lasts the stages' total; a send falls where the integral of the rate reaches its number.
Everything is drawn from ``random.Random(seed)``: the same parameters give the same plan in every
process.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from drivers.workload import DEFAULTS, GroupSpec, Plan, PlannedSend

__all__ = ["SyntheticWorkload", "plan_synthetic", "make_body", "parse_stages", "stage_times"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_stages(spec: str) -> tuple[tuple[float, float], ...]:
    """``"30s:100,60s:1000"`` -> ``((30.0, 100.0), (60.0, 1000.0))``: (duration s, target msgs/s).

    Durations take ``ms``, ``s``, ``m`` or ``h`` (a bare number is seconds). Raises ValueError naming
    the stage that does not parse, a duration that is not positive or a negative target.
    """
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        dur, sep, target = part.partition(":")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", dur.strip())
        try:
            value = float(target)
        except ValueError:
            value = -1.0
        if not sep or m is None or value < 0:
            raise ValueError(f"stage {part!r}: expected DURATION:RATE, e.g. 30s:100")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
        if seconds <= 0:
            raise ValueError(f"stage {part!r}: the duration must be positive")
        out.append((seconds, value))
    if not out:
        raise ValueError("no stages")
    return tuple(out)


def stage_times(stages: tuple[tuple[float, float], ...], step_s: float = 0.001) -> list[float]:
    """Send offsets (s) of a rate ramping linearly through ``stages`` (see the module docstring):
    send i (0-based) at the first step where the integral of the rate reaches i + 1."""
    times: list[float] = []
    base = 0.0  # sends due before this stage
    t0 = 0.0
    start = 0.0
    for duration, target in stages:
        n = max(1, int(round(duration / step_s)))
        for k in range(1, n + 1):
            tau = k * duration / n  # the integral in closed form: no rounding drift over long runs
            due = base + start * tau + (target - start) * tau * tau / (2 * duration)
            while due + 1e-6 >= len(times) + 1:
                times.append(t0 + tau)
        base += (start + target) * duration / 2
        t0 += duration
        start = target
    return times


def make_body(index: int, size: int) -> str:
    """A body of exactly ``size`` ASCII bytes that starts with the send index (readable in traces)."""
    head = f"{index}:"
    if size <= len(head):
        return head[:size] if size > 0 else ""
    filler = "abcdefghijklmnopqrstuvwxyz0123456789 "
    need = size - len(head)
    return head + (filler * (need // len(filler) + 1))[:need]


@dataclass(frozen=True)
class SyntheticWorkload:
    """Synthetic traffic (a :class:`~drivers.workload.Workload`); see the module docstring.

    ``rate`` msgs/s in total; ``duration_s`` seconds; ``msg_bytes`` bytes per body; ``group_size`` 0
    means no groups; ``groups`` None means ``ceil(users / group_size)``; ``direct_share`` None means
    1.0 without groups and 0.0 with them; ``stages`` ((duration s, target msgs/s), ...) ramps the rate
    instead of ``rate`` and ``duration_s``.
    """

    users: int = DEFAULTS.users
    rate: float = DEFAULTS.rate
    duration_s: float = DEFAULTS.duration_s
    msg_bytes: int = DEFAULTS.msg_bytes
    group_size: int = 0
    groups: int | None = None
    direct_share: float | None = None
    poisson: bool = False
    seed: int = 0
    stages: tuple[tuple[float, float], ...] = ()

    def build(self, run_prefix: str) -> Plan:
        """The plan, with user ids and group names prefixed by ``run_prefix``."""
        return plan_synthetic(self, run_prefix)


def plan_synthetic(w: SyntheticWorkload, run_prefix: str = "") -> Plan:
    """The :class:`~drivers.workload.Plan` of ``w``; raises ValueError for impossible parameters."""
    if w.stages and w.poisson:
        raise ValueError("stages ramp an even rate: not with poisson")
    if w.users < 1 or w.rate <= 0 or w.duration_s < 0 or w.msg_bytes < 0:
        raise ValueError("users >= 1, rate > 0, duration_s >= 0 and msg_bytes >= 0 are required")
    if w.group_size < 0 or w.group_size > w.users or w.group_size == 1:
        raise ValueError("group_size must be 0 (no groups) or 2..users")
    direct_share = w.direct_share if w.direct_share is not None else (1.0 if w.group_size == 0 else 0.0)
    if not 0.0 <= direct_share <= 1.0:
        raise ValueError("direct_share must be in 0..1")
    if direct_share > 0 and w.users < 2:
        raise ValueError("direct messages need at least 2 users")
    if direct_share < 1.0 and w.group_size == 0:
        raise ValueError("group traffic needs group_size >= 2")
    rng = random.Random(w.seed)
    users = tuple(f"{run_prefix}s{i}" for i in range(w.users))
    groups: list[GroupSpec] = []
    if w.group_size:
        count = w.groups if w.groups is not None else math.ceil(w.users / w.group_size)
        order = list(users)
        rng.shuffle(order)
        for g in range(count):
            members = tuple(order[(g * w.group_size + k) % len(order)] for k in range(w.group_size))
            groups.append(GroupSpec(key=f"g{g}", name=f"{run_prefix}g{g}", creator=members[0], members=members))
    staged = stage_times(w.stages) if w.stages else None
    n = len(staged) if staged is not None else int(round(w.rate * w.duration_s))
    sends: list[PlannedSend] = []
    at = 0.0
    for i in range(n):
        if staged is not None:
            at = staged[i]
        elif w.poisson:
            at = at + rng.expovariate(w.rate) if i else 0.0
        else:
            at = i / w.rate
        body = make_body(i, w.msg_bytes)
        if groups and rng.random() >= direct_share:
            spec = groups[rng.randrange(len(groups))]
            sends.append(PlannedSend(i, at, spec.members[rng.randrange(len(spec.members))], body, group=spec.key))
        else:
            a, b = rng.sample(range(len(users)), 2)
            sends.append(PlannedSend(i, at, users[a], body, peer=users[b]))
    return Plan(
        name="synthetic",
        users=users,
        groups=tuple(groups),
        sends=tuple(sends),
        duration_s=sends[-1].at_s if sends else 0.0,
        info={
            "rate": w.rate,
            "msg_bytes": w.msg_bytes,
            "group_size": w.group_size,
            "direct_share": direct_share,
            "poisson": w.poisson,
            "seed": w.seed,
            **({"stages": [list(s) for s in w.stages]} if w.stages else {}),
        },
    )
