"""A multi-host proof on one machine: three hosts as Linux network namespaces, one host cut off.

Three network namespaces, each a "host" with its own address on a bridge in a private /24 made for
the run (only loopback and those addresses are ever used), a Ray head in the first and a Ray worker
in each of the others. The deployment's hubs are spread one per host (``placement = "spread"``).
Synthetic traffic runs from the head's host while probe clients (:class:`drivers.chaos.ChaosMonkey`'s)
measure recovery. Then one worker host is cut off the network (its link set down: no process is
killed) for ``--cut-for`` seconds and brought back; its Ray node, declared dead by the head meanwhile,
is started again on it. The oracle must be clean.

Printed (and written with ``--report``): the placement of the hubs, the oracle's counts, and

- ``recovery_s``: from the cut until a probe message sent after it was acked and delivered to every
  probe client (at least one on each hub, the cut host's included). A probe client on the cut host's
  hub sees no close (its peer is just gone): it notices by its WebSocket pings (``--probe-ping``,
  2 s) and reconnects elsewhere;
- ``node_dead_s``: from the cut until Ray's head declared the host's node dead;
- ``actors_moved_s``: from the cut until every actor of the cut host was alive on another host
  (None when that did not happen while the host was cut off);
- ``rejoin_s``: from the link coming back until the host's Ray node was alive again.

The backing services stay on this machine's loopback (the shared Redis and RabbitMQ with the run's
own prefix and names, a private SecantusDB): the hosts reach them through TCP forwarders listening on
the bridge's address only. Everything made (namespaces, links, the bridge, every process in the
namespaces, forwarders, keys, queues, the database) is removed at the end, also on failure or Ctrl-C.

Needs root and iproute2 (``ip``). Run: ``sudo .venv/bin/python benchmarks/multihost.py``
(about two minutes; ``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

RAY_PORT = 6380  # never Redis's 6379
HOSTS = 3


@dataclass(frozen=True)
class Net:
    """The run's network: namespaces, links and addresses (names fit IFNAMSIZ, 15 characters)."""

    run: str
    subnet: str  # e.g. "10.231.7" (a /24)

    @property
    def bridge(self) -> str:
        return f"imbr{self.run}"

    @property
    def bridge_ip(self) -> str:
        return f"{self.subnet}.1"

    def ns(self, i: int) -> str:
        return f"imh{self.run}-{i}"

    def veth(self, i: int) -> str:  # the bridge side, in the root namespace
        return f"imv{self.run}{i}"

    def peer(self, i: int) -> str:  # the host side, inside namespace i
        return f"imp{self.run}{i}"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"


def sh(*argv: str, check: bool = True, timeout: float = 60.0, env: dict[str, str] | None = None) -> str:
    """Run a command; its stdout. Raises ``RuntimeError`` with the end of its stderr when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-1500:]
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {tail}")
    return done.stdout


def free_subnet(rng: random.Random) -> str:
    """A 10.x.y.0/24 that overlaps no address or route of this machine."""
    used = []
    for line in sh("ip", "-4", "-o", "addr").splitlines() + sh("ip", "-4", "route").splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                if "/" in word or word.count(".") == 3:
                    used.append(ipaddress.ip_network(word, strict=False))
    for _ in range(100):
        subnet = f"10.{rng.randrange(200, 250)}.{rng.randrange(1, 255)}"
        net = ipaddress.ip_network(f"{subnet}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 found")


def make_net(net: Net) -> None:
    """The bridge with the forwarders' address, and one namespace per host wired to it by a veth pair."""
    sh("ip", "link", "add", net.bridge, "type", "bridge")
    sh("ip", "addr", "add", f"{net.bridge_ip}/24", "dev", net.bridge)
    sh("ip", "link", "set", net.bridge, "up")
    for i in range(HOSTS):
        ns = net.ns(i)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", net.veth(i), "type", "veth", "peer", "name", net.peer(i))
        sh("ip", "link", "set", net.peer(i), "netns", ns)
        sh("ip", "link", "set", net.veth(i), "master", net.bridge, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{net.ip(i)}/24", "dev", net.peer(i))
        sh("ip", "netns", "exec", ns, "ip", "link", "set", net.peer(i), "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")


def check_reachable(net: Net, port: int) -> None:
    """Every host opens a TCP connection to the bridge's address (a forwarder's ``port``)."""
    probe = f"import socket; socket.create_connection(({net.bridge_ip!r}, {port}), timeout=5).close()"
    for i in range(HOSTS):
        sh("ip", "netns", "exec", net.ns(i), sys.executable, "-c", probe, timeout=30)


def kill_namespace_processes(ns: str) -> int:
    """SIGTERM, then SIGKILL, every process inside namespace ``ns`` (all of them this run started)."""
    pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def remove_net(net: Net) -> None:
    """Every process in the namespaces, the namespaces (their veth ends go with them), the bridge."""
    existing = sh("ip", "netns", "list", check=False)
    for i in range(HOSTS):
        if net.ns(i) in existing:
            kill_namespace_processes(net.ns(i))
            sh("ip", "netns", "del", net.ns(i), check=False)
        sh("ip", "link", "del", net.veth(i), check=False)
    sh("ip", "link", "del", net.bridge, check=False)


# --- TCP forwarders: the bridge's address -> a loopback service --------------------------------------


class Forwarder:
    """Listens on ``host`` (the bridge's address) and forwards each connection to loopback ports,
    in a thread of its own: ``start({"redis": 6379, ...})`` returns ``{name: listening port}``."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.servers: list[asyncio.AbstractServer] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self, targets: dict[str, int]) -> dict[str, int]:
        self.thread.start()
        return {
            name: asyncio.run_coroutine_threadsafe(self._serve(port), self.loop).result(10)
            for name, port in targets.items()
        }

    async def _serve(self, target: int) -> int:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        server = await asyncio.start_server(handle, self.host, 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            for server in self.servers:
                server.close()

        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def _via(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced (credentials, path and query kept)."""
    parts = urlsplit(url)
    cred = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, f"{cred}{host}:{port}", parts.path, parts.query, parts.fragment))


