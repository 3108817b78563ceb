"""The pure parts of benchmarks/capacity.py: splitting measured CPU into per-message and per-delivery
costs, and turning costs into nodes."""

from __future__ import annotations

import pytest

from benchmarks import capacity as cap


def test_split_costs_solves_the_two_points() -> None:
    # hub: 1 ms/msg + 0.1 ms/delivery; 1:1 has 1 delivery per msg, the group 50
    direct = {"hub": 1.1, "conv": 0.5, "session": 0.2, "machine": 5.0, "driver": 0.4, "mongodb": 2.0, "router": 0.1}
    group = {"hub": 6.0, "conv": 0.5 + 0.02 * 49, "session": 0.9, "machine": 9.0, "driver": 3.0, "mongodb": 2.1}
    per_msg, per_delivery = cap.split_costs(direct, 1.0, group, 50.0)
    assert per_msg["hub"] == pytest.approx(1.0)
    assert per_delivery["hub"] == pytest.approx(0.1)
    assert per_delivery["conv"] == pytest.approx(0.02)
    assert per_msg["conv"] == pytest.approx(0.48)
    # not a delivery role: its 1:1 figure, per message only
    assert per_msg["session"] == 0.2 and per_delivery["session"] == 0.0
    # the load generator, the storage server, the machine and the router are not charged per message
    assert not {"machine", "driver", "mongodb", "router"} & set(per_msg)


def test_split_costs_never_negative() -> None:
    per_msg, per_delivery = cap.split_costs({"hub": 2.0}, 1.0, {"hub": 1.0}, 50.0)  # noise: cheaper with more copies
    assert per_delivery["hub"] == 0.0 and per_msg["hub"] == 2.0
    per_msg, per_delivery = cap.split_costs({"hub": 0.1}, 1.0, {"hub": 50.0}, 50.0)
    assert per_msg["hub"] == 0.0 and per_delivery["hub"] > 0
    with pytest.raises(ValueError, match="different deliveries"):
        cap.split_costs({"hub": 1.0}, 2.0, {"hub": 1.0}, 2.0)


def _costs(**kw: float) -> object:
    base = dict(
        cpu_ms_per_msg={"hub": 1.0, "conv": 1.0, "session": 0.0},
        cpu_ms_per_delivery={"hub": 0.5, "conv": 0.0, "session": 0.0},
        hub_bytes_per_conn=25 * 1024.0,
        session_bytes_per_conn=2 * 1024.0,
        conv_bytes_per_active_conv=1000.0,
        redis_bytes_per_entry=200.0,
        mongo_bytes_per_doc=150.0,
    )
    base.update(kw)
    return cap.Costs(**base)


def test_plan_nodes_cpu_and_memory() -> None:
    target = cap.Target(
        connections=1_000_000,
        msgs_per_s=10_000.0,
        deliveries_per_msg=2.0,
        active_convs=1_000_000,
        recent_ttl_s=3600,
        node_cores=16,
        node_gib=64.0,
        cpu_utilisation=0.5,
    )
    plan = cap.plan_nodes(_costs(), target)
    hub = plan["roles"]["hub"]
    # (10k x 1 ms + 10k x 2 x 0.5 ms) = 20 s of CPU per s = 20 cores at 100 %, 40 at 50 %
    assert hub["cores"] == pytest.approx(40.0)
    assert hub["nodes"] == 3 and hub["by"] == "cpu"
    assert hub["memory_gib"] == pytest.approx(1_000_000 * 25 / 2**20, abs=0.1)
    # the session shard costs no CPU here, only the memory of its connections: one node, by memory
    assert plan["roles"]["session"]["nodes"] == 1 and plan["roles"]["session"]["by"] == "memory"
    assert plan["redis"]["entries"] == 10_000 * 3600
    assert plan["redis"]["memory_gib"] == pytest.approx(10_000 * 3600 * 200 / 2**30, abs=0.1)
    assert plan["nodes"] == sum(r["nodes"] for r in plan["roles"].values()) + plan["redis"]["nodes"]


def test_plan_nodes_memory_decides_when_connections_dominate() -> None:
    target = cap.Target(connections=10_000_000, msgs_per_s=100.0, node_gib=16.0)
    plan = cap.plan_nodes(_costs(hub_bytes_per_conn=100 * 1024.0), target)
    hub = plan["roles"]["hub"]
    assert hub["by"] == "memory"
    assert hub["nodes"] == 60  # 10M x 100 KB = 953.7 GiB on 16-GiB nodes
