"""The run report's plots (im_actors.report) drawn from a small run's JSON, and ``im-actors report``."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from typer.testing import CliRunner

from drivers.oracle import Recorder, decode_histogram
from im_actors.cli import app
from im_actors.report import FIGURES, figures, load_report, render_html, write_png

T0_MS = 1_800_000_000_000.0  # a whole second, so second i of the run is [T0 + 1000 i, T0 + 1000 (i + 1))
A, B = "a/d1", "b/d1"


def _run_json(tmp_path: Path, faults: bool = True) -> Path:
    """A 5-second run: 20 sends a second in one conversation of two devices, acked in 2 + i ms and
    delivered in 5 + i ms; then the report as the runner writes it (through JSON)."""
    rec = Recorder({"c": [A, B]})
    seq = 0
    for second in range(5):
        for i in range(20):
            seq += 1
            send = T0_MS + second * 1000 + i * 40
            rec.add_sent(1, send)
            rec.add_ack("c", seq, send, send + 2 + i)
            for dev in (A, B):
                rec.add_receipt(dev, "c", seq, send + 5 + i + second * 10, send)
    report: dict[str, Any] = rec.partial().report()
    if faults:
        report["faults"] = [
            {"kind": "hub", "target": "hub-0", "at_s": 1.0, "at_ms": T0_MS + 1500, "recovery_s": 1.2, "error": None},
            {"kind": "conv", "target": "conv-0", "at_s": 3.0, "at_ms": T0_MS + 3500, "recovery_s": None, "error": None},
        ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    return path


def test_report_keeps_the_timeline_and_the_histograms(tmp_path: Path) -> None:
    report = load_report(_run_json(tmp_path))
    tl = report["timeline"]
    assert tl["start_ms"] == T0_MS and tl["step_s"] == 1
    assert tl["sent"] == [20] * 5 and tl["acked"] == [20] * 5
    assert sum(tl["delivered"]) == report["delivered"] == 200
    # deliveries of second s take 5 + i + 10 s ms, i < 20: p99 grows by 10 ms a second
    assert tl["delivery_p99_ms"][0] == pytest.approx(24.0, rel=0.02)
    assert tl["delivery_p99_ms"][4] == pytest.approx(64.0, rel=0.02)
    assert tl["ack_p99_ms"] == [pytest.approx(21.0, rel=0.02)] * 5
    ack = decode_histogram(report["histograms"]["ack_latency_us"])
    assert ack.get_total_count() == 100
    assert ack.get_max_value() == pytest.approx(21_000, rel=0.001)


def test_figures_draw_cdfs_timeline_and_fault_spans(tmp_path: Path) -> None:
    figs = figures(load_report(_run_json(tmp_path)))
    assert list(figs) == list(FIGURES)
    for name, fig in figs.items():
        (ax,) = fig.axes
        assert ax.get_title() == FIGURES[name]
    cdf = figs["latency_cdf"].axes[0]
    assert cdf.get_xscale() == "log"
    assert [line.get_label().split(" ")[0] for line in cdf.get_lines()] == ["ack", "delivery"]
    assert max(cdf.get_lines()[0].get_ydata()) == pytest.approx(1.0)
    thr = figs["throughput"].axes[0]
    assert [line.get_label() for line in thr.get_lines()] == ["sent/s", "acked/s", "delivered/s"]
    assert list(thr.get_lines()[0].get_ydata()) == [20.0] * 6  # five seconds, the last drawn to its end
    for name in ("throughput", "p99"):
        ax = figs[name].axes[0]
        spans = [p for p in ax.patches if p.get_label() == "_fault"]
        assert len(spans) == 2
        texts = [t.get_text() for t in ax.texts]
        assert texts == ["hub 1.2 s", "conv no recovery"]
        # the hub fault spans 1.5 s .. 2.7 s of the run
        x0, x1 = spans[0].get_x(), spans[0].get_x() + spans[0].get_width()
        assert (x0, x1) == (pytest.approx(1.5), pytest.approx(2.7))
    assert figs["p99"].axes[0].get_yscale() == "log"


def test_an_empty_run_draws_empty_axes(tmp_path: Path) -> None:
    report = Recorder().partial().report()
    figs = figures(report)
    assert all(not fig.axes[0].get_lines() for fig in figs.values())


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_embeds_every_figure_as_a_png_that_decodes(tmp_path: Path) -> None:
    report = load_report(_run_json(tmp_path))
    report["verdict"] = {"passed": False, "problems": ["delivery_p99_ms = 64.0 (threshold < 50)"]}
    page = _Images()
    page.feed(render_html(report))
    assert len(page.srcs) == len(FIGURES)
    for src in page.srcs:
        assert src.startswith("data:image/png;base64,")  # no file, no network
        image = matplotlib.image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert image.shape[0] > 100 and image.shape[1] > 100
    text = " ".join(page.text)
    assert "FAILED" in text and "delivery_p99_ms = 64.0" in text and "conv-0" in text
    report["storm"] = {"clients": 2000, "hub": "hub-1", "hub_clients": 1002, "all_back_s": 21.0}
    report["notes"] = ["push off: no RabbitMQ"]
    page = _Images()
    page.feed(render_html(report))
    text = " ".join(page.text)
    assert "hub-1 killed holding 1002 of 2000 clients; all back after 21.0 s" in text and "push off" in text


def test_png_folder(tmp_path: Path) -> None:
    paths = write_png(load_report(_run_json(tmp_path, faults=False)), tmp_path / "png")
    assert [p.name for p in paths] == [f"{name}.png" for name in FIGURES]
    for p in paths:
        assert matplotlib.image.imread(p).shape[2] in (3, 4)


def test_cli_report_writes_html_and_png(tmp_path: Path) -> None:
    path = _run_json(tmp_path)
    result = CliRunner().invoke(
        app, ["report", str(path), "--html", str(tmp_path / "r.html"), "--png", str(tmp_path / "pngs")]
    )
    assert result.exit_code == 0, result.output
    page = _Images()
    page.feed((tmp_path / "r.html").read_text())
    assert len(page.srcs) == len(FIGURES)
    assert result.output.count("wrote ") == 1 + len(FIGURES)
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == sorted(f"{n}.png" for n in FIGURES)


def test_cli_report_refuses_what_is_not_a_report(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"sent": 1}))
    result = CliRunner().invoke(app, ["report", str(bad), "--html", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "histograms" in result.output
    result = CliRunner().invoke(app, ["report", str(bad)])
    assert result.exit_code == 2 and "--html" in result.output
