"""Lifecycle pieces without Ray: the router's drain marks, deployment names, config differences,
the drain chaos kind's record and summary."""

from __future__ import annotations

import random

from drivers.chaos import KINDS, ChaosSpec, Fault, summarize
from im_actors.cluster import _deployment_of, config_differences
from im_actors.config import load_config
from im_actors.router import HubTable


def test_a_draining_hub_is_not_handed_out_until_a_new_process_answers() -> None:
    table = HubTable(random.Random(2))
    table.update("h0", "ws://a", 0, incarnation="a1")
    table.update("h1", "ws://b", 5, incarnation="b1")
    assert table.drain("h0") and not table.drain("nope")
    assert {table.pick().name for _ in range(10)} == {"h1"}  # type: ignore[union-attr]
    assert table.pick({"h1"}).name == "h1"  # type: ignore[union-attr]  # excluded, but the only one left
    table.update("h0", "ws://a", 0, draining=False, incarnation="a1")  # an answer sent before the drain
    assert [h.name for h in table.live()] == ["h1"]
    table.update("h0", "ws://a", 0, draining=True, incarnation="a1")
    table.update("h0", "ws://a2", 0, draining=False, incarnation="a2")  # the replaced process
    assert sorted(h.name for h in table.live()) == ["h0", "h1"]
    assert table.pick().name == "h0"  # type: ignore[union-attr]


def test_a_hub_that_says_it_drains_is_marked() -> None:
    table = HubTable()
    table.update("h0", "ws://a", 3, draining=True, incarnation="x")
    assert table.live() == [] and table.hubs["h0"].draining
    assert table.pick() is None


def test_deployment_of_actor_names() -> None:
    assert _deployment_of("prod-im-hub-3") == "prod"
    assert _deployment_of("im-router-0") == ""
    assert _deployment_of("a-im-b-im-conv-12") == "a-im-b"
    assert _deployment_of("x-im-im-session-0") == "x-im"
    assert _deployment_of("prod-im-nothing-1") is None
    assert _deployment_of("someone-else") is None
    assert _deployment_of("prodim-hub-1") is None


def test_config_differences_names_keys_only() -> None:
    a = load_config(deployment="d", jwt_secret="s" * 32)
    b = a.model_copy(update={"hubs": 5, "jwt_secret": "t" * 32})
    assert config_differences(a, b) == ["hubs", "jwt_secret"]
    assert config_differences(a, a) == []


def test_drain_is_a_chaos_kind_and_its_record_carries_the_spread() -> None:
    assert "drain" in KINDS
    assert ChaosSpec.parse("drain").kinds == ("drain",)
    assert [k for _, k in ChaosSpec.parse("drain").schedule(0, 60)] == ["drain", "drain"]
    fault = Fault("drain", "d-im-hub-1", 8.0, recovery_s=12.5)
    fault.drain = {"hub": "d-im-hub-1", "closed": 30, "spread_s": 9.6, "ready_s": 1.2}
    row = fault.as_dict()
    assert row["reconnect_spread_s"] == 9.6 and row["drain"]["closed"] == 30
    assert "drain" not in Fault("hub", "h", 1.0).as_dict()
    second = {**row, "reconnect_spread_s": 8.1, "recovery_s": 11.0}
    summary = summarize([row, second, Fault("hub", "h", 3.0, recovery_s=1.0).as_dict()])
    assert summary["drain"]["injected"] == 2 and summary["drain"]["reconnect_spread_s"] == [9.6, 8.1]
    assert "reconnect_spread_s" not in summary["hub"]


def test_drain_window_knob_is_checked() -> None:
    import pytest

    from im_actors.errors import ConfigError

    assert load_config().drain_window_s == 10.0
    with pytest.raises(ConfigError, match="drain_window_s"):
        load_config(drain_window_s=-1)


def test_rays_placement_group_warning_is_filtered_and_explained() -> None:
    import logging

    from im_actors.cluster import PLACEMENT_GROUP_NOTE, _DropPlacementGroupWarning

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("ray.actor", logging.WARNING, __file__, 1, msg, None, None)

    quiet = _DropPlacementGroupWarning()
    warning = (
        "Scheduling a restartable detached actor with a placement group is not recommended because Ray will "
        "kill the actor when the placement group is removed and the actor will not be able to be restarted."
    )
    assert not quiet.filter(record(warning))
    assert quiet.filter(record("some other warning"))
    assert "im-actors down" in PLACEMENT_GROUP_NOTE and "restarts them" in PLACEMENT_GROUP_NOTE
