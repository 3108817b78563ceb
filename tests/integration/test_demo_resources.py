"""A short ``im-actors demo`` samples every role's processes and writes the resources and leaks sections.

The demo starts its own Ray cluster, so it runs as a process of its own (as a user runs it); this test
reads the report it wrote. Nothing here asserts a timing or a slope's size: only that the figures
are there, real (read from the processes) and plausible.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from im_actors import ids

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MB = 1e6


def test_a_short_demo_reports_memory_per_role_and_leaks(tmp_path: Path) -> None:
    report_path, html_path = tmp_path / "r.json", tmp_path / "r.html"
    argv = ["demo", "--messages", "300", "--duration", "20", "--sample-every", "2", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "drivers.cli", *argv, "--report", str(report_path), "--html", str(html_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    knobs = report["config"]
    counts = {
        "router": 1,
        "hub": knobs["hubs"],
        "session": knobs["session_shards"],
        "conv": knobs["conv_shards"],
        "group": knobs["group_shards"],
        "store": knobs["store_writers"],
        "push": knobs["push_workers"],
    }
    prefix = f"{knobs['deployment']}-"
    expected = {ids.actor_name(role, i, prefix) for role, n in counts.items() for i in range(n)}

    res = report["resources"]
    actors = res["actors"]
    assert expected <= set(actors), sorted(expected - set(actors))
    assert "mongodb" in actors  # the demo's own SecantusDB, sampled by pid
    assert res["sample_every_s"] == 2
    for name in expected | {"mongodb"}:
        series = actors[name]
        assert len(series["t_s"]) >= 10, name  # 20 s of sending, sampled every 2 s, and the settle
        assert all(v is not None and v > 10 * MB for v in series["rss_bytes"]), (name, series["rss_bytes"])
        assert all(v is not None and v > 0 for v in series["fds"]), name
        assert series["restarts_at_s"] == [] and len(set(series["pid"])) == 1  # no chaos: one process each
        if name != "mongodb":
            assert all(v is not None and v >= 1 for v in series["tasks"]), name  # vitals answered every time
    hubs = [actors[n] for n in expected if "-hub-" in n]
    assert max(v for h in hubs for v in h["ws"]) > 0  # the clients were connected to them
    assert all(h["ws"][-1] == 0 for h in hubs)  # and closed at the end
    for role in counts:
        if counts[role]:
            row = res["roles"][role]
            assert row["processes"] == counts[role]
            assert row["mem_slope_mb_per_min"] is not None and row["fitted_samples"] >= 2
            assert row["first_rss_bytes"] > 10 * MB and row["last_rss_bytes"] > 10 * MB
    assert res["mem_slope_role"] in counts

    leaks = report["leaks"]
    assert expected <= set(leaks["actors"])
    for name in expected:
        entry = leaks["actors"][name]
        assert set(entry["diff"]) == {"fds", "tasks", "connections", "pooled"}, name
        assert entry["before"]["fds"] > 0 and entry["after"]["tasks"] >= 1
    assert set(leaks["leaked"]) == {"fds", "tasks", "connections"}
    assert leaks["leaked"] == {k: sum(a["leaked"].get(k, 0) for a in leaks["actors"].values()) for k in leaks["leaked"]}

    assert "memory (RSS" in proc.stdout and "leaked beyond the allowance" in proc.stdout
    page = html_path.read_text()
    assert "<h2>Resources</h2>" in page and "<h2>Leaks</h2>" in page
    assert 'alt="Memory (RSS) per role over time"' in page
