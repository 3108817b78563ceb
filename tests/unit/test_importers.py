"""Importers (drivers.importers): a Slack export, irssi and weechat logs and CSV, each made here, into
the replay format that ReplayWorkload plays."""

from __future__ import annotations

import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from drivers.importers import main, read_csv, read_irc_log, read_slack_export, write_replay
from drivers.replay import CorpusMessage, ReplayWorkload, read_corpus

T0 = datetime(2024, 3, 1, 9, 0, 0, tzinfo=UTC).timestamp()


def _slack(root: Path) -> Path:
    (root / "general").mkdir(parents=True)
    (root / "random").mkdir()
    (root / "channels.json").write_text(json.dumps([{"name": "general"}, {"name": "random"}]))
    (root / "general" / "2024-03-01.json").write_text(
        json.dumps(
            [
                {"type": "message", "subtype": "channel_join", "user": "U1", "text": "joined", "ts": f"{T0:.6f}"},
                {"type": "message", "user": "U1", "text": "hello", "ts": f"{T0 + 1:.6f}"},
                {"type": "message", "user": "U2", "text": "hi U1", "ts": f"{T0 + 3.5:.6f}"},
                {"type": "message", "subtype": "bot_message", "bot_id": "B1", "text": "beep", "ts": f"{T0 + 4:.6f}"},
                {"type": "message", "subtype": "me_message", "user": "U2", "text": "waves", "ts": f"{T0 + 5:.6f}"},
            ]
        )
    )
    (root / "random" / "2024-03-01.json").write_text(
        json.dumps([{"type": "message", "user": "U3", "text": "lunch?", "ts": f"{T0 + 2:.6f}"}])
    )
    return root


def test_slack_export_folder_and_zip(tmp_path: Path) -> None:
    root = _slack(tmp_path / "export")
    expected = [
        CorpusMessage(T0 + 1, "general", "U1", "hello"),
        CorpusMessage(T0 + 2, "random", "U3", "lunch?"),
        CorpusMessage(T0 + 3.5, "general", "U2", "hi U1"),
        CorpusMessage(T0 + 5, "general", "U2", "/me waves"),
    ]
    assert read_slack_export(root) == expected
    with zipfile.ZipFile(tmp_path / "export.zip", "w") as z:
        for f in root.rglob("*.json"):
            z.write(f, f"Workspace Export/{f.relative_to(root)}")
    assert read_slack_export(tmp_path / "export.zip") == expected
    with pytest.raises(ValueError, match="no Slack channel files"):
        read_slack_export(tmp_path / "nothing")


def test_irssi_log(tmp_path: Path) -> None:
    log = tmp_path / "#dev.log"
    log.write_text(
        "--- Log opened Fri Mar 01 09:00:00 2024\n"
        "09:00 -!- alice [a@host] has joined #dev\n"
        "09:01 <@alice> morning\n"
        "09:02:30 < bob> hi alice\n"
        "09:03  * bob stretches\n"
        "--- Day changed Sat Mar 02 2024\n"
        "00:10 <+carol[m]> late night\n"
    )
    msgs = read_irc_log(log)
    assert [(m.ts - T0, m.room, m.sender, m.text) for m in msgs] == [
        (60.0, "#dev", "alice", "morning"),
        (150.0, "#dev", "bob", "hi alice"),
        (180.0, "#dev", "bob", "/me stretches"),
        (15 * 3600 + 600.0, "#dev", "carol[m]", "late night"),
    ]
    (tmp_path / "nodate.log").write_text("09:01 <alice> morning\n")
    with pytest.raises(ValueError, match="nodate.log:1: a message before"):
        read_irc_log(tmp_path / "nodate.log")


def test_weechat_log(tmp_path: Path) -> None:
    log = tmp_path / "irc.libera.#ops.weechatlog"
    log.write_text(
        "2024-03-01 09:00:00\t-->\talice (a@host) has joined #ops\n"
        "2024-03-01 09:00:05\t@alice\tdeploy done\n"
        "2024-03-01 09:00:09\t *\tbob cheers\n"
        "2024-03-01 09:00:10\t--\tMode #ops [+o bob]\n"
        "2024-03-01 09:00:12\tbob\tthanks\n"
    )
    msgs = read_irc_log(log, room="ops")
    assert [(m.ts - T0, m.room, m.sender, m.text) for m in msgs] == [
        (5.0, "ops", "alice", "deploy done"),
        (9.0, "ops", "bob", "/me cheers"),
        (12.0, "ops", "bob", "thanks"),
    ]


def test_csv(tmp_path: Path) -> None:
    f = tmp_path / "chat.csv"
    f.write_text(
        "ts,room,sender,text,extra\n"
        f'{T0},sales,ann,"hello, all",x\n'
        '2024-03-01T09:00:02Z,sales,ben,"quote ""this""",y\n'
        "2024-03-01T09:00:04,support,ann,new line\n"
    )
    assert read_csv(f) == [
        CorpusMessage(T0, "sales", "ann", "hello, all"),
        CorpusMessage(T0 + 2, "sales", "ben", 'quote "this"'),
        CorpusMessage(T0 + 4, "support", "ann", "new line"),
    ]
    (tmp_path / "bad.csv").write_text("time,room,sender,text\n1,r,s,t\n")
    with pytest.raises(ValueError, match="missing column"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("ts,room,sender,text\nyesterday,r,s,t\n")
    with pytest.raises(ValueError, match="bad2.csv:2"):
        read_csv(tmp_path / "bad2.csv")


def test_written_replay_plays(tmp_path: Path) -> None:
    out = tmp_path / "slack.jsonl.gz"
    counts = write_replay(read_slack_export(_slack(tmp_path / "e")), out)
    assert counts == {"messages": 4, "rooms": 2, "senders": 3}
    assert read_corpus(out, 10) == [
        CorpusMessage(0.0, "r1", "u1", "hello"),
        CorpusMessage(1.0, "r2", "u2", "lunch?"),
        CorpusMessage(2.5, "r1", "u3", "hi U1"),
        CorpusMessage(4.0, "r1", "u3", "/me waves"),
    ]
    plan = ReplayWorkload(str(out), messages=10, duration_s=2.0).build("t.")
    assert len(plan.sends) == 4 and {g.key for g in plan.groups} == {"r1", "r2"}
    assert plan.sends[-1].at_s == pytest.approx(2.0)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "a.log"
    log.write_text("2024-03-01 09:00:05\talice\tone\n2024-03-01 09:00:06\tbob\ttwo\n")
    assert main(["irc", str(log), str(tmp_path / "out.jsonl.gz")]) == 0
    assert "2 messages, 1 rooms, 2 senders" in capsys.readouterr().out
    assert main(["csv", str(tmp_path / "missing.csv"), str(tmp_path / "x.gz")]) == 2
