"""The live view of a run: one status line updated in place, on a terminal only.

Every driver process keeps a :class:`PartProgress` (what its share of the run has done so far) and
hands a :meth:`~PartProgress.snapshot` to the parent about twice a second; the parent's
:class:`LiveView` merges the latest snapshot of every process and redraws one tqdm line::

    sending   : 1240/2000 |############      |, elapsed 12s sent 201/s acked 199/s ack p99 38 ms errors 0 faults: hub 3s

The line shows the phase (``connecting``, ``groups``, ``sending``, ``draining``) with its progress
(clients connected, groups created, sends issued, clients caught up), the elapsed time, sends and
acks per second over the last refresh interval (msgs/s), the ack latency p99 so far (ms, from the
processes' HdrHistograms merged), send errors, and the faults in progress (``faults``: a callable
the chaos runner gives). Disabled (nothing drawn, nothing computed) unless ``enabled``; the runner
enables it only when stdout is a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from hdrh.histogram import HdrHistogram
from tqdm import tqdm

from drivers.oracle import new_histogram

__all__ = ["PHASES", "PartProgress", "LiveView"]

#: The line: phase, its progress, then :meth:`LiveView.status` (tqdm's own rate and times are left out:
#: they restart with every phase).
_BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:20}|{postfix}"

#: The phases of a run, in order.
PHASES = ("connecting", "groups", "sending", "draining")


@dataclass
class PartProgress:
    """One process's progress: its ``phase``, ``done`` of ``total`` in that phase, and counters.

    ``sent`` and ``acked`` count sends and acks, ``errors`` failed sends; ``ack_hist`` is the
    process's ack latency histogram (the oracle's, in microseconds; shared, not copied).
    """

    phase: str = PHASES[0]
    done: int = 0
    total: int = 0
    sent: int = 0
    acked: int = 0
    errors: int = 0
    #: Clients with an open, authenticated connection, and reconnections so far (all clients).
    connected: int = 0
    reconnects: int = 0
    ack_hist: HdrHistogram | None = None

    def enter(self, phase: str, total: int) -> None:
        """Start ``phase`` with ``total`` steps."""
        self.phase, self.done, self.total = phase, 0, total

    def snapshot(self, encode: bool) -> dict[str, Any]:
        """Plain data for :meth:`LiveView.update`; ``encode`` the histogram to send it to another process."""
        hist: Any = self.ack_hist
        if encode and hist is not None:
            hist = hist.encode().decode("ascii")
        return {
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "sent": self.sent,
            "acked": self.acked,
            "errors": self.errors,
            "connected": self.connected,
            "reconnects": self.reconnects,
            "ack_hist": hist,
        }


@dataclass
class LiveView:
    """The status line (see the module docstring) for a run of ``processes`` driver processes."""

    processes: int = 1
    enabled: bool = True
    faults: Callable[[], list[str]] | None = None
    #: Called with the run's phase each time it changes (also when the line is not drawn).
    on_phase: Callable[[str], None] | None = None
    #: Called with this view after every snapshot taken (also when the line is not drawn).
    on_update: Callable[[LiveView], None] | None = None
    file: TextIO = field(default_factory=lambda: sys.stdout)
    refresh_s: float = 0.5
    _parts: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: process -> phase -> (done, total) last seen: a process already past a phase counts as done in it
    _phases: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)
    _bar: tqdm | None = None
    _phase: str = ""
    _last: tuple[float, int, int] | None = None
    _rates: tuple[float, float] = (0.0, 0.0)
    _drawn: float = 0.0
    _started: float = 0.0
    _announced: str = ""

    def update(self, index: int, snapshot: dict[str, Any]) -> None:
        """Take process ``index``'s latest :meth:`PartProgress.snapshot`; redraws at most every ``refresh_s``."""
        self._parts[index] = snapshot
        self._phases.setdefault(index, {})[snapshot["phase"]] = (snapshot["done"], snapshot["total"])
        phase = self.phase
        if phase != self._announced:
            self._announced = phase
            if self.on_phase is not None:
                self.on_phase(phase)
        if self.on_update is not None:
            self.on_update(self)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn >= self.refresh_s:
            self.draw(now)

    @property
    def connected(self) -> int:
        """Clients connected, summed over the processes' latest snapshots."""
        return sum(int(p.get("connected", 0)) for p in self._parts.values())

    @property
    def reconnects(self) -> int:
        """Reconnections so far, summed over the processes' latest snapshots."""
        return sum(int(p.get("reconnects", 0)) for p in self._parts.values())

    @property
    def phase(self) -> str:
        """The run's phase: that of its slowest process (processes wait for each other between
        phases); "" before any snapshot."""
        if not self._parts:
            return ""
        return min((p["phase"] for p in self._parts.values()), key=PHASES.index)

    def draw(self, now: float | None = None) -> None:
        """Redraw the line from the snapshots so far."""
        if not self.enabled or not self._parts:
            return
        now = time.monotonic() if now is None else now
        self._drawn = now
        parts = list(self._parts.values())
        phase = self.phase
        seen = [by_phase[phase] for by_phase in self._phases.values() if phase in by_phase]
        done = sum(d for d, _ in seen)
        total = max(sum(t for _, t in seen), done)
        if self._bar is None:
            self._started = now
            self._bar = tqdm(total=total, file=self.file, dynamic_ncols=True, leave=True, bar_format=_BAR_FORMAT)
        if phase != self._phase:
            self._phase = phase
            self._bar.set_description(f"{phase:10}", refresh=False)
            self._bar.reset(total=total)
        self._bar.total = total
        self._bar.n = done
        sent = sum(p["sent"] for p in parts)
        acked = sum(p["acked"] for p in parts)
        if self._last is not None and now > self._last[0]:
            span = now - self._last[0]
            self._rates = ((sent - self._last[1]) / span, (acked - self._last[2]) / span)
        self._last = (now, sent, acked)
        self._bar.postfix = f"elapsed {now - self._started:.0f}s {self.status(parts)}"  # no ", " before it
        self._bar.refresh()

    def status(self, parts: list[dict[str, Any]]) -> str:
        """The text after the bar: rates, p99 so far, errors, faults in progress."""
        hist = new_histogram()
        for p in parts:
            h = p.get("ack_hist")
            if isinstance(h, str):
                h = HdrHistogram.decode(h)
            if h is not None and h.get_total_count():
                hist.add(h)
        p99 = hist.get_value_at_percentile(99.0) / 1000.0 if hist.get_total_count() else 0.0
        text = (
            f"sent {self._rates[0]:.0f}/s acked {self._rates[1]:.0f}/s ack p99 {p99:.1f} ms "
            f"errors {sum(p['errors'] for p in parts)}"
        )
        faults = self.faults() if self.faults is not None else []
        if faults:
            text += f" faults: {', '.join(faults)}"
        return text

    def close(self) -> None:
        """Draw the final line and leave it on the terminal."""
        if self._bar is not None:
            self.draw()
            self._bar.close()
            self._bar = None
