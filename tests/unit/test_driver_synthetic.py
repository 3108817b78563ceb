"""Synthetic workload planning (drivers.synthetic)."""

from __future__ import annotations

from collections import Counter

import pytest

from drivers.synthetic import SyntheticWorkload, make_body


def test_direct_pairs_at_the_rate() -> None:
    plan = SyntheticWorkload(users=10, rate=50.0, duration_s=2.0, msg_bytes=40, seed=3).build("p.")
    assert len(plan.sends) == 100 and plan.groups == ()
    assert plan.users == tuple(f"p.s{i}" for i in range(10))
    assert [s.at_s for s in plan.sends] == pytest.approx([i / 50.0 for i in range(100)])
    for s in plan.sends:
        assert s.peer is not None and s.peer != s.sender and s.group is None
        assert len(s.body.encode()) == 40
    recipients = plan.recipients({})
    assert all(len(devs) == 2 for devs in recipients.values())
    assert plan == SyntheticWorkload(users=10, rate=50.0, duration_s=2.0, msg_bytes=40, seed=3).build("p.")


def test_groups_of_a_given_size_and_a_mix() -> None:
    w = SyntheticWorkload(users=12, rate=100.0, duration_s=5.0, group_size=4, direct_share=0.25, seed=1)
    plan = w.build("")
    assert len(plan.groups) == 3
    assert all(len(set(g.members)) == 4 and g.creator == g.members[0] for g in plan.groups)
    assert set().union(*(g.members for g in plan.groups)) == set(plan.users)
    kinds = Counter("group" if s.group else "direct" for s in plan.sends)
    assert kinds["group"] + kinds["direct"] == 500
    assert 0.15 < kinds["direct"] / 500 < 0.35
    members = {g.key: set(g.members) for g in plan.groups}
    assert all(s.sender in members[s.group] for s in plan.sends if s.group)


def test_poisson_keeps_the_mean_rate() -> None:
    plan = SyntheticWorkload(users=5, rate=200.0, duration_s=10.0, poisson=True).build("")
    assert len(plan.sends) == 2000
    assert plan.sends[-1].at_s == pytest.approx(10.0, rel=0.1)
    assert all(b.at_s >= a.at_s for a, b in zip(plan.sends, plan.sends[1:], strict=False))


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        SyntheticWorkload(users=1).build("")
    with pytest.raises(ValueError):
        SyntheticWorkload(users=4, group_size=5).build("")
    with pytest.raises(ValueError):
        SyntheticWorkload(users=4, direct_share=0.5).build("")


def test_make_body() -> None:
    assert make_body(7, 10) == "7:abcdefgh"
    assert make_body(12345, 3) == "123"
    assert make_body(1, 0) == ""
    assert len(make_body(3, 500)) == 500


def test_stages_parse_k6_style() -> None:
    from drivers.synthetic import parse_stages

    assert parse_stages("30s:100,60s:1000") == ((30.0, 100.0), (60.0, 1000.0))
    assert parse_stages("500ms:10, 2m:0,1h:5, 7:1") == ((0.5, 10.0), (120.0, 0.0), (3600.0, 5.0), (7.0, 1.0))
    for bad in ("30s", "x:100", "30s:-1", "0s:5", "30q:5", ""):
        with pytest.raises(ValueError):
            parse_stages(bad)


def test_stages_ramp_the_rate() -> None:
    from drivers.synthetic import stage_times

    times = stage_times(((10.0, 100.0), (10.0, 100.0), (5.0, 0.0)))
    # integral of the rate: ramp 0 -> 100 over 10 s (500), hold 100 for 10 s (1000), down to 0 over 5 s (250)
    assert len(times) == 1750
    assert times == sorted(times) and 0 < times[0] and times[-1] <= 25.0
    per_second = [sum(1 for t in times if s < t <= s + 1) for s in range(25)]
    assert per_second[0] == 5 and per_second[9] == 95  # 10 msgs/s more every second of the ramp
    assert per_second[10:20] == [100] * 10
    assert per_second[24] == 10

    w = SyntheticWorkload(users=6, group_size=3, stages=((2.0, 50.0), (2.0, 50.0)), seed=1)
    plan = w.build("p.")
    assert len(plan.sends) == 150 and plan.duration_s == pytest.approx(4.0, abs=0.05)
    assert plan.info["stages"] == [[2.0, 50.0], [2.0, 50.0]]
    with pytest.raises(ValueError, match="poisson"):
        SyntheticWorkload(users=6, stages=((1.0, 5.0),), poisson=True).build("")
