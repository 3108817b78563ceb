"""Plots of a load run's JSON report: latency CDFs, the run second by second, the faults as spans.

Input is the report that ``im-actors demo`` and ``python -m drivers.run`` write (see
:func:`drivers.run.run_workload`); what is drawn comes from three of its keys:

- ``histograms``: the whole run's ack and delivery latencies as HdrHistograms in hdrhistogram's own
  encoding (:meth:`hdrh.histogram.HdrHistogram.encode`, values in microseconds);
- ``timeline``: per second ``sent``, ``acked``, ``delivered`` (counts) and ``ack_p99_ms``,
  ``delivery_p99_ms``, from ``start_ms`` (epoch ms);
- ``faults`` (chaos runs): ``kind``, ``target``, ``at_ms`` (epoch ms), ``recovery_s`` (None: not seen).

Three figures (:data:`FIGURES`): ``latency_cdf`` (one axes, log-scale latency axis), ``throughput``
(msgs/s per second) and ``p99`` (ms per second, log scale); the last two mark every fault as a span
from its injection to its recovery, labelled with the kind and the recovery time. A report with a
``resources`` section (``drivers.resources``: per actor ``t_s``, ``rss_bytes``, ``restarts_at_s``,
per role ``mem_slope_mb_per_min``) adds ``memory`` (:data:`RESOURCE_FIGURES`): one axes per role,
each process's RSS over time, its restarts dotted, the faults as spans; the page then also shows
the ``resources`` and ``leaks`` tables. :func:`write_png`
writes them as PNG files, :func:`write_html` one self-contained HTML page (the PNGs embedded as
``data:`` URIs, no script, no network: it opens offline). matplotlib runs with its Agg backend (no
display needed). No Ray, no services: this module reads a dict.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, no display

from hdrh.histogram import HdrHistogram  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

__all__ = ["FIGURES", "RESOURCE_FIGURES", "load_report", "figures", "write_png", "write_html", "render_html"]

#: The figures, in page order: name -> title.
FIGURES = {
    "latency_cdf": "Latency CDF (ack and delivery)",
    "throughput": "Throughput per second",
    "p99": "p99 latency per second",
}

#: Drawn when the report has a ``resources`` section: name -> title.
RESOURCE_FIGURES = {"memory": "Memory (RSS) per role over time"}

_SUMMARY_KEYS = (
    ("sent", "sent"),
    ("acked", "acked"),
    ("delivered", "deliveries"),
    ("expected_deliveries", "expected deliveries"),
    ("lost", "lost"),
    ("duplicates", "duplicates"),
    ("order_violations", "order violations"),
    ("clients", "clients"),
    ("duration_s", "send phase (s)"),
    ("throughput_msgs_per_s", "throughput (msgs/s)"),
    ("deliveries_per_s", "deliveries/s"),
)


def load_report(path: str | Path) -> dict[str, Any]:
    """The report at ``path`` (JSON). Raises ``OSError`` or ``ValueError`` (not JSON, or no
    ``histograms``/``timeline``: a report from before they were kept)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "histograms" not in data or "timeline" not in data:
        raise ValueError(f"{path}: not a run report with 'histograms' and 'timeline'")
    return data


def _cdf(encoded: str) -> tuple[list[float], list[float]]:
    """(latency ms, cumulative fraction) at every recorded value of an encoded histogram (us)."""
    hist = HdrHistogram.decode(encoded)
    total = hist.get_total_count()
    xs: list[float] = []
    ys: list[float] = []
    if not total:
        return xs, ys
    for item in hist.get_recorded_iterator():
        xs.append(max(item.value_iterated_to, 1) / 1000.0)
        ys.append(item.total_count_to_this_value / total)
    return xs, ys


def _fault_spans(ax: Axes, report: Mapping[str, Any], start_ms: float, end_s: float, labels: bool = True) -> None:
    """Shade each fault from injection to recovery (to the end, red, when none was seen); ``labels``:
    write its kind and recovery time beside it."""
    for fault in report.get("faults") or []:
        at_ms = fault.get("at_ms")
        if at_ms is None:
            continue
        at_s = (float(at_ms) - start_ms) / 1000.0
        rec = fault.get("recovery_s")
        until = at_s + float(rec) if rec is not None else max(end_s, at_s + 1.0)
        color = "tab:orange" if rec is not None and not fault.get("error") else "tab:red"
        ax.axvspan(at_s, max(until, at_s + 0.1), color=color, alpha=0.25, label="_fault")
        if not labels:
            continue
        text = f"{fault.get('kind')} {rec:.1f} s" if rec is not None else f"{fault.get('kind')} no recovery"
        ax.annotate(
            text, (at_s, 0.02), xycoords=("data", "axes fraction"), rotation=90, va="bottom", ha="right", fontsize=7
        )


