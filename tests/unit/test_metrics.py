"""im_actors.metrics without Ray: the series table, the stats mirror, the increment probe, the Grafana
dashboard's expressions, and the CPU each role asks for (issue 11 items 1 and 5)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from im_actors import ids
from im_actors.cluster import bundle_cpus, role_cpus
from im_actors.config import load_config
from im_actors.conversation import ConversationShard, SendItem
from im_actors.hub import Hub
from im_actors.metrics import (
    SERIES,
    ActorMetrics,
    IncrementProbe,
    Series,
    delivery_latency_ms,
    exported_names,
)
from im_actors.push.worker import PushWorker
from im_actors.session import SessionShard
from tests.fakes import FakePeers, FakeStore

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "im-actors.json"


class FakeMetric:
    def __init__(self, series: Series, tags: dict[str, str]) -> None:
        self.series, self.tags = series, tags
        self.incs: list[tuple[float, dict[str, str] | None]] = []
        self.sets: list[tuple[float, dict[str, str] | None]] = []
        self.observed: list[float] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert value > 0  # Ray's Counter.inc refuses anything else
        self.incs.append((value, tags))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.sets.append((value, tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.observed.append(value)


class FakeBackend:
    def __init__(self) -> None:
        self.made: dict[str, FakeMetric] = {}

    def make(self, series: Series, default_tags: dict[str, str]) -> FakeMetric:
        self.made[series.name] = FakeMetric(series, default_tags)
        return self.made[series.name]


def test_series_names_units_and_roles() -> None:
    names = [s.name for s in SERIES]
    assert len(names) == len(set(names))
    assert all(n.startswith("im_") for n in names)
    assert {s.role for s in SERIES} - {"*"} == set(ids.ROLES)
    for s in SERIES:
        if s.kind == "histogram":
            assert s.bounds and list(s.bounds) == sorted(s.bounds)
            assert s.name.endswith("_ms") or s.name.endswith("_batch")  # ms, or entries per batch
        elif s.name != "im_up":
            assert s.path, s.name
    assert "ray_im_hub_frames_in_total" in exported_names()
    assert {"ray_im_conv_commit_ms_bucket", "ray_im_conv_commit_ms_count"} <= exported_names()


def test_mirror_counts_increments_sets_gauges_and_survives_a_restart() -> None:
    stats: dict[str, Any] = {"frames_in": 10, "connections": 3, "answers": {"ack": 4, "forbidden": 1}}
    backend = FakeBackend()
    m = ActorMetrics(load_config(deployment="dep1"), "hub", "dep1-hub-0", lambda: stats, backend)
    assert "im_conv_committed" not in backend.made  # only the role's own series
    m.mirror()
    stats.update(frames_in=15, connections=2, answers={"ack": 6, "forbidden": 1, "rate_limited": 2})
    m.mirror()
    stats.update(frames_in=4)  # a new incarnation of the counters: counted from zero again
    m.mirror()
    made = backend.made
    assert [v for v, _ in made["im_hub_frames_in"].incs] == [10, 5, 4]
    assert made["im_hub_connections"].sets == [(3, None), (2, None), (2, None)]
    assert [v for v, _ in made["im_hub_acks"].incs] == [4, 2]
    errors = made["im_hub_errors"].incs
    assert errors == [(1, {"code": "forbidden"}), (2, {"code": "rate_limited"})]  # never "ack"
    assert made["im_up"].sets[-1] == (1.0, {"role": "hub"})
    assert made["im_hub_frames_in"].tags == {"deployment": "dep1", "actor": "dep1-hub-0"}


def test_mirror_never_raises_and_zero_interval_turns_metrics_off() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("stats failed")

    backend = FakeBackend()
    ActorMetrics(load_config(), "conv", "conv-0", broken, backend).mirror()  # logged, not raised
    off = FakeBackend()
    m = ActorMetrics(load_config(metrics_interval_s=0), "conv", "conv-0", dict, off)
    m.mirror()
    m.observe("im_conv_commit_ms", 3.0)
    assert not off.made and not m.enabled


def test_increment_probe_samples_increments_and_refuses_unknown_keys() -> None:
    seen: list[float] = []
    probe = IncrementProbe({"commit_ms_total": 0.0, "commits": 0}, {"commit_ms_total": seen.append})
    probe["commit_ms_total"] += 2.5
    probe["commit_ms_total"] += 4.0
    probe["commits"] += 1
    assert seen == [2.5, 4.0]
    assert dict(probe) == {"commit_ms_total": 6.5, "commits": 1}
    with pytest.raises(KeyError, match="renamed"):
        IncrementProbe({"commits": 0}, {"renamed": seen.append})


async def test_conversation_shard_commits_feed_the_histograms() -> None:
    store = FakeStore()
    config = load_config(fanout_batch_ms=0)
    shard = ConversationShard(config, FakePeers(store, {}), store)  # type: ignore[arg-type]
    backend = FakeBackend()
    m = ActorMetrics(config, "conv", "conv-0", lambda: shard.stats, backend)
    shard.stats = m.probe(shard.stats, commit_ms_total="im_conv_commit_ms", committed="im_conv_commit_batch")
    shard.start()
    items = [SendItem(sender="alice", conv="d:alice:bob", cmid=f"c{i}", body="hi") for i in range(5)]
    acks = await shard.send_batch(items)
    assert [a["seq"] for a in acks] == [1, 2, 3, 4, 5]
    batches = backend.made["im_conv_commit_batch"].observed
    assert sum(batches) == 5 and all(b >= 1 for b in batches)
    assert len(backend.made["im_conv_commit_ms"].observed) == len(batches)
    m.mirror()
    assert [v for v, _ in backend.made["im_conv_activations"].incs] == [1]
    assert sum(v for v, _ in backend.made["im_conv_committed"].incs) == 5


def test_series_paths_name_keys_the_cores_count() -> None:
    """A counter renamed in a core is found here, not as a flat line on a dashboard."""
    config = load_config()
    store = FakeStore()
    hub = Hub(config, "hub-0", FakePeers(store, {}))  # type: ignore[arg-type]
    shell_keys = {
        "hub": {*hub.stats, "connections", "queued_bytes", "queued_bytes_max", "answers"},
        "conv": {*ConversationShard(config, FakePeers(store, {}), store).stats, "active", "routes"},  # type: ignore[arg-type]
        "session": {*SessionShard(config, None, None, None).stats, "users", "push", "push_planner"},  # type: ignore[arg-type]
        "store": {"commits", "mongo_ms_total", "redis_ms_total"},
        "push": {*PushWorker(config, {}, None, None, None).stats()},  # type: ignore[arg-type]
        "router": {"hubs", "hubs_live", "connections"},
        "group": {"cached"},
    }
    for s in SERIES:
        if s.role != "*" and s.path:
            assert s.path[0] in shell_keys[s.role], s.name


def test_delivery_latency_from_entry_ts() -> None:
    items = [({"ts": 1000}, [1, 2]), ({"ts": 1500}, [3]), ({"no": "ts"}, [4]), ({"ts": 2500}, [5])]
    assert delivery_latency_ms(items, now_ms=2000.0) == [1000.0, 500.0, 0.0]


def test_dashboard_is_json_and_queries_only_exported_series() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    panels = dash["panels"]
    assert panels
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_im_[a-z0-9_]+", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= exported, (panel["title"], names - exported)
            used |= names
    by_name = {s.name: s for s in SERIES}
    roles = {by_name[re.sub(r"^ray_|(_total|_bucket|_sum|_count)$", "", n)].role for n in used}
    assert roles == {"*", *ids.ROLES}  # a panel for every role
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "ray_im_up" in variables["deployment"]["definition"]


def test_every_role_asks_for_cpu_and_default_deployments_fit_two_cpus() -> None:
    base = load_config()
    for role in ids.ROLES:
        assert role_cpus(base, role) > 0
    tests = load_config(hubs=2, session_shards=2, conv_shards=2, store_writers=2, push_workers=1)
    counts = {"router": 1, "hub": 2, "session": 2, "conv": 2, "group": 1, "store": 2, "push": 1}
    demand = sum(role_cpus(tests, role) * n for role, n in counts.items())
    assert demand <= 1.0  # the integration tests' deployment leaves room for the smaller ones beside it
    assert bundle_cpus(tests, 1) == [pytest.approx(2 * (0.1 + 0.05 + 0.1))]
    # tests/cluster: three 1-CPU nodes, 3 hubs, 3 session and 3 conversation shards: one bundle each,
    # and each node keeps room for the actors outside the group (and a second bundle after a removal).
    three = load_config(hubs=3, session_shards=3, conv_shards=3)
    assert bundle_cpus(three, 3) == [pytest.approx(0.25)] * 3
    assert 2 * 0.25 + sum(role_cpus(three, r) for r in ("router", "group", "store")) <= 1.0
    zero = load_config(hub_num_cpus=0, session_num_cpus=0, conv_num_cpus=0)
    assert bundle_cpus(zero, 2) == [0.001, 0.001]  # a bundle must hold some resource


def test_log_knobs_map_to_rays_logging_config() -> None:
    from im_actors.cluster import ray_logging
    from im_actors.errors import ConfigError

    json_cfg = ray_logging(load_config(log_level="INFO"))
    assert (json_cfg.encoding, json_cfg.log_level) == ("JSON", "INFO")
    text_cfg = ray_logging(load_config(log_format="text"))
    assert (text_cfg.encoding, text_cfg.log_level) == ("TEXT", "WARNING")
    with pytest.raises(ConfigError, match="log_level"):
        load_config(log_level="LOUD")
    with pytest.raises(ConfigError, match="hub_num_cpus"):
        load_config(hub_num_cpus=-1)


def test_status_reads_the_alive_record_of_each_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name taken again after a kill has several records in Ray's GCS: status shows the alive one."""
    import ray

    from im_actors import cluster

    records = {
        "a1": {"Name": "hub-0", "State": "DEAD", "NumRestarts": 9, "StartTime": 5, "Address": {"NodeID": "n1"}},
        "a2": {"Name": "hub-0", "State": "ALIVE", "NumRestarts": 2, "StartTime": 3, "Address": {"NodeID": "n2"}},
        "a3": {"Name": "conv-0", "State": "DEAD", "NumRestarts": 1, "StartTime": 1, "Address": {"NodeID": "n1"}},
        "a4": {"Name": "conv-0", "State": "DEAD", "NumRestarts": 4, "StartTime": 7, "Address": {"NodeID": "n3"}},
        "a5": {"Name": "other-hub-0", "State": "ALIVE", "NumRestarts": 0, "StartTime": 1, "Address": {}},
    }
    monkeypatch.setattr(ray._private.state, "actors", lambda: records)  # noqa: SLF001
    table = cluster._actor_table({"hub-0", "conv-0"})  # noqa: SLF001
    assert table["hub-0"] == {"state": "ALIVE", "restarts": 2, "node": "n2", "pid": 0}
    assert table["conv-0"]["restarts"] == 4 and table["conv-0"]["node"] == "n3"  # the newest, both dead
    assert set(table) == {"hub-0", "conv-0"}
