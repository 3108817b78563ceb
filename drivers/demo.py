"""The demo's orchestration: services, a local Ray cluster, a deployment, a workload, faults, the verdict.

:func:`run_demo` is what ``im-actors demo`` does (the command in :mod:`drivers.cli` only turns its
flags into :class:`DemoOptions`): it loads the configuration, picks the workload (the corpus replay,
or the synthetic one), fills in the backing services (:func:`im_actors.services.ensure_services`),
starts a local Ray cluster of ``nodes`` nodes, deploys every actor role, runs the workload (with a
:class:`~drivers.chaos.ChaosMonkey` beside it when ``chaos`` is given), tears everything down (also on
SIGTERM or Ctrl-C), judges the run (:func:`drivers.verdict.judge`), writes the JSON report (and the
HTML one) and prints the summary. It returns the exit code: 0 passed, 1 failed; a problem found before
anything started raises :class:`DemoError` with code 2 (usage, configuration) or 3 (a service).

Every run has a seed (``seed``, drawn when not given) that seeds the synthetic workload and the
chaos monkey's choices; the report's ``fault_plan`` holds it with the faults injected, and a failed
run writes the plan beside the report too (:mod:`drivers.faultplan`); ``replay`` reruns one. The
``mongodb-slow`` and ``mongodb-cut`` kinds put a :class:`~drivers.tcpproxy.TcpProxy` (on a thread of
this process) between the deployment and MongoDB: the deployment's ``mongo_url`` points at it.

Dependencies point one way: :mod:`drivers` imports :mod:`im_actors`, never the reverse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.chaos import PRIVATE_SERVICE_KINDS, PROXY_KINDS, ChaosMonkey, ChaosSpec, summarize
from drivers.faultplan import REPLAYED_OPTIONS, FaultPlan, plan_path
from drivers.replay import ReplayWorkload
from drivers.resources import ResourceSampler, send_phase_end_ms, summary_lines
from drivers.run import run_workload, run_workload_async
from drivers.storm import reconnect_storm
from drivers.synthetic import SyntheticWorkload
from drivers.tcpproxy import TcpProxy, mongo_upstream, proxied_mongo_url
from drivers.verdict import Threshold, judge
from drivers.workload import DEFAULTS, Workload
from im_actors.config import Config, load_config
from im_actors.errors import ConfigError, ServiceError
from im_actors.services import LocalServices, can_start_private

__all__ = ["DemoOptions", "DemoError", "run_demo", "chaos_spec", "private_kinds", "find_corpus", "DEFAULT_CORPUS"]

log = logging.getLogger(__name__)

#: Where the demo looks for the chat corpus when ``corpus`` is not given (read in place, never copied):
#: ``$IM_CORPUS``, then ``shared/data/`` beside the checkout, then ``../shared/data/`` and
#: ``./shared/data/`` from the current folder.
CORPUS_NAME = Path("shared") / "data" / "fluid_irc_replay.jsonl.gz"
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / CORPUS_NAME

Echo = Callable[..., None]


def _echo(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


class DemoError(Exception):
    """A problem found before the demo started anything: ``exit_code`` 2 (usage or configuration)
    or 3 (a backing service missing); the message says what and how to fix it."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class DemoOptions:
    """Everything ``im-actors demo`` takes (see ``im-actors demo --help`` for each flag).

    Durations in seconds, ``rate`` in msgs/s; None for a service URL or a deployment knob means
    "from the configuration file / IM_* environment, else the demo's default".
    """

    corpus: Path | None = None
    messages: int = DEFAULTS.messages
    duration_s: float = DEFAULTS.duration_s
    report: Path = Path("im-actors-report.json")
    html: Path | None = None
    thresholds: tuple[str, ...] = ()
    synthetic: bool = False
    users: int = DEFAULTS.users
    rate: float = DEFAULTS.rate
    group_size: int = DEFAULTS.group_size
    processes: int = 1
    config: Path | None = None
    hubs: int | None = None
    shards: int | None = None
    store_writers: int | None = None
    mongo_url: str | None = None
    redis_url: str | None = None
    rabbitmq_url: str | None = None
    progress: bool | None = None
    chaos: str | None = None
    chaos_outage_s: float = 10.0
    nodes: int = 1
    storm: int = 0
    #: Seeds the synthetic workload and the chaos monkey's choices; None: drawn (and reported).
    seed: int | None = None
    #: ``mongodb-slow``'s delay of every MongoDB reply (ms).
    chaos_delay_ms: float = 500.0
    #: A fault plan or a report to rerun (:mod:`drivers.faultplan`): its seed, workload and faults.
    replay: Path | None = None
    #: drivers.resources: sample every role's processes this often (s; 0: off) and count leaks
    #: after this settle time (s) once the clients closed.
    sample_every_s: float = 10.0
    leak_settle_s: float = 5.0
    #: Trace every actor's Python allocations and report the lines that grew (needs sample_every_s > 0).
    heap_trace: bool = False


