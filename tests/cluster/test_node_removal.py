"""A Ray node removed from a three-node cluster mid-traffic: nothing lost, its actors restarted elsewhere.

The cluster runs in a process of its own (see :mod:`tests.cluster.node_removal`); this test starts it
and asserts on what it reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_node_removed_mid_traffic_moves_its_actors_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "node_removal.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.cluster.node_removal", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    report = result["report"]
    assert report["sent"] == report["acked"] > 0, report.get("send_errors")
    assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0)
    assert report["delivered"] == report["expected_deliveries"] > 0
    assert len(set(result["before"].values())) == 3  # hubs and shards were spread over three nodes
    moved = result["moved"]
    assert any("-hub-" in name for name in moved), moved
    for name in moved:  # every actor of the removed node is alive again, on another node
        assert result["after"].get(name) not in (None, result["removed_node"]), (name, result["after"])
