"""Capacity model: per-role costs measured on this machine, turned into the nodes a target load needs.

Two parts, both printed (``--json FILE`` writes every figure):

**Measured here** (each a real deployment on one local Ray, the MongoDB-wire server named in the output):

1. *CPU per message, per role* (``--cpu-s`` seconds of steady open-loop load each, as
   benchmarks/saturation.py drives it, psutil CPU time of each actor process):

   - the 1:1 workload (``--users`` users, every message from a random user to a random other user) at
     ``--rate-direct`` msgs/s;
   - a group workload (one group of ``--group-size`` members, every message delivered to every member)
     at ``--rate-group`` msgs/s in.

   A role's CPU is split into a cost per message in and a cost per delivery by solving the two runs'
   equations ``cpu/msg = per_msg + per_delivery x deliveries/msg`` (clamped at 0; a role whose work
   does not grow with deliveries gets its 1:1 figure per message; the router is not charged per message:
   its work is heartbeats and connects). ``other`` is the machine's busy time
   minus every measured process: Ray's own processes (raylet, GCS), Redis, RabbitMQ and anything else
   on the machine (it is shared).
2. *Memory*, on a deployment of one hub, one shard of each kind and no store writer:

   - per connection: ``--connections`` idle authenticated WebSocket clients (benchmarks/connections.py's
     client fleet); the RSS growth of the hub and of the session shard divided by the connections;
   - per active conversation: ``--conv-users`` users send ``--conv-messages`` 1:1 messages between random
     pairs, so that almost every message opens a conversation; the conversation shard's RSS growth
     divided by the sequencers it then holds (``stats()["active"]``);
   - per recent entry in Redis: ``MEMORY USAGE`` of up to 500 of the deployment's ``m:<conv>:<seq>``
     keys (their mean, bytes); per message document in MongoDB: the mean BSON size of up to 500 stored
     ``messages`` documents (bytes, without index entries or the storage engine's overhead).

**The model** (:func:`plan_nodes`, a pure function of those costs and a :class:`Target`): for
``--target-connections`` concurrent connections and ``--target-rate`` msgs/s in with
``--target-deliveries`` deliveries per message and ``--target-active-convs`` active conversations,
each role needs ``rate x cost / cpu_utilisation`` cores and ``count x bytes`` of memory; roles are
packed onto nodes of ``--node-cores`` cores and ``--node-gib`` GiB, each role on nodes of its own (so
a hub node's sockets never wait behind a shard's CPU), and the node count of a role is the larger of
what its CPU and its memory need. Redis holds every entry for ``recent_ttl_s``; MongoDB's cores are
*not* modelled from the SecantusDB figure (SecantusDB commits far slower than a real mongod): the
output prints it, labelled, and the storage tier is left to a measurement on the real server.

What is extrapolated, not measured: everything beyond one machine of 2 cores (linear scaling of
shards and hubs by their count, no cross-node cost beyond what one host shows), costs at other batch
sizes (the per-message costs are measured at ``--rate-direct``; bigger batches under more load cost
less per message), and memory beyond the measured counts (linear). docs/capacity.md gives the
figures of one run and says which is which.

    python benchmarks/capacity.py --json /tmp/capacity.json

Exit status: 0 when every measurement ran (and lost nothing), 1 when one broke or lost messages,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bson
import psutil
import ray
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.connections import ClientFleet, per_connection_kb, raise_nofile_limit, role_pids, rss  # noqa: E402
from benchmarks.saturation import RampOptions, run_step  # noqa: E402
from drivers.run import run_workload  # noqa: E402
from drivers.synthetic import SyntheticWorkload  # noqa: E402
from im_actors import ids  # noqa: E402
from im_actors.cluster import deploy, init_local_ray, teardown  # noqa: E402
from im_actors.config import Config, ConfigError, load_config  # noqa: E402
from im_actors.services import LocalServices, describe_services, ensure_services, purge_deployment  # noqa: E402
from im_actors.store import mongo_client  # noqa: E402

log = logging.getLogger("capacity")

#: Roles whose CPU grows with deliveries (they write or route each delivered copy).
DELIVERY_ROLES = ("hub", "conv")
#: Process groups of the CPU sampler that are not charged per message: the machine, the load generator,
#: the storage server (not modelled, see the module docstring) and the router (its work is heartbeats and
#: hub lookups, which grow with hubs and connects, not messages; it runs beside a hub).
NOT_ROLES = ("machine", "driver", "mongodb", "router")
#: Keys sampled for the Redis and MongoDB sizes.
SIZE_SAMPLE = 500


# --- the model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Per-role costs: ``cpu_ms_per_msg[role]`` (ms of CPU per message in), ``cpu_ms_per_delivery[role]``
    (ms per delivered copy), and memory in bytes per connection (hub, session), per active conversation
    (conversation shard), per recent entry (Redis) and per message document (MongoDB, BSON only)."""

    cpu_ms_per_msg: Mapping[str, float]
    cpu_ms_per_delivery: Mapping[str, float]
    hub_bytes_per_conn: float
    session_bytes_per_conn: float
    conv_bytes_per_active_conv: float
    redis_bytes_per_entry: float
    mongo_bytes_per_doc: float


