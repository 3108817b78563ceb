"""Hostile-client benchmark: a hub's resident memory and well-behaved clients' delivery latency under abuse.

Runs one real hub (``im_actors.hub.Hub``, its WebSocket server and code unchanged) in a child process,
with its peers faked in that process (tests/hubkit.py: a session table and one conversation shard that
fans every committed entry out through the hub), so the hub's RSS is the child's RSS and nothing else.
From this process it then:

1. attempts ``--headers`` frames whose header claims 1 GiB (half before auth, half after), on as
   many connections: each must be closed 1009 without the payload ever being buffered;
2. runs a busy group of ``--members`` members, one of which sends ``--rate`` messages/s for
   ``--duration`` s, and measures every other member's delivery latency (send -> receive);
3. does the same with ``--stalled`` extra members that never read (4 KiB receive buffers), which the
   hub must close with 4508 once their send queue passes ``--send-queue-bytes``.

It prints the hub's RSS before and after each phase (and the peak sampled every 10 ms) and p50/p99/max
delivery latency with and without the stalled consumers.

    python benchmarks/hostile.py --members 200 --rate 20 --duration 20 --stalled 10 --body-bytes 2048 \
        --send-queue-bytes 262144 --socket-send-buffer-bytes 65536

Linux only (RSS from /proc). Output: a table on stdout and, with ``--json FILE``, the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.typing import Subprotocol  # noqa: E402

from im_actors.auth import issue_token  # noqa: E402
from im_actors.config import Config, load_config  # noqa: E402
from im_actors.protocol import SUBPROTOCOL_MSGPACK as MP  # noqa: E402
from im_actors.protocol import decode, encode  # noqa: E402
from tests.hubkit import masked_frame  # noqa: E402

GROUP = "g:busy"


# --- the hub, in a child process ------------------------------------------------------------------


def _hub_process(config: Config, members: list[str], conn: Any) -> None:
    from tests.hubkit import HubKit

    async def main() -> None:
        kit = HubKit(config)
        kit.peers.groups[GROUP] = members
        conn.send(await kit.start())
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg == "stats":
                conn.send({**kit.hub.stats, "connections": len(kit.hub.conns)})
            elif msg == "stop":
                await kit.stop()
                conn.send("stopped")
                return

    asyncio.run(main())


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakSampler:
    """Samples a process's RSS every 10 ms in a thread; ``peak`` since the last :meth:`reset`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.01)

    def reset(self) -> None:
        self.peak = rss_mib(self.pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- clients ----------------------------------------------------------------------------------------


async def _authed(url: str, config: Config, user: str, **kwargs: Any) -> ClientConnection:
    ws = await connect(url, subprotocols=[Subprotocol(MP)], compression=None, max_size=None, **kwargs)
    await ws.send(encode({"t": "auth", "token": issue_token(config, user), "device": "d1", "proto": 1}, MP))
    if decode(await ws.recv(), MP)["t"] != "ready":
        raise RuntimeError("no ready")
    return ws


async def one_gib_header(url: str, config: Config, index: int) -> int:
    """One connection that writes a frame header claiming 1 GiB; returns the close code received."""
    if index % 2:
        ws = await _authed(url, config, f"h{index}")
    else:
        ws = await connect(url, subprotocols=[Subprotocol(MP)], compression=None)
    ws.transport.write(masked_frame(0x2, b"x" * 64, 1 << 30))
    try:
        async with asyncio.timeout(30):
            async for _ in ws:
                pass
    except ConnectionClosed:
        pass
    return ws.close_code or 1006


async def stalled(url: str, config: Config, user: str) -> ClientConnection:
    """A member that never reads: 4 KiB receive buffer, one frame queued in the client library."""
    u = urlparse(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((u.hostname, u.port))
    sock.setblocking(False)
    return await _authed(url, config, user, sock=sock, max_queue=1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def busy_group(
    url: str, config: Config, members: list[str], rate: float, duration: float, n_stalled: int, body_bytes: int
) -> dict[str, Any]:
    """Phase 2/3: ``members[0]`` sends to the group at ``rate``; the readers measure latency."""
    readers = members[1 : len(members) - n_stalled]
    stalled_users = members[len(members) - n_stalled :]
    latencies: list[float] = []
    received: dict[str, int] = {u: 0 for u in readers}

    async def read(user: str, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                frame = decode(data, MP)
                if frame.get("t") == "msg":
                    latencies.append((time.perf_counter() - float(frame["body"][:24])) * 1000)
                    received[user] += 1
        except ConnectionClosed:
            pass

    sockets = []
    for i in range(0, len(readers), 50):
        sockets += await asyncio.gather(*(_authed(url, config, u) for u in readers[i : i + 50]))
    tasks = [asyncio.create_task(read(u, ws)) for u, ws in zip(readers, sockets, strict=True)]
    stalls = [await stalled(url, config, u) for u in stalled_users]
    sender = await _authed(url, config, members[0])
    acks = 0

    async def drain_acks() -> None:
        nonlocal acks
        try:
            async for data in sender:
                acks += decode(data, MP).get("t") == "ack"
        except ConnectionClosed:
            pass

    ack_task = asyncio.create_task(drain_acks())
    pad = "." * max(0, body_bytes - 24)
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        body = f"{time.perf_counter():<24.6f}{pad}"
        frame = {"t": "send", "id": sent, "conv": GROUP, "cmid": f"c{sent}-{secrets.token_hex(2)}", "body": body}
        await sender.send(encode(frame, MP))
        sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
    deadline = time.perf_counter() + 30
    while min(received.values(), default=sent) < sent and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    stalled_codes: list[int | None] = []
    for ws in stalls:
        try:
            async with asyncio.timeout(5):
                async for _ in ws:
                    pass
        except (ConnectionClosed, TimeoutError):
            pass
        stalled_codes.append(int(ws.close_code) if ws.close_code is not None else None)
    for ws in [*sockets, sender]:
        await ws.close()
    await asyncio.gather(*tasks, ack_task)
    return {
        "sent": sent,
        "acked": acks,
        "readers": len(readers),
        "deliveries": len(latencies),
        "expected": sent * len(readers),
        "lost": sent * len(readers) - len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
        "stalled_close_codes": stalled_codes,
        "_latencies": latencies,
    }


# --- main -------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(
        jwt_secret=secrets.token_hex(32),
        send_queue_bytes=args.send_queue_bytes,
        socket_send_buffer_bytes=args.socket_send_buffer_bytes,
        rate_send_per_s=0,
        rate_request_per_s=0,
    )
    members = [f"m{i}" for i in range(args.members)]
    stalled_by_round = [[f"s{r}-{i}" for i in range(args.stalled)] for r in range(args.rounds)]
    everyone = members + [u for users in stalled_by_round for u in users]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_hub_process, args=(config, everyone, child), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    url = await loop.run_in_executor(None, parent.recv)
    assert proc.pid is not None
    sampler = PeakSampler(proc.pid)
    out: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "json"}}

    async def stats() -> dict[str, Any]:
        parent.send("stats")
        return await loop.run_in_executor(None, parent.recv)

    try:
        await asyncio.sleep(0.5)
        out["rss_idle_mib"] = round(rss_mib(proc.pid), 1)
        sampler.reset()
        codes: list[int] = []
        for i in range(0, args.headers, 50):
            codes += await asyncio.gather(
                *(one_gib_header(url, config, j) for j in range(i, min(i + 50, args.headers)))
            )
        await asyncio.sleep(0.5)
        out["headers"] = {
            "attempted": args.headers,
            "closed_1009": codes.count(1009),
            "other_codes": sorted(set(codes) - {1009}),
            "rss_before_mib": out["rss_idle_mib"],
            "rss_after_mib": round(rss_mib(proc.pid), 1),
            "rss_peak_mib": round(sampler.peak, 1),
        }
        # Rounds alternate without / with stalled consumers, so load from elsewhere on the machine
        # falls on both alike; each round's stalled members are new (the last ones were closed).
        phases = [(f"without_stalled#{r}", 0, r) for r in range(args.rounds)]
        phases += [(f"with_stalled#{r}", args.stalled, r) for r in range(args.rounds)]
        phases.sort(key=lambda p: (p[2], p[1]))
        for name, n_stalled, r in phases:
            group = members + (stalled_by_round[r] if n_stalled else [])
            before = rss_mib(proc.pid)
            sampler.reset()
            res = await busy_group(url, config, group, args.rate, args.duration, n_stalled, args.body_bytes)
            await asyncio.sleep(0.5)
            res.update(
                {
                    "rss_before_mib": round(before, 1),
                    "rss_peak_mib": round(sampler.peak, 1),
                    "rss_after_mib": round(rss_mib(proc.pid), 1),
                    "hub_slow_closed_total": (await stats())["slow_closed"],
                }
            )
            out.setdefault("rounds", {})[name] = res
        for kind in ("without_stalled", "with_stalled"):
            runs = [v for k, v in out["rounds"].items() if k.startswith(kind + "#")]
            lat = sorted(x for v in runs for x in v.pop("_latencies"))
            out[kind] = {
                "rounds": len(runs),
                "sent": sum(v["sent"] for v in runs),
                "deliveries": len(lat),
                "lost": sum(v["lost"] for v in runs),
                "p50_ms": round(percentile(lat, 0.50), 2),
                "p99_ms": round(percentile(lat, 0.99), 2),
                "max_ms": round(max(lat, default=float("nan")), 2),
                "rss_peak_mib": max(v["rss_peak_mib"] for v in runs),
                "rss_after_mib": runs[-1]["rss_after_mib"],
            }
    finally:
        sampler.stop()
        parent.send("stop")
        await loop.run_in_executor(None, parent.recv)
        proc.join(10)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the three phases and print their figures; exit 1 when a well-behaved delivery was lost."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--headers", type=int, default=1000, help="connections writing a 1 GiB frame header")
    ap.add_argument("--members", type=int, default=200, help="well-behaved group members (the sender included)")
    ap.add_argument("--stalled", type=int, default=10, help="members that never read (phase 3)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds without and with stalled members")
    ap.add_argument("--rate", type=float, default=20.0, help="group messages per second")
    ap.add_argument("--duration", type=float, default=20.0, help="send phase (s)")
    ap.add_argument("--body-bytes", type=int, default=2048, help="size of each group message body")
    ap.add_argument("--send-queue-bytes", type=int, default=256 << 10, help="the hub's send_queue_bytes")
    ap.add_argument(
        "--socket-send-buffer-bytes", type=int, default=65536, help="the hub's socket_send_buffer_bytes (0: kernel)"
    )
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    out = asyncio.run(run(args))
    h = out["headers"]
    print(f"hub RSS idle: {out['rss_idle_mib']} MiB")
    print(
        f"1 GiB headers: {h['attempted']} attempted, {h['closed_1009']} closed 1009 (other codes {h['other_codes']}); "
        f"RSS before {h['rss_before_mib']} MiB, peak {h['rss_peak_mib']} MiB, after {h['rss_after_mib']} MiB"
    )
    print("| round | readers | sent | deliveries | lost | p50 ms | p99 ms | max ms | RSS before/peak/after MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in out["rounds"].items():
        print(
            f"| {name} | {r['readers']} | {r['sent']} | {r['deliveries']} | {r['lost']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['max_ms']} | {r['rss_before_mib']} / {r['rss_peak_mib']} / {r['rss_after_mib']} |"
        )
    for kind in ("without_stalled", "with_stalled"):
        r = out[kind]
        print(
            f"{kind}, all {r['rounds']} rounds: {r['deliveries']} deliveries, {r['lost']} lost, "
            f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms; hub RSS peak {r['rss_peak_mib']} MiB"
        )
    codes = [c for k, v in out["rounds"].items() if k.startswith("with_") for c in v["stalled_close_codes"]]
    print(
        f"stalled consumers closed by the hub (4508): {out['rounds'][list(out['rounds'])[-1]]['hub_slow_closed_total']}"
    )
    print(f"close codes the stalled clients saw when they finally read: {sorted(set(codes), key=str)}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 1 if out["without_stalled"]["lost"] or out["with_stalled"]["lost"] else 0  # (lost: well-behaved only)


if __name__ == "__main__":
    sys.exit(main())
