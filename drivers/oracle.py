"""The oracle of DESIGN.md section 10: did every acked entry reach every member device exactly once, in order?

A pure module (no I/O, no asyncio): the drivers feed a :class:`Recorder` as things happen, in each
process; each process turns its recorder into a :class:`Partial`; the partials are merged
(:func:`merge`) and :meth:`Partial.report` computes the numbers. :func:`evaluate` does all of it in one
call, for a single process or a test.

What counts:

- ``sent``: send calls the driver made; ``acked``: distinct (conv, seq) the driver got an ack for.
- ``expected_deliveries``: for every acked entry, the number of expected recipient devices of its
  conversation (every device of every member, the sender's own device included).
- ``delivered``: distinct (device, conv, seq) received by the application where the device is an
  expected recipient and the entry was acked; ``lost = expected_deliveries - delivered``.
- ``duplicates``: receipts of a (device, conv, seq) the device had already received.
- ``order_violations``: receipts whose seq is not greater than the previous one the same device
  received in the same conversation (so a duplicate delivered late counts here too).
- ``ack_latency_ms``: ack time - send time; ``delivery_latency_ms``: receive time - send time, over the
  first receipt by each expected device (the send time travels in the message ``meta`` as ``{"t":
  send_ms}``, so a receiver in another process can compute it; same machine clock). Recorded in
  microseconds in an HdrHistogram (3 significant digits), reported in milliseconds.
- ``ack_latency_from_schedule_ms`` and ``delivery_latency_from_schedule_ms``: the same, measured from
  the time the send was *scheduled* (meta ``{"s": scheduled_ms}``) instead of the time it was issued:
  the coordinated-omission correction of wrk2 (Gil Tene, "How NOT to measure latency"), which counts
  the time a send waited behind a slow driver or a slow previous ack. Empty (count 0) when the driver
  gives no schedule.

Only entries of kind != ``system`` sent by the driver count: :meth:`Recorder.record_msg` skips the rest.
Device keys are ``"<user>/<device>"`` (:func:`device_key`); times are milliseconds since the epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = [
    "AckRecord",
    "Recorder",
    "Partial",
    "merge",
    "evaluate",
    "device_key",
    "new_histogram",
    "latency_summary",
]

#: Highest latency the histograms track: one hour, in microseconds.
MAX_LATENCY_US = 3_600_000_000
_SIG_FIGS = 3


def device_key(user: str, device: str = "d1") -> str:
    """The key of one device in recipients and receipts: ``"<user>/<device>"``."""
    return f"{user}/{device}"


def new_histogram() -> HdrHistogram:
    """An empty latency histogram: microseconds, 1 us .. 1 h, 3 significant digits."""
    return HdrHistogram(1, MAX_LATENCY_US, _SIG_FIGS)


def _record_ms(hist: HdrHistogram, ms: float) -> None:
    hist.record_value(min(max(int(round(ms * 1000.0)), 0), MAX_LATENCY_US))


def latency_summary(hist: HdrHistogram) -> dict[str, float | int]:
    """``{"p50", "p95", "p99", "max", "mean"}`` in milliseconds (3 decimals) and ``"count"``; zeros when empty."""
    count = hist.get_total_count()
    if count == 0:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0, "count": 0}
    pct = hist.get_percentile_to_value_dict([50.0, 95.0, 99.0])
    return {
        "p50": round(pct[50.0] / 1000.0, 3),
        "p95": round(pct[95.0] / 1000.0, 3),
        "p99": round(pct[99.0] / 1000.0, 3),
        "max": round(hist.get_max_value() / 1000.0, 3),
        "mean": round(hist.get_mean_value() / 1000.0, 3),
        "count": int(count),
    }


@dataclass(frozen=True)
class AckRecord:
    """One acked send: entry (``conv``, ``seq``), ``send_ms`` when the send was first issued, ``ack_ms``
    when its ack arrived (ms since the epoch)."""

    conv: str
    seq: int
    send_ms: float
    ack_ms: float


class _SeqSet:
    """A set of positive seqs as a bitmap (one bit per seq: dense and cheap for contiguous streams)."""

    __slots__ = ("bits",)

    def __init__(self) -> None:
        self.bits = bytearray()

    def add(self, seq: int) -> bool:
        """Add ``seq``; False when it was already there."""
        byte, bit = divmod(seq, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(max(byte + 1 - len(self.bits), len(self.bits))))
        mask = 1 << bit
        if self.bits[byte] & mask:
            return False
        self.bits[byte] |= mask
        return True


@dataclass
class Partial:
    """One process's share of a run, mergeable with :func:`merge`; :meth:`report` gives the numbers.

    ``recipients``: conv -> number of expected devices. ``acked``: conv -> set of acked seqs.
    ``received``: conv -> seq -> number of distinct expected devices (of this process) that received it.
    Times (``first_send_ms``, ``first_ack_ms``, ``last_ack_ms``, ``last_recv_ms``) are ms since the epoch, None when
    nothing happened.
    """

    sent: int = 0
    acked: dict[str, set[int]] = field(default_factory=dict)
    recipients: dict[str, int] = field(default_factory=dict)
    received: dict[str, dict[int, int]] = field(default_factory=dict)
    receipts: int = 0
    duplicates: int = 0
    order_violations: int = 0
    unexpected: int = 0
    ack_hist: HdrHistogram = field(default_factory=new_histogram)
    delivery_hist: HdrHistogram = field(default_factory=new_histogram)
    ack_sched_hist: HdrHistogram = field(default_factory=new_histogram)
    delivery_sched_hist: HdrHistogram = field(default_factory=new_histogram)
    first_send_ms: float | None = None
    first_ack_ms: float | None = None
    last_ack_ms: float | None = None
    last_recv_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A picklable, msgpack/JSON-friendly form (histograms encoded) to send to another process."""
        return {
            "sent": self.sent,
            "acked": {conv: sorted(seqs) for conv, seqs in self.acked.items()},
            "recipients": dict(self.recipients),
            "received": {conv: [[seq, n] for seq, n in by_seq.items()] for conv, by_seq in self.received.items()},
            "receipts": self.receipts,
            "duplicates": self.duplicates,
            "order_violations": self.order_violations,
            "unexpected": self.unexpected,
            "ack_hist": self.ack_hist.encode().decode("ascii"),
            "delivery_hist": self.delivery_hist.encode().decode("ascii"),
            "ack_sched_hist": self.ack_sched_hist.encode().decode("ascii"),
            "delivery_sched_hist": self.delivery_sched_hist.encode().decode("ascii"),
            "first_send_ms": self.first_send_ms,
            "first_ack_ms": self.first_ack_ms,
            "last_ack_ms": self.last_ack_ms,
            "last_recv_ms": self.last_recv_ms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Partial:
        """Inverse of :meth:`to_dict`."""
        return cls(
            sent=int(data["sent"]),
            acked={conv: set(seqs) for conv, seqs in data["acked"].items()},
            recipients={conv: int(n) for conv, n in data["recipients"].items()},
            received={conv: {int(s): int(n) for s, n in pairs} for conv, pairs in data["received"].items()},
            receipts=int(data["receipts"]),
            duplicates=int(data["duplicates"]),
            order_violations=int(data["order_violations"]),
            unexpected=int(data["unexpected"]),
            ack_hist=_decode_hist(data["ack_hist"]),
            delivery_hist=_decode_hist(data["delivery_hist"]),
            ack_sched_hist=_decode_hist(data["ack_sched_hist"]) if "ack_sched_hist" in data else new_histogram(),
            delivery_sched_hist=(
                _decode_hist(data["delivery_sched_hist"]) if "delivery_sched_hist" in data else new_histogram()
            ),
            first_send_ms=data.get("first_send_ms"),
            first_ack_ms=data.get("first_ack_ms"),
            last_ack_ms=data.get("last_ack_ms"),
            last_recv_ms=data.get("last_recv_ms"),
        )

    def report(self) -> dict[str, Any]:
        """The oracle's numbers: sent, acked, unacked, expected_deliveries, delivered, lost, duplicates,
        lost_entries (up to 20 acked entries some expected device never got: conv, seq, devices that
        got it, devices expected), order_violations, unexpected_deliveries (by devices that are not
        members), delivered_unacked
        (deliveries of entries whose ack the driver never got), ack_latency_ms, delivery_latency_ms,
        ack_latency_from_schedule_ms, delivery_latency_from_schedule_ms."""
        acked = sum(len(seqs) for seqs in self.acked.values())
        expected = delivered = 0
        short: list[dict[str, Any]] = []  # entries some expected device never got, for diagnosis
        for conv, seqs in self.acked.items():
            n = self.recipients.get(conv, 0)
            expected += n * len(seqs)
            by_seq = self.received.get(conv, {})
            delivered += sum(min(by_seq.get(seq, 0), n) for seq in seqs)
            short += [
                {"conv": conv, "seq": seq, "devices": by_seq.get(seq, 0), "expected_devices": n}
                for seq in sorted(seqs)
                if by_seq.get(seq, 0) < n and len(short) < _LOST_EXAMPLES
            ]
        delivered_unacked = sum(
            n
            for conv, by_seq in self.received.items()
            for seq, n in by_seq.items()
            if seq not in self.acked.get(conv, ())
        )
        return {
            "sent": self.sent,
            "acked": acked,
            "unacked": max(self.sent - acked, 0),
            "expected_deliveries": expected,
            "delivered": delivered,
            "lost": expected - delivered,
            "lost_entries": short[:_LOST_EXAMPLES],
            "duplicates": self.duplicates,
            "order_violations": self.order_violations,
            "unexpected_deliveries": self.unexpected,
            "delivered_unacked": delivered_unacked,
            "ack_latency_ms": latency_summary(self.ack_hist),
            "delivery_latency_ms": latency_summary(self.delivery_hist),
            "ack_latency_from_schedule_ms": latency_summary(self.ack_sched_hist),
            "delivery_latency_from_schedule_ms": latency_summary(self.delivery_sched_hist),
        }


#: How many short entries a report lists (``lost_entries``).
_LOST_EXAMPLES = 20


def _decode_hist(encoded: str | bytes) -> HdrHistogram:
    hist = new_histogram()
    other = HdrHistogram.decode(encoded)
    if other.get_total_count():
        hist.add(other)
    return hist


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def merge(partials: Iterable[Partial]) -> Partial:
    """One :class:`Partial` holding the union of several (counts summed, sets united, histograms added)."""
    out = Partial()
    for p in partials:
        out.sent += p.sent
        for conv, seqs in p.acked.items():
            out.acked.setdefault(conv, set()).update(seqs)
        for conv, n in p.recipients.items():
            out.recipients[conv] = max(out.recipients.get(conv, 0), n)
        for conv, by_seq in p.received.items():
            dst = out.received.setdefault(conv, {})
            for seq, n in by_seq.items():
                dst[seq] = dst.get(seq, 0) + n
        out.receipts += p.receipts
        out.duplicates += p.duplicates
        out.order_violations += p.order_violations
        out.unexpected += p.unexpected
        out.ack_hist.add(p.ack_hist)
        out.delivery_hist.add(p.delivery_hist)
        out.ack_sched_hist.add(p.ack_sched_hist)
        out.delivery_sched_hist.add(p.delivery_sched_hist)
        out.first_send_ms = _min(out.first_send_ms, p.first_send_ms)
        out.first_ack_ms = _min(out.first_ack_ms, p.first_ack_ms)
        out.last_ack_ms = _max(out.last_ack_ms, p.last_ack_ms)
        out.last_recv_ms = _max(out.last_recv_ms, p.last_recv_ms)
    return out


class Recorder:
    """Collects what one process saw, as it happens: sends, acks and application receipts.

    ``recipients``: conv -> the device keys expected to receive its entries. Set it (or call
    :meth:`set_recipients`) before the first receipt.
    """

    def __init__(self, recipients: Mapping[str, Iterable[str]] | None = None) -> None:
        self._recipients: dict[str, frozenset[str]] = {}
        self._part = Partial()
        self._seen: dict[tuple[str, str], _SeqSet] = {}
        self._last: dict[tuple[str, str], int] = {}
        self._send_ms: dict[tuple[str, int], float] = {}
        self._sched_ms: dict[tuple[str, int], float] = {}
        if recipients is not None:
            self.set_recipients(recipients)

    def set_recipients(self, recipients: Mapping[str, Iterable[str]]) -> None:
        """Add or replace the expected recipient devices of some conversations."""
        for conv, devices in recipients.items():
            self._recipients[conv] = frozenset(devices)
            self._part.recipients[conv] = len(self._recipients[conv])

    @property
    def receipts(self) -> int:
        """How many receipts were recorded so far (duplicates included): the drain watches it."""
        return self._part.receipts

    def add_sent(self, n: int = 1, at_ms: float | None = None) -> None:
        """Count ``n`` send calls, the first issued at ``at_ms``."""
        self._part.sent += n
        self._part.first_send_ms = _min(self._part.first_send_ms, at_ms)

    def add_ack(self, conv: str, seq: int, send_ms: float, ack_ms: float, scheduled_ms: float | None = None) -> None:
        """Record the ack of entry (``conv``, ``seq``), sent at ``send_ms``, acked at ``ack_ms``; with
        ``scheduled_ms`` (when the send was due) also its latency from the schedule."""
        p = self._part
        p.acked.setdefault(conv, set()).add(seq)
        _record_ms(p.ack_hist, ack_ms - send_ms)
        if scheduled_ms is not None:
            _record_ms(p.ack_sched_hist, ack_ms - scheduled_ms)
            self._sched_ms[(conv, seq)] = scheduled_ms
        p.last_ack_ms = _max(p.last_ack_ms, ack_ms)
        p.first_ack_ms = _min(p.first_ack_ms, ack_ms)
        p.first_send_ms = _min(p.first_send_ms, send_ms)
        self._send_ms[(conv, seq)] = send_ms

    def add_receipt(
        self,
        device: str,
        conv: str,
        seq: int,
        recv_ms: float,
        send_ms: float | None = None,
        scheduled_ms: float | None = None,
    ) -> None:
        """Record that the application of ``device`` received (``conv``, ``seq``) at ``recv_ms``.

        ``send_ms`` (from the message meta) gives the delivery latency; when None, the send time of a
        local ack of the same entry is used, if any. ``scheduled_ms`` (meta ``s``, or a local ack's)
        gives the delivery latency from the schedule in the same way.
        """
        p = self._part
        p.receipts += 1
        p.last_recv_ms = _max(p.last_recv_ms, recv_ms)
        key = (device, conv)
        last = self._last.get(key)
        if last is not None and seq <= last:
            p.order_violations += 1
        self._last[key] = seq if last is None else max(last, seq)
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = _SeqSet()
        if not seen.add(seq):
            p.duplicates += 1
            return
        if device not in self._recipients.get(conv, ()):
            p.unexpected += 1
            return
        by_seq = p.received.setdefault(conv, {})
        by_seq[seq] = by_seq.get(seq, 0) + 1
        if send_ms is None:
            send_ms = self._send_ms.get((conv, seq))
        if send_ms is not None:
            _record_ms(p.delivery_hist, recv_ms - send_ms)
        if scheduled_ms is None:
            scheduled_ms = self._sched_ms.get((conv, seq))
        if scheduled_ms is not None:
            _record_ms(p.delivery_sched_hist, recv_ms - scheduled_ms)

    def record_msg(self, device: str, msg: Mapping[str, Any], recv_ms: float) -> bool:
        """Record a delivered ``msg`` map if it is a driver entry (kind != system, ``meta.t`` present;
        ``meta.s``, the scheduled send time, is used when present).

        Returns True when it was recorded.
        """
        if msg.get("kind") == "system":
            return False
        meta = msg.get("meta")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("t"), (int, float)):
            return False
        sched = meta.get("s")
        scheduled_ms = float(sched) if isinstance(sched, (int, float)) else None
        self.add_receipt(device, str(msg["conv"]), int(msg["seq"]), recv_ms, float(meta["t"]), scheduled_ms)
        return True

    def partial(self) -> Partial:
        """This process's :class:`Partial` (the live object: take it once the run is over)."""
        return self._part