def figures(report: Mapping[str, Any]) -> dict[str, Figure]:
    """The figures of :data:`FIGURES` for ``report`` (see the module docstring for the keys read).

    Each figure has one axes whose title is the figure's title. Empty data gives empty axes, not an
    error.
    """
    out: dict[str, Figure] = {}
    hists = report.get("histograms") or {}
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for key, summary, label in (
        ("ack_latency_us", "ack_latency_ms", "ack"),
        ("delivery_latency_us", "delivery_latency_ms", "delivery"),
    ):
        if hists.get(key):
            xs, ys = _cdf(hists[key])
            if xs:
                count = (report.get(summary) or {}).get("count", len(xs))
                ax.step(xs, ys, where="post", label=f"{label} (n={count})")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of messages")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(FIGURES["latency_cdf"])
    if ax.get_lines():
        ax.legend(loc="lower right")
    out["latency_cdf"] = fig

    tl = report.get("timeline") or {}
    start_ms = tl.get("start_ms") or 0.0
    step = float(tl.get("step_s") or 1)
    n = len(tl.get("sent") or [])
    xs = [i * step for i in range(n)]
    end_s = n * step

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("sent", "sent"), ("acked", "acked"), ("delivered", "delivered")):
        values = [v / step for v in tl.get(key) or []]
        if values:  # the last second drawn to its end
            ax.plot([*xs, end_s], [*values, values[-1]], drawstyle="steps-post", label=f"{label}/s")
    _fault_spans(ax, report, start_ms, end_s)
    ax.set_xlabel("time since the start of the first send's second (s)")
    ax.set_ylabel("per second")
    ax.set_title(FIGURES["throughput"])
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="upper left")
    out["throughput"] = fig

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("ack_p99_ms", "ack p99"), ("delivery_p99_ms", "delivery p99")):
        pairs = [(x, v) for x, v in zip(xs, tl.get(key) or [], strict=False) if v > 0]
        if pairs:
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker=".", label=label)
    _fault_spans(ax, report, start_ms, end_s)
    if ax.get_lines():
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.legend(loc="upper left")
    ax.set_xlabel("time since the start of the first send's second (s)")
    ax.set_ylabel("ms (log scale)")
    ax.set_title(FIGURES["p99"])
    ax.grid(True, which="both", alpha=0.3)
    out["p99"] = fig
    resources = report.get("resources")
    if isinstance(resources, Mapping) and resources.get("actors"):
        out["memory"] = _memory_figure(report, resources)
    return out


def _short(name: str) -> str:
    """``hub-0`` of ``demo1a2b3c-im-hub-0`` (a server's name stays)."""
    return name.rpartition("im-")[2] or name


