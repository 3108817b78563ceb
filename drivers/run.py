"""The runner: play a workload against im-actors with many clients in one or more processes, then judge it.

:func:`run_workload` (or :func:`run_workload_async` from inside an event loop) does, in every process,
for its share of the users (one :class:`~im_actors.client.Client` each, device ``d1``):

1. connect every client (router lookup, dev login, WebSocket, auth, ``convs`` baseline);
2. create the plan's groups, each by its creator's client (then check the membership with
   ``group.info`` and add anyone missing); the processes exchange the group conversation ids;
3. start together at a common wall-clock time ``t0`` and issue each send at ``t0 + at_s``, keeping each
   sender's sends in order (a sender waits for its previous ack; senders do not wait for each other),
   with ``meta = {"t": send_ms, "s": scheduled_ms}`` and a cmid unique in the run; with
   ``open_loop=True`` every send is instead issued at its time as a task of its own, whatever is still
   waiting for an ack (the open-loop load of wrk2: the offered rate does not bend to the server's);
4. once every process has finished sending: every client catches up (``convs`` + ``sync``), then the
   process waits until deliveries stop changing (or ``drain_timeout_s``);
5. each process hands its :class:`~drivers.oracle.Partial` to the parent, which merges them and builds
   the report.

With ``processes > 1`` the users are split over OS processes (multiprocessing, spawn context), each
running its clients in one asyncio loop; the parent only coordinates the stages, draws the live
status line (:mod:`drivers.live`: phase and its progress, rates, p99 so far, errors, faults) and
merges the results.

CLI: ``python -m drivers.run --router URL replay --corpus FILE -n 2000 --duration 60`` or
``python -m drivers.run --router URL synthetic --users 100 --rate 200 --duration 10``; ``--fake-hubs N``
runs against the in-memory :mod:`tests.fakeserver` instead of a router. The report is printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import queue
import secrets
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from drivers.live import LiveView, PartProgress
from drivers.oracle import Partial, Recorder, device_key, latency_summary, merge, new_histogram
from drivers.stages import StageRecorder
from drivers.synthetic import parse_stages
from drivers.tokens import TokenSource
from drivers.verdict import Threshold, judge
from drivers.workload import DEFAULTS, DEVICE, GroupSpec, Plan, PlannedSend, Workload
from im_actors.client import Client
from im_actors.protocol import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK

__all__ = ["RunOptions", "run_workload", "run_workload_async", "split_users", "build_report", "main"]

log = logging.getLogger(__name__)

#: How often each process hands its progress to the live view (s).
LIVE_INTERVAL_S = 0.5

_COUNTERS = ("reconnects", "gap_fills", "gap_fill_failures", "dups_dropped", "resends", "holes_skipped")


@dataclass(frozen=True)
class RunOptions:
    """How a run talks to the service (all durations in seconds).

    ``run_id`` prefixes user ids, group names and cmids (fresh per run); ``drain_timeout_s`` bounds the
    final catch-up and wait for deliveries; ``quiet_s`` is how long deliveries must stay unchanged to
    end the drain early; ``send_deadline_s`` is each send's retry deadline; ``connect_concurrency``
    bounds simultaneous connects per process; ``setup_timeout_s`` bounds connecting and group creation;
    ``open_loop`` issues each send at its scheduled time without waiting for the sender's previous ack
    (False: one send in flight per sender, the historical behaviour).
    ``tokens`` says where each client's token comes from (:class:`~drivers.tokens.TokenSource`: minted,
    a token file, or development login).
    """

    router_url: str
    run_id: str
    drain_timeout_s: float = 30.0
    quiet_s: float = 1.0
    send_deadline_s: float = 30.0
    request_timeout_s: float = 10.0
    subprotocol: str = SUBPROTOCOL_MSGPACK
    connect_concurrency: int = 100
    setup_timeout_s: float = 120.0
    start_lead_s: float = 0.3
    open_loop: bool = False
    tokens: TokenSource = field(default_factory=TokenSource)


# --- coordination between processes -----------------------------------------------------------------


class _Coordinator(Protocol):
    async def exchange(self, stage: str, payload: Any) -> Any: ...

    def live(self, progress: PartProgress) -> None: ...

    def flush(self) -> None: ...


def _stage_reply(stage: str, payloads: Sequence[Any], opts: RunOptions, processes: int) -> Any:
    """What every process gets back once all have reached ``stage`` (decided in one place)."""
    if stage == "groups":
        merged: dict[str, str] = {}
        for p in payloads:
            merged.update(p)
        return merged
    if stage == "start":
        return time.time() + opts.start_lead_s + 0.05 * processes
    return None


class _LocalCoordinator:
    """The single-process case: every stage is reached by the one process; progress goes to the view."""

    def __init__(self, opts: RunOptions, view: LiveView) -> None:
        self._opts = opts
        self._view = view

    async def exchange(self, stage: str, payload: Any) -> Any:
        return _stage_reply(stage, [payload], self._opts, 1)

    def live(self, progress: PartProgress) -> None:
        self._view.update(0, progress.snapshot(encode=False))

    def flush(self) -> None:
        pass


class _ChildCoordinator:
    """A worker process: stages go up to the parent, which answers every worker once all are there."""

    def __init__(self, index: int, up: Any, down: Any) -> None:
        self._index = index
        self._up = up
        self._down = down
        self._live: dict[str, Any] | None = None

    async def exchange(self, stage: str, payload: Any) -> Any:
        self.flush()
        self._up.put(("stage", self._index, stage, payload))
        got_stage, reply = await asyncio.to_thread(self._wait_reply)
        if got_stage != stage:
            raise RuntimeError(f"expected the reply to stage {stage!r}, got {got_stage!r}")
        return reply

    def _wait_reply(self) -> tuple[str, Any]:
        parent = mp.parent_process()
        while True:
            try:
                return self._down.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    raise RuntimeError("the parent process is gone") from None

    def live(self, progress: PartProgress) -> None:
        self._live = progress.snapshot(encode=True)
        self.flush()

    def flush(self) -> None:
        if self._live is not None:
            self._up.put(("live", self._index, self._live))
            self._live = None


# --- one process's share -----------------------------------------------------------------------------


def split_users(plan: Plan, processes: int) -> list[list[str]]:
    """Split the plan's users over ``processes`` parts, balancing sends (largest first onto the lightest)."""
    processes = max(1, min(processes, len(plan.users) or 1))
    load = Counter(s.sender for s in plan.sends)
    parts: list[list[str]] = [[] for _ in range(processes)]
    weight = [0] * processes
    for user in sorted(plan.users, key=lambda u: (-load[u], u)):
        i = min(range(processes), key=lambda k: (weight[k], len(parts[k])))
        parts[i].append(user)
        weight[i] += load[user] + 1
    return parts


