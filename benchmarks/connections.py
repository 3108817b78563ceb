"""Idle-connections benchmark: a hub's memory per WebSocket connection and its authenticated connect rate.

Deploys im-actors on a local Ray with **one hub actor** (one session, conversation and group shard,
one store writer, no push workers), then opens ``--connections`` idle clients on it from
``--processes`` client processes (so the load generator is not the limit), each a distinct user
with device ``d1``: WebSocket handshake on ``im.v1.msgpack``, ``auth`` with a token signed here
(HS256, the deployment's secret: the router's dev login is not measured), then waiting for
``ready``. Clients then stay idle (they answer the hub's pings and send nothing).

Several counts are checkpoints of one run (``--connections 2000 10000``: 2,000 clients, then 8,000
more). At each checkpoint, after ``--settle-s`` seconds, it prints:

- the connect rate: clients connected in this phase / (last ready - first connect attempt), in
  connections/s, and each connect's latency (p50/p99/max ms, handshake start to ``ready``);
- the RSS of the hub actor's process (psutil; before any client and now), and the difference divided
  by the clients connected (KB per connection; target <= 100 KB, ejabberd measured at about 340 KB
  on this machine); the same for the session shard (its per-device table), for reference;
- what the hub says it holds (``load()["connections"]``).

With ``--breakdown N`` (default 2,000; 0 skips it), it then runs the hub's own code
(:class:`im_actors.hub.Hub` through tests/hubkit.py: the real WebSocket server, auth and
per-connection structures, peers faked, the session core real) in a child process under
``tracemalloc``, opens N clients on it the same way and prints the allocation sites that grew, in
bytes per connection, grouped by source line and by file: which per-connection structures dominate.
The hub actor itself is measured from outside only.

The open-file limit of this process is raised to its hard limit (``resource.setrlimit``) before Ray
starts, so the hub actor and the client processes inherit it; a hard limit too low for the count is
reported. Linux only (RSS from psutil).

    python benchmarks/connections.py --connections 2000 10000 --processes 4

``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import linecache
import logging
import multiprocessing as mp
import resource
import secrets
import sys
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.typing import Subprotocol  # noqa: E402

from drivers.oracle import latency_summary, new_histogram  # noqa: E402
from im_actors import ids  # noqa: E402
from im_actors.auth import issue_token  # noqa: E402
from im_actors.cluster import deploy, init_local_ray, teardown  # noqa: E402
from im_actors.config import Config, load_config  # noqa: E402
from im_actors.protocol import SUBPROTOCOL_MSGPACK as MP  # noqa: E402
from im_actors.protocol import decode, encode  # noqa: E402
from im_actors.services import describe_services, ensure_services, purge_deployment  # noqa: E402

log = logging.getLogger("connections")

#: File descriptors a process needs beyond one per connection (its own files, Ray's sockets, ...).
FD_MARGIN = 512


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft open-file limit to its hard limit; returns ``(soft, hard)`` after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %s: %s", target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def split_counts(total: int, parts: int) -> list[int]:
    """``total`` clients over ``parts`` processes, as even as possible (the first ones take the rest)."""
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


def per_connection_kb(before_bytes: int, after_bytes: int, connections: int) -> float:
    """(after - before) / connections, in KB (1 KB = 1024 bytes); 0 when there are no connections."""
    return round((after_bytes - before_bytes) / 1024.0 / connections, 2) if connections > 0 else 0.0


# --- client processes -------------------------------------------------------------------------------


async def _open_one(url: str, config: Config, user: str, timeout_s: float) -> ClientConnection:
    ws = await connect(
        url,
        subprotocols=[Subprotocol(MP)],
        compression=None,
        ping_interval=None,  # idle: only the hub's pings, answered by the library
        open_timeout=timeout_s,
        max_size=1 << 20,
    )
    try:
        await ws.send(encode({"t": "auth", "token": issue_token(config, user), "device": "d1", "proto": 1}, MP))
        async with asyncio.timeout(timeout_s):
            while True:
                frame = decode(await ws.recv(), MP)
                if frame.get("t") == "ready":
                    return ws
                if frame.get("t") == "err":
                    raise RuntimeError(f"auth answered {frame.get('code')}")
    except BaseException:
        await ws.close()
        raise


async def _client_main(index: int, url: str, config: Config, conn: Any, concurrency: int, timeout_s: float) -> None:
    held: list[ClientConnection] = []
    loop = asyncio.get_running_loop()
    prefix = f"c{secrets.token_hex(3)}p{index}u"
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "close":
            await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
            conn.send(("closed", len(held)))
            return
        want = int(cmd[1])
        sem = asyncio.Semaphore(concurrency)
        hist = new_histogram()
        errors: dict[str, int] = {}
        start = time.time()
        last_ready = start

        async def one(i: int, hist: Any = hist, errors: dict[str, int] = errors, sem: Any = sem) -> None:
            nonlocal last_ready
            async with sem:
                t = time.perf_counter()
                try:
                    ws = await _open_one(url, config, f"{prefix}{i}", timeout_s)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    return
                hist.record_value(max(int((time.perf_counter() - t) * 1e6), 1))
                last_ready = max(last_ready, time.time())
                held.append(ws)

        base = len(held)
        await asyncio.gather(*(one(base + k) for k in range(want)))
        conn.send(
            (
                "opened",
                {
                    "opened": len(held) - base,
                    "held": sum(1 for ws in held if ws.close_code is None),
                    "errors": errors,
                    "start": start,
                    "last_ready": last_ready,
                    "hist": hist.encode().decode("ascii"),
                },
            )
        )


def _client_process(index: int, url: str, config: Config, conn: Any, concurrency: int, timeout_s: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.WARNING, format=f"[client {index}] %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_client_main(index, url, config, conn, concurrency, timeout_s))
    except BaseException as exc:
        conn.send(("error", repr(exc)))


class ClientFleet:
    """``processes`` client processes (spawn) holding idle connections to one hub URL."""

    def __init__(self, processes: int, url: str, config: Config, concurrency: int, timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.pipes = []
        self.procs = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_client_process,
                args=(i, url, config, child, concurrency, timeout_s),
                name=f"im-conn-client-{i}",
                daemon=True,
            )
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)
        self.held = 0

    def open(self, total: int) -> dict[str, Any]:
        """Open ``total`` more connections spread over the processes; returns the phase's figures."""
        shares = split_counts(total, len(self.pipes))
        for pipe, n in zip(self.pipes, shares, strict=True):
            pipe.send(("open", n))
        replies = []
        for pipe in self.pipes:
            kind, data = pipe.recv()
            if kind != "opened":
                raise RuntimeError(f"client process failed: {data}")
            replies.append(data)
        hist = new_histogram()
        errors: dict[str, int] = {}
        for r in replies:
            hist.decode_and_add(r["hist"])
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        opened = sum(r["opened"] for r in replies)
        elapsed = max(r["last_ready"] for r in replies) - min(r["start"] for r in replies)
        self.held = sum(r["held"] for r in replies)
        return {
            "asked": total,
            "opened": opened,
            "failed": sum(errors.values()),
            "errors": errors,
            "elapsed_s": round(elapsed, 3),
            "connect_rate_per_s": round(opened / elapsed, 1) if elapsed > 0 else 0.0,
            "connect_latency_ms": latency_summary(hist),
            "held_open": self.held,
        }

    def close(self) -> None:
        """Close every connection and end the processes."""
        for pipe in self.pipes:
            try:
                pipe.send(("close",))
            except OSError:
                pass
        for pipe in self.pipes:
            try:
                if pipe.poll(60):
                    pipe.recv()
            except (OSError, EOFError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


# --- the hub actor ----------------------------------------------------------------------------------


def role_pids(config: Config) -> dict[str, int]:
    """``{actor name: pid}`` of the deployment's alive actors, from Ray's GCS."""
    out: dict[str, int] = {}
    for info in ray._private.state.actors().values():  # noqa: SLF001 - as im_actors.cluster.actor_nodes
        name = info.get("Name", "")
        if info.get("State") == "ALIVE" and info.get("Pid") and name.startswith(config.actor_prefix + "im-"):
            out[name] = int(info["Pid"])
    return out


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    return int(psutil.Process(pid).memory_info().rss)


# --- the breakdown: the hub's code under tracemalloc -------------------------------------------------


def _breakdown_process(config: Config, conn: Any, frames: int) -> None:
    from tests.hubkit import HubKit, NoContactsStore

    async def main() -> None:
        kit = HubKit(config)
        kit.peers.sessions_core.store = NoContactsStore()  # type: ignore[assignment]
        url = await kit.start()
        tracemalloc.start(frames)
        await asyncio.sleep(0.5)
        before = tracemalloc.take_snapshot()
        conn.send(("url", url))
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd[0] == "snap":
                await asyncio.sleep(float(cmd[1]))
                after = tracemalloc.take_snapshot()
                conn.send(("snap", _diff(before, after), len(kit.hub.conns)))
            elif cmd[0] == "stop":
                tracemalloc.stop()
                await kit.stop()
                conn.send(("stopped", None))
                return

    asyncio.run(main())


def _diff(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> dict[str, list[tuple[str, int, int]]]:
    """Growth between two snapshots: ``{"lines": [(site, bytes, count)...], "files": [...]}``, largest
    first, of sites that grew; a site is ``file:line  source``, files are shortened to the package."""
    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, linecache.__file__)]
    before, after = before.filter_traces(filters), after.filter_traces(filters)

    def short(path: str) -> str:
        for marker in ("site-packages/", "im_actors/", "lib/python3"):
            if marker in path:
                return path[path.index(marker) + (len(marker) if marker == "site-packages/" else 0) :]
        return path

    lines = []
    for stat in after.compare_to(before, "lineno"):
        if stat.size_diff <= 0:
            continue
        frame = stat.traceback[0]
        src = linecache.getline(frame.filename, frame.lineno).strip()
        lines.append((f"{short(frame.filename)}:{frame.lineno}  {src[:70]}", stat.size_diff, stat.count_diff))
    files = [
        (short(stat.traceback[0].filename), stat.size_diff, stat.count_diff)
        for stat in after.compare_to(before, "filename")
        if stat.size_diff > 0
    ]
    return {"lines": lines[:40], "files": files[:20]}


