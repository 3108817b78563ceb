"""Fault plans: the seed and the fault schedule a demo run used, so a lost delivery seen once can be rerun.

Issue 14 ("deterministic replays of faults"). Every ``im-actors demo`` report carries a
``fault_plan`` (:meth:`FaultPlan.as_dict`); a run that fails also writes it to a small JSON file
beside the report (:func:`plan_path`: ``r.json`` -> ``r.replay.json``), named in the output.
``im-actors demo --replay FILE`` (the plan file or the report itself) runs again with:

- the same **seed**: it seeds the synthetic workload (``SyntheticWorkload.seed``; the corpus replay
  has no randomness) and the chaos monkey's choices (:class:`drivers.chaos.ChaosMonkey`'s ``rng``);
- the same **workload and deployment shape** (``options``: corpus or synthetic and their sizes,
  duration, driver processes, hubs, shards, store writers, Ray nodes, storm);
- the same **faults**: each kind at the same planned offset (s since the probes started; faults
  run one after another, so an injection that lasts, such as a ``mongodb`` outage, delays the next
  one in both runs alike) and, where the target is chosen at random or by load (which actor of a
  role is killed, which hub is drained), the same target index. A ``node`` fault's victim is chosen
  by placement again (node ids differ between runs).

What is not reproduced: timing itself (thread and process scheduling, the client library's
jittered backoff), the run's ids (user and deployment names are fresh), and which send a fault
hits. A replay reruns the same plan; it cannot promise the same interleaving.

The plan is plain JSON::

    {"format": "im-actors-fault-plan", "version": 1, "seed": 1234,
     "chaos": "mongodb-slow,mongodb-cut:15", "outage_s": 10.0, "slow_ms": 500.0,
     "faults": [{"at_s": 9.5, "kind": "mongodb-slow", "target": null}, ...],
     "options": {"messages": 5000, "duration_s": 90.0, "synthetic": false, ...}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "PlannedFault", "FaultPlan", "plan_path", "REPLAYED_OPTIONS"]

FORMAT = "im-actors-fault-plan"
_VERSION = 1

#: The :class:`drivers.demo.DemoOptions` fields a plan carries and a replay takes from it.
REPLAYED_OPTIONS = (
    "corpus",
    "synthetic",
    "messages",
    "duration_s",
    "users",
    "rate",
    "group_size",
    "processes",
    "hubs",
    "shards",
    "store_writers",
    "nodes",
    "storm",
)


@dataclass(frozen=True)
class PlannedFault:
    """One fault of a plan: ``kind`` at ``at_s`` seconds after the chaos monkey started, on target
    index ``target`` of its role (None: no choice to repeat)."""

    at_s: float
    kind: str
    target: int | None = None

    def as_tuple(self) -> tuple[float, str, int | None]:
        """``(at_s, kind, target)``: one item of :meth:`drivers.chaos.ChaosMonkey.run`'s schedule."""
        return (self.at_s, self.kind, self.target)


@dataclass(frozen=True)
class FaultPlan:
    """The seed, the fault schedule and the options of one run (see the module docstring).

    ``chaos`` is the ``--chaos`` text of the kinds actually used (``all`` already narrowed to what
    the run could break), or None for a run without faults; ``outage_s`` and ``slow_ms`` are
    ``--chaos-outage`` (s) and ``--chaos-delay`` (ms).
    """

    seed: int
    chaos: str | None = None
    faults: tuple[PlannedFault, ...] = ()
    outage_s: float = 10.0
    slow_ms: float = 500.0
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_faults(
        cls,
        seed: int,
        chaos: str | None,
        faults: Sequence[Mapping[str, Any]],
        outage_s: float,
        slow_ms: float,
        options: Mapping[str, Any],
    ) -> FaultPlan:
        """The plan of a finished run from its report's ``faults`` (each with ``planned_at_s`` or
        ``at_s``, ``kind`` and ``index``), in injection order."""
        planned = tuple(
            PlannedFault(float(f.get("planned_at_s", f["at_s"])), str(f["kind"]), _index(f.get("index")))
            for f in faults
        )
        return cls(seed, chaos, planned, outage_s, slow_ms, {k: options[k] for k in REPLAYED_OPTIONS if k in options})

    def schedule(self) -> list[tuple[float, str, int | None]]:
        """The faults as :meth:`drivers.chaos.ChaosMonkey.run` takes them."""
        return [f.as_tuple() for f in self.faults]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data (the module docstring shows it)."""
        return {
            "format": FORMAT,
            "version": _VERSION,
            "seed": self.seed,
            "chaos": self.chaos,
            "outage_s": self.outage_s,
            "slow_ms": self.slow_ms,
            "faults": [{"at_s": round(f.at_s, 3), "kind": f.kind, "target": f.target} for f in self.faults],
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in self.options.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultPlan:
        """Read :meth:`as_dict`'s data, or a demo report holding it under ``fault_plan``.

        Raises ValueError when it is neither, or of a newer version."""
        if "fault_plan" in data and data.get("format") != FORMAT:
            data = data["fault_plan"]
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError("not a fault plan, nor a demo report with one (no 'fault_plan')")
        if int(data.get("version", 0)) > _VERSION:
            raise ValueError(f"fault plan version {data.get('version')} is newer than this im-actors reads")
        faults = tuple(
            PlannedFault(float(f["at_s"]), str(f["kind"]), _index(f.get("target"))) for f in data.get("faults", [])
        )
        options = {k: v for k, v in dict(data.get("options") or {}).items() if k in REPLAYED_OPTIONS}
        if options.get("corpus") is not None:
            options["corpus"] = Path(options["corpus"])
        return cls(
            seed=int(data["seed"]),
            chaos=data.get("chaos") or None,
            faults=faults,
            outage_s=float(data.get("outage_s", 10.0)),
            slow_ms=float(data.get("slow_ms", 500.0)),
            options=options,
        )

    def write(self, path: Path) -> Path:
        """Write the plan as JSON to ``path``; returns it."""
        path.write_text(json.dumps(self.as_dict(), indent=2))
        return path

    @classmethod
    def read(cls, path: Path) -> FaultPlan:
        """The plan in ``path`` (a plan file or a demo report). Raises OSError when it cannot be
        read, ValueError when it holds no plan (or is not JSON)."""
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from None
        return cls.from_dict(data)


def plan_path(report: Path) -> Path:
    """Where a failed run writes its plan: beside ``report``, ``r.json`` -> ``r.replay.json``."""
    return report.with_name(f"{report.stem}.replay.json")


def _index(value: Any) -> int | None:
    return None if value is None else int(value)
