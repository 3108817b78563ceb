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


def test_two_nodes_removed_mid_traffic_move_their_actors_and_lose_nothing(tmp_path: Path) -> None:
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
    assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0), report["lost_entries"]
    assert report["delivered"] == report["expected_deliveries"] > 0
    assert len(set(result["before"].values())) == 3  # hubs and shards were spread over three nodes
    hubs = {name: node for name, node in result["before"].items() if "-hub-" in name}
    assert len(set(hubs.values())) == min(3, len(hubs))  # one hub per node
    faults = result["faults"]
    assert [f["kind"] for f in faults] == ["node", "node"]
    # Recovered: every actor of the removed node alive on another node, and probes delivered again.
    assert all(f["error"] is None and f["recovery_s"] is not None for f in faults), faults
