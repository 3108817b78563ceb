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


def _connect_ray(address: str) -> None:
    import ray

    from im_actors.ids import NAMESPACE

    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
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
