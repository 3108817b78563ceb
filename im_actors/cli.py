"""The ``im-actors`` command: ``demo``, ``up``, ``down``, ``status``.

``demo`` is the main job: it starts a local Ray cluster and the backing services it must, deploys
every actor, replays real chat traffic (or a synthetic workload) through real WebSocket clients,
prints a summary, writes the JSON report, tears everything down, and exits non-zero when the
oracle found a lost, duplicated or reordered delivery (DESIGN.md section 10).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from im_actors.config import Config, load_config
from im_actors.errors import ConfigError, ServiceError

__all__ = ["app", "main", "DEFAULT_CORPUS"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # option help says "[default: ...]" literally; rich would drop it as markup
    help="im-actors: an IM backend on Ray actors.",
)
log = logging.getLogger("im_actors")

#: Where the demo looks for the chat corpus when ``--corpus`` is not given (read in place, never copied):
#: ``$IM_CORPUS``, then ``shared/data/`` beside the checkout, then ``../shared/data/`` from here.
CORPUS_NAME = Path("shared") / "data" / "fluid_irc_replay.jsonl.gz"
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / CORPUS_NAME


def find_corpus() -> Path | None:
    """The first corpus file found among the default places (see :data:`CORPUS_NAME`), or None."""
    env = os.environ.get("IM_CORPUS")
    candidates = [Path(env)] if env else []
    candidates += [DEFAULT_CORPUS, Path.cwd().parent / CORPUS_NAME, Path.cwd() / CORPUS_NAME]
    return next((c for c in candidates if c.is_file()), None)


def _connect_ray(address: str) -> None:
    import ray

    from im_actors.ids import NAMESPACE

    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    except ConnectionError as exc:
        typer.echo(f"im-actors: no Ray cluster at {address!r}: {exc}", err=True)
        raise typer.Exit(4) from None


def _chaos_spec(spec: str, cfg: Config, mongo_given: bool) -> Any:
    """Parse ``--chaos``; ``all`` leaves out what this run cannot break (a given server is never
    restarted), and naming such a kind explicitly is an error (exit 2)."""
    from drivers.chaos import ChaosSpec

    try:
        parsed = ChaosSpec.parse(spec)
    except ValueError as exc:
        typer.echo(f"im-actors: --chaos: {exc}", err=True)
        raise typer.Exit(2) from None
    given = {"mongodb": mongo_given, "redis-restart": bool(cfg.redis_url), "rabbitmq": bool(cfg.rabbitmq_url)}
    keys = {"mongodb": "mongo_url", "redis-restart": "redis_url", "rabbitmq": "rabbitmq_url"}
    from im_actors.services import can_start_private

    if spec.split(":")[0].strip() in ("", "all"):
        skip = {kind for kind, is_given in given.items() if is_given}
        for kind, service in (("redis-restart", "redis"), ("rabbitmq", "rabbitmq")):
            if kind not in skip and not can_start_private(service):
                typer.echo(f"im-actors: --chaos all: no {service} server program to restart here; {kind} left out")
                skip.add(kind)
        skip |= {"push"} if cfg.push_workers == 0 else set()
        skip |= {"store"} if cfg.store_writers == 0 else set()
        return ChaosSpec(tuple(k for k in parsed.kinds if k not in skip), parsed.interval_s)
    for kind in parsed.kinds:
        if given.get(kind):
            typer.echo(
                f"im-actors: --chaos {kind}: {keys[kind]} is given, and a server this run did not start is "
                "never stopped; leave it unset so the run starts a private one",
                err=True,
            )
            raise typer.Exit(2)
    return parsed


async def _run_with_chaos(
    cfg: Config,
    router_url: str,
    workload: Any,
    spec: Any,
    services: Any,
    duration: float,
    outage_s: float,
    processes: int,
    progress: bool,
    cluster: Any = None,
) -> dict[str, Any]:
    """The workload with a :class:`drivers.chaos.ChaosMonkey` breaking things beside it."""
    from drivers.chaos import ChaosMonkey, summarize
    from drivers.run import run_workload_async

    monkey = ChaosMonkey(cfg, router_url, spec, services, outage_s=outage_s, cluster=cluster)
    await monkey.start()
    run = asyncio.create_task(
        run_workload_async(router_url, workload, processes, progress, faults_in_progress=monkey.in_progress)
    )
    setup_s = 5.0  # the driver connects its clients and creates the groups first
    schedule = spec.schedule(setup_s + 0.05 * duration, setup_s + 0.8 * duration)
    faults_task = asyncio.create_task(monkey.run(schedule))
    try:
        result = await run
    finally:
        faults_task.cancel()
    result["faults"] = await monkey.finish()
    result["faults_summary"] = summarize(result["faults"])
    return result


def _private_kinds(spec: Any) -> set[str]:
    """The services (``redis``, ``rabbitmq``, ``mongodb``) that the chaos kinds of ``spec`` restart."""
    from drivers.chaos import PRIVATE_SERVICE_KINDS

    return {PRIVATE_SERVICE_KINDS[k] for k in spec.kinds if k in PRIVATE_SERVICE_KINDS}


def _sigterm_to_exit() -> None:
    """Turn SIGTERM into SystemExit so that ``finally`` blocks stop what the demo started."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration file")]
