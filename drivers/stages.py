"""Stage breakdown of sampled sends: where a message's time goes on its way to a recipient.

With ``trace_sample`` > 0 (:class:`im_actors.config.Config`) a share of sends carries stage
timestamps, stamped by the server as the entry passes each stage (:func:`im_actors.conversation.stamp`)
and handed to the recipients in the ``msg`` frame's ``trace`` field. A :class:`StageRecorder` turns
each receipt of a traced ``msg`` into the time spent in every step between two stages, one
HdrHistogram per step (microseconds, as the oracle's), so the steps' p50 / p99 add up to the delivery
latency. Pure: no I/O; partial recorders of several driver processes merge through
:meth:`StageRecorder.encode` / :meth:`StageRecorder.add_encoded`.

The steps, each named after the stage it ends at:

- ``hub_in``: client send (the driver's ``meta.t``) to the sender's hub decoding the frame;
- ``shard_in``: the hub's batch to the conversation shard (batch wait, Ray call);
- ``seq``: activation of a first-seen conversation, the contacts check of a direct one, and the
  wait for the conversation's previous commit or a free commit slot, until numbered;
- ``committed``: the MongoDB commit;
- ``fanout``: committed to routed: by the conversation shard itself (``fanout_via = "conv"``), or
  through the fan-out batch and Ray call to a session shard (``"session"``);
- ``hub_queued``: to the recipient's hub (per-hub batch and Ray call);
- ``received``: queued on the connection to received and decoded by the client (send queue,
  socket, client).

All times come from one machine's clock (a local deployment); on several hosts the steps that cross
hosts include their clock offset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hdrh.histogram import HdrHistogram

from drivers.oracle import MAX_LATENCY_US, latency_summary, new_histogram

__all__ = ["STAGES", "StageRecorder", "step_times"]

#: The stages in path order; the step ending at each one is named after it.
STAGES = ("hub_in", "shard_in", "seq", "committed", "fanout", "hub_queued", "received")


def step_times(trace: Mapping[str, Any], sent_ms: float, received_ms: float) -> dict[str, float]:
    """The time (ms) spent in each step of one traced delivery: ``{stage: ms}`` for each stage of
    :data:`STAGES` that ``trace`` (stage -> ms since the epoch) holds, plus ``received``, the first
    step counted from ``sent_ms`` (ms since the epoch). Pure."""
    times = {**trace, "received": received_ms}
    out: dict[str, float] = {}
    prev = float(sent_ms)
    for stage in STAGES:
        at = times.get(stage)
        if at is not None:
            out[stage] = float(at) - prev
            prev = float(at)
    return out


class StageRecorder:
    """Per-step latency histograms of traced ``msg`` receipts."""

    def __init__(self) -> None:
        self.hists: dict[str, HdrHistogram] = {}
        self.traced = 0

    def record(self, msg: Mapping[str, Any], received_ms: float) -> None:
        """Record one receipt of ``msg`` at ``received_ms`` (ms since the epoch); ignores a
        ``msg`` without a ``trace`` or without the driver's send time in ``meta.t``."""
        trace = msg.get("trace")
        meta = msg.get("meta")
        if not isinstance(trace, Mapping) or not isinstance(meta, Mapping) or "t" not in meta:
            return
        self.traced += 1
        for stage, ms in step_times(trace, float(meta["t"]), received_ms).items():
            hist = self.hists.get(stage)
            if hist is None:
                hist = self.hists[stage] = new_histogram()
            hist.record_value(min(max(int(round(ms * 1000.0)), 0), MAX_LATENCY_US))

    def encode(self) -> dict[str, Any]:
        """A picklable, mergeable form: ``{"traced": int, "hists": {step: encoded histogram}}``."""
        return {"traced": self.traced, "hists": {k: h.encode().decode("ascii") for k, h in self.hists.items()}}

    def add_encoded(self, data: Mapping[str, Any]) -> None:
        """Merge another recorder's :meth:`encode` output into this one."""
        self.traced += int(data.get("traced", 0))
        for stage, encoded in (data.get("hists") or {}).items():
            hist = self.hists.get(stage)
            if hist is None:
                hist = self.hists[stage] = new_histogram()
            hist.decode_and_add(encoded)

    def report(self) -> dict[str, Any]:
        """``{"traced": receipts, "steps": {step: {"p50", "p95", "p99", "max", "mean", "count"}}}`` in
        ms, steps in path order; empty ``steps`` when nothing was traced."""
        steps = {s: latency_summary(self.hists[s]) for s in STAGES if s in self.hists}
        return {"traced": self.traced, "steps": steps}
