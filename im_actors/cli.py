"""The ``im-actors`` command's operator half: ``up``, ``down``, ``status`` and ``report``.

``demo`` (a local cluster carrying a load test) belongs to the load drivers: :mod:`drivers.cli`
adds it to this :data:`app`, and the ``im-actors`` console script runs that (``drivers.cli:main``),
so that nothing under ``im_actors`` imports ``drivers``. ``report`` draws a run's JSON report
(:mod:`im_actors.report`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from im_actors.config import Config, load_config
from im_actors.errors import ConfigError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # option help says "[default: ...]" literally; rich would drop it as markup
    help="im-actors: an IM backend on Ray actors.",
)
log = logging.getLogger("im_actors")


def _connect_ray(address: str, cfg: Config | None = None) -> None:
    import ray

    from im_actors.cluster import connect

    if ray.is_initialized():  # called from a process already connected (tests, a notebook)
        return
    try:
        connect(address, cfg)  # with cfg: the actors created log as cfg says (log_level, log_format)
    except ConnectionError as exc:
        typer.echo(f"im-actors: no Ray cluster at {address!r}: {exc}", err=True)
        raise typer.Exit(4) from None


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
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="when the deployment is running with a different configuration, tear it down (its hubs "
            "drained) and deploy this one; without it, up refuses",
        ),
    ] = False,
) -> None:
    """Deploy im-actors onto a running Ray cluster as detached actors (stays up after this command).

    Run again with the same configuration, it finds the actors running and changes nothing.
    """

    from im_actors.cluster import PLACEMENT_GROUP_NOTE, deploy

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
    _connect_ray(address, cfg)
    try:
        dep = deploy(cfg, detached=True, replace=replace)
    except ConfigError as exc:
        typer.echo(f"im-actors: {exc}", err=True)
        raise typer.Exit(2) from None
    if cfg.placement == "spread":
        typer.echo(f"note: {PLACEMENT_GROUP_NOTE}", err=True)
    typer.echo(json.dumps({"router": dep.router_url, "hubs": dep.hub_urls}, indent=2))


DeploymentOpt = Annotated[
    str | None,
    typer.Option("--deployment", "-d", help="deployment name [default: the configuration's deployment]"),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="do not ask before removing data")]
WindowOpt = Annotated[
    float | None,
    typer.Option("--drain-window", help="spread hub clients' 1001 closes over this many s [default: drain_window_s]"),
]


def _running_target(address: str, config: Path | None, deployment: str | None) -> Config:
    """Connect to Ray and find the running deployment named by ``--deployment`` (or the
    configuration); returns its configuration, as its router keeps it unless ``--config`` was given.

    Exits 1 naming the running deployments when that one is not running (rather than doing nothing
    and exiting 0).
    """
    from im_actors.cluster import list_deployments, running_config

    cfg = _config(config, deployment=deployment)
    _connect_ray(address)
    running = list_deployments()
    if cfg.deployment not in running:
        shown = ", ".join(repr(name) for name in running) or "none"
        typer.echo(
            f"im-actors: deployment {cfg.deployment!r} is not running on this cluster (running: {shown}); "
            "pass --deployment NAME",
            err=True,
        )
        raise typer.Exit(1)
    if config is None:
        kept = running_config(cfg.deployment)
        if kept is not None:
            return kept
    return cfg


def _purge(cfg: Config, yes: bool) -> None:
    """Remove the deployment's data after asking (``--yes`` skips the question; no answer = no)."""
    from im_actors.config import mask_url
    from im_actors.services import purge_deployment

    what = (
        f"Redis keys {cfg.key_prefix}* at {mask_url(cfg.redis_url)}, RabbitMQ exchange and queues "
        f"{cfg.amqp_prefix}im.push* at {mask_url(cfg.rabbitmq_url)}, MongoDB database {cfg.mongo_db!r} at "
        f"{mask_url(cfg.mongo_url)}"
    )
    if not yes and not typer.confirm(f"remove every message and key of deployment {cfg.deployment!r}: {what}?"):
        typer.echo("im-actors: nothing removed", err=True)
        raise typer.Exit(1)
    removed = purge_deployment(cfg, drop_mongo_db=True)
    typer.echo(f"purged deployment {cfg.deployment!r}: {removed.get('redis_keys', 0)} Redis keys; {what}")