HubsOpt = Annotated[int | None, typer.Option(help="hub actors")]
ShardsOpt = Annotated[int | None, typer.Option(help="session and conversation shards (each)")]
WritersOpt = Annotated[int | None, typer.Option(help="store writer actors")]
MongoOpt = Annotated[str | None, typer.Option(help="MongoDB URL (default: start SecantusDB for the run)")]
RedisOpt = Annotated[str | None, typer.Option(help="Redis URL (default: redis://127.0.0.1:6379/0)")]
AmqpOpt = Annotated[str | None, typer.Option(help="RabbitMQ URL (default: amqp://guest:guest@127.0.0.1:5672/)")]
# A cluster deployment starts no services: its URLs are required (TOML, IM_* or these flags).
ClusterMongoOpt = Annotated[str | None, typer.Option("--mongo-url", help="MongoDB URL (required)")]
ClusterRedisOpt = Annotated[str | None, typer.Option("--redis-url", help="Redis URL (required)")]
ClusterAmqpOpt = Annotated[str | None, typer.Option("--rabbitmq-url", help="RabbitMQ URL (required)")]


def _config(path: Path | None, **flags: Any) -> Config:
    try:
        return load_config(path, **flags)
    except ConfigError as exc:
        typer.echo(f"im-actors: {exc}", err=True)
        raise typer.Exit(2) from None


def _summary(report: dict[str, Any]) -> str:
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
    for kind, row in report.get("faults_summary", {}).items():
        lines.append(
            f"  fault {kind:13} injected {row['injected']}  recovered {row['recovered']}  "
            f"recovery median {row['median_recovery_s']} s  worst {row['worst_recovery_s']} s"
        )
    return "\n".join(lines)