# --- Ray nodes ---------------------------------------------------------------------------------------


def ray_start(net: Net, i: int, env: dict[str, str], temp_dir: str) -> None:
    """Start the Ray head (i = 0) or a worker in host ``i``'s namespace (1 CPU, a small object store)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    common = ["--node-ip-address", net.ip(i), "--num-cpus", "1", "--object-store-memory", str(256 << 20)]
    if i == 0:
        argv = [
            ray_bin,
            "start",
            "--head",
            "--port",
            str(RAY_PORT),
            "--include-dashboard=false",
            "--temp-dir",
            temp_dir,
        ]
        argv.append("--disable-usage-stats")
    else:
        argv = [ray_bin, "start", "--address", f"{net.ip(0)}:{RAY_PORT}"]
    try:
        sh("ip", "netns", "exec", net.ns(i), *argv, *common, env=env, timeout=120)
    except RuntimeError as exc:
        if i == 0:
            raise
        # A worker's start can time out on a loaded machine: end what it left and try once more.
        print(f"ray start in {net.ns(i)} failed, once more: {str(exc)[-300:]}", flush=True)
        kill_namespace_processes(net.ns(i))
        sh("ip", "netns", "exec", net.ns(i), *argv, *common, env=env, timeout=180)


# --- the traffic phase, inside the head's namespace --------------------------------------------------


async def traffic(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Deploy, run traffic with probes, cut the victim host off and bring it back; the results."""
    import ray

    from drivers.chaos import ChaosMonkey, ChaosSpec, Fault
    from drivers.run import run_workload_async
    from drivers.synthetic import SyntheticWorkload
    from im_actors import ids
    from im_actors.cluster import actor_nodes, deploy
    from im_actors.config import Config

    net = Net(spec["run"], spec["subnet"])
    cfg = Config(**spec["config"])
    ray.init(
        address=f"{net.ip(0)}:{RAY_PORT}", namespace=ids.NAMESPACE, _node_ip_address=net.ip(0), logging_level="WARNING"
    )
    try:
        _wait_nodes(HOSTS, 60)
        ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        dep = deploy(cfg)
        placed = {name: ip_of.get(node, "?") for name, node in actor_nodes(cfg).items()}
        hubs_at = {name: ip for name, ip in placed.items() if ids.parse_actor_name(name, cfg.actor_prefix)[0] == "hub"}
        router_ip = placed[ids.actor_name("router", 0, cfg.actor_prefix)]
        victims = [i for i in range(1, HOSTS) if net.ip(i) != router_ip and net.ip(i) in hubs_at.values()]
        if not victims:
            raise RuntimeError(f"no worker host holds a hub without the router: {placed}")
        victim = victims[0]
        moved = [name for name, ip in placed.items() if ip == net.ip(victim)]
        monkey = ChaosMonkey(cfg, dep.router_url, ChaosSpec(()), None, probes=4, client_ping_s=args.probe_ping)
        await monkey.start()
        workload = SyntheticWorkload(
            users=args.users, rate=args.rate, duration_s=args.duration, group_size=4, direct_share=0.3, seed=11
        )
        run = asyncio.create_task(
            run_workload_async(
                dep.router_url,
                workload,
                progress=False,
                send_deadline_s=180.0,
                request_timeout_s=5.0,
                drain_timeout_s=90.0,
            )
        )
        await asyncio.sleep(args.cut_at)
        fault = Fault("host-cut", f"{net.ns(victim)} ({net.ip(victim)}: {', '.join(sorted(moved))})", monkey.now())
        monkey.faults.append(fault)
        cut_t = time.monotonic()
        sh("ip", "netns", "exec", net.ns(victim), "ip", "link", "set", net.peer(victim), "down")
        actors_moved_s = node_dead_s = None
        while time.monotonic() - cut_t < args.cut_for:
            if node_dead_s is None and not _node_alive(net.ip(victim)):
                node_dead_s = round(time.monotonic() - cut_t, 3)
            if actors_moved_s is None:
                now = {name: ip_of_now(n) for name, n in (await asyncio.to_thread(actor_nodes, cfg)).items()}
                if all(now.get(name) not in (None, net.ip(victim)) for name in moved):
                    actors_moved_s = round(time.monotonic() - cut_t, 3)
            await asyncio.sleep(0.2)
        sh("ip", "netns", "exec", net.ns(victim), "ip", "link", "set", net.peer(victim), "up")
        back_t = time.monotonic()
        # The head declared the host's Ray node dead while it was away; a raylet told so exits. Start
        # the host's node again (after ending what is left of the old one, all inside its namespace).
        await asyncio.sleep(2.0)
        if not _node_alive(net.ip(victim)):
            await asyncio.to_thread(kill_namespace_processes, net.ns(victim))
            await asyncio.to_thread(ray_start, net, victim, dict(os.environ), "")
        await asyncio.to_thread(_wait_node, net.ip(victim), 120)
        rejoin_s = round(time.monotonic() - back_t, 3)
        report = await run
        faults = await monkey.finish(settle_s=90.0)
        return {
            "hosts": {net.ns(i): net.ip(i) for i in range(HOSTS)},
            "hubs_at": hubs_at,
            "router_at": router_ip,
            "cut_host": net.ns(victim),
            "cut_for_s": args.cut_for,
            "probe_ping_s": args.probe_ping,
            "actors_on_cut_host": sorted(moved),
            "node_dead_s": node_dead_s,
            "actors_moved_s": actors_moved_s,
            "rejoin_s": rejoin_s,
            "recovery_s": faults[0]["recovery_s"],
            "worst_probe_latency_ms": faults[0]["worst_delivery_latency_ms"],
            "report": {
                k: report.get(k)
                for k in (
                    "sent",
                    "acked",
                    "expected_deliveries",
                    "delivered",
                    "lost",
                    "duplicates",
                    "order_violations",
                    "reconnects",
                    "resends",
                    "lost_entries",
                    "ack_latency_ms",
                    "delivery_latency_ms",
                )
            },
        }
    finally:
        ray.shutdown()