def breakdown(config: Config, count: int, processes: int, concurrency: int, settle_s: float) -> dict[str, Any]:
    """Open ``count`` clients on the hub's code under tracemalloc; the growth per connection by site."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_breakdown_process, args=(config, child, 1), name="im-conn-breakdown", daemon=True)
    proc.start()
    fleet: ClientFleet | None = None
    try:
        kind, url = parent.recv()
        fleet = ClientFleet(processes, url, config, concurrency, 30.0)
        phase = fleet.open(count)
        parent.send(("snap", settle_s))
        _, diff, conns = parent.recv()
        n = max(conns, 1)
        return {
            "connections": conns,
            "phase": phase,
            "traced_kb_per_conn": round(sum(b for _, b, _ in diff["files"]) / 1024.0 / n, 2),
            "by_line": [
                {"site": s, "bytes_per_conn": round(b / n, 1), "blocks_per_conn": round(c / n, 2)}
                for s, b, c in diff["lines"]
            ],
            "by_file": [
                {"file": s, "bytes_per_conn": round(b / n, 1), "blocks_per_conn": round(c / n, 2)}
                for s, b, c in diff["files"]
            ],
        }
    finally:
        if fleet is not None:
            fleet.close()
        try:
            parent.send(("stop",))
            if parent.poll(30):
                parent.recv()
        except (OSError, EOFError):
            pass
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()


# --- main -------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument(
        "--connections", type=int, nargs="+", default=[10000], help="checkpoints: total clients at each, rising"
    )
    ap.add_argument("--processes", type=int, default=4, help="client processes")
    ap.add_argument("--concurrency", type=int, default=100, help="connects in progress at once per process")
    ap.add_argument("--settle-s", type=float, default=3.0, help="wait before each memory reading (s)")
    ap.add_argument("--connect-timeout", type=float, default=30.0, help="one connect's timeout, ready included (s)")
    ap.add_argument("--breakdown", type=int, default=2000, help="clients of the tracemalloc breakdown (0: skip)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checkpoints and the breakdown; exit 1 when a connect failed or a hub count disagreed."""
    args = _parser().parse_args(argv)
    counts = list(args.connections)
    if not counts or any(c < 1 for c in counts) or counts != sorted(counts) or args.processes < 1:
        _parser().error("--connections must be rising counts >= 1 and --processes >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    soft, hard = raise_nofile_limit()
    need = max(counts) + FD_MARGIN
    out: dict[str, Any] = {"args": vars(args) | {"json": str(args.json) if args.json else None}}
    out["nofile"] = {"soft": soft, "hard": hard, "needed_by_the_hub": need}
    if soft < need:
        print(
            f"# WARNING: open-file limit {soft} (hard {hard}) is below the {need} the hub needs for "
            f"{max(counts)} connections: raise the hard limit (ulimit -Hn, /etc/security/limits.conf)",
            flush=True,
        )
    base = load_config(
        deployment=f"conn{secrets.token_hex(3)}",
        jwt_secret=secrets.token_hex(32),
        router_port=0,
        hubs=1,
        session_shards=1,
        conv_shards=1,
        group_shards=1,
        store_writers=1,
        push_workers=0,
    )
    base, services = ensure_services(base)
    failed = False
    checkpoints: list[dict[str, Any]] = []
    fleet: ClientFleet | None = None
    try:
        init_local_ray(base)
        server = describe_services(base)["mongodb"]
        out["services"] = {"mongodb": server}
        dep = deploy(base)
        hub_name = ids.actor_name("hub", 0, base.actor_prefix)
        session_name = ids.actor_name("session", 0, base.actor_prefix)
        pids = role_pids(base)
        hub_pid, session_pid = pids[hub_name], pids[session_name]
        hub_proc = psutil.Process(hub_pid)
        hub_nofile = hub_proc.rlimit(psutil.RLIMIT_NOFILE)
        out["hub_nofile"] = list(hub_nofile)
        print(
            f"# one hub actor (pid {hub_pid}, open-file limit {hub_nofile[0]}); {args.processes} client processes; "
            f"MongoDB-wire server {server.get('server')} {server.get('version')}; Ray {ray.__version__}; "
            f"{psutil.cpu_count()} cores",
            flush=True,
        )
        if hub_nofile[0] < need:
            print(f"# WARNING: the hub's open-file limit {hub_nofile[0]} is below {need}", flush=True)
        time.sleep(args.settle_s)
        hub_before, session_before = rss(hub_pid), rss(session_pid)
        out["hub_rss_before_bytes"] = hub_before
        out["session_rss_before_bytes"] = session_before
        print(
            f"# before any client: hub RSS {hub_before / 2**20:.1f} MiB, session shard RSS "
            f"{session_before / 2**20:.1f} MiB",
            flush=True,
        )
        print(
            f"{'clients':>8} {'opened':>7} {'failed':>6} {'conn/s':>8} {'c_p50ms':>8} {'c_p99ms':>8} "
            f"{'hub_conns':>9} {'hub_MiB':>8} {'hub_KB/conn':>11} {'sess_KB/conn':>12}",
            flush=True,
        )
        fleet = ClientFleet(args.processes, dep.hub_urls[hub_name], base, args.concurrency, args.connect_timeout)
        done = 0
        for total in counts:
            phase = fleet.open(total - done)
            done = total
            time.sleep(args.settle_s)
            hub_after, session_after = rss(hub_pid), rss(session_pid)
            hub_conns = int(ray.get(dep.actors[hub_name].load.remote(), timeout=60)["connections"])
            held = fleet.held
            row = {
                "clients": total,
                **phase,
                "hub_connections": hub_conns,
                "hub_rss_bytes": hub_after,
                "hub_kb_per_conn": per_connection_kb(hub_before, hub_after, hub_conns),
                "session_rss_bytes": session_after,
                "session_kb_per_conn": per_connection_kb(session_before, session_after, hub_conns),
            }
            checkpoints.append(row)
            failed = failed or phase["failed"] > 0 or hub_conns != held
            lat = phase["connect_latency_ms"]
            print(
                f"{total:>8} {phase['opened']:>7} {phase['failed']:>6} {phase['connect_rate_per_s']:>8.0f} "
                f"{lat['p50']:>8.1f} {lat['p99']:>8.1f} {hub_conns:>9} {hub_after / 2**20:>8.1f} "
                f"{row['hub_kb_per_conn']:>11.1f} {row['session_kb_per_conn']:>12.1f}"
                + (f"  errors {phase['errors']}" if phase["errors"] else ""),
                flush=True,
            )
        fleet.close()
        fleet = None
    finally:
        if fleet is not None:
            fleet.close()
        try:
            if ray.is_initialized():
                teardown(base)
                purge_deployment(base)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            services.stop()
    out["checkpoints"] = checkpoints
    if checkpoints:
        last = checkpoints[-1]
        print(
            f"# hub memory per connection at {last['hub_connections']:,} connections: "
            f"{last['hub_kb_per_conn']:.1f} KB (target <= 100 KB; ejabberd here: about 340 KB); "
            f"connect rate {last['connect_rate_per_s']:,.0f} connections/s (authenticated)",
            flush=True,
        )
    if args.breakdown > 0:
        cfg = load_config(deployment=f"connbd{secrets.token_hex(3)}", jwt_secret=secrets.token_hex(32))
        bd = breakdown(cfg, args.breakdown, args.processes, args.concurrency, args.settle_s)
        out["breakdown"] = bd
        print(
            f"# breakdown: the hub's code (tests/hubkit.py, peers faked, session core real) under tracemalloc, "
            f"{bd['connections']:,} connections: {bd['traced_kb_per_conn']:.1f} KB/conn of Python allocations",
            flush=True,
        )
        print("#   by file (bytes/conn, blocks/conn):", flush=True)
        for f in bd["by_file"][:10]:
            print(f"#   {f['bytes_per_conn']:>9.0f} {f['blocks_per_conn']:>7.1f}  {f['file']}", flush=True)
        print("#   by line:", flush=True)
        for f in bd["by_line"][:15]:
            print(f"#   {f['bytes_per_conn']:>9.0f} {f['blocks_per_conn']:>7.1f}  {f['site']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