@app.command()
def demo(
    corpus: Annotated[
        Path | None,
        typer.Option(help="chat corpus (JSONL.gz) to replay [default: $IM_CORPUS or shared/data/ beside the checkout]"),
    ] = None,
    messages: Annotated[int, typer.Option(help="corpus messages to replay")] = 2000,
    duration: Annotated[float, typer.Option(help="wall time of the replay (s)")] = 30.0,
    report: Annotated[Path, typer.Option(help="where to write the JSON report")] = Path("im-actors-report.json"),
    html: Annotated[Path | None, typer.Option(help="also write the HTML report with plots here")] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            help="fail the run (exit 1) unless METRIC OP NUMBER holds, e.g. 'delivery_p99_ms<50' (repeatable); "
            "metrics: ack_/delivery_ p50/p95/p99/max _ms, lost, duplicates, order_violations, throughput"
        ),
    ] = None,
    synthetic: Annotated[bool, typer.Option(help="synthetic workload instead of the corpus")] = False,
    users: Annotated[int, typer.Option(help="synthetic: users")] = 100,
    rate: Annotated[float, typer.Option(help="synthetic: messages/s")] = 200.0,
    group_size: Annotated[int, typer.Option(help="synthetic: group size (0: direct messages only)")] = 10,
    processes: Annotated[int, typer.Option(help="driver processes (clients are split over them)")] = 1,
    config: ConfigOpt = None,
    hubs: HubsOpt = None,
    shards: ShardsOpt = None,
    store_writers: WritersOpt = None,
    mongo_url: MongoOpt = None,
    redis_url: RedisOpt = None,
    rabbitmq_url: AmqpOpt = None,
    progress: Annotated[bool | None, typer.Option(help="live status line [default: when stdout is a terminal]")] = None,
    chaos: Annotated[
        str | None,
        typer.Option(
            help="inject faults during the run: all, or a comma list of hub, conv, session, store, push, "
            "mongodb, redis, redis-restart, rabbitmq, node; optionally :INTERVAL_S"
        ),
    ] = None,
    chaos_outage: Annotated[
        float,
        typer.Option(
            help="how long a mongodb fault keeps the server down (s); redis-restart and rabbitmq restart at once"
        ),
    ] = 10.0,
    nodes: Annotated[
        int,
        typer.Option(
            help="Ray nodes of the local cluster (more than 1: several raylets on this machine); "
            "the node fault kind needs 3 and gets them"
        ),
    ] = 1,
) -> None:
    """Run a local cluster, carry real chat traffic through it, verify every delivery, write a report."""
    import ray

    from drivers.replay import ReplayWorkload
    from drivers.run import run_workload
    from drivers.synthetic import SyntheticWorkload
    from drivers.verdict import Threshold, judge
    from im_actors.cluster import deploy, init_local_cluster, init_local_ray
    from im_actors.services import describe_services, ensure_services, purge_deployment

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        thresholds = [Threshold.parse(t) for t in threshold or []]
    except ValueError as exc:
        typer.echo(f"im-actors: --threshold: {exc}", err=True)
        raise typer.Exit(2) from None
    cfg = _config(
        config,
        deployment=f"demo{secrets.token_hex(3)}",
        hubs=hubs,
        session_shards=shards,
        conv_shards=shards,
        store_writers=store_writers,
        mongo_url=mongo_url,
        redis_url=redis_url,
        rabbitmq_url=rabbitmq_url,
        dev_login=True,
        router_port=0,
    )
    if not cfg.jwt_secret:
        cfg = cfg.model_copy(update={"jwt_secret": secrets.token_hex(32)})
    own_mongo_db = bool(cfg.mongo_url)  # a given MongoDB gets a database of the run's own, dropped after
    if own_mongo_db:
        cfg = cfg.model_copy(update={"mongo_db": f"im_{cfg.deployment}"})
    if progress is None:
        progress = sys.stdout.isatty()
    chaos_spec = _chaos_spec(chaos, cfg, own_mongo_db) if chaos else None
    if synthetic:
        workload: Any = SyntheticWorkload(users=users, rate=rate, duration_s=duration, group_size=group_size)
    else:
        path = corpus or find_corpus()
        if path is None or not path.is_file():
            typer.echo(
                f"im-actors: corpus {path or DEFAULT_CORPUS} not found "
                "(pass --corpus PATH, set IM_CORPUS, or use --synthetic)",
                err=True,
            )
            raise typer.Exit(2)
        workload = ReplayWorkload(path=str(path), messages=messages, duration_s=duration)
    _sigterm_to_exit()
    try:
        private = [] if chaos_spec is None else [k for k in ("redis", "rabbitmq") if k in _private_kinds(chaos_spec)]
        cfg, services = ensure_services(cfg, private=private)
    except ServiceError as exc:
        typer.echo(f"im-actors: {exc}", err=True)
        raise typer.Exit(3) from None
    if chaos_spec is not None and "node" in chaos_spec.kinds and nodes < 3:
        nodes = 3  # one to lose, one to keep the router, one for the restarted actors
    started = time.monotonic()
    result: dict[str, Any] = {}
    cluster: Any = None
    try:
        typer.echo(f"starting a local Ray cluster of {nodes} node(s) and deploying {cfg.hubs} hubs ...")
        if nodes > 1:
            cluster = init_local_cluster(cfg, nodes)
        else:
            init_local_ray(cfg)
        _sigterm_to_exit()  # ray.init installs its own SIGTERM handler, which skips our clean-up
        dep = deploy(cfg)
        typer.echo(f"router {dep.router_url}; hubs {', '.join(dep.hub_urls.values())}")
        if chaos_spec is None:
            result = run_workload(dep.router_url, workload, processes=processes, progress=progress)
        else:
            result = asyncio.run(
                _run_with_chaos(
                    cfg,
                    dep.router_url,
                    workload,
                    chaos_spec,
                    services,
                    duration,
                    chaos_outage,
                    processes,
                    progress,
                    cluster,
                )
            )
        result["hubs"] = cfg.hubs
        result["ray_nodes"] = nodes
        result["config"] = cfg.knobs()
        result["services"] = describe_services(cfg)
        result["deploy_and_run_s"] = round(time.monotonic() - started, 1)
    finally:
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
            purge_deployment(cfg, drop_mongo_db=own_mongo_db)
        finally:
            services.stop()
    decision = judge(result, thresholds)
    result["verdict"] = decision.as_dict()
    report.write_text(json.dumps(result, indent=2, default=str))
    if html is not None:
        from im_actors.report import write_html

        write_html(result, html)
    typer.echo(_summary(result))
    if not decision.passed:
        typer.echo(f"FAILED: {'; '.join(decision.reasons())}  (report: {report})", err=True)
        raise typer.Exit(decision.exit_code)
    held = f"; thresholds held: {', '.join(decision.thresholds)}" if decision.thresholds else ""
    typer.echo(f"OK: every acked message reached every member device once, in order{held}  (report: {report})")