def evaluate(
    acked: Iterable[AckRecord | Sequence[Any]],
    recipients: Mapping[str, Iterable[str]],
    received: Mapping[str, Iterable[Sequence[Any]]],
    sent: int | None = None,
) -> dict[str, Any]:
    """The whole oracle in one call (one process): the :meth:`Partial.report` dict.

    ``acked``: :class:`AckRecord` or tuples ``(conv, seq, send_ms, ack_ms)``; ``recipients``: conv ->
    device keys; ``received``: device key -> its ordered receipts ``(conv, seq, recv_ms)`` or
    ``(conv, seq, recv_ms, send_ms)``; ``sent``: send calls (default: the number of acks given).
    """
    rec = Recorder(recipients)
    n_acks = 0
    for a in acked:
        conv, seq, send_ms, ack_ms = (a.conv, a.seq, a.send_ms, a.ack_ms) if isinstance(a, AckRecord) else a
        rec.add_ack(conv, int(seq), float(send_ms), float(ack_ms))
        n_acks += 1
    rec.add_sent(n_acks if sent is None else sent)
    for device, receipts in received.items():
        for r in receipts:
            send_ms = float(r[3]) if len(r) > 3 and r[3] is not None else None
            rec.add_receipt(device, str(r[0]), int(r[1]), float(r[2]), send_ms)
    return rec.partial().report()
