"""Large-group benchmark: fan-out of messages into one big group through real WebSocket clients.

Deploys im-actors on a local Ray (starting the backing services it must), creates one group of
``--members`` users, connects ``--online`` of them (one :class:`~im_actors.client.Client` each, spread
over ``--processes`` OS processes), has one online member send ``--messages`` messages one after the
other (each waits for the previous ack, or ``--inflight N`` at a time; the ack does not wait for
the fan-out), then reports:

- fan-out deliveries/s: live deliveries to the online members' applications, over the time from the
  first send to the last delivery;
- delivery latency (p50, p99, max): receive time - send time (``meta.t``), over every delivery;
- ack latency of the sender; lost deliveries (expected online deliveries never received, after
  every client caught up with ``sync``); duplicates and order violations seen by the applications;
- the MongoDB-wire server it ran on (SecantusDB commits far slower than mongod).

    python benchmarks/large_group.py --members 5000 --online 1000 --messages 100 --processes 4

Offline members get nothing pushed here (push workers are off): they catch up from the conversation
stream when they come back, so their count costs the fan-out nothing per message beyond the session
shard's routing loop. ``--json FILE`` writes the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import queue
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.oracle import latency_summary, new_histogram  # noqa: E402
from im_actors.client import Client  # noqa: E402
from im_actors.cluster import deploy, init_local_ray, teardown  # noqa: E402
from im_actors.config import load_config  # noqa: E402
from im_actors.services import describe_services, ensure_services, purge_deployment  # noqa: E402


def _record(hist: Any, ms: float) -> None:
    hist.record_value(min(max(int(round(ms * 1000.0)), 0), 3_600_000_000))


async def _member_part(router_url: str, users: list[str], conv_q: Any, up: Any, expect: int, timeout_s: float) -> None:
    """One process's online members: connect, say ready, record deliveries, catch up, report."""
    hist = new_histogram()
    got: dict[str, list[int]] = {u: [] for u in users}
    first_recv = last_recv = 0.0
    state: dict[str, str] = {}

    def on_msg_for(user: str) -> Any:
        def on_msg(msg: dict[str, Any]) -> None:
            nonlocal first_recv, last_recv
            if msg.get("kind") == "system" or msg.get("conv") != state.get("conv"):
                return
            now = time.time() * 1000.0
            got[user].append(int(msg["seq"]))
            sent = (msg.get("meta") or {}).get("t")
            if isinstance(sent, (int, float)):
                _record(hist, now - sent)
            first_recv = first_recv or now
            last_recv = max(last_recv, now)

        return on_msg

    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients = [Client(router_url, u, "d1", on_msg=on_msg_for(u), http=http, connect_timeout_s=120) for u in users]
    sem = asyncio.Semaphore(50)

    async def connect(c: Client) -> None:
        async with sem:
            await c.connect()

    try:
        await asyncio.gather(*(connect(c) for c in clients))
        up.put(("ready", len(clients)))
        state["conv"] = await asyncio.to_thread(conv_q.get)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline and sum(len(v) for v in got.values()) < expect * len(users):
            await asyncio.sleep(0.05)
        live = sum(len(v) for v in got.values())
        live_first, live_last = first_recv, last_recv
        await asyncio.gather(*(c.catch_up(30) for c in clients))
        dups = sum(len(v) - len(set(v)) for v in got.values())
        order = sum(sum(1 for a, b in zip(v, v[1:], strict=False) if b <= a) for v in got.values())
        up.put(
            (
                "result",
                {
                    "live": live,
                    "total": sum(len(set(v)) for v in got.values()),
                    "duplicates": dups,
                    "order_violations": order,
                    "first_recv_ms": live_first,
                    "last_recv_ms": live_last,
                    "hist": hist.encode().decode("ascii"),
                },
            )
        )
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await http.close()


def _member_main(router_url: str, users: list[str], conv_q: Any, up: Any, expect: int, timeout_s: float) -> None:
    logging.basicConfig(level=logging.ERROR)
    try:
        asyncio.run(_member_part(router_url, users, conv_q, up, expect, timeout_s))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        up.put(("error", repr(exc)))


async def _owner_part(router_url: str, owner: str, members: list[str], messages: int) -> dict[str, Any]:
    """Create the group (owner online, the rest listed) and hand back the conversation id."""
    client = Client(router_url, owner, "d1", connect_timeout_s=120, request_timeout_s=120)
    await client.connect()
    try:
        group, conv = await client.group_create("large", members)
        info = await client.group_info(group)
        return {"group": group, "conv": conv, "members": len(info["members"])}
    finally:
        await client.close()