@app.command("report")
def report_cmd(
    path: Annotated[Path, typer.Argument(help="a run's JSON report (im-actors demo --report, drivers.run --out)")],
    html: Annotated[Path | None, typer.Option(help="write the HTML page (plots embedded) here")] = None,
    png: Annotated[Path | None, typer.Option(help="write the plots as PNG files into this folder")] = None,
) -> None:
    """Draw a run's report: latency CDFs, throughput and p99 per second, faults with their recovery."""
    from im_actors.report import load_report, write_html, write_png

    if html is None and png is None:
        typer.echo("im-actors report: give --html FILE and/or --png DIR", err=True)
        raise typer.Exit(2)
    try:
        data = load_report(path)
    except (OSError, ValueError) as exc:
        typer.echo(f"im-actors report: {exc}", err=True)
        raise typer.Exit(2) from None
    if html is not None:
        typer.echo(f"wrote {write_html(data, html, title=f'im-actors run report: {path.name}')}")
    if png is not None:
        for written in write_png(data, png):
            typer.echo(f"wrote {written}")


@app.command()
def up(
    address: Annotated[str, typer.Option(help="Ray cluster address (auto: the local node's cluster)")] = "auto",
    config: ConfigOpt = None,
    hubs: HubsOpt = None,
    shards: ShardsOpt = None,
    store_writers: WritersOpt = None,
    mongo_url: ClusterMongoOpt = None,
    redis_url: ClusterRedisOpt = None,
    rabbitmq_url: ClusterAmqpOpt = None,
) -> None:
    """Deploy im-actors onto a running Ray cluster as detached actors (stays up after this command)."""

    from im_actors.cluster import deploy

    cfg = _config(
        config,
        hubs=hubs,
        session_shards=shards,
        conv_shards=shards,
        store_writers=store_writers,
        mongo_url=mongo_url,
        redis_url=redis_url,
        rabbitmq_url=rabbitmq_url,
    )
    needed = (
        "mongo_url",
        "redis_url",
        "rabbitmq_url",
        "jwt_secret" if cfg.jwt_algorithm == "HS256" else "jwt_public_key",
    )
    missing = [k for k in needed if not getattr(cfg, k)]
    if missing:
        typer.echo(
            f"im-actors: a cluster deployment needs {', '.join(missing)} (in the TOML file or IM_* environment; "
            "the URLs also as flags; jwt_secret at least 16 characters)",
            err=True,
        )
        raise typer.Exit(2)
    if len(cfg.jwt_secret) < 16 and cfg.jwt_algorithm == "HS256":
        typer.echo("im-actors: jwt_secret must be at least 16 characters: it signs every client token", err=True)
        raise typer.Exit(2)
    _connect_ray(address)
    try:
        dep = deploy(cfg, detached=True)
    except ConfigError as exc:
        typer.echo(f"im-actors: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"router": dep.router_url, "hubs": dep.hub_urls}, indent=2))


@app.command()
def down(
    address: Annotated[str, typer.Option(help="Ray cluster address")] = "auto",
    config: ConfigOpt = None,
) -> None:
    """Remove a deployment's actors from the Ray cluster (hubs close clients with 1001 first)."""

    from im_actors.cluster import teardown

    cfg = _config(config)
    _connect_ray(address)
    killed = teardown(cfg)
    typer.echo(f"removed {len(killed)} actors")


@app.command()
def status(
    address: Annotated[str, typer.Option(help="Ray cluster address")] = "auto",
    config: ConfigOpt = None,
) -> None:
    """Print every actor of the deployment, whether it is up, and its counters (JSON)."""

    from im_actors.cluster import status as cluster_status

    cfg = _config(config)
    _connect_ray(address)
    out = cluster_status(cfg)
    typer.echo(json.dumps(out, indent=2, default=str))
    if not all(a["up"] for a in out["actors"].values()):
        raise typer.Exit(1)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