@app.command()
def down(
    address: Annotated[str, typer.Option(help="Ray cluster address")] = "auto",
    config: ConfigOpt = None,
    deployment: DeploymentOpt = None,
    drain_window: WindowOpt = None,
    purge: Annotated[bool, typer.Option("--purge", help="also remove the deployment's data (asks first)")] = False,
    yes: YesOpt = False,
) -> None:
    """Remove a deployment's actors from the Ray cluster (hubs drain first: clients closed with 1001
    spread over the drain window); with --purge, its data too.

    The actors are found by listing Ray's "im" namespace; the deployment's configuration is the one
    its router keeps (no --config needed). Exits 1 when the deployment is not running.
    """

    from im_actors.cluster import teardown

    cfg = _running_target(address, config, deployment)
    window = cfg.drain_window_s if drain_window is None else drain_window
    killed = teardown(cfg, drain_window_s=window)
    typer.echo(f"removed {len(killed)} actors of deployment {cfg.deployment!r}")
    if purge:
        _purge(cfg, yes)


@app.command("purge")
def purge_cmd(
    address: Annotated[str, typer.Option(help="Ray cluster address")] = "auto",
    config: ConfigOpt = None,
    deployment: DeploymentOpt = None,
    yes: YesOpt = False,
) -> None:
    """Remove a stopped deployment's data: its Redis keys, its RabbitMQ exchange and queues and its
    MongoDB database (asks first; --yes does not). The service URLs come from --config or IM_*.
    Refuses (exit 1) while the deployment's actors run: `im-actors down --purge` does both."""
    from im_actors.cluster import list_deployments

    cfg = _config(config, deployment=deployment)
    _connect_ray(address)
    if cfg.deployment in list_deployments():
        typer.echo(
            f"im-actors: deployment {cfg.deployment!r} is running; `im-actors down --purge` stops it first", err=True
        )
        raise typer.Exit(1)
    missing = [k for k in ("mongo_url", "redis_url", "rabbitmq_url") if not getattr(cfg, k)]
    if missing:
        typer.echo(f"im-actors: purge needs {', '.join(missing)} (TOML file, IM_* environment)", err=True)
        raise typer.Exit(2)
    _purge(cfg, yes)


restart_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Rolling restarts.")
app.add_typer(restart_app, name="restart")


@restart_app.command("hubs")
def restart_hubs_cmd(
    address: Annotated[str, typer.Option(help="Ray cluster address")] = "auto",
    config: ConfigOpt = None,
    deployment: DeploymentOpt = None,
    drain_window: WindowOpt = None,
) -> None:
    """Restart the hubs one at a time: drain (the router stops handing the hub out, its clients are
    closed with 1001 spread over the drain window and reconnect to the others), replace its process,
    wait until it answers GET /ready; then the next. Prints one JSON line per hub; exits 1 when a
    hub does not come back."""
    from im_actors.cluster import restart_hubs

    cfg = _running_target(address, config, deployment)

    def done(result: dict[str, Any]) -> None:
        typer.echo(json.dumps(result))

    try:
        restart_hubs(cfg, drain_window, on_done=done)
    except (TimeoutError, ValueError) as exc:  # not back in time; a hub or the router not running
        typer.echo(f"im-actors: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def status(
    address: Annotated[str, typer.Option(help="Ray cluster address")] = "auto",
    config: ConfigOpt = None,
    deployment: DeploymentOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print everything as JSON, for scripts")] = False,
) -> None:
    """Show every actor of the deployment: up, restarts, CPUs asked, load and key counters (a table;
    --json for scripts). Exits 1 when an actor is down."""

    from im_actors.cluster import status as cluster_status
    from im_actors.cluster import status_table

    cfg = _running_target(address, config, deployment)
    out = cluster_status(cfg)
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
    else:
        from rich.console import Console

        console = Console()
        console.print(status_table(out))
        console.print(f"metrics (Prometheus): {', '.join(out['metrics']) or 'none (is ray[default] installed?)'}")
    if not all(a["up"] for a in out["actors"].values()):
        raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        from im_actors import __version__

        typer.echo(f"im-actors {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """im-actors: an IM backend on Ray actors."""


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
