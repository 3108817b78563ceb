"""The live status line (drivers.live): what it shows, merged over processes, and nothing when disabled."""

from __future__ import annotations

import io

from drivers.live import LiveView, PartProgress
from drivers.oracle import new_histogram


def _lines(buf: io.StringIO) -> list[str]:
    return [line.strip() for line in buf.getvalue().replace("\r", "\n").splitlines() if line.strip()]


def test_the_line_merges_processes_and_shows_rates_p99_errors_and_faults() -> None:
    buf = io.StringIO()
    faults = ["hub 2s"]
    view = LiveView(2, enabled=True, faults=lambda: faults, file=buf, refresh_s=0.0)
    parts = [PartProgress(ack_hist=new_histogram()), PartProgress(ack_hist=new_histogram())]
    for i, p in enumerate(parts):
        p.enter("connecting", 10)
        p.done = 10
        view.update(i, p.snapshot(encode=i == 1))  # process 1 as a child sends it: histogram encoded
    assert "connecting" in _lines(buf)[-1] and "20/20" in _lines(buf)[-1]
    for i, p in enumerate(parts):
        p.enter("sending", 50)
        p.done = p.sent = p.acked = 40
        p.errors = i
        for ms in range(1, 101):
            p.ack_hist.record_value(ms * 1000)  # 1..100 ms
    view.update(0, parts[0].snapshot(encode=False))
    line = _lines(buf)[-1]
    # process 1 has not left connecting yet: the run is in the phase of its slowest process
    assert "connecting" in line and "20/20" in line
    view.update(1, parts[1].snapshot(encode=True))
    line = _lines(buf)[-1]
    assert "80/100" in line and "errors 1" in line and "faults: hub 2s" in line
    assert "ack p99 99.0 ms" in line or "ack p99 99.1 ms" in line
    assert "acked" in line and "/s" in line and "elapsed" in line
    parts[0].enter("draining", 20)
    view.update(0, parts[0].snapshot(encode=False))
    assert "sending" in _lines(buf)[-1] and "80/100" in _lines(buf)[-1]
    faults.clear()
    view.close()
    assert "faults" not in _lines(buf)[-1]


def test_disabled_draws_nothing() -> None:
    buf = io.StringIO()
    view = LiveView(1, enabled=False, file=buf)
    p = PartProgress()
    p.enter("sending", 3)
    view.update(0, p.snapshot(encode=False))
    view.close()
    assert buf.getvalue() == ""


def test_phase_changes_are_announced_even_when_the_line_is_not_drawn() -> None:
    seen: list[str] = []
    view = LiveView(2, enabled=False, on_phase=seen.append)
    parts = [PartProgress(), PartProgress()]
    for i, p in enumerate(parts):
        view.update(i, p.snapshot(encode=False))
    for phase in ("groups", "sending"):
        parts[0].enter(phase, 1)
        view.update(0, parts[0].snapshot(encode=False))  # process 1 still connecting: no change yet
        assert seen[-1] == "connecting"
    parts[1].enter("sending", 1)
    view.update(1, parts[1].snapshot(encode=False))
    assert seen == ["connecting", "sending"] and view.phase == "sending"