def _memory_figure(report: Mapping[str, Any], resources: Mapping[str, Any]) -> Figure:
    """One axes per role: each process's RSS (MB) over the sampled time, its restarts dotted, faults
    shaded (the warm-up left out of the slopes in grey)."""
    roles = list(resources.get("roles") or {})
    cols = 2
    rows = max(1, -(-len(roles) // cols))
    fig = Figure(figsize=(10, 2.6 * rows), layout="constrained")
    fig.suptitle(RESOURCE_FIGURES["memory"])
    start_ms = float(resources.get("start_ms") or 0.0)
    actors = resources.get("actors") or {}
    end_s = max((max(a.get("t_s") or [0.0]) for a in actors.values()), default=0.0)
    for i, role in enumerate(roles):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, series in actors.items():
            if series.get("role") != role:
                continue
            pts = [(t, v / 1e6) for t, v in zip(series["t_s"], series.get("rss_bytes") or [], strict=False) if v]
            if pts:
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=_short(name))
                for t in series.get("restarts_at_s") or []:
                    ax.axvline(t, color=line.get_color(), linestyle=":", linewidth=1)
        _fault_spans(ax, report, start_ms, end_s, labels=False)  # small axes: the throughput figure names them
        ax.axvspan(0, float(resources.get("warmup_s") or 0.0), color="0.85", alpha=0.5, label="_warm-up")
        slope = (resources["roles"][role] or {}).get("mem_slope_mb_per_min")
        ax.set_title(f"{role}: {'-' if slope is None else f'{slope:+.2f}'} MB/min", fontsize=9)
        ax.set_ylabel("RSS (MB)")
        ax.set_xlabel("s since sampling began")
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(loc="lower right", fontsize=7)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_png(report: Mapping[str, Any], folder: str | Path) -> list[Path]:
    """Write ``<name>.png`` for every figure into ``folder`` (made if missing); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(report).items():
        path = folder / f"{name}.png"
        path.write_bytes(_png(fig))
        paths.append(path)
    return paths


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def render_html(report: Mapping[str, Any], title: str = "im-actors run report") -> str:
    """The whole HTML page for ``report``: a summary, the verdict (when ``report["verdict"]`` is
    present), the figures as embedded PNGs and the faults."""
    rows: list[tuple[str, Any]] = [(label, report[key]) for key, label in _SUMMARY_KEYS if key in report]
    for key, label in (("ack_latency_ms", "ack latency ms"), ("delivery_latency_ms", "delivery latency ms")):
        lat = report.get(key) or {}
        rows.append((label, "  ".join(f"{p} {lat.get(p)}" for p in ("p50", "p95", "p99", "max"))))
    storm = report.get("storm")
    if isinstance(storm, Mapping):
        back = storm.get("all_back_s")
        rows.append(
            (
                "reconnect storm",
                f"{storm.get('hub')} killed holding {storm.get('hub_clients')} of {storm.get('clients')} clients; "
                + (f"all back after {back} s" if back is not None else "not all back"),
            )
        )
    rows += [("note", note) for note in report.get("notes") or []]
    parts = [f"<h1>{html.escape(title)}</h1>", _table(rows)]
    verdict = report.get("verdict")
    if isinstance(verdict, Mapping):
        ok = verdict.get("passed")
        problems = "".join(f"<li>{html.escape(str(p))}</li>" for p in verdict.get("problems") or [])
        parts.append(f"<h2 class={'ok' if ok else 'fail'}>{'PASSED' if ok else 'FAILED'}</h2><ul>{problems}</ul>")
    for name, fig in figures(report).items():
        data = base64.b64encode(_png(fig)).decode("ascii")
        alt = html.escape({**FIGURES, **RESOURCE_FIGURES}[name])
        parts.append(f'<figure id="{name}"><img alt="{alt}" src="data:image/png;base64,{data}"></figure>')
    faults = report.get("faults") or []
    if faults:
        head = "<tr><th>kind</th><th>target</th><th>at (s)</th><th>recovery (s)</th><th>error</th></tr>"
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(f.get(k) if f.get(k) is not None else '-'))}</td>"
                for k in ("kind", "target", "at_s", "recovery_s", "error")
            )
            + "</tr>"
            for f in faults
        )
        parts.append(f"<h2>Faults</h2><table>{head}{body}</table>")
    parts += _resource_tables(report)
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}"
        ".ok{color:#060}.fail{color:#a00}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def _grid(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('-' if v is None else str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def _mb(value: Any) -> str | None:
    return None if value is None else f"{float(value) / 1e6:.1f}"


def _until(fit_until_s: Any) -> str:
    return "the end" if fit_until_s is None else f"{fit_until_s} s (the end of the send phase)"


def _resource_tables(report: Mapping[str, Any]) -> list[str]:
    """The ``resources`` (memory per role) and ``leaks`` (before -> after per role) tables, if any."""
    parts: list[str] = []
    res = report.get("resources")
    if isinstance(res, Mapping):
        rows = [
            (role, r.get("processes"), r.get("mem_slope_mb_per_min"), r.get("uss_slope_mb_per_min"))
            + (_mb(r.get("first_rss_bytes")), _mb(r.get("last_rss_bytes")), _mb(r.get("peak_rss_bytes")))
            + (r.get("restarts"),)
            for role, r in (res.get("roles") or {}).items()
        ]
        head = ("role", "processes", "RSS slope MB/min", "USS slope MB/min", "first MB", "last MB", "peak MB")
        parts.append(
            f"<h2>Resources</h2><p>sampled every {res.get('sample_every_s')} s; slopes per process, from "
            f"{res.get('warmup_s')} s to {_until(res.get('fit_until_s'))}, leaving out "
            f"{res.get('restart_settle_s')} s after each restart; first, last and peak of the role's sum"
            f"</p>{_grid((*head, 'restarts'), rows)}"
        )
    leaks = report.get("leaks")
    if isinstance(leaks, Mapping):
        counts = [*(leaks.get("leaked") or {}), "pooled"]
        rows = []
        for role, r in (leaks.get("roles") or {}).items():
            b, a = r.get("before") or {}, r.get("after") or {}
            rows.append((role, *(f"{b.get(k, '-')} -> {a.get(k, '-')}" for k in counts)))
        leaked = ", ".join(f"{k} {v}" for k, v in (leaks.get("leaked") or {}).items())
        allowance = ", ".join(f"{k} {v}" for k, v in (leaks.get("allowance") or {}).items())
        leaking = ", ".join(leaks.get("leaking") or []) or "no actor"
        text = (
            f"counted before the workload and {leaks.get('settle_s')} s after its clients closed; fds and "
            "connections leave out the pooled sockets to the storage servers (pooled, reported only); allowed "
            f"growth per actor: {allowance}; beyond it: {leaked} ({leaking})"
        )
        parts.append(f"<h2>Leaks</h2><p>{html.escape(text)}</p>" + _grid(("role", *counts), rows))
    return parts


def write_html(report: Mapping[str, Any], path: str | Path, title: str = "im-actors run report") -> Path:
    """Write :func:`render_html` of ``report`` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(render_html(report, title), encoding="utf-8")
    return path
