"""The ``im-actors`` console script: the operator commands of :mod:`im_actors.cli` plus ``demo``.

``demo`` only turns its flags into a :class:`drivers.demo.DemoOptions` and calls
:func:`drivers.demo.run_demo`, which does the work and returns the exit code (0 passed, 1 failed;
2 a usage or configuration problem, 3 a missing service, each with a message naming it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from drivers.demo import DemoError, DemoOptions, run_demo
from drivers.workload import DEFAULTS
from im_actors.cli import AmqpOpt, ConfigOpt, HubsOpt, MongoOpt, RedisOpt, ShardsOpt, WritersOpt, app

__all__ = ["app", "demo", "main"]


@app.command()
def demo(
    corpus: Annotated[
        Path | None,
        typer.Option(help="chat corpus (JSONL.gz) to replay [default: $IM_CORPUS or shared/data/ beside the checkout]"),
    ] = None,
    messages: Annotated[int, typer.Option(help="corpus messages to replay")] = DEFAULTS.messages,
    duration: Annotated[float, typer.Option(help="wall time of the send phase (s)")] = DEFAULTS.duration_s,
    report: Annotated[Path, typer.Option(help="where to write the JSON report")] = Path("im-actors-report.json"),
    html: Annotated[Path | None, typer.Option(help="also write the HTML report with plots here")] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            help="fail the run (exit 1) unless METRIC OP NUMBER holds, e.g. 'delivery_p99_ms<50' (repeatable); "
            "metrics: ack_/delivery_ p50/p95/p99/max _ms, lost, duplicates, order_violations, throughput, "
            "mem_slope_mb_per_min, leaked_fds, leaked_tasks, leaked_connections"
        ),
    ] = None,
    synthetic: Annotated[bool, typer.Option(help="synthetic workload instead of the corpus")] = False,
    users: Annotated[int, typer.Option(help="synthetic: users")] = DEFAULTS.users,
    rate: Annotated[float, typer.Option(help="synthetic: messages/s")] = DEFAULTS.rate,
    group_size: Annotated[
        int, typer.Option(help="synthetic: group size (0: direct messages only)")
    ] = DEFAULTS.group_size,
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
            help="inject faults during the run: all, or a comma list of hub, drain, conv, session, store, push, "
            "mongodb, mongodb-slow, mongodb-cut, redis, redis-restart, rabbitmq, node; optionally :INTERVAL_S"
        ),
    ] = None,
    chaos_outage: Annotated[
        float,
        typer.Option(
            help="how long a mongodb fault keeps the server down, and mongodb-slow / mongodb-cut last (s); "
            "redis-restart and rabbitmq restart at once"
        ),
    ] = 10.0,
    chaos_delay: Annotated[float, typer.Option(help="mongodb-slow: delay added to every MongoDB reply (ms)")] = 500.0,
    seed: Annotated[
        int | None,
        typer.Option(help="seed of the synthetic workload and of the chaos targets [default: drawn, in the report]"),
    ] = None,
    replay: Annotated[
        Path | None,
        typer.Option(
            help="rerun a run: its seed, workload, deployment sizes and fault schedule from FILE (the report, "
            "or the .replay.json a failed run wrote); those flags are taken from FILE"
        ),
    ] = None,
    nodes: Annotated[
        int,
        typer.Option(
            help="Ray nodes of the local cluster (more than 1: several raylets on this machine); "
            "the node fault kind needs 3 and gets them"
        ),
    ] = 1,
    storm: Annotated[
        int,
        typer.Option(
            help="reconnect storm: this many synthetic clients (--rate, --duration, --group-size); the hub "
            "holding most of them is killed once all are connected; reports the time until all are back"
        ),
    ] = 0,
    sample_every: Annotated[
        float,
        typer.Option(
            help="sample every role's memory, file descriptors, sockets and asyncio tasks this often (s; 0: off); "
            "the report gains resources and leaks (thresholds mem_slope_mb_per_min, leaked_fds, leaked_tasks, "
            "leaked_connections)"
        ),
    ] = 10.0,
    leak_settle: Annotated[
        float, typer.Option(help="wait this long after the clients closed before counting what was left open (s)")
    ] = 5.0,
    heap_trace: Annotated[
        bool,
        typer.Option(
            help="trace every actor's Python allocations (tracemalloc, about a third slower) and report the "
            "source lines whose live memory grew most during the run (needs --sample-every)"
        ),
    ] = False,
) -> None:
    """Run a local cluster, carry real chat traffic through it, verify every delivery, write a report."""
    opts = DemoOptions(
        corpus=corpus,
        messages=messages,
        duration_s=duration,
        report=report,
        html=html,
        thresholds=tuple(threshold or ()),
        synthetic=synthetic,
        users=users,
        rate=rate,
        group_size=group_size,
        processes=processes,
        config=config,
        hubs=hubs,
        shards=shards,
        store_writers=store_writers,
        mongo_url=mongo_url,
        redis_url=redis_url,
        rabbitmq_url=rabbitmq_url,
        progress=progress,
        chaos=chaos,
        chaos_outage_s=chaos_outage,
        nodes=nodes,
        storm=storm,
        seed=seed,
        chaos_delay_ms=chaos_delay,
        replay=replay,
        sample_every_s=sample_every,
        leak_settle_s=leak_settle,
        heap_trace=heap_trace,
    )
    try:
        code = run_demo(opts, echo=typer.echo)
    except DemoError as exc:
        typer.echo(f"im-actors: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    if code:
        raise typer.Exit(code)


def main() -> None:
    """Console entry point (``im-actors``)."""
    app()


if __name__ == "__main__":
    main()