async def _create_group(client: Client, name: str, members: Sequence[str]) -> tuple[str, str]:
    group, conv = await client.group_create(name, list(members))
    info = await client.group_info(group)
    missing = [u for u in members if u not in set(info.get("members") or [])]
    if missing:
        await client.group_add(group, missing)
    return group, conv


async def _run_part(plan: Plan, users: Sequence[str], opts: RunOptions, coord: _Coordinator) -> dict[str, Any]:
    """Run this process's users through every stage; returns the picklable result for the parent."""
    recorder = Recorder()
    stages = StageRecorder()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients: dict[str, Client] = {}
    lag_hist = new_histogram()
    errors: Counter[str] = Counter()
    drained = False
    progress = PartProgress(ack_hist=recorder.partial().ack_hist)
    progress.enter("connecting", len(users))

    async def tick() -> None:  # the live view, twice a second, off the hot path
        while True:
            progress.connected = sum(1 for c in clients.values() if c.connected)
            progress.reconnects = sum(c.reconnects for c in clients.values())
            coord.live(progress)
            await asyncio.sleep(LIVE_INTERVAL_S)

    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        for user in users:
            dev = device_key(user, DEVICE)

            def on_msg(msg: dict[str, Any], dev: str = dev) -> None:
                now_ms = time.time() * 1000.0
                recorder.record_msg(dev, msg, now_ms)
                if "trace" in msg:
                    stages.record(msg, now_ms)

            clients[user] = Client(
                opts.router_url,
                user,
                DEVICE,
                token=opts.tokens.token_for(user),
                subprotocol=opts.subprotocol,
                on_msg=on_msg,
                http=http,
                send_deadline_s=opts.send_deadline_s,
                request_timeout_s=opts.request_timeout_s,
                connect_timeout_s=opts.setup_timeout_s,
            )
        sem = asyncio.Semaphore(opts.connect_concurrency)

        async def connect(c: Client) -> None:
            async with sem:
                await c.connect()
            progress.done += 1

        await asyncio.wait_for(asyncio.gather(*(connect(c) for c in clients.values())), opts.setup_timeout_s)
        await coord.exchange("connected", len(clients))

        mine = [g for g in plan.groups if g.creator in clients]
        progress.enter("groups", len(mine))

        async def create(g: GroupSpec) -> tuple[str, str]:
            made = await _create_group(clients[g.creator], g.name, g.members)
            progress.done += 1
            return made

        created = await asyncio.wait_for(
            asyncio.gather(*(create(g) for g in mine)),
            opts.setup_timeout_s,
        )
        group_convs: dict[str, str] = await coord.exchange(
            "groups", {g.key: conv for g, (_, conv) in zip(mine, created, strict=True)}
        )
        recorder.set_recipients(plan.recipients(group_convs))
        t0: float = await coord.exchange("start", None)
        by_sender = plan.sends_by_sender()
        progress.enter("sending", sum(len(by_sender.get(u, ())) for u in users))

        async def issue(client: Client, s: PlannedSend, due: float) -> None:
            conv = s.conv(group_convs)
            send_ms = time.time() * 1000.0
            due_ms = due * 1000.0
            lag_hist.record_value(min(max(int((send_ms - due_ms) * 1000.0), 0), 3_600_000_000))
            recorder.add_sent(1, send_ms)
            progress.sent += 1
            progress.done += 1
            inflight[0] += 1
            inflight[1] = max(inflight[1], inflight[0])
            try:
                ack = await client.send(conv, s.body, cmid=f"{opts.run_id}.{s.index}", meta={"t": send_ms, "s": due_ms})
            except Exception as exc:  # counted in the report; the run goes on
                errors[type(exc).__name__] += 1
                progress.errors += 1
                log.debug("send %d failed: %r", s.index, exc)
            else:
                recorder.add_ack(conv, ack.seq, send_ms, time.time() * 1000.0, due_ms)
                progress.acked += 1
            finally:
                inflight[0] -= 1

        async def until(due: float) -> None:
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)

        async def sender(client: Client, sends: list[PlannedSend]) -> None:
            for s in sends:
                await until(t0 + s.at_s)
                await issue(client, s, t0 + s.at_s)

        async def scheduler(sends: list[PlannedSend]) -> None:
            tasks: list[asyncio.Task[None]] = []
            for s in sends:
                await until(t0 + s.at_s)
                tasks.append(asyncio.create_task(issue(clients[s.sender], s, t0 + s.at_s)))
            await asyncio.gather(*tasks)

        inflight = [0, 0]  # sends awaiting their ack now, and the most at once
        if opts.open_loop:
            await scheduler([s for s in plan.sends if s.sender in clients])
        else:
            await asyncio.gather(*(sender(clients[u], by_sender[u]) for u in users if u in by_sender))
        coord.flush()
        await coord.exchange("sent", None)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.drain_timeout_s
        progress.enter("draining", len(clients))

        async def catch_up(c: Client) -> bool:
            done = await c.catch_up(opts.drain_timeout_s)
            progress.done += 1
            return done

        caught_up = await asyncio.gather(*(catch_up(c) for c in clients.values()))
        last, quiet_since = recorder.receipts, loop.time()
        while loop.time() < deadline and loop.time() - quiet_since < opts.quiet_s:
            await asyncio.sleep(min(0.1, opts.quiet_s))
            if recorder.receipts != last:
                last, quiet_since = recorder.receipts, loop.time()
        drained = all(caught_up) and loop.time() - quiet_since >= opts.quiet_s
    finally:
        ticker.cancel()
        coord.live(progress)
        coord.flush()
        await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)
        await http.close()
    stats = Counter({k: 0 for k in _COUNTERS})
    for c in clients.values():
        stats.update({k: getattr(c, k) for k in _COUNTERS})
    return {
        "partial": recorder.partial().to_dict(),
        "clients": len(clients),
        "stats": dict(stats),
        "errors": dict(errors),
        "lag_hist": lag_hist.encode().decode("ascii"),
        "stages": stages.encode(),
        "drained": drained,
        "t0": t0,
        "max_inflight": inflight[1],
    }


