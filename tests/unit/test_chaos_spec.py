"""Chaos specs, schedules and the per-kind summary (no Ray, no servers)."""

from __future__ import annotations

import pytest

from drivers.chaos import KINDS, ChaosSpec, summarize


def test_parse_all_and_lists_and_interval() -> None:
    assert ChaosSpec.parse("all") == ChaosSpec(KINDS, None)
    assert ChaosSpec.parse("hub, conv:7.5") == ChaosSpec(("hub", "conv"), 7.5)
    with pytest.raises(ValueError, match="nope"):
        ChaosSpec.parse("hub,nope")


def test_schedule_injects_every_kind_twice_inside_the_window() -> None:
    spec = ChaosSpec(("hub", "conv", "mongodb"))
    plan = spec.schedule(10.0, 70.0)
    assert [k for _, k in plan] == ["hub", "conv", "mongodb"] * 2
    assert plan[0][0] == 10.0 and all(10.0 <= t < 70.0 for t, _ in plan)
    assert [t for t, _ in ChaosSpec(("hub",), 20.0).schedule(0.0, 65.0)] == [0.0, 20.0, 40.0]


def test_summary_gives_median_and_worst_recovery() -> None:
    faults = [
        {"kind": "hub", "recovery_s": 0.5},
        {"kind": "hub", "recovery_s": 1.5},
        {"kind": "hub", "recovery_s": None},
        {"kind": "conv", "recovery_s": 2.0},
    ]
    assert summarize(faults) == {
        "hub": {"injected": 3, "recovered": 2, "median_recovery_s": 1.0, "worst_recovery_s": 1.5},
        "conv": {"injected": 1, "recovered": 1, "median_recovery_s": 2.0, "worst_recovery_s": 2.0},
    }


def test_demo_leaves_out_servers_it_did_not_start_and_refuses_to_restart_them() -> None:
    from drivers.demo import DemoError
    from drivers.demo import chaos_spec as _chaos_spec
    from drivers.demo import private_kinds as _private_kinds
    from im_actors.config import load_config

    shared = load_config(redis_url="redis://127.0.0.1:6379/0", rabbitmq_url="amqp://guest:guest@127.0.0.1:5672/")
    kinds = _chaos_spec("all", shared, mongo_given=True).kinds
    assert not {"mongodb", "redis-restart", "rabbitmq"} & set(kinds)
    assert "redis" in kinds  # a key flush is confined to the run's own prefix: always allowed
    with pytest.raises(DemoError) as exc:
        _chaos_spec("hub,rabbitmq", shared, mongo_given=False)
    assert exc.value.exit_code == 2

    own = load_config(store_writers=1)  # no URLs: the demo starts private servers for the restart kinds
    spec = _chaos_spec("all:5", own, mongo_given=False)
    assert spec.kinds == KINDS and spec.interval_s == 5.0
    assert _private_kinds(spec) == {"mongodb", "redis", "rabbitmq"}


def test_all_leaves_out_store_writer_kills_when_shards_commit_themselves() -> None:
    from drivers.demo import chaos_spec as _chaos_spec
    from im_actors.config import load_config

    spec = _chaos_spec("all", load_config(store_writers=0), mongo_given=False)
    assert "store" not in spec.kinds and "conv" in spec.kinds


def test_the_storage_proxy_kinds_are_in_all_unless_the_mongo_url_cannot_be_proxied() -> None:
    from drivers.chaos import PROXY_KINDS
    from drivers.demo import DemoError
    from drivers.demo import chaos_spec as _chaos_spec
    from im_actors.config import load_config

    own = load_config()
    assert set(PROXY_KINDS) <= set(_chaos_spec("all", own, mongo_given=False).kinds)
    # A given single-host server: the proxy stands in front of it, the server is never touched.
    given = load_config(mongo_url="mongodb://db.example:27017/")
    kinds = _chaos_spec("all", given, mongo_given=True).kinds
    assert set(PROXY_KINDS) <= set(kinds) and "mongodb" not in kinds
    notes: list[str] = []
    srv = load_config(mongo_url="mongodb+srv://cluster.example/")
    kinds = _chaos_spec("all", srv, mongo_given=True, echo=lambda text, err=False: notes.append(text)).kinds
    assert not set(PROXY_KINDS) & set(kinds) and "cannot be proxied" in notes[0]
    with pytest.raises(DemoError, match="cannot be proxied") as exc:
        _chaos_spec("mongodb-cut", srv, mongo_given=True)
    assert exc.value.exit_code == 2