async def _send_part(router_url: str, owner: str, conv: str, messages: int, inflight: int) -> dict[str, Any]:
    """Send ``messages`` with at most ``inflight`` unacked at a time; ack latencies in a histogram."""
    client = Client(router_url, owner, "d2", connect_timeout_s=120)
    await client.connect()
    ack_hist = new_histogram()
    window = asyncio.Semaphore(inflight)

    async def one(i: int) -> None:
        async with window:
            sent = time.time() * 1000.0
            await client.send(conv, f"message {i}", meta={"t": sent})
            _record(ack_hist, time.time() * 1000.0 - sent)

    try:
        first_send = time.time() * 1000.0
        tasks = []
        for i in range(messages):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0)  # issued in order: cmid i before cmid i + 1
        await asyncio.gather(*tasks)
        last_ack = time.time() * 1000.0
    finally:
        await client.close()
    return {"first_send_ms": first_send, "last_ack_ms": last_ack, "ack_latency_ms": latency_summary(ack_hist)}


def main(argv: list[str] | None = None) -> int:
    """Run once and print the report; exit status 1 when a delivery was lost or duplicated."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--online", type=int, default=1000, help="members connected (the sender among them)")
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--processes", type=int, default=4, help="member client processes")
    ap.add_argument("--inflight", type=int, default=1, help="sends in flight (1: each waits for the previous ack)")
    ap.add_argument("--shards", type=int, default=2, help="session and conversation shards")
    ap.add_argument("--hubs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound of the delivery phase (s)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    base = load_config(
        dev_login=True,
        jwt_secret=secrets.token_hex(32),
        router_port=0,
        push_workers=0,
        deployment=f"lg{secrets.token_hex(3)}",
        hubs=args.hubs,
        session_shards=args.shards,
        conv_shards=args.shards,
    )
    base, services = ensure_services(base)
    report: dict[str, Any] = {}
    try:
        init_local_ray(base)
        server = describe_services(base)["mongodb"]
        dep = deploy(base)
        try:
            run = secrets.token_hex(3)
            users = [f"lg{run}-u{i}" for i in range(args.members)]
            owner, online = users[0], users[1 : args.online]  # the owner's sending device is online too
            created = asyncio.run(_owner_part(dep.router_url, owner, users[1:], args.messages))
            ctx = mp.get_context("spawn")
            up = ctx.Queue()
            conv_qs = [ctx.Queue() for _ in range(args.processes)]
            parts = [online[i :: args.processes] for i in range(args.processes)]
            procs = [
                ctx.Process(
                    target=_member_main,
                    args=(dep.router_url, part, conv_qs[i], up, args.messages, args.timeout),
                    daemon=True,
                )
                for i, part in enumerate(parts)
            ]
            for p in procs:
                p.start()
            ready = 0
            while ready < len(procs):
                kind, payload = up.get(timeout=600)
                if kind == "error":
                    raise RuntimeError(f"member process failed: {payload}")
                ready += 1
            print(f"# {len(online)} members connected in {len(procs)} processes; sending", flush=True)
            for q in conv_qs:
                q.put(created["conv"])
            sent = asyncio.run(_send_part(dep.router_url, owner, created["conv"], args.messages, args.inflight))
            results: list[dict[str, Any]] = []
            while len(results) < len(procs):
                try:
                    kind, payload = up.get(timeout=args.timeout + 120)
                except queue.Empty:
                    raise RuntimeError("member processes did not report in time") from None
                if kind == "error":
                    raise RuntimeError(f"member process failed: {payload}")
                results.append(payload)
            for p in procs:
                p.join(10)
            stats = {
                name: ray.get(ray.get_actor(name, namespace="im").stats.remote())
                for name in [f"{base.actor_prefix}im-session-{i}" for i in range(args.shards)]
            }
        finally:
            teardown(base)
            purge_deployment(base)
        hist = new_histogram()
        for r in results:
            hist.decode_and_add(r["hist"])
        live = sum(r["live"] for r in results)
        expected = len(online) * args.messages
        last_recv = max(r["last_recv_ms"] for r in results)
        span_s = max((last_recv - sent["first_send_ms"]) / 1000.0, 1e-9)
        report = {
            "members": created["members"],
            "online": len(online) + 1,
            "messages": args.messages,
            "processes": args.processes,
            "inflight": args.inflight,
            "expected_deliveries": expected,
            "live_deliveries": live,
            "lost": expected - sum(r["total"] for r in results),
            "duplicates": sum(r["duplicates"] for r in results),
            "order_violations": sum(r["order_violations"] for r in results),
            "send_phase_s": round((sent["last_ack_ms"] - sent["first_send_ms"]) / 1000.0, 3),
            "fanout_span_s": round(span_s, 3),
            "fanout_deliveries_per_s": round(live / span_s, 1),
            "delivery_latency_ms": latency_summary(hist),
            "ack_latency_ms": sent["ack_latency_ms"],
            "session_shards": stats,
            "mongodb": server,
            "ray": ray.__version__,
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        services.stop()
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if report["lost"] or report["duplicates"] or report["order_violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