def _child_main(index: int, plan: Plan, users: list[str], opts: RunOptions, up: Any, down: Any) -> None:
    """Entry point of a worker process (spawn context)."""
    logging.basicConfig(level=logging.WARNING, format=f"[driver {index}] %(levelname)s %(name)s: %(message)s")
    coord = _ChildCoordinator(index, up, down)
    try:
        result = asyncio.run(_run_part(plan, users, opts, coord))
    except BaseException:
        up.put(("error", index, traceback.format_exc()))
    else:
        up.put(("result", index, result))


def _run_processes(plan: Plan, parts: list[list[str]], opts: RunOptions, view: LiveView) -> list[dict[str, Any]]:
    """Start one spawn process per part, relay the stages, return every process's result."""
    ctx = mp.get_context("spawn")
    up = ctx.Queue()
    downs = [ctx.Queue() for _ in parts]
    procs = [
        ctx.Process(target=_child_main, args=(i, plan, part, opts, up, downs[i]), name=f"im-driver-{i}", daemon=True)
        for i, part in enumerate(parts)
    ]
    for p in procs:
        p.start()
    stages: dict[str, dict[int, Any]] = {}
    results: dict[int, dict[str, Any]] = {}
    dead_since: dict[int, float] = {}
    try:
        while len(results) < len(procs):
            try:
                item = up.get(timeout=0.5)
            except queue.Empty:
                now = time.monotonic()
                for i, p in enumerate(procs):
                    if i not in results and not p.is_alive():
                        if now - dead_since.setdefault(i, now) > 3.0:
                            raise RuntimeError(f"driver process {i} exited ({p.exitcode}) without a result") from None
                continue
            kind, index = item[0], item[1]
            if kind == "live":
                view.update(index, item[2])
            elif kind == "stage":
                stage, payload = item[2], item[3]
                stages.setdefault(stage, {})[index] = payload
                if len(stages[stage]) == len(procs):
                    reply = _stage_reply(stage, [stages[stage][i] for i in range(len(procs))], opts, len(procs))
                    for d in downs:
                        d.put((stage, reply))
            elif kind == "result":
                results[index] = item[2]
            elif kind == "error":
                raise RuntimeError(f"driver process {index} failed:\n{item[2]}")
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == len(procs) else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [results[i] for i in range(len(procs))]


