"""The demo's shape: no import from im_actors into drivers, one set of workload defaults, the
im-actors console script carries every command, and demo problems found before start say what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from typer.testing import CliRunner

import im_actors
from drivers import run as run_module
from drivers.cli import app
from drivers.demo import DemoError, DemoOptions, run_demo
from drivers.replay import ReplayWorkload
from drivers.synthetic import SyntheticWorkload
from drivers.workload import DEFAULTS


def test_nothing_under_im_actors_imports_drivers() -> None:
    offenders = []
    for path in Path(im_actors.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n == "drivers" or n.startswith("drivers.")]
    assert offenders == []


def test_one_set_of_workload_defaults() -> None:
    demo = DemoOptions()
    assert (demo.messages, demo.duration_s, demo.users, demo.rate, demo.group_size) == (
        DEFAULTS.messages,
        DEFAULTS.duration_s,
        DEFAULTS.users,
        DEFAULTS.rate,
        DEFAULTS.group_size,
    )
    syn = run_module._parser().parse_args(["--router", "http://x", "synthetic"])
    assert (syn.users, syn.rate, syn.duration, syn.size, syn.group_size) == (
        DEFAULTS.users,
        DEFAULTS.rate,
        DEFAULTS.duration_s,
        DEFAULTS.msg_bytes,
        DEFAULTS.group_size,
    )
    rep = run_module._parser().parse_args(["--router", "http://x", "replay", "--corpus", "c.gz"])
    assert (rep.messages, rep.duration, rep.gap_cap) == (DEFAULTS.messages, DEFAULTS.duration_s, DEFAULTS.gap_cap_s)
    w = SyntheticWorkload()
    assert (w.users, w.rate, w.duration_s, w.msg_bytes) == (
        DEFAULTS.users,
        DEFAULTS.rate,
        DEFAULTS.duration_s,
        DEFAULTS.msg_bytes,
    )
    r = ReplayWorkload("c.gz")
    assert (r.messages, r.duration_s, r.gap_cap_s) == (DEFAULTS.messages, DEFAULTS.duration_s, DEFAULTS.gap_cap_s)


def test_the_console_script_has_every_command() -> None:
    out = CliRunner().invoke(app, ["--help"]).output
    for command in ("demo", "up", "down", "status", "report"):
        assert command in out
    demo_help = CliRunner().invoke(app, ["demo", "--help"]).output
    assert "--threshold" in demo_help and "--html" in demo_help


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (DemoOptions(thresholds=("p99<5",)), "--threshold: threshold 'p99<5': unknown metric"),
        (DemoOptions(chaos="hub,volcano"), "--chaos: unknown fault kind"),
        (DemoOptions(hubs=0), "hubs"),
        (DemoOptions(storm=10, chaos="hub"), "one fault plan at a time"),
        (DemoOptions(heap_trace=True, sample_every_s=0), "--heap-trace needs --sample-every"),
    ],
)
def test_demo_refuses_bad_input_before_starting_anything(opts: DemoOptions, message: str) -> None:
    with pytest.raises(DemoError, match=message) as exc:
        run_demo(opts)
    assert exc.value.exit_code == 2


def test_cli_demo_exits_2_with_the_message() -> None:
    result = CliRunner().invoke(app, ["demo", "--threshold", "nope"])
    assert result.exit_code == 2
    assert "expected METRIC OP NUMBER" in result.output


def test_no_corpus_found_falls_back_to_synthetic_and_says_where_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from drivers import demo as demo_module

    monkeypatch.setattr(demo_module, "find_corpus", lambda: None)
    said: list[str] = []
    notes: list[str] = []
    workload = demo_module._workload(DemoOptions(users=7, rate=5.0), notes, lambda text, err=False: said.append(text))
    assert workload == SyntheticWorkload(users=7, rate=5.0, duration_s=DEFAULTS.duration_s, group_size=10)
    assert len(notes) == 1 and "fluid_irc_replay.jsonl.gz" in notes[0] and "--corpus" in notes[0]
    assert "synthetic" in notes[0] and said == [f"im-actors: {notes[0]}"]


def test_a_given_corpus_that_is_missing_is_an_error(tmp_path: Path) -> None:
    from drivers import demo as demo_module

    with pytest.raises(DemoError, match="not found") as exc:
        demo_module._workload(DemoOptions(corpus=tmp_path / "none.gz"), [], lambda text, err=False: None)
    assert exc.value.exit_code == 2
