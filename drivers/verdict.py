"""The one pass/fail rule of a load run: the oracle's findings plus the user's thresholds.

:func:`judge` decides for ``im-actors demo`` and ``python -m drivers.run`` alike. A run fails when

- the oracle found something (DESIGN.md section 10): ``lost``, ``duplicates`` or ``order_violations``
  not 0, ``delivered`` != ``expected_deliveries``, or no message acked at all;
- a chaos fault was not injected (``error``) or no recovery was seen (``recovery_s`` None);
- a threshold is broken.

Thresholds are written as in k6 (``http_req_duration: ['p(95)<200']``), one metric, one comparison,
one number: ``delivery_p99_ms<50``, ``lost==0``, ``throughput>=150``. The metrics (:data:`METRICS`):
``ack_p50_ms``, ``ack_p95_ms``, ``ack_p99_ms``, ``ack_max_ms`` and the same for ``delivery_``
(milliseconds, from the report's ``ack_latency_ms`` / ``delivery_latency_ms``), ``lost``,
``duplicates``, ``order_violations`` (counts), ``throughput`` (acked msgs/s,
``throughput_msgs_per_s``) and, from a run that sampled its resources (:mod:`drivers.resources`),
``mem_slope_mb_per_min`` (the steepest role's RSS slope, MB per minute per process), ``leaked_fds``,
``leaked_tasks`` and ``leaked_connections`` (what the actors held after the run beyond the allowance;
NaN, so broken, when the run did not sample). The comparisons: ``<``, ``<=``, ``>``, ``>=``, ``==``, ``!=``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["METRICS", "Threshold", "Verdict", "judge", "metric_value"]


def _latency(key: str, pct: str) -> Callable[[Mapping[str, Any]], float]:
    return lambda report: float((report.get(key) or {}).get(pct, 0.0))


def _count(key: str) -> Callable[[Mapping[str, Any]], float]:
    return lambda report: float(report.get(key) or 0)


def _nested(section: str, *keys: str) -> Callable[[Mapping[str, Any]], float]:
    """``report[section][keys...]``; NaN when the run has no such figure (no resource sampling), so
    that a threshold on it is broken rather than held by a zero nobody measured."""

    def read(report: Mapping[str, Any]) -> float:
        value: Any = report.get(section)
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        return math.nan if value is None else float(value)

    return read


#: Threshold metric -> how to read it from a report.
METRICS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    **{
        f"{kind}_{pct}_ms": _latency(f"{kind}_latency_ms", pct)
        for kind in ("ack", "delivery")
        for pct in ("p50", "p95", "p99", "max")
    },
    "lost": _count("lost"),
    "duplicates": _count("duplicates"),
    "order_violations": _count("order_violations"),
    "throughput": _count("throughput_msgs_per_s"),
    # drivers.resources: the steepest role's memory slope (MB/min per process) and what the actors
    # held after the run beyond the allowance (see that module for the rule).
    "mem_slope_mb_per_min": _nested("resources", "mem_slope_mb_per_min"),
    "leaked_fds": _nested("leaks", "leaked", "fds"),
    "leaked_tasks": _nested("leaks", "leaked", "tasks"),
    "leaked_connections": _nested("leaks", "leaked", "connections"),
}

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_SYNTAX = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|==|!=|<|>)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")


def metric_value(report: Mapping[str, Any], metric: str) -> float:
    """The value of ``metric`` (a key of :data:`METRICS`) in ``report``; KeyError for an unknown one."""
    return METRICS[metric](report)


@dataclass(frozen=True)
class Threshold:
    """``metric op value``, e.g. ``Threshold("delivery_p99_ms", "<", 50.0)``: the run passes it when
    ``metric_value(report, metric) op value`` holds."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        """Parse ``'delivery_p99_ms<50'``; raises ValueError naming the problem and the known metrics."""
        m = _SYNTAX.match(text)
        if m is None:
            raise ValueError(f"threshold {text!r}: expected METRIC OP NUMBER, e.g. 'delivery_p99_ms<50'")
        metric, op, value = m.groups()
        if metric not in METRICS:
            raise ValueError(f"threshold {text!r}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
        return cls(metric, op, float(value))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def holds(self, report: Mapping[str, Any]) -> bool:
        """Whether ``report`` passes this threshold."""
        return _OPS[self.op](metric_value(report, self.metric), self.value)


@dataclass(frozen=True)
class Verdict:
    """What :func:`judge` decided: ``problems`` (oracle and faults), ``broken`` (thresholds with the
    value seen), ``thresholds`` (all of them, as text); passed when both lists are empty."""

    problems: tuple[str, ...] = ()
    broken: tuple[str, ...] = ()
    thresholds: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """True when nothing was found and no threshold is broken."""
        return not self.problems and not self.broken

    @property
    def exit_code(self) -> int:
        """0 when :attr:`passed`, else 1."""
        return 0 if self.passed else 1

    def reasons(self) -> list[str]:
        """Every reason the run failed, oracle first, in one list (empty when it passed)."""
        return [*self.problems, *self.broken]

    def as_dict(self) -> dict[str, Any]:
        """``{"passed", "problems", "broken_thresholds", "thresholds"}`` for the report."""
        return {
            "passed": self.passed,
            "problems": list(self.reasons()),
            "broken_thresholds": list(self.broken),
            "thresholds": list(self.thresholds),
        }


def _oracle_problems(report: Mapping[str, Any]) -> list[str]:
    problems = [f"{key} = {report[key]}" for key in ("lost", "duplicates", "order_violations") if report.get(key)]
    if report.get("delivered") != report.get("expected_deliveries"):
        problems.append(f"delivered {report.get('delivered')} != expected {report.get('expected_deliveries')}")
    if not report.get("acked"):
        problems.append("no message was acknowledged")
    for fault in report.get("faults") or []:
        if fault.get("error"):
            problems.append(f"fault {fault['kind']} at {fault['at_s']} s not injected: {fault['error']}")
        elif fault.get("recovery_s") is None:
            problems.append(f"fault {fault['kind']} at {fault['at_s']} s: no recovery seen")
    return problems


def judge(report: Mapping[str, Any], thresholds: Iterable[Threshold] = ()) -> Verdict:
    """The verdict on ``report`` (a run report, see :func:`drivers.run.run_workload`) under ``thresholds``."""
    thresholds = tuple(thresholds)
    broken = tuple(
        f"threshold {t} broken: {t.metric} = {metric_value(report, t.metric):g}"
        for t in thresholds
        if not t.holds(report)
    )
    return Verdict(tuple(_oracle_problems(report)), broken, tuple(str(t) for t in thresholds))
