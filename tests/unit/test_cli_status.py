"""``im-actors status`` as a table (and ``--json``) and ``im-actors --version``, without Ray."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from typer.testing import CliRunner

from im_actors import __version__
from im_actors.cli import app
from im_actors.cluster import status_table

STATUS: dict[str, Any] = {
    "router_url": "http://127.0.0.1:8080",
    "actors": {
        "router": {"up": True, "role": "router", "restarts": 0, "num_cpus": 0.02,
                   "stats": {"hubs": 2, "hubs_live": 1, "connections": 7}},
        "hub-0": {"up": True, "role": "hub", "restarts": 3, "num_cpus": 0.1,
                  "stats": {"connections": 7, "frames_in": 120, "frames_out": 340, "sends": 100,
                            "slow_closed": 1, "queued_bytes": 2048,
                            "answers": {"ack": 98, "forbidden": 2, "rate_limited": 1}}},
        "hub-1": {"up": False, "role": "hub", "restarts": 5},
        "conv-0": {"up": True, "role": "conv", "restarts": 0, "num_cpus": 0.1,
                   "stats": {"active": 4, "committed": 98, "commits": 10, "commit_ms_total": 55.0,
                             "dups": 0, "unavailable": 0, "activations": 4}},
        "store-0": {"up": True, "role": "store", "restarts": 0, "num_cpus": 0.05, "error": "timed out"},
    },
    "push": {},
    "metrics": ["http://10.0.0.1:9999/metrics"],
}  # fmt: skip


def _render(out: dict[str, Any]) -> str:
    console = Console(record=True, width=240)
    console.print(status_table(out))
    return console.export_text()


def test_status_table_shows_each_actor_up_restarts_load_and_counters() -> None:
    text = _render(STATUS)
    lines = {line.split()[1]: line for line in text.splitlines() if line.strip().startswith("│")}
    assert "http://127.0.0.1:8080" in text
    hub0 = lines["hub-0"]
    assert "yes" in hub0 and " 3 " in hub0 and "7 conns" in hub0
    assert "acks 98" in hub0 and "errors 3" in hub0 and "slow closed 1" in hub0
    assert "no" in lines["hub-1"] and " 5 " in lines["hub-1"]
    assert "4 sequencers" in lines["conv-0"] and "avg 5.5 ms" in lines["conv-0"]
    assert "no answer" in lines["store-0"] and "timed out" in lines["store-0"]
    assert "1/2 hubs live" in lines["router"]
    names = [n for n in lines if n in STATUS["actors"]]
    assert names == ["router", "hub-0", "hub-1", "conv-0", "store-0"]  # grouped by role


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"im-actors {__version__}"


def test_status_has_a_json_flag() -> None:
    result = CliRunner().invoke(app, ["status", "--help"])
    assert result.exit_code == 0
    assert "--json" in result.output