# --- the report --------------------------------------------------------------------------------------


def build_report(plan: Plan, results: Sequence[dict[str, Any]], processes: int, total_s: float) -> dict[str, Any]:
    """Merge the processes' results into the report (see :func:`run_workload`)."""
    partial = merge(Partial.from_dict(r["partial"]) for r in results)
    report = partial.report()
    t0 = min(r["t0"] for r in results)
    t0_ms = t0 * 1000.0
    send_phase_s = max((partial.last_ack_ms - t0_ms) / 1000.0, 0.0) if partial.last_ack_ms is not None else 0.0
    ack_span_s = (
        (partial.last_ack_ms - partial.first_ack_ms) / 1000.0
        if partial.last_ack_ms is not None and partial.first_ack_ms is not None
        else 0.0
    )
    delivery_s = max((partial.last_recv_ms - t0_ms) / 1000.0, 0.0) if partial.last_recv_ms is not None else 0.0
    lag = new_histogram()
    stats: Counter[str] = Counter({k: 0 for k in _COUNTERS})
    errors: Counter[str] = Counter()
    stages = StageRecorder()
    for r in results:
        lag.decode_and_add(r["lag_hist"])
        stages.add_encoded(r.get("stages") or {})
        stats.update(r["stats"])
        errors.update(r["errors"])
    report.update(
        {
            "clients": sum(r["clients"] for r in results),
            "processes": processes,
            "duration_s": round(send_phase_s, 3),
            "total_s": round(total_s, 3),
            "throughput_msgs_per_s": round(report["acked"] / send_phase_s, 3) if send_phase_s > 0 else 0.0,
            "deliveries_per_s": round(report["delivered"] / delivery_s, 3) if delivery_s > 0 else 0.0,
            "schedule_lag_ms": latency_summary(lag),
            "stages": stages.report(),
            "reconnects": stats["reconnects"],
            "client_counters": dict(stats),
            "send_errors": dict(errors),
            "drained": all(r["drained"] for r in results),
            "t0_s": round(t0, 3),
            "ack_span_s": round(ack_span_s, 3),
            "acks_per_s": round((report["acked"] - 1) / ack_span_s, 3) if ack_span_s > 0 else 0.0,
            "sends_in_flight_max": max((int(r.get("max_inflight", 0)) for r in results), default=0),
            "workload": plan.summary(),
        }
    )
    return report


