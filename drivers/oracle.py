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

For the plots of :mod:`im_actors.report` the partial also keeps a timeline: per wall-clock second
(``int(ms // 1000)`` of the event's time) the sends issued, acks received and deliveries counted
there, and per-second HdrHistograms (2 significant digits) of the ack latencies (by ack time) and
delivery latencies (by receive time), whose p99 the report gives per second. The report carries
the whole-run histograms too, in hdrhistogram's own encoding (:meth:`HdrHistogram.encode`: V2,
zlib-compressed, base64; values in microseconds), so a reader can recompute any percentile.

Only entries of kind != ``system`` sent by the driver count: :meth:`Recorder.record_msg` skips the rest.
Device keys are ``"<user>/<device>"`` (:func:`device_key`); times are milliseconds since the epoch.
"""

from __future__ import annotations

from array import array
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
    "decode_histogram",
    "HISTOGRAM_ENCODING",
]

#: Highest latency the histograms track: one hour, in microseconds.
MAX_LATENCY_US = 3_600_000_000
_SIG_FIGS = 3
#: Per-second histograms are coarser (2 significant digits: about 26 KB each instead of 190 KB).
_SECOND_SIG_FIGS = 2
#: Deliveries a :class:`Partial` holds before it folds their latencies into its histograms
#: (:meth:`Partial.settle`): 24 bytes each, so at most 12 MB per process.
PENDING_DELIVERIES_MAX = 500_000
_NAN = float("nan")
#: How the report's ``histograms`` are encoded (see :func:`decode_histogram`).
HISTOGRAM_ENCODING = "hdrhistogram V2 (HdrHistogram.encode: zlib, base64), values in microseconds"


def device_key(user: str, device: str = "d1") -> str:
    """The key of one device in recipients and receipts: ``"<user>/<device>"``."""
    return f"{user}/{device}"


def new_histogram() -> HdrHistogram:
    """An empty latency histogram: microseconds, 1 us .. 1 h, 3 significant digits."""
    return HdrHistogram(1, MAX_LATENCY_US, _SIG_FIGS)


def _second_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, _SECOND_SIG_FIGS)


def decode_histogram(encoded: str | bytes) -> HdrHistogram:
    """A histogram of the report's ``histograms`` (see :data:`HISTOGRAM_ENCODING`); values in us.

    Raises ``ValueError`` or ``zlib.error`` (from hdrh) when ``encoded`` is not such a histogram.
    """
    return HdrHistogram.decode(encoded)


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
    #: Epoch second -> [sends issued, acks received, deliveries counted] in that second.
    seconds: dict[int, list[int]] = field(default_factory=dict)
    #: Epoch second -> latencies (us) of the acks / deliveries of that second.
    ack_by_s: dict[int, HdrHistogram] = field(default_factory=dict)
    delivery_by_s: dict[int, HdrHistogram] = field(default_factory=dict)
    #: Deliveries not yet in the delivery histograms: flat ``(recv_ms, latency ms, latency from the
    #: schedule ms)`` triples, NaN where unknown (see :meth:`settle`).
    pending: array[float] = field(default_factory=lambda: array("d"), repr=False, compare=False)

    def add_delivery(self, recv_ms: float, latency_ms: float | None, sched_latency_ms: float | None) -> None:
        """Note one delivery's latencies (ms; None when unknown) for the delivery histograms."""
        pending = self.pending
        pending.append(recv_ms)
        pending.append(_NAN if latency_ms is None else latency_ms)
        pending.append(_NAN if sched_latency_ms is None else sched_latency_ms)
        if len(pending) >= 3 * PENDING_DELIVERIES_MAX:
            self.settle()

    def settle(self) -> None:
        """Fold the pending deliveries into ``delivery_hist``, ``delivery_by_s`` and
        ``delivery_sched_hist``. Every reader of them calls it first (:meth:`to_dict`,
        :meth:`report`, :meth:`timeline`, :func:`merge`).

        Why: a delivery is recorded in three HdrHistograms, about 1 us each in the pure-Python hdrh,
        which was 15 % of the load generator's CPU in a 200-member group's fan-out (py-spy); noting
        three floats costs a fraction of it, and the histograms take them when the numbers are read
        (or every :data:`PENDING_DELIVERIES_MAX` deliveries), after the measured send phase. The
        same values end up in the same histograms."""
        pending, self.pending = self.pending, array("d")
        it = iter(pending)
        for recv_ms, latency_ms, sched_ms in zip(it, it, it, strict=True):
            if latency_ms == latency_ms:  # not NaN
                _record_ms(self.delivery_hist, latency_ms)
                _record_ms(_per_second(self.delivery_by_s, recv_ms), latency_ms)
            if sched_ms == sched_ms:
                _record_ms(self.delivery_sched_hist, sched_ms)

    def count(self, at_ms: float, column: int, n: int = 1) -> None:
        """Add ``n`` to ``column`` (0 sent, 1 acked, 2 delivered) of the second of ``at_ms``."""
        row = self.seconds.get(sec := int(at_ms // 1000))
        if row is None:
            row = self.seconds[sec] = [0, 0, 0]
        row[column] += n

    def to_dict(self) -> dict[str, Any]:
        """A picklable, msgpack/JSON-friendly form (histograms encoded) to send to another process."""
        self.settle()
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
            "seconds": [[sec, *row] for sec, row in self.seconds.items()],
            "ack_by_s": [[sec, h.encode().decode("ascii")] for sec, h in self.ack_by_s.items()],
            "delivery_by_s": [[sec, h.encode().decode("ascii")] for sec, h in self.delivery_by_s.items()],
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
            seconds={int(r[0]): [int(v) for v in r[1:]] for r in data.get("seconds", [])},
            ack_by_s={int(sec): _decode_hist(h, _SECOND_SIG_FIGS) for sec, h in data.get("ack_by_s", [])},
            delivery_by_s={int(sec): _decode_hist(h, _SECOND_SIG_FIGS) for sec, h in data.get("delivery_by_s", [])},
        )

    def report(self) -> dict[str, Any]:
        """The oracle's numbers: sent, acked, unacked, expected_deliveries, delivered, lost, duplicates,
        lost_entries (up to 20 acked entries some expected device never got: conv, seq, devices that
        got it, devices expected), order_violations, unexpected_deliveries (by devices that are not
        members), delivered_unacked
        (deliveries of entries whose ack the driver never got), ack_latency_ms, delivery_latency_ms,
        ack_latency_from_schedule_ms, delivery_latency_from_schedule_ms, ``timeline``
        (:meth:`timeline`) and ``histograms`` (``{"encoding", "ack_latency_us", "delivery_latency_us"}``,
        see :data:`HISTOGRAM_ENCODING`)."""
        self.settle()
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
            "timeline": self.timeline(),
            "histograms": {
                "encoding": HISTOGRAM_ENCODING,
                "ack_latency_us": self.ack_hist.encode().decode("ascii"),
                "delivery_latency_us": self.delivery_hist.encode().decode("ascii"),
            },
        }

    def timeline(self) -> dict[str, Any]:
        """The run second by second, as columns: ``{"start_ms", "step_s": 1, "sent", "acked",
        "delivered", "ack_p99_ms", "delivery_p99_ms"}``; entry i covers ``[start_ms + 1000 i,
        start_ms + 1000 (i + 1))`` (epoch ms), from the first second with an event to the last, and
        a p99 is 0.0 in a second without acks / deliveries. ``start_ms`` is None when nothing happened."""
        self.settle()
        secs = set(self.seconds) | set(self.ack_by_s) | set(self.delivery_by_s)
        if not secs:
            return {"start_ms": None, "step_s": 1, **{k: [] for k in _TIMELINE_COLUMNS}}
        first, last = min(secs), max(secs)
        rows = [self.seconds.get(sec, [0, 0, 0]) for sec in range(first, last + 1)]

        def p99(by_s: dict[int, HdrHistogram], sec: int) -> float:
            h = by_s.get(sec)
            return round(h.get_value_at_percentile(99.0) / 1000.0, 3) if h is not None and h.get_total_count() else 0.0

        return {
            "start_ms": first * 1000,
            "step_s": 1,
            "sent": [r[0] for r in rows],
            "acked": [r[1] for r in rows],
            "delivered": [r[2] for r in rows],
            "ack_p99_ms": [p99(self.ack_by_s, sec) for sec in range(first, last + 1)],
            "delivery_p99_ms": [p99(self.delivery_by_s, sec) for sec in range(first, last + 1)],
        }


#: How many short entries a report lists (``lost_entries``).
_LOST_EXAMPLES = 20
_TIMELINE_COLUMNS = ("sent", "acked", "delivered", "ack_p99_ms", "delivery_p99_ms")


def _decode_hist(encoded: str | bytes, sig_figs: int = _SIG_FIGS) -> HdrHistogram:
    hist = HdrHistogram(1, MAX_LATENCY_US, sig_figs)
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
        p.settle()
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
        for sec, row in p.seconds.items():
            for column, n in enumerate(row):
                out.count(sec * 1000, column, n)
        for src, dst_by_s in ((p.ack_by_s, out.ack_by_s), (p.delivery_by_s, out.delivery_by_s)):
            for sec, h in src.items():
                if sec not in dst_by_s:
                    dst_by_s[sec] = _second_histogram()
                dst_by_s[sec].add(h)
    return out


def _per_second(by_s: dict[int, HdrHistogram], at_ms: float) -> HdrHistogram:
    hist = by_s.get(sec := int(at_ms // 1000))
    if hist is None:
        hist = by_s[sec] = _second_histogram()
    return hist


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
        if at_ms is not None:
            self._part.count(at_ms, 0, n)

    def add_ack(self, conv: str, seq: int, send_ms: float, ack_ms: float, scheduled_ms: float | None = None) -> None:
        """Record the ack of entry (``conv``, ``seq``), sent at ``send_ms``, acked at ``ack_ms``; with
        ``scheduled_ms`` (when the send was due) also its latency from the schedule."""
        p = self._part
        p.acked.setdefault(conv, set()).add(seq)
        _record_ms(p.ack_hist, ack_ms - send_ms)
        if scheduled_ms is not None:
            _record_ms(p.ack_sched_hist, ack_ms - scheduled_ms)
            self._sched_ms[(conv, seq)] = scheduled_ms
        p.count(ack_ms, 1)
        _record_ms(_per_second(p.ack_by_s, ack_ms), ack_ms - send_ms)
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
        p.count(recv_ms, 2)
        if send_ms is None:
            send_ms = self._send_ms.get((conv, seq))
        if scheduled_ms is None:
            scheduled_ms = self._sched_ms.get((conv, seq))
        p.add_delivery(
            recv_ms,
            None if send_ms is None else recv_ms - send_ms,
            None if scheduled_ms is None else recv_ms - scheduled_ms,
        )

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
