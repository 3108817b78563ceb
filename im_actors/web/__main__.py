"""``python -m im_actors.web``: a local deployment to chat in with a browser, until Ctrl-C.

It does what the demo does before its traffic starts (a local Ray cluster, Redis and RabbitMQ on
their default local ports, a private SecantusDB because no ``mongo_url`` is given; ``--config`` and
``IM_*`` variables as everywhere), with development login on, and prints the chat page's URL
(``http://127.0.0.1:8080/chat/`` by default). Ctrl-C or SIGTERM removes the deployment's actors,
Redis keys and RabbitMQ names and stops what it started. Exit 3 when a service is missing (the
message names it), 2 for a bad configuration (the message names the key).
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from im_actors.web import CHAT_PATH

app = typer.Typer(add_completion=False)


@app.command()
def main(
    port: Annotated[int, typer.Option(help="router HTTP port, the page's port (0 = any free port)")] = 8080,
    hubs: Annotated[int, typer.Option(min=1, help="hubs (WebSocket servers)")] = 2,
    config: Annotated[Path | None, typer.Option(help="TOML configuration file")] = None,
) -> None:
    """Run a local im-actors deployment with development login and print the chat page's URL."""
    import ray

    from im_actors.cluster import deploy, init_local_ray, teardown
    from im_actors.config import load_config
    from im_actors.errors import ConfigError
    from im_actors.services import ServiceError, ensure_services, purge_deployment

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(
            config,
            deployment=f"chat{secrets.token_hex(3)}",
            hubs=hubs,
            router_port=port,
            dev_login=True,
        )
    except (ConfigError, ValueError) as exc:
        typer.echo(f"im-actors: {exc}", err=True)
        raise typer.Exit(2) from None
    if not cfg.jwt_secret:
        cfg = cfg.model_copy(update={"jwt_secret": secrets.token_hex(32)})
    try:
        cfg, services = ensure_services(cfg)
    except ServiceError as exc:
        typer.echo(f"im-actors: {exc}", err=True)
        raise typer.Exit(3) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        typer.echo(f"starting a local Ray cluster and deploying {cfg.hubs} hubs ...")
        init_local_ray(cfg)
        try:
            dep = deploy(cfg)
        except ConfigError as exc:
            typer.echo(f"im-actors: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"chat page: {dep.router_url}{CHAT_PATH}   (sign in with any user id; Ctrl-C stops)")
        while not stop.wait(1.0):
            pass
        typer.echo("stopping ...")
        teardown(cfg)
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
            purge_deployment(cfg)
        finally:
            services.stop()


if __name__ == "__main__":
    app()
