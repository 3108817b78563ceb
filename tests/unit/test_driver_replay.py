"""Corpus replay planning (drivers.replay): groups from the corpus, time compression, the gap cap."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from drivers.replay import CorpusMessage, ReplayWorkload, compress_times, plan_replay, read_corpus

REAL_CORPUS = Path("/work/shared/data/fluid_irc_replay.jsonl.gz")

LINES = [
    {"ts": 0.0, "room": "r1", "sender": "u1", "len": 5, "text": "hello"},
    {"ts": 10.0, "room": "r1", "sender": "u2", "len": 3, "text": "hey"},
    {"ts": 10.0, "room": "r2", "sender": "u3", "len": 6, "text": "design", "to": "u1"},
    {"ts": 500.0, "room": "r1", "sender": "u1", "len": 5, "text": "later"},  # a 490 s gap, capped to 60
    {"ts": 510.0, "room": "r2", "sender": "u1", "len": 4, "text": "/me x"},
    {"ts": 520.0, "room": "r3", "sender": "u4", "len": 3, "text": "not read"},
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in LINES:
            f.write(json.dumps(line) + "\n")
        f.write("\n")
    return path


def test_read_corpus_takes_the_first_n(corpus: Path) -> None:
    msgs = read_corpus(corpus, 5)
    assert [m.sender for m in msgs] == ["u1", "u2", "u3", "u1", "u1"]
    assert msgs[2] == CorpusMessage(10.0, "r2", "u3", "design")
    assert len(read_corpus(corpus, 100)) == 6
    assert read_corpus(corpus, 0) == []


def test_plan_groups_users_and_order(corpus: Path) -> None:
    plan = plan_replay(read_corpus(corpus, 5), run_prefix="p.", duration_s=10.0, gap_cap_s=60.0)
    assert plan.users == ("p.u1", "p.u2", "p.u3")
    groups = {g.key: g for g in plan.groups}
    assert set(groups) == {"r1", "r2"}  # r3 is beyond the first 5 messages
    assert groups["r1"].members == ("p.u1", "p.u2") and groups["r1"].creator == "p.u1"
    assert groups["r2"].members == ("p.u3", "p.u1") and groups["r2"].creator == "p.u3"
    assert groups["r1"].name == "p.r1"
    assert [(s.index, s.sender, s.group, s.body) for s in plan.sends] == [
        (0, "p.u1", "r1", "hello"),
        (1, "p.u2", "r1", "hey"),
        (2, "p.u3", "r2", "design"),
        (3, "p.u1", "r1", "later"),
        (4, "p.u1", "r2", "/me x"),
    ]
    # capped corpus times 0, 10, 10, 70, 80, scaled by 10 / 80
    assert [s.at_s for s in plan.sends] == pytest.approx([0.0, 1.25, 1.25, 8.75, 10.0])
    assert plan.duration_s == pytest.approx(10.0)
    conv_of = {"r1": "g:one", "r2": "g:two"}
    assert plan.recipients(conv_of) == {"g:one": ["p.u1/d1", "p.u2/d1"], "g:two": ["p.u3/d1", "p.u1/d1"]}
    assert plan.sends[0].conv(conv_of) == "g:one"


def test_compression_fits_the_duration_and_caps_gaps() -> None:
    ts = [0.0, 1.0, 1.0, 1000.0, 1003.0, 5000.0]
    times = compress_times(ts, duration_s=30.0, gap_cap_s=60.0)
    assert times[0] == 0.0 and times[-1] == pytest.approx(30.0)
    # capped: 0, 1, 1, 61, 64, 124 -> factor 30 / 124
    assert times == pytest.approx([t * 30.0 / 124.0 for t in (0, 1, 1, 61, 64, 124)])
    assert compress_times([0.0, 10.0, 100.0], speed=10.0, gap_cap_s=None) == pytest.approx([0.0, 1.0, 10.0])
    assert compress_times([0.0, 10.0, 100.0], 5.0, gap_cap_s=20.0, speed=10.0) == pytest.approx([0.0, 1.0, 3.0])
    assert compress_times([7.0, 7.0], duration_s=5.0) == [0.0, 0.0]
    assert compress_times([], duration_s=5.0) == []
    with pytest.raises(ValueError):
        compress_times([0.0, 1.0])
    with pytest.raises(ValueError):
        compress_times([0.0, 1.0], speed=0.0)


def test_workload_builds_with_the_run_prefix(corpus: Path) -> None:
    plan = ReplayWorkload(str(corpus), messages=6, duration_s=12.0).build("run7.")
    assert plan.users == ("run7.u1", "run7.u2", "run7.u3", "run7.u4")
    assert plan.sends[-1].at_s == pytest.approx(12.0)
    assert plan.summary()["sends"] == 6 and plan.summary()["groups"] == 3


@pytest.mark.skipif(not REAL_CORPUS.exists(), reason="the shared corpus is not on this machine")
def test_first_2000_lines_of_the_real_corpus() -> None:
    with gzip.open(REAL_CORPUS, "rt", encoding="utf-8") as f:
        raw = [json.loads(next(f)) for _ in range(2000)]
    plan = ReplayWorkload(str(REAL_CORPUS), messages=2000, duration_s=60.0, gap_cap_s=60.0).build("x.")
    assert len(plan.sends) == 2000
    senders_by_room: dict[str, list[str]] = {}
    for r in raw:
        members = senders_by_room.setdefault(r["room"], [])
        if "x." + r["sender"] not in members:
            members.append("x." + r["sender"])
    assert {g.key: list(g.members) for g in plan.groups} == senders_by_room
    assert {g.key: g.creator for g in plan.groups} == {room: m[0] for room, m in senders_by_room.items()}
    assert set(plan.users) == {"x." + r["sender"] for r in raw}
    assert [s.body for s in plan.sends] == [r["text"] for r in raw]
    assert [s.group for s in plan.sends] == [r["room"] for r in raw]
    # order kept, fits 60 s, no gap longer than the cap after scaling
    at = [s.at_s for s in plan.sends]
    assert at[0] == 0.0 and at[-1] == pytest.approx(60.0)
    assert all(b >= a for a, b in zip(at, at[1:], strict=False))
    capped_span = sum(min(b["ts"] - a["ts"], 60.0) for a, b in zip(raw, raw[1:], strict=False))
    factor = 60.0 / capped_span
    assert max(b - a for a, b in zip(at, at[1:], strict=False)) <= 60.0 * factor + 1e-9
    # relative timing kept below the cap: a gap of g corpus seconds (g <= 60) becomes g * factor
    for i in range(1, 2000):
        gap = raw[i]["ts"] - raw[i - 1]["ts"]
        if gap <= 60.0:
            assert at[i] - at[i - 1] == pytest.approx(gap * factor, abs=1e-9)
    counts = Counter(s.sender for s in plan.sends)
    assert sum(counts.values()) == 2000