async def run_workload_async(
    router_url: str,
    workload: Workload | Plan,
    processes: int = 1,
    progress: bool = True,
    drain_timeout_s: float = 30.0,
    faults_in_progress: Callable[[], list[str]] | None = None,
    user_prefix: str | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_update: Callable[[LiveView], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """:func:`run_workload` for callers already inside an event loop (processes > 1 run in a thread).

    ``faults_in_progress``: what the live view shows after ``faults:`` (the chaos runner's faults
    not yet recovered); ``user_prefix``: the prefix of user ids and group names (default
    ``"<run_id>."``, fresh per run; fix it when the users' tokens come from a token file); ``on_phase``:
    called with each phase the run enters (``connecting``, ``groups``, ``sending``, ``draining``: see
    :mod:`drivers.live`), within about half a second; ``on_update``: called with the
    :class:`~drivers.live.LiveView` after every progress snapshot (about twice a second per process)."""
    started = time.monotonic()
    run_id = options.pop("run_id", None) or secrets.token_hex(4)
    opts = RunOptions(router_url=router_url, run_id=run_id, drain_timeout_s=drain_timeout_s, **options)
    plan = (
        workload if isinstance(workload, Plan) else workload.build(f"{run_id}." if user_prefix is None else user_prefix)
    )
    parts = split_users(plan, processes)
    view = LiveView(len(parts), enabled=progress, faults=faults_in_progress, on_phase=on_phase, on_update=on_update)
    try:
        if len(parts) == 1:
            results = [await _run_part(plan, parts[0], opts, _LocalCoordinator(opts, view))]
        else:
            results = await asyncio.to_thread(_run_processes, plan, parts, opts, view)
    finally:
        view.close()
    report = build_report(plan, results, len(parts), time.monotonic() - started)
    report["run_id"] = run_id
    report["open_loop"] = opts.open_loop
    return report


def run_workload(
    router_url: str,
    workload: Workload | Plan,
    processes: int = 1,
    progress: bool = True,
    drain_timeout_s: float = 30.0,
    **options: Any,
) -> dict[str, Any]:
    """Run ``workload`` against the router at ``router_url`` and return the oracle's report.

    ``workload``: a :class:`~drivers.replay.ReplayWorkload`, a :class:`~drivers.synthetic.SyntheticWorkload`
    (anything with ``build(run_prefix) -> Plan``) or a ready :class:`~drivers.workload.Plan`.
    ``processes``: OS processes to spread the clients over (spawn context); ``progress``: the live
    status line (:mod:`drivers.live`; callers pass ``sys.stdout.isatty()``); ``drain_timeout_s``: bound
    of the final catch-up and drain. Other keyword options are the fields of :class:`RunOptions`
    (``send_deadline_s``, ``subprotocol``, ``quiet_s``, ``run_id``, ...).

    The report (counts are entries or deliveries, latencies in ms, rates per second):
    ``sent``, ``acked``, ``unacked``, ``expected_deliveries``, ``delivered``, ``lost``, ``duplicates``,
    ``order_violations``, ``unexpected_deliveries``, ``delivered_unacked``, ``clients``, ``processes``,
    ``duration_s`` (send phase: start to last ack), ``total_s`` (the whole run, setup and drain
    included), ``throughput_msgs_per_s`` (acked / duration_s), ``deliveries_per_s`` (delivered / start
    to last delivery), ``ack_latency_ms`` and ``delivery_latency_ms`` (from the actual send),
    ``ack_latency_from_schedule_ms`` and ``delivery_latency_from_schedule_ms`` (from the scheduled send
    time: coordinated-omission corrected) and ``schedule_lag_ms`` (actual - scheduled send time; each
    ``{"p50", "p95", "p99", "max", "mean", "count"}``), ``open_loop``, ``sends_in_flight_max`` (the most
    sends one driver process had awaiting their ack at once), ``t0_s`` (the common start, s since the
    epoch), ``ack_span_s`` (first to last ack) and ``acks_per_s`` ((acked - 1) / ack_span_s: the rate
    acks came in at, which a constant latency does not lower as it lowers ``throughput_msgs_per_s``),
    ``reconnects``, ``client_counters``,
    ``send_errors`` (exception name -> count), ``stages`` (the per-step breakdown of sends the
    server traced, :meth:`drivers.stages.StageRecorder.report`; empty without ``trace_sample``),
    ``drained`` (every client caught up and deliveries
    went quiet before the drain timeout), ``workload`` (the plan's summary), ``run_id``.

    Must not be called from a running event loop: use :func:`run_workload_async` there.
    """
    return asyncio.run(run_workload_async(router_url, workload, processes, progress, drain_timeout_s, **options))


# --- command line ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m drivers.run", description="Load-test im-actors and judge the run.")
    p.add_argument("--router", help="router base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--fake-hubs", type=int, default=0, help="run against the in-memory fake server with N hubs")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds")
    p.add_argument("--send-deadline", type=float, default=30.0, help="seconds")
    p.add_argument("--json-subprotocol", action="store_true", help="speak im.v1.json instead of msgpack")
    p.add_argument(
        "--open-loop", action="store_true", help="issue every send on schedule, not waiting for the previous ack"
    )
    p.add_argument("--no-progress", action="store_true", help="no live status line (drawn only on a terminal)")
    t = p.add_argument_group("tokens (default: the router's development login)")
    t.add_argument(
        "--jwt-secret",
        default=os.environ.get("IM_JWT_SECRET", ""),
        help="mint HS256 tokens per user with the deployment's jwt_secret [default: $IM_JWT_SECRET]",
    )
    t.add_argument("--jwt-key", help="mint tokens per user with this PEM private key (RS256, or ES256 for EC keys)")
    t.add_argument("--jwt-algorithm", default="", help="HS256, RS256 or ES256 [default: from the secret or key]")
    t.add_argument("--jwt-audience", default="", help="aud claim of minted tokens (the deployment's jwt_audience)")
    t.add_argument("--jwt-issuer", default="", help="iss claim of minted tokens (the deployment's jwt_issuer)")
    t.add_argument("--token-ttl", type=int, default=3600, help="lifetime of minted tokens (s)")
    t.add_argument(
        "--token-file", help="tokens per user: a JSON object or '<user> <token>' lines (needs --user-prefix)"
    )
    p.add_argument("--user-prefix", help="prefix of user ids and group names [default: '<run id>.', fresh per run]")
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument("--html", help="also write the HTML report with plots to this file")
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="METRIC_OP_NUMBER",
        help="fail (exit 1) unless it holds, e.g. 'delivery_p99_ms<50' (repeatable; see drivers.verdict)",
    )
    sub = p.add_subparsers(dest="workload", required=True)
    r = sub.add_parser("replay", help="replay the chat corpus")
    r.add_argument("--corpus", required=True, help="gzip JSON Lines file (fluid_irc_replay.jsonl.gz)")
    r.add_argument("-n", "--messages", type=int, default=DEFAULTS.messages)
    r.add_argument("--duration", type=float, default=DEFAULTS.duration_s, help="wall seconds the replay lasts")
    r.add_argument("--speed", type=float, help="compression factor instead of --duration")
    r.add_argument("--gap-cap", type=float, default=DEFAULTS.gap_cap_s, help="longest idle gap kept, corpus seconds")
    s = sub.add_parser("synthetic", help="synthetic direct and group traffic")
    s.add_argument("--users", type=int, default=DEFAULTS.users)
    s.add_argument("--rate", type=float, default=DEFAULTS.rate, help="messages per second, in total")
    s.add_argument("--duration", type=float, default=DEFAULTS.duration_s, help="seconds")
    s.add_argument("--size", type=int, default=DEFAULTS.msg_bytes, help="body bytes")
    s.add_argument("--group-size", type=int, default=DEFAULTS.group_size, help="0: direct messages only")
    s.add_argument("--groups", type=int)
    s.add_argument("--direct-share", type=float)
    s.add_argument("--poisson", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--stages",
        type=parse_stages,
        help="ramp the rate k6 style instead of --rate/--duration, e.g. 30s:100,60s:1000 (duration:msgs/s)",
    )
    return p


def _workload_from_args(args: argparse.Namespace) -> Workload:
    if args.workload == "replay":
        from drivers.replay import ReplayWorkload

        return ReplayWorkload(args.corpus, args.messages, args.duration, args.gap_cap, args.speed)
    from drivers.synthetic import SyntheticWorkload

    return SyntheticWorkload(
        users=args.users,
        rate=args.rate,
        duration_s=args.duration,
        msg_bytes=args.size,
        group_size=args.group_size,
        groups=args.groups,
        direct_share=args.direct_share,
        poisson=args.poisson,
        seed=args.seed,
        stages=args.stages or (),
    )


def _tokens(args: argparse.Namespace) -> TokenSource:
    """The token source of the flags; raises ValueError (or OSError) for a bad combination or file."""
    common: dict[str, Any] = {"ttl_s": args.token_ttl, "audience": args.jwt_audience, "issuer": args.jwt_issuer}
    if args.jwt_algorithm:
        common["algorithm"] = args.jwt_algorithm
    if args.token_file:
        if args.jwt_key or args.jwt_secret:
            raise ValueError("give --token-file or a way to mint tokens (--jwt-secret, --jwt-key), not both")
        if args.user_prefix is None:
            raise ValueError("--token-file needs --user-prefix: the user ids must be known before the run")
        return TokenSource.from_token_file(args.token_file)
    if args.jwt_key:
        if args.jwt_secret:
            raise ValueError("give --jwt-secret or --jwt-key, not both")
        return TokenSource.from_key_file(args.jwt_key, **common)
    if args.jwt_secret:
        return TokenSource(secret=args.jwt_secret, **common)
    return TokenSource()


def _live(args: argparse.Namespace) -> bool:
    """The live view only on a terminal (stdout), unless --no-progress."""
    return not args.no_progress and sys.stdout.isatty()


async def _main_async(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "send_deadline_s": args.send_deadline,
        "subprotocol": SUBPROTOCOL_JSON if args.json_subprotocol else SUBPROTOCOL_MSGPACK,
        "open_loop": args.open_loop,
        "tokens": _tokens(args),
        "user_prefix": args.user_prefix,
    }
    workload = _workload_from_args(args)
    if args.fake_hubs:
        from tests.fakeserver import FakeServer

        async with FakeServer(hubs=args.fake_hubs) as fake:
            return await run_workload_async(
                fake.router_url, workload, args.processes, _live(args), args.drain_timeout, **kwargs
            )
    return await run_workload_async(args.router, workload, args.processes, _live(args), args.drain_timeout, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m drivers.run``: print the report as JSON (with its ``verdict``), the verdict on stderr;
    exit 1 when :func:`drivers.verdict.judge` fails the run (oracle or a ``--threshold``), 2 on bad flags."""
    args = _parser().parse_args(argv)
    if not args.router and not args.fake_hubs:
        _parser().error("give --router URL or --fake-hubs N")
    try:
        thresholds = [Threshold.parse(t) for t in args.threshold]
    except ValueError as exc:
        _parser().error(f"--threshold: {exc}")
    try:
        _tokens(args)
    except (OSError, ValueError) as exc:
        _parser().error(f"tokens: {exc}")
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(_main_async(args))
    decision = judge(report, thresholds)
    report["verdict"] = decision.as_dict()
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.html:
        from im_actors.report import write_html

        write_html(report, args.html)
    if decision.passed:
        print(
            "OK" + (f": thresholds held: {', '.join(decision.thresholds)}" if decision.thresholds else ""),
            file=sys.stderr,
        )
    else:
        print(f"FAILED: {'; '.join(decision.reasons())}", file=sys.stderr)
    return decision.exit_code


if __name__ == "__main__":
    sys.exit(main())