def find_corpus() -> Path | None:
    """The first corpus file found among the default places (see :data:`CORPUS_NAME`), or None."""
    env = os.environ.get("IM_CORPUS")
    candidates = [Path(env)] if env else []
    candidates += [DEFAULT_CORPUS, Path.cwd().parent / CORPUS_NAME, Path.cwd() / CORPUS_NAME]
    return next((c for c in candidates if c.is_file()), None)


def chaos_spec(spec: str, cfg: Config, mongo_given: bool, echo: Echo = _echo) -> ChaosSpec:
    """Parse ``--chaos``; ``all`` leaves out what this run cannot break (a given server is never
    restarted), and naming such a kind explicitly is an error (:class:`DemoError`, exit 2)."""
    try:
        parsed = ChaosSpec.parse(spec)
    except ValueError as exc:
        raise DemoError(f"--chaos: {exc}") from None
    given = {"mongodb": mongo_given, "redis-restart": bool(cfg.redis_url), "rabbitmq": bool(cfg.rabbitmq_url)}
    keys = {"mongodb": "mongo_url", "redis-restart": "redis_url", "rabbitmq": "rabbitmq_url"}
    unproxied = _unproxiable(cfg.mongo_url)
    if spec.split(":")[0].strip() in ("", "all"):
        skip = {kind for kind, is_given in given.items() if is_given}
        if unproxied:
            echo(f"im-actors: --chaos all: {unproxied}; {' and '.join(PROXY_KINDS)} left out")
            skip |= set(PROXY_KINDS)
        for kind, service in (("redis-restart", "redis"), ("rabbitmq", "rabbitmq")):
            if kind not in skip and not can_start_private(service):
                echo(f"im-actors: --chaos all: no {service} server program to restart here; {kind} left out")
                skip.add(kind)
        skip |= {"push"} if cfg.push_workers == 0 else set()
        skip |= {"store"} if cfg.store_writers == 0 else set()
        return ChaosSpec(tuple(k for k in parsed.kinds if k not in skip), parsed.interval_s)
    for kind in parsed.kinds:
        if given.get(kind):
            raise DemoError(
                f"--chaos {kind}: {keys[kind]} is given, and a server this run did not start is "
                "never stopped; leave it unset so the run starts a private one"
            )
        if kind in PROXY_KINDS and unproxied:
            raise DemoError(f"--chaos {kind}: {unproxied}")
    return parsed


def _unproxiable(mongo_url: str) -> str:
    """Why the MongoDB proxy cannot stand in front of ``mongo_url`` ("" when it can: always for
    the SecantusDB the run starts itself)."""
    if not mongo_url:
        return ""
    try:
        mongo_upstream(mongo_url)
    except ValueError as exc:
        return f"mongo_url cannot be proxied ({exc})"
    return ""


def _start_mongo_proxy(cfg: Config, seed: int) -> tuple[Config, TcpProxy]:
    """A :class:`TcpProxy` in front of ``cfg.mongo_url`` on its own thread (the deployment's
    actors connect to it while this process blocks in Ray calls), and the config pointing at it."""
    proxy = TcpProxy(mongo_upstream(cfg.mongo_url), rng=random.Random(seed ^ 0x5EED))
    port = proxy.start_thread()
    return cfg.model_copy(update={"mongo_url": proxied_mongo_url(cfg.mongo_url, port)}), proxy


