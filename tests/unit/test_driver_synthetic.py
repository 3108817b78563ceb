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
