"""The one verdict rule (drivers.verdict): the oracle's findings plus k6-style thresholds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from drivers import run as run_module
from drivers.verdict import METRICS, Threshold, judge, metric_value


def _report(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sent": 10,
        "acked": 10,
        "expected_deliveries": 30,
        "delivered": 30,
        "lost": 0,
        "duplicates": 0,
        "order_violations": 0,
        "throughput_msgs_per_s": 150.0,
        "ack_latency_ms": {"p50": 3.0, "p95": 9.0, "p99": 12.5, "max": 40.0},
        "delivery_latency_ms": {"p50": 4.0, "p95": 20.0, "p99": 61.0, "max": 80.0},
    }
    base.update(over)
    return base


def test_parse_every_metric_and_comparison() -> None:
    assert Threshold.parse("delivery_p99_ms<50") == Threshold("delivery_p99_ms", "<", 50.0)
    assert Threshold.parse(" lost == 0 ") == Threshold("lost", "==", 0.0)
    assert Threshold.parse("throughput>=1.5e2") == Threshold("throughput", ">=", 150.0)
    assert str(Threshold.parse("ack_max_ms<=100")) == "ack_max_ms<=100"
    assert set(METRICS) == {
        *(f"{k}_{p}_ms" for k in ("ack", "delivery") for p in ("p50", "p95", "p99", "max")),
        "lost",
        "duplicates",
        "order_violations",
        "throughput",
        "mem_slope_mb_per_min",
        "leaked_fds",
        "leaked_tasks",
        "leaked_connections",
    }
    r = _report()
    assert [metric_value(r, m) for m in ("ack_p99_ms", "delivery_max_ms", "throughput", "lost")] == [12.5, 80, 150, 0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("delivery_p99<50", "unknown metric 'delivery_p99'"),
        ("delivery_p99_ms<", "expected METRIC OP NUMBER"),
        ("delivery_p99_ms=<50", "expected METRIC OP NUMBER"),
        ("p(99)<50", "expected METRIC OP NUMBER"),
    ],
)
def test_bad_thresholds_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Threshold.parse(text)


def test_a_clean_run_passes_and_a_broken_threshold_fails_it() -> None:
    r = _report()
    assert judge(r).passed and judge(r).exit_code == 0
    ok = judge(r, [Threshold.parse("ack_p99_ms<50"), Threshold.parse("lost==0")])
    assert ok.passed and ok.thresholds == ("ack_p99_ms<50", "lost==0")
    bad = judge(r, [Threshold.parse("delivery_p99_ms<50"), Threshold.parse("throughput>200")])
    assert not bad.passed and bad.exit_code == 1 and not bad.problems
    assert bad.broken == (
        "threshold delivery_p99_ms<50 broken: delivery_p99_ms = 61",
        "threshold throughput>200 broken: throughput = 150",
    )
    assert bad.as_dict()["broken_thresholds"] == list(bad.broken)


def test_the_oracle_fails_a_run_whatever_the_thresholds() -> None:
    v = judge(_report(lost=2, delivered=28, duplicates=1), [Threshold.parse("lost<5")])
    assert v.problems == ("lost = 2", "duplicates = 1", "delivered 28 != expected 30")
    assert not v.broken and not v.passed
    assert judge(_report(acked=0)).problems == ("no message was acknowledged",)
    faults = [
        {"kind": "hub", "at_s": 3.0, "recovery_s": None, "error": None},
        {"kind": "mongodb", "at_s": 9.0, "recovery_s": None, "error": "no server"},
        {"kind": "conv", "at_s": 12.0, "recovery_s": 1.0, "error": None},
    ]
    assert judge(_report(faults=faults)).problems == (
        "fault hub at 3.0 s: no recovery seen",
        "fault mongodb at 9.0 s not injected: no server",
    )


def test_drivers_run_exits_1_on_a_broken_threshold_and_says_which(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fake_run(args: Any) -> dict[str, Any]:
        return _report()

    monkeypatch.setattr(run_module, "_main_async", fake_run)
    argv = ["--router", "http://x", "--threshold", "delivery_p99_ms<50", "--threshold", "lost==0", "synthetic"]
    assert run_module.main(argv) == 1
    out, err = capsys.readouterr()
    assert "FAILED: threshold delivery_p99_ms<50 broken: delivery_p99_ms = 61" in err
    assert json.loads(out)["verdict"]["broken_thresholds"] == [
        "threshold delivery_p99_ms<50 broken: delivery_p99_ms = 61"
    ]
    assert run_module.main(["--router", "http://x", "--threshold", "delivery_p99_ms<100", "synthetic"]) == 0
    assert "OK: thresholds held: delivery_p99_ms<100" in capsys.readouterr().err
    assert run_module.main(["--router", "http://x", "synthetic"]) == 0


def test_drivers_run_refuses_a_bad_threshold_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    async def must_not_run(args: Any) -> dict[str, Any]:
        raise AssertionError("ran")

    monkeypatch.setattr(run_module, "_main_async", must_not_run)
    with pytest.raises(SystemExit) as exc:
        run_module.main(["--router", "http://x", "--threshold", "nope<1", "synthetic"])
    assert exc.value.code == 2