@dataclass(frozen=True)
class Target:
    """The load to plan for: connections held at once, msgs/s in, mean deliveries per message (the
    recipients' devices reached live), active conversations (sequencers held in memory), Redis's
    retention (s), the nodes' size and the share of a core a role may use (headroom for bursts)."""

    connections: int = 1_000_000
    msgs_per_s: float = 100_000.0
    deliveries_per_msg: float = 2.0
    active_convs: int = 2_000_000
    recent_ttl_s: int = 7 * 24 * 3600
    node_cores: int = 16
    node_gib: float = 64.0
    cpu_utilisation: float = 0.6


def split_costs(
    direct: Mapping[str, float],
    direct_deliveries: float,
    group: Mapping[str, float],
    group_deliveries: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """Split each role's ms of CPU per message (``direct``: the 1:1 run, ``group``: the group run, each
    with its deliveries per message) into ``(per_msg, per_delivery)``.

    For :data:`DELIVERY_ROLES`, solves ``cpu = per_msg + per_delivery x deliveries`` through the two
    points (both clamped at 0: a noisy pair cannot make a cost negative); every other role is charged
    per message only, at its 1:1 figure (the group run's per-message figure is kept in the output for
    comparison). Raises ValueError when the two runs have the same deliveries per message.
    """
    if math.isclose(direct_deliveries, group_deliveries):
        raise ValueError("the two runs need different deliveries per message to split the costs")
    per_msg: dict[str, float] = {}
    per_delivery: dict[str, float] = {}
    for role in sorted(set(direct) | set(group)):
        if role in NOT_ROLES:
            continue
        d, g = float(direct.get(role, 0.0)), float(group.get(role, 0.0))
        if role in DELIVERY_ROLES:
            slope = max((g - d) / (group_deliveries - direct_deliveries), 0.0)
            per_delivery[role] = slope
            per_msg[role] = max(d - slope * direct_deliveries, 0.0)
        else:
            per_msg[role] = d
            per_delivery[role] = 0.0
    return per_msg, per_delivery


def plan_nodes(costs: Costs, target: Target) -> dict[str, Any]:
    """Nodes per role for ``target``: ``{"roles": {role: {cores, memory_gib, nodes, by}}, "redis":
    {...}, "nodes": total}`` (``by`` names what decides the count: ``cpu`` or ``memory``).

    A role's cores are ``(msgs/s x per_msg + msgs/s x deliveries x per_delivery) / 1000 /
    cpu_utilisation``; its memory is what it holds (hub and session: connections, conversation shard:
    active conversations; others: nothing modelled); its nodes ``max(ceil(cores / node_cores),
    ceil(memory / node_gib), 1 if it costs anything)``. Redis memory is ``msgs/s x recent_ttl_s x
    bytes per entry`` (every entry is kept for the retention). MongoDB is not planned here (see the
    module docstring): ``storage`` gives only the documents' bytes per day.
    """
    held = {
        "hub": target.connections * costs.hub_bytes_per_conn,
        "session": target.connections * costs.session_bytes_per_conn,
        "conv": target.active_convs * costs.conv_bytes_per_active_conv,
    }
    roles: dict[str, dict[str, Any]] = {}
    for role in sorted(set(costs.cpu_ms_per_msg) | set(held)):
        ms = target.msgs_per_s * costs.cpu_ms_per_msg.get(role, 0.0)
        ms += target.msgs_per_s * target.deliveries_per_msg * costs.cpu_ms_per_delivery.get(role, 0.0)
        cores = ms / 1000.0 / target.cpu_utilisation
        mem_gib = held.get(role, 0.0) / 2**30
        by_cpu = math.ceil(cores / target.node_cores) if cores > 0 else 0
        by_mem = math.ceil(mem_gib / target.node_gib) if mem_gib > 0 else 0
        nodes = max(by_cpu, by_mem)
        roles[role] = {
            "cores": round(cores, 1),
            "memory_gib": round(mem_gib, 1),
            "nodes": nodes,
            "by": "memory" if by_mem > by_cpu else "cpu",
        }
    entries = target.msgs_per_s * target.recent_ttl_s
    redis_gib = entries * costs.redis_bytes_per_entry / 2**30
    redis_nodes = math.ceil(redis_gib / target.node_gib) if redis_gib > 0 else 0
    return {
        "target": asdict(target),
        "roles": roles,
        "redis": {"entries": entries, "memory_gib": round(redis_gib, 1), "nodes": redis_nodes},
        "storage": {"bson_gib_per_day": round(target.msgs_per_s * 86400 * costs.mongo_bytes_per_doc / 2**30, 1)},
        "nodes": sum(r["nodes"] for r in roles.values()) + redis_nodes,
    }


# --- measurements -----------------------------------------------------------------------------------


def measure_cpu(base: Config, services: LocalServices, rate: float, opts: RampOptions) -> dict[str, Any]:
    """One saturation-style step at ``rate`` msgs/s; returns its ms of CPU per message by process group
    (``ms_per_msg``, ``other`` included), deliveries per message, and the step's loss figures."""
    step = run_step(base, services, rate, opts)
    report, cpu = step["report"], step["cpu"]
    acked = int(report.get("acked", 0))
    per_msg = dict(cpu.get("ms_per_msg", {}))
    if per_msg and "machine" in per_msg:
        measured = sum(v for k, v in per_msg.items() if k != "machine")
        per_msg["other"] = round(max(per_msg["machine"] - measured, 0.0), 3)
    return {
        "rate": rate,
        "acked": acked,
        "delivered": int(report.get("delivered", 0)),
        "deliveries_per_msg": round(int(report.get("delivered", 0)) / acked, 3) if acked else 0.0,
        "lost": int(report.get("lost", 0)),
        "duplicates": int(report.get("duplicates", 0)),
        "order_violations": int(report.get("order_violations", 0)),
        "ms_per_msg": per_msg,
        "machine_busy_pct": cpu.get("machine_busy_pct"),
        "load_avg_1m": cpu.get("load_avg_1m"),
    }


def _redis_entry_bytes(config: Config) -> tuple[float, int]:
    """Mean ``MEMORY USAGE`` (bytes) of up to :data:`SIZE_SAMPLE` recent-entry keys, and how many were read."""
    r = redis.Redis.from_url(config.redis_url)
    try:
        sizes = []
        for key in r.scan_iter(match=f"{config.key_prefix}m:*", count=1000):
            usage = r.memory_usage(key, samples=0)
            if usage:
                sizes.append(int(usage))
            if len(sizes) >= SIZE_SAMPLE:
                break
    finally:
        r.close()
    return (sum(sizes) / len(sizes) if sizes else 0.0), len(sizes)


async def _mongo_doc_bytes(config: Config) -> tuple[float, int]:
    """Mean BSON size (bytes) of up to :data:`SIZE_SAMPLE` stored message documents, and how many."""
    client = mongo_client(config)
    try:
        docs = await client[config.mongo_db]["messages"].find({}).to_list(SIZE_SAMPLE)
    finally:
        await client.close()
    sizes = [len(bson.encode(d)) for d in docs]
    return (sum(sizes) / len(sizes) if sizes else 0.0), len(sizes)


def measure_memory(
    base: Config, connections: int, processes: int, conv_users: int, conv_messages: int
) -> dict[str, Any]:
    """Memory per connection, per active conversation, per recent entry and per message document
    (see the module docstring), on a fresh deployment of one actor per role; torn down afterwards."""
    cfg = base.model_copy(
        update={
            "deployment": f"cap{secrets.token_hex(3)}",
            "hubs": 1,
            "session_shards": 1,
            "conv_shards": 1,
            "group_shards": 1,
            "store_writers": 0,
        }
    )
    out: dict[str, Any] = {}
    dep = deploy(cfg)
    fleet: ClientFleet | None = None
    try:
        pids = role_pids(cfg)
        hub_name = ids.actor_name("hub", 0, cfg.actor_prefix)
        session_name = ids.actor_name("session", 0, cfg.actor_prefix)
        conv_name = ids.actor_name("conv", 0, cfg.actor_prefix)
        hub_pid, session_pid, conv_pid = pids[hub_name], pids[session_name], pids[conv_name]
        time.sleep(3.0)
        hub0, session0 = rss(hub_pid), rss(session_pid)
        fleet = ClientFleet(processes, dep.hub_urls[hub_name], cfg, concurrency=100, timeout_s=60.0)
        phase = fleet.open(connections)
        time.sleep(3.0)
        held = int(ray.get(dep.actors[hub_name].load.remote(), timeout=60)["connections"])
        hub1, session1 = rss(hub_pid), rss(session_pid)
        out["connections"] = {
            "asked": connections,
            "held": held,
            "failed": phase["failed"],
            "connect_rate_per_s": phase["connect_rate_per_s"],
            "hub_rss_before_bytes": hub0,
            "hub_rss_after_bytes": hub1,
            "hub_kb_per_conn": per_connection_kb(hub0, hub1, held),
            "session_kb_per_conn": per_connection_kb(session0, session1, held),
        }
        fleet.close()
        fleet = None

        conv_actor = dep.actors[conv_name]
        active0 = int(ray.get(conv_actor.stats.remote(), timeout=60)["active"])
        conv0 = rss(conv_pid)
        rate = max(conv_messages / 20.0, 1.0)
        workload = SyntheticWorkload(users=conv_users, rate=rate, duration_s=conv_messages / rate, group_size=0, seed=7)
        report = run_workload(dep.router_url, workload, processes=processes, progress=False, open_loop=True)
        time.sleep(3.0)
        active1 = int(ray.get(conv_actor.stats.remote(), timeout=60)["active"])
        conv1 = rss(conv_pid)
        grown = active1 - active0
        out["conversations"] = {
            "messages": int(report.get("acked", 0)),
            "lost": int(report.get("lost", 0)),
            "active_before": active0,
            "active_after": active1,
            "conv_rss_before_bytes": conv0,
            "conv_rss_after_bytes": conv1,
            "bytes_per_active_conv": round((conv1 - conv0) / grown, 1) if grown > 0 else 0.0,
        }
        entry_bytes, entries = _redis_entry_bytes(cfg)
        doc_bytes, docs = asyncio.run(_mongo_doc_bytes(cfg))
        out["redis"] = {"bytes_per_entry": round(entry_bytes, 1), "sampled": entries}
        out["mongodb"] = {"bson_bytes_per_doc": round(doc_bytes, 1), "sampled": docs}
    finally:
        if fleet is not None:
            fleet.close()
        teardown(cfg)
        purge_deployment(cfg)
    return out


# --- output -----------------------------------------------------------------------------------------


def format_costs(direct: Mapping[str, Any], group: Mapping[str, Any], costs: Costs) -> list[str]:
    """The measured table: ms of CPU per message of each run, and the split per message / per delivery."""
    lines = [
        f"# CPU, ms per message in: 1:1 at {direct['rate']:g} msgs/s "
        f"({direct['deliveries_per_msg']:g} deliveries/msg), group at {group['rate']:g} msgs/s in "
        f"({group['deliveries_per_msg']:g} deliveries/msg)",
        f"{'role':<10} {'1:1':>8} {'group':>8} {'per msg':>8} {'per dlv':>8}",
    ]
    roles = sorted((set(direct["ms_per_msg"]) | set(group["ms_per_msg"])) - {"machine"})
    for role in roles:
        pm = costs.cpu_ms_per_msg.get(role)
        pd = costs.cpu_ms_per_delivery.get(role)
        lines.append(
            f"{role:<10} {direct['ms_per_msg'].get(role, 0.0):>8.3f} {group['ms_per_msg'].get(role, 0.0):>8.3f} "
            + (f"{pm:>8.3f} {pd:>8.4f}" if pm is not None and pd is not None else f"{'-':>8} {'-':>8}")
        )
    machine = (direct["ms_per_msg"].get("machine", 0.0), group["ms_per_msg"].get("machine", 0.0))
    lines.append(
        f"{'machine':<10} {machine[0]:>8.3f} {machine[1]:>8.3f}"
        f"   (busy {direct['machine_busy_pct']}% / {group['machine_busy_pct']}% of all cores)"
    )
    return lines


def format_plan(plan: Mapping[str, Any], mongo_ms_per_msg: float) -> list[str]:
    """The model's answer, one line per role."""
    t = plan["target"]
    lines = [
        f"# model: {t['connections']:,} connections, {t['msgs_per_s']:,.0f} msgs/s in, {t['deliveries_per_msg']:g} "
        f"deliveries/msg, {t['active_convs']:,} active conversations; nodes of {t['node_cores']} cores and "
        f"{t['node_gib']:g} GiB, {t['cpu_utilisation']:.0%} of a core per role",
        f"{'role':<10} {'cores':>8} {'mem GiB':>8} {'nodes':>6}  by",
    ]
    for role, r in plan["roles"].items():
        lines.append(f"{role:<10} {r['cores']:>8.1f} {r['memory_gib']:>8.1f} {r['nodes']:>6}  {r['by']}")
    rd = plan["redis"]
    lines.append(
        f"{'redis':<10} {'':>8} {rd['memory_gib']:>8.1f} {rd['nodes']:>6}  memory ({rd['entries']:,.0f} recent entries "
        f"for {t['recent_ttl_s']:,} s)"
    )
    lines.append(f"# nodes without storage: {plan['nodes']}")
    sec_cores = t["msgs_per_s"] * mongo_ms_per_msg / 1000.0
    lines.append(
        f"# storage: {plan['storage']['bson_gib_per_day']:,.1f} GiB/day of message BSON; the MongoDB-wire server here "
        f"spent {mongo_ms_per_msg:.2f} ms CPU/msg, i.e. {sec_cores:,.0f} cores at the target (SecantusDB, NOT a "
        "mongod figure: measure the real server)"
    )
    return lines


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--users", type=int, default=200, help="users of the 1:1 CPU run")
    ap.add_argument("--rate-direct", type=float, default=250.0, help="msgs/s of the 1:1 CPU run")
    ap.add_argument("--group-size", type=int, default=50, help="members of the group CPU run")
    ap.add_argument("--rate-group", type=float, default=40.0, help="msgs/s in of the group CPU run")
    ap.add_argument("--cpu-s", type=float, default=20.0, help="send phase of each CPU run (s)")
    ap.add_argument("--processes", type=int, default=2, help="driver / client processes")
    ap.add_argument("--connections", type=int, default=5000, help="idle connections of the memory run")
    ap.add_argument("--conv-users", type=int, default=2000, help="users of the active-conversation run")
    ap.add_argument("--conv-messages", type=int, default=10000, help="1:1 messages of the active-conversation run")
    ap.add_argument("--target-connections", type=int, default=Target.connections)
    ap.add_argument("--target-rate", type=float, default=Target.msgs_per_s, help="msgs/s in")
    ap.add_argument("--target-deliveries", type=float, default=Target.deliveries_per_msg, help="per message")
    ap.add_argument("--target-active-convs", type=int, default=Target.active_convs)
    ap.add_argument("--node-cores", type=int, default=Target.node_cores)
    ap.add_argument("--node-gib", type=float, default=Target.node_gib)
    ap.add_argument("--cpu-utilisation", type=float, default=Target.cpu_utilisation, help="share of a core per role")
    ap.add_argument("--json", type=Path, help="write every figure here")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, model, print; see the module docstring for the exit status."""
    ap = _parser()
    args = ap.parse_args(argv)
    if args.group_size < 3 or args.users < 2 or args.cpu_s <= 0 or not 0 < args.cpu_utilisation <= 1:
        ap.error("--group-size >= 3, --users >= 2, --cpu-s > 0 and 0 < --cpu-utilisation <= 1 are required")
    try:
        base = load_config(dev_login=True, jwt_secret=secrets.token_hex(32), router_port=0, push_workers=0)
    except ConfigError as exc:
        print(f"capacity: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise_nofile_limit()
    out: dict[str, Any] = {"args": vars(args) | {"json": str(args.json) if args.json else None}}
    failed = False
    base, services = ensure_services(base)
    try:
        init_local_ray(base)
        server = describe_services(base)["mongodb"]
        out["services"] = {"mongodb": server}
        out["machine"] = {"cores": psutil.cpu_count(), "ray": ray.__version__, "python": sys.version.split()[0]}
        print(
            f"# measured on: MongoDB-wire server {server.get('server')} {server.get('version')}; "
            f"{psutil.cpu_count()} cores; Ray {ray.__version__}; load generator on the same machine",
            flush=True,
        )

        def opts(users: int, group_size: int) -> RampOptions:
            return RampOptions(
                users=users,
                group_size=group_size,
                body_bytes=64,
                step_s=args.cpu_s,
                processes=args.processes,
                open_loop=True,
                send_deadline_s=30.0,
                drain_timeout_s=60.0,
                seed=1,
            )

        direct = measure_cpu(base, services, args.rate_direct, opts(args.users, 0))
        group = measure_cpu(base, services, args.rate_group, opts(args.group_size, args.group_size))
        out["cpu"] = {"direct": direct, "group": group}
        memory = measure_memory(base, args.connections, args.processes, args.conv_users, args.conv_messages)
        out["memory"] = memory
    finally:
        if ray.is_initialized():
            ray.shutdown()
        services.stop()
    for run in (direct, group):
        failed = failed or bool(run["lost"] or run["duplicates"] or run["order_violations"])
    failed = failed or memory["conversations"]["lost"] > 0 or memory["connections"]["failed"] > 0
    per_msg, per_delivery = split_costs(
        direct["ms_per_msg"], direct["deliveries_per_msg"], group["ms_per_msg"], group["deliveries_per_msg"]
    )
    per_msg.pop("other", None)
    per_delivery.pop("other", None)
    costs = Costs(
        cpu_ms_per_msg=per_msg,
        cpu_ms_per_delivery=per_delivery,
        hub_bytes_per_conn=memory["connections"]["hub_kb_per_conn"] * 1024.0,
        session_bytes_per_conn=memory["connections"]["session_kb_per_conn"] * 1024.0,
        conv_bytes_per_active_conv=memory["conversations"]["bytes_per_active_conv"],
        redis_bytes_per_entry=memory["redis"]["bytes_per_entry"],
        mongo_bytes_per_doc=memory["mongodb"]["bson_bytes_per_doc"],
    )
    for line in format_costs(direct, group, costs):
        print(line, flush=True)
    c, cv = memory["connections"], memory["conversations"]
    print(
        f"# memory: hub {c['hub_kb_per_conn']:.1f} KB/connection and session shard {c['session_kb_per_conn']:.1f} "
        f"KB/connection at {c['held']:,} connections ({c['connect_rate_per_s']:,.0f} connects/s); conversation shard "
        f"{cv['bytes_per_active_conv']:,.0f} bytes/active conversation at {cv['active_after']:,}; Redis "
        f"{memory['redis']['bytes_per_entry']:,.0f} bytes/recent entry; {memory['mongodb']['bson_bytes_per_doc']:,.0f} "
        "BSON bytes/message document",
        flush=True,
    )
    target = Target(
        connections=args.target_connections,
        msgs_per_s=args.target_rate,
        deliveries_per_msg=args.target_deliveries,
        active_convs=args.target_active_convs,
        recent_ttl_s=base.recent_ttl_s,
        node_cores=args.node_cores,
        node_gib=args.node_gib,
        cpu_utilisation=args.cpu_utilisation,
    )
    plan = plan_nodes(costs, target)
    out["costs"] = asdict(costs)
    out["plan"] = plan
    for line in format_plan(plan, float(direct["ms_per_msg"].get("mongodb", 0.0))):
        print(line, flush=True)
    if failed:
        print("# a measurement lost, duplicated or reordered messages or failed to connect: see the JSON", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