def private_kinds(spec: ChaosSpec) -> set[str]:
    """The services (``redis``, ``rabbitmq``, ``mongodb``) that the chaos kinds of ``spec`` restart."""
    return {PRIVATE_SERVICE_KINDS[k] for k in spec.kinds if k in PRIVATE_SERVICE_KINDS}


async def _run_with_chaos(
    cfg: Config,
    router_url: str,
    workload: Workload,
    spec: ChaosSpec,
    services: LocalServices,
    duration: float,
    outage_s: float,
    processes: int,
    progress: bool,
    cluster: Any = None,
    *,
    mongo_proxy: TcpProxy | None = None,
    slow_ms: float = 500.0,
    rng: random.Random | None = None,
    schedule: list[tuple[float, str, int | None]] | None = None,
) -> dict[str, Any]:
    """The workload with a :class:`drivers.chaos.ChaosMonkey` breaking things beside it, on
    ``schedule`` when given (a replayed plan), else on ``spec``'s."""
    monkey = ChaosMonkey(
        cfg,
        router_url,
        spec,
        services,
        outage_s=outage_s,
        cluster=cluster,
        rng=rng,
        mongo_proxy=mongo_proxy,
        slow_ms=slow_ms,
    )
    await monkey.start()
    run = asyncio.create_task(
        run_workload_async(router_url, workload, processes, progress, faults_in_progress=monkey.in_progress)
    )
    setup_s = 5.0  # the driver connects its clients and creates the groups first
    if schedule is None:
        planned: list[Any] = spec.schedule(setup_s + 0.05 * duration, setup_s + 0.8 * duration)
    else:
        planned = list(schedule)
    faults_task = asyncio.create_task(monkey.run(planned))
    try:
        result = await run
    finally:
        faults_task.cancel()
    result["faults"] = await monkey.finish()
    result["faults_summary"] = summarize(result["faults"])
    return result