def ip_of_now(node_id: str) -> str | None:
    import ray

    for n in ray.nodes():
        if n["NodeID"] == node_id and n["Alive"]:
            return str(n["NodeManagerAddress"])
    return None


def _node_alive(ip: str) -> bool:
    import ray

    return any(n["Alive"] and n["NodeManagerAddress"] == ip for n in ray.nodes())


def _wait_node(ip: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _node_alive(ip):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray node at {ip} did not come back within {timeout_s} s")
        time.sleep(0.2)


def _wait_nodes(n: int, timeout_s: float) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while sum(1 for node in ray.nodes() if node["Alive"]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} Ray nodes alive after {timeout_s} s")
        time.sleep(0.2)


# --- the whole run, from the root namespace ----------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Make the hosts, the services' forwarders and the Ray cluster; run the traffic phase in the
    head's namespace; remove everything. Returns the traffic phase's results."""
    from im_actors.cluster import ray_env
    from im_actors.config import load_config
    from im_actors.services import ensure_services, purge_deployment

    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise SystemExit("multihost: needs root and iproute2 (ip) to make network namespaces")
    rng = random.Random()
    net = Net(secrets.token_hex(3), free_subnet(rng))
    cfg = load_config(
        deployment=f"mh{net.run}",
        hubs=HOSTS,
        session_shards=1,
        conv_shards=1,
        store_writers=1,
        push_workers=0,
        host="0.0.0.0",  # the router and the hubs advertise their host's address
        router_port=0,
        dev_login=True,
        jwt_secret=secrets.token_hex(32),
        heartbeat_s=0.5,
    )
    temp_dir = tempfile.mkdtemp(prefix="im-multihost-")
    forwarder: Forwarder | None = None
    services: Any = None
    started = time.monotonic()
    try:
        cfg, services = ensure_services(cfg)
        print(f"hosts {net.ns(0)}..{net.ns(HOSTS - 1)} on {net.subnet}.0/24 (bridge {net.bridge})", flush=True)
        make_net(net)
        forwarder = Forwarder(net.bridge_ip)
        loopback = {k: urlsplit(getattr(cfg, k)).port or 0 for k in ("redis_url", "rabbitmq_url", "mongo_url")}
        ports = forwarder.start(loopback)
        check_reachable(net, ports["redis_url"])
        hosts_cfg = cfg.model_copy(update={k: _via(getattr(cfg, k), net.bridge_ip, ports[k]) for k in ports})
        # Ray's token authentication (on by default for a head): the workers and the driver use the
        # same token file (~/.ray/auth_token), and must be told the mode.
        env = {**os.environ, **ray_env(cfg), "RAY_AUTH_MODE": "token"}
        for i in range(HOSTS):
            ray_start(net, i, env, temp_dir)
        print(f"Ray head in {net.ns(0)} at {net.ip(0)}:{RAY_PORT}, workers in the others", flush=True)
        spec_file = Path(temp_dir) / "spec.json"
        spec_file.write_text(json.dumps({"run": net.run, "subnet": net.subnet, "config": hosts_cfg.model_dump()}))
        spec_file.chmod(0o600)
        argv = [sys.executable, str(Path(__file__).resolve()), "--phase", "traffic", "--spec", str(spec_file)]
        argv += ["--users", str(args.users), "--rate", str(args.rate), "--duration", str(args.duration)]
        argv += ["--cut-at", str(args.cut_at), "--cut-for", str(args.cut_for), "--probe-ping", str(args.probe_ping)]
        done = subprocess.run(
            ["ip", "netns", "exec", net.ns(0), *argv], capture_output=True, text=True, env=env, timeout=900
        )
        sys.stderr.write(done.stderr[-4000:])
        if done.returncode != 0:
            raise RuntimeError(f"traffic phase failed ({done.returncode}): {done.stdout[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["run_s"] = round(time.monotonic() - started, 1)
        return result
    finally:
        try:
            keep = os.environ.get("IM_MULTIHOST_KEEP_LOGS")  # for a post-mortem of Ray's own logs
            if keep:
                with contextlib.suppress(OSError, shutil.Error):
                    shutil.copytree(temp_dir, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("sockets"))
        finally:
            try:
                remove_net(net)
            finally:
                try:
                    if forwarder is not None:
                        forwarder.stop()
                finally:
                    try:
                        if services is not None:
                            purge_deployment(cfg, drop_mongo_db=False)
                    finally:
                        if services is not None:
                            services.stop()
                        shutil.rmtree(temp_dir, ignore_errors=True)
        left = [n for n in sh("ip", "netns", "list", check=False).split() if n.startswith(f"imh{net.run}")]
        print(f"cleaned up: namespaces left {left or 'none'}", flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--users", type=int, default=18, help="synthetic users (one client each)")
    p.add_argument("--rate", type=float, default=30.0, help="messages/s in all")
    p.add_argument("--duration", type=float, default=45.0, help="seconds of traffic")
    p.add_argument("--cut-at", type=float, default=12.0, help="seconds after the traffic starts to cut a host off")
    p.add_argument("--cut-for", type=float, default=12.0, help="seconds the host stays cut off")
    p.add_argument(
        "--probe-ping",
        type=float,
        default=2.0,
        help="WebSocket ping interval (and timeout) of the probe clients, s: how soon a probe client on the "
        "cut host notices (the workload's clients keep the library's 20 s)",
    )
    p.add_argument("--report", type=Path, help="write the results here as JSON")
    p.add_argument("--phase", choices=["all", "traffic"], default="all", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 1 when the oracle found a problem."""
    args = _parser().parse_args(argv)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # run the clean-up in the finally blocks

    signal.signal(signal.SIGTERM, stop)
    if args.phase == "traffic":
        spec = json.loads(args.spec.read_text())
        print(json.dumps(asyncio.run(traffic(args, spec)), default=str))
        return 0
    result = run(args)
    rep = result["report"]
    print(json.dumps(result, indent=2, default=str))
    print(
        f"\nmultihost: {HOSTS} hosts, hubs {result['hubs_at']}; {result['cut_host']} cut off for "
        f"{result['cut_for_s']} s: actors moved in {result['actors_moved_s']} s, recovery {result['recovery_s']} s, "
        f"host rejoined {result['rejoin_s']} s after its link came back\n"
        f"  sent {rep['sent']} acked {rep['acked']} delivered {rep['delivered']} of {rep['expected_deliveries']}  "
        f"lost {rep['lost']} duplicates {rep['duplicates']} order violations {rep['order_violations']}"
    )
    if args.report:
        args.report.write_text(json.dumps(result, indent=2, default=str))
    clean = rep["lost"] == 0 and rep["duplicates"] == 0 and rep["order_violations"] == 0
    clean = clean and rep["delivered"] == rep["expected_deliveries"] and rep["sent"] == rep["acked"]
    return 0 if clean and result["recovery_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