def _sigterm_to_exit() -> None:
    """Turn SIGTERM into SystemExit so that ``finally`` blocks stop what the demo started."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def summary(report: dict[str, Any]) -> str:
    """The text summary the demo prints (counts, rates in msgs/s, latencies in ms, services, faults)."""
    ack, dl = report["ack_latency_ms"], report["delivery_latency_ms"]
    svc = report.get("services", {})
    lines = [
        "",
        "im-actors demo report",
        f"  clients {report['clients']}  hubs {report['hubs']}  duration {report['duration_s']:.1f} s",
        f"  sent {report['sent']}  acked {report['acked']}  unacked {report.get('unacked', 0)}",
        f"  deliveries {report['delivered']} of {report['expected_deliveries']} expected",
        f"  lost {report['lost']}  duplicates {report['duplicates']}  order violations {report['order_violations']}",
        f"  throughput {report['throughput_msgs_per_s']:.1f} msgs/s  {report['deliveries_per_s']:.1f} deliveries/s",
        f"  ack latency ms       p50 {ack['p50']}  p95 {ack['p95']}  p99 {ack['p99']}  max {ack['max']}",
        f"  delivery latency ms  p50 {dl['p50']}  p95 {dl['p95']}  p99 {dl['p99']}  max {dl['max']}",
        "  services  " + "  ".join(f"{k}: {v.get('server', '?')} {v.get('version', '')}" for k, v in svc.items()),
    ]
    storm = report.get("storm")
    if storm:
        back = f"{storm['all_back_s']} s" if storm["all_back_s"] is not None else "never seen"
        lines.append(
            f"  storm: {storm['hub']} killed holding {storm['hub_clients']} of {storm['clients']} clients; "
            f"all back after {back}"
        )
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    for kind, row in report.get("faults_summary", {}).items():
        lines.append(
            f"  fault {kind:13} injected {row['injected']}  recovered {row['recovered']}  "
            f"recovery median {row['median_recovery_s']} s  worst {row['worst_recovery_s']} s"
        )
        if "reconnect_spread_s" in row:
            lines.append(f"  {'':19}reconnect spread s {row['reconnect_spread_s']}")
        if "proxy" in row:
            counts = "  ".join(f"{k} {v}" for k, v in row["proxy"].items())
            lines.append(f"  {'':19}worst probe ack latency {row.get('worst_ack_latency_ms')} ms  proxy: {counts}")
    plan = report.get("fault_plan")
    if plan:
        faults = ", ".join(f"{f['kind']}@{f['at_s']:g}s" for f in plan.get("faults", []))
        lines.append(f"  seed {plan['seed']}" + (f"  faults {faults}" if faults else ""))
    lines += summary_lines(report)
    return "\n".join(lines)


#: Where the corpus comes from, for the message of a run that cannot find it.
CORPUS_SOURCE = (
    "it ships in the project's shared/ folder as shared/data/fluid_irc_replay.jsonl.gz (the Fluid Project's "
    "public IRC logs, https://github.com/fluid-project/fluid-irc-logs, anonymised); put that folder beside "
    "the checkout, or pass --corpus PATH or set IM_CORPUS"
)


def _workload(opts: DemoOptions, notes: list[str], echo: Echo) -> Workload:
    """The replay of the corpus; the synthetic workload when asked, or when no corpus was given and none
    is found in the default places (a note says where to get it). A given ``corpus`` that is missing
    is an error (:class:`DemoError`, exit 2)."""
    synthetic = SyntheticWorkload(
        users=opts.users,
        rate=opts.rate,
        duration_s=opts.duration_s,
        group_size=opts.group_size,
        seed=opts.seed or 0,
    )
    if opts.synthetic:
        return synthetic
    if opts.corpus is not None:
        if not opts.corpus.is_file():
            raise DemoError(f"corpus {opts.corpus} not found (pass an existing file, or use --synthetic)")
        path = opts.corpus
    else:
        found = find_corpus()
        if found is None:
            note = f"no chat corpus found (looked for {DEFAULT_CORPUS}); {CORPUS_SOURCE}. Ran the synthetic workload"
            echo(f"im-actors: {note}", err=True)
            notes.append(note)
            return synthetic
        path = found
    return ReplayWorkload(path=str(path), messages=opts.messages, duration_s=opts.duration_s)


def _replayed_options(opts: DemoOptions, workload: Workload | None, cfg: Config, nodes: int) -> dict[str, Any]:
    """The options a replay takes from this run (:data:`drivers.faultplan.REPLAYED_OPTIONS`), as
    they were in effect: the deployment's sizes from ``cfg`` (a replay gives them as flags, so the
    configuration file may differ), the Ray nodes run, and the workload actually run: a corpus
    replay names its corpus file, a run that fell back to the synthetic workload is synthetic."""
    out = {k: getattr(opts, k) for k in REPLAYED_OPTIONS}
    shards = cfg.conv_shards if cfg.conv_shards == cfg.session_shards else opts.shards
    out.update(hubs=cfg.hubs, shards=shards, store_writers=cfg.store_writers, nodes=nodes)
    if isinstance(workload, ReplayWorkload):
        out.update(corpus=str(workload.path), synthetic=False)
    elif isinstance(workload, SyntheticWorkload):
        out.update(corpus=None, synthetic=True)
    return out


def run_demo(opts: DemoOptions, echo: Echo = _echo) -> int:
    """Run the demo (see the module docstring); returns the exit code (0 passed, 1 failed).

    ``echo(text, err=False)`` prints (``typer.echo``). Raises :class:`DemoError` (exit 2 or 3) for a
    problem found before anything was started: a bad threshold, chaos kind or configuration key, a
    missing corpus, a missing service.
    """
    import ray

    from im_actors.cluster import deploy, init_local_cluster, init_local_ray
    from im_actors.services import describe_services, ensure_services, purge_deployment

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    replayed: FaultPlan | None = None
    if opts.replay is not None:
        try:
            replayed = FaultPlan.read(opts.replay)
        except (OSError, ValueError) as exc:
            raise DemoError(f"--replay: {exc}") from None
        opts = dataclasses.replace(
            opts,
            seed=replayed.seed,
            chaos=replayed.chaos,
            chaos_outage_s=replayed.outage_s,
            chaos_delay_ms=replayed.slow_ms,
            **dict(replayed.options),
        )
        echo(f"replaying {opts.replay}: seed {replayed.seed}, {len(replayed.faults)} fault(s), chaos {opts.chaos}")
    if opts.seed is None:
        opts = dataclasses.replace(opts, seed=secrets.randbits(32))
    assert opts.seed is not None
    try:
        thresholds = [Threshold.parse(t) for t in opts.thresholds]
    except ValueError as exc:
        raise DemoError(f"--threshold: {exc}") from None
    try:
        cfg = load_config(
            opts.config,
            deployment=f"demo{secrets.token_hex(3)}",
            hubs=opts.hubs,
            session_shards=opts.shards,
            conv_shards=opts.shards,
            store_writers=opts.store_writers,
            mongo_url=opts.mongo_url,
            redis_url=opts.redis_url,
            rabbitmq_url=opts.rabbitmq_url,
            dev_login=True,
            router_port=0,
        )
    except ConfigError as exc:
        raise DemoError(str(exc)) from None
    if not cfg.jwt_secret:
        cfg = cfg.model_copy(update={"jwt_secret": secrets.token_hex(32)})
    own_mongo_db = bool(cfg.mongo_url)  # a given MongoDB gets a database of the run's own, dropped after
    if own_mongo_db:
        cfg = cfg.model_copy(update={"mongo_db": f"im_{cfg.deployment}"})
    progress = sys.stdout.isatty() if opts.progress is None else opts.progress
    if opts.storm and opts.chaos:
        raise DemoError("--storm and --chaos: one fault plan at a time")
    if opts.heap_trace and opts.sample_every_s <= 0:
        raise DemoError("--heap-trace needs --sample-every > 0 (the trace is taken with the resource samples)")
    if opts.storm and cfg.hubs < 1:
        raise DemoError("--storm needs a hub to kill")
    spec = chaos_spec(opts.chaos, cfg, own_mongo_db, echo) if opts.chaos else None
    notes: list[str] = []
    workload = _workload(opts, notes, echo) if not opts.storm else None
    _sigterm_to_exit()
    try:
        private = [] if spec is None else [k for k in ("redis", "rabbitmq") if k in private_kinds(spec)]
        cfg, services = ensure_services(cfg, private=private, push_optional=True)
    except ServiceError as exc:
        raise DemoError(str(exc), exit_code=3) from None
    for note in services.notes:
        echo(f"im-actors: {note}")
        notes.append(note)
    if spec is not None and cfg.push_workers == 0:  # push turned off for want of a broker
        spec = ChaosSpec(tuple(k for k in spec.kinds if k not in ("push", "rabbitmq")), spec.interval_s)
    proxy: TcpProxy | None = None
    if spec is not None and set(PROXY_KINDS) & set(spec.kinds):
        try:
            cfg, proxy = _start_mongo_proxy(cfg, opts.seed)
        except (OSError, TimeoutError) as exc:
            services.stop()
            raise DemoError(f"the MongoDB proxy of {', '.join(PROXY_KINDS)} did not start: {exc}", 3) from None
        except BaseException:
            services.stop()
            raise
    nodes = opts.nodes
    if spec is not None and "node" in spec.kinds and nodes < 3:
        nodes = 3  # one to lose, one to keep the router, one for the restarted actors
    started = time.monotonic()
    result: dict[str, Any] = {}
    cluster: Any = None
    sampler: ResourceSampler | None = None
    try:
        echo(f"starting a local Ray cluster of {nodes} node(s) and deploying {cfg.hubs} hubs ...")
        if nodes > 1:
            cluster = init_local_cluster(cfg, nodes)
        else:
            init_local_ray(cfg)
        _sigterm_to_exit()  # ray.init installs its own SIGTERM handler, which skips our clean-up
        dep = deploy(cfg)
        echo(f"router {dep.router_url}; hubs {', '.join(dep.hub_urls.values())}")
        if opts.sample_every_s > 0:
            sampler = ResourceSampler(
                cfg, services, every_s=opts.sample_every_s, settle_s=opts.leak_settle_s, heap_trace=opts.heap_trace
            )
            sampler.start()
        if opts.storm:
            result = asyncio.run(
                reconnect_storm(
                    cfg,
                    dep.router_url,
                    clients=opts.storm,
                    rate=opts.rate,
                    duration_s=opts.duration_s,
                    group_size=opts.group_size,
                    processes=opts.processes,
                    progress=progress,
                )
            )
        elif workload is None:
            raise AssertionError("a workload is planned unless --storm")
        elif spec is None:
            result = run_workload(dep.router_url, workload, processes=opts.processes, progress=progress)
        else:
            result = asyncio.run(
                _run_with_chaos(
                    cfg,
                    dep.router_url,
                    workload,
                    spec,
                    services,
                    opts.duration_s,
                    opts.chaos_outage_s,
                    opts.processes,
                    progress,
                    cluster,
                    mongo_proxy=proxy,
                    slow_ms=opts.chaos_delay_ms,
                    rng=random.Random(opts.seed),
                    schedule=replayed.schedule() if replayed is not None else None,
                )
            )
        if sampler is not None:
            result.update(sampler.finish(send_end_ms=send_phase_end_ms(result)))
        result["hubs"] = cfg.hubs
        result["ray_nodes"] = nodes
        result["config"] = cfg.knobs()
        result["services"] = describe_services(cfg)
        result["deploy_and_run_s"] = round(time.monotonic() - started, 1)
        if proxy is not None:
            result["mongo_proxy"] = {"port": proxy.port, **proxy.stats.as_dict()}
        if notes:
            result["notes"] = notes
    finally:
        if sampler is not None:
            sampler.stop()
        try:
            # The demo owns this Ray cluster: shutting it down ends every actor. Bounded, because
            # a signal sent to the whole process group (timeout, Ctrl-C in some shells) may have
            # killed Ray's own processes already.
            if ray.is_initialized():
                stopper = threading.Thread(target=ray.shutdown, daemon=True)
                stopper.start()
                stopper.join(20)
            if cluster is not None:
                stopper = threading.Thread(target=cluster.shutdown, daemon=True)
                stopper.start()
                stopper.join(30)
            if proxy is not None:
                proxy.heal()
            purge_deployment(cfg, drop_mongo_db=own_mongo_db)
        finally:
            if proxy is not None:
                proxy.stop_thread()
            services.stop()
    chaos_used = f"{','.join(spec.kinds)}{f':{spec.interval_s:g}' if spec.interval_s else ''}" if spec else None
    plan = FaultPlan.from_faults(
        opts.seed,
        chaos_used,
        result.get("faults", []),
        opts.chaos_outage_s,
        opts.chaos_delay_ms,
        _replayed_options(opts, workload, cfg, nodes),
    )
    result["fault_plan"] = plan.as_dict()
    decision = judge(result, thresholds)
    result["verdict"] = decision.as_dict()
    opts.report.write_text(json.dumps(result, indent=2, default=str))
    if opts.html is not None:
        from im_actors.report import write_html

        write_html(result, opts.html)
    echo(summary(result))
    written = f"report: {opts.report}" + (f", {opts.html}" if opts.html is not None else "")
    if not decision.passed:
        replay_file = plan.write(plan_path(opts.report))
        echo(f"FAILED: {'; '.join(decision.reasons())}  ({written})", err=True)
        echo(f"seed and fault schedule: {replay_file} (rerun: im-actors demo --replay {replay_file})", err=True)
        return decision.exit_code
    held = f"; thresholds held: {', '.join(decision.thresholds)}" if decision.thresholds else ""
    echo(f"OK: every acked message reached every member device once, in order{held}  ({written})")
    return 0
