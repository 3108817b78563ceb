"""The router: "which hub should I connect to?" over HTTP (PROTOCOL.md section 1).

:class:`HubTable` is the plain core: the live hubs and their load, least connections first, ties at
random. :class:`RouterActor` serves it with aiohttp and heartbeats every hub each
``heartbeat_s``: a hub that does not answer within the interval is dropped at once, and comes back
when it answers again. A draining hub (:meth:`HubTable.drain`, or a heartbeat answer saying so) is
no longer handed out until a new process of it (another ``incarnation``) answers.

With ``host`` 0.0.0.0 (or ``::``) and no ``advertise_host``, the router's URL carries the Ray node's
address, as the hubs' URLs do.

Endpoints: ``GET /v1/hub[?exclude=<hub>...]``, ``POST /v1/login`` (development login only, when
``dev_login`` is on), ``GET /v1/health``; the browser chat page (:mod:`im_actors.web`) at ``GET /chat/``
(``GET /`` redirects there) and its static files under ``/chat/``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any

import ray
from aiohttp import web

from im_actors import ids
from im_actors import web as web_pages
from im_actors.auth import issue_token
from im_actors.config import Config
from im_actors.errors import ConfigError, Unavailable
from im_actors.refs import ConvShardRef, HubRef, Peers, SessionShardRef
from im_actors.tls import server_context
from im_actors.vitals import Vitals

__all__ = ["HubInfo", "HubTable", "make_app", "RouterActor"]

log = logging.getLogger(__name__)


@dataclass
class HubInfo:
    """A hub as the router sees it."""

    name: str
    url: str
    connections: int = 0
    alive: bool = True
    draining: bool = False
    incarnation: str = ""


class HubTable:
    """Live hubs and their load."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.hubs: dict[str, HubInfo] = {}
        self._rng = rng or random.Random()

    def register(self, name: str, url: str) -> None:
        """Add or refresh a hub (it answered, or announced itself)."""
        info = self.hubs.get(name)
        if info is None:
            self.hubs[name] = HubInfo(name, url)
        else:
            info.url, info.alive = url, True

    def update(self, name: str, url: str, connections: int, draining: bool = False, incarnation: str = "") -> None:
        """A heartbeat answer: the hub is alive with ``connections`` clients.

        A drain mark stays until the hub answers from a new process (another ``incarnation``) that is
        not draining: an answer sent before the hub learnt of its drain cannot clear it.
        """
        self.register(name, url)
        info = self.hubs[name]
        info.connections = connections
        if incarnation and incarnation != info.incarnation:
            if info.incarnation:
                info.draining = False  # a replaced process: whatever drained was the old one
            info.incarnation = incarnation
        info.draining = info.draining or draining

    def drain(self, name: str) -> bool:
        """Stop handing ``name`` out (it is draining); False when the hub is unknown."""
        info = self.hubs.get(name)
        if info is None:
            return False
        info.draining = True
        return True

    def mark_dead(self, name: str) -> None:
        """A heartbeat went unanswered: stop handing the hub out."""
        if name in self.hubs:
            self.hubs[name].alive = False

    def live(self) -> list[HubInfo]:
        """Hubs that answered their last heartbeat and are not draining."""
        return [h for h in self.hubs.values() if h.alive and h.url and not h.draining]

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> HubInfo | None:
        """The live hub with the fewest connections (ties at random), not in ``exclude``.

        When every live hub is excluded, any live hub is better than none.
        """
        live = self.live()
        candidates = [h for h in live if h.name not in exclude] or live
        if not candidates:
            return None
        fewest = min(h.connections for h in candidates)
        chosen = self._rng.choice([h for h in candidates if h.connections == fewest])
        chosen.connections += 1  # until the next heartbeat says otherwise
        return chosen


def make_app(config: Config, table: HubTable, health: Any = None) -> web.Application:
    """The router's aiohttp application over ``table``; ``health()`` gives the health summary.

    ``POST /v1/login`` is routed only when ``dev_login`` is on (404 otherwise). Raises
    :class:`ConfigError` when development login is on under RS256 without ``jwt_private_key``.
    """
    if config.dev_login and config.jwt_algorithm == "RS256" and not config.jwt_private_key:
        raise ConfigError("dev_login under RS256 needs jwt_private_key to sign its tokens")
    app = web.Application(client_max_size=64 * 1024)

    async def get_hub(request: web.Request) -> web.Response:
        exclude = set(request.query.getall("exclude", []))
        hub = table.pick(exclude)
        if hub is None:
            return web.json_response({"error": "no_hub"}, status=503)
        return web.json_response({"hub": hub.name, "url": hub.url, "ttl_s": config.hub_ttl_s})

    async def login(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "bad_request", "msg": "body must be JSON"}, status=400)
        user = body.get("user") if isinstance(body, dict) else None
        if not ids.valid_id(user):
            return web.json_response(
                {"error": "bad_request", "msg": "user must be 1..64 characters of [A-Za-z0-9_.-]"}, status=400
            )
        return web.json_response({"token": issue_token(config, str(user))})

    async def get_health(request: web.Request) -> web.Response:
        summary = health() if health is not None else {}
        live = table.live()
        summary.update(
            {
                "hubs_live": len(live),
                "hubs": [
                    {
                        "hub": h.name,
                        "url": h.url,
                        "connections": h.connections,
                        "alive": h.alive,
                        "draining": h.draining,
                    }
                    for h in table.hubs.values()
                ],
            }
        )
        return web.json_response(summary, status=200 if live else 503)

    async def chat_redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(web_pages.CHAT_PATH)

    async def chat_page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(web_pages.STATIC_DIR / "index.html")

    app.router.add_get("/v1/hub", get_hub)
    app.router.add_get("/v1/health", get_health)
    if config.dev_login:
        app.router.add_post("/v1/login", login)
    app.router.add_get("/", chat_redirect)
    app.router.add_get(web_pages.CHAT_PATH.rstrip("/"), chat_redirect)
    app.router.add_get(web_pages.CHAT_PATH, chat_page)
    app.router.add_static(web_pages.CHAT_PATH, web_pages.STATIC_DIR, append_version=False)
    app.on_response_prepare.append(_page_headers)
    return app


async def _page_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Security headers on the chat page's files (:data:`im_actors.web.PAGE_HEADERS`)."""
    if request.path.startswith(web_pages.CHAT_PATH):
        for name, value in web_pages.PAGE_HEADERS.items():
            response.headers.setdefault(name, value)


@ray.remote(num_cpus=0, max_restarts=-1)
class RouterActor(Vitals):
    """Ray shell of the router: serves HTTP and heartbeats the hubs."""

    async def __init__(self, config: Config) -> None:  # type: ignore[misc]  # Ray awaits it
        from im_actors import metrics

        self._config = config
        self._peers = Peers(config)
        self._table = HubTable()
        self._runner: web.AppRunner | None = None
        self._beat: asyncio.Task[None] | None = None
        self._sessions_beat: asyncio.Task[None] | None = None
        self.url = ""
        self._metrics = metrics.for_actor(config, "router", self.stats)
        self._metrics.start()
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray restarted this actor after its process died: nobody calls ready() on a restart
            # (deploy did, once), so serve again at once, on the configured port, and heartbeat the
            # hubs, which re-register on their next heartbeat (HubTable starts empty).
            await self.ready()

    async def ready(self) -> str:
        """Start serving (once); returns the router's base URL, e.g. ``http://127.0.0.1:8080``
        (``https://`` when TLS is configured)."""
        if self._runner is None:
            ssl_context = server_context(self._config)
            self._runner = web.AppRunner(make_app(self._config, self._table, self._health), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self._config.host, self._config.router_port, ssl_context=ssl_context)
            await site.start()
            port = self._runner.addresses[0][1]
            host = self._config.advertise_host or self._config.host
            if not self._config.advertise_host and self._config.host in ("0.0.0.0", "::"):
                host = ray.util.get_node_ip_address()  # clients cannot connect to "every interface"
            self.url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
            self._beat = asyncio.get_running_loop().create_task(self._heartbeat())
            self._sessions_beat = asyncio.get_running_loop().create_task(self._supervise())
        return self.url

    def _health(self) -> dict[str, Any]:
        return {"deployment": self._config.deployment, "router": self.url}

    def register(self, name: str, url: str) -> None:
        """A hub announces itself when it starts."""
        self._table.register(name, url)

    def hubs(self) -> list[dict[str, Any]]:
        """Every hub known, with its liveness, drain mark and load."""
        return [vars(h).copy() for h in self._table.hubs.values()]

    def drain(self, name: str) -> bool:
        """Stop handing hub ``name`` out (see :meth:`HubTable.drain`); False when it is unknown."""
        return self._table.drain(name)

    def deployment_config(self) -> Config:
        """The configuration this deployment was made with (``im-actors up`` compares it with a
        new one; ``down --deployment`` and ``purge`` read its service URLs from it)."""
        return self._config

    def stats(self) -> dict[str, Any]:
        """``hubs``: hubs known; ``hubs_live``: hubs handed out now; ``connections``: their clients."""
        live = self._table.live()
        return {
            "hubs": len(self._table.hubs),
            "hubs_live": len(live),
            "connections": sum(h.connections for h in live),
        }

    async def _heartbeat(self) -> None:
        interval = self._config.heartbeat_s
        while True:
            started = asyncio.get_running_loop().time()
            names = set(self._peers.hubs) | set(self._table.hubs)
            await asyncio.gather(*(self._probe(name, interval) for name in sorted(names)))
            await asyncio.sleep(max(0.0, interval - (asyncio.get_running_loop().time() - started)))

    async def _supervise(self) -> None:
        """Every heartbeat, call ``heartbeat`` on each session shard and, with ``fanout_via = "conv"``,
        each conversation shard: a restarted one comes back empty, and its first ``heartbeat`` has
        the hubs re-announce their connections to it (:mod:`im_actors.routes`)."""
        interval = self._config.heartbeat_s
        holders = self._route_holders()
        while True:
            for name, holder in holders:
                try:
                    await holder.heartbeat(timeout=10 * interval)
                except Unavailable as exc:
                    log.info("%s not ready: %s", name, exc)
            await asyncio.sleep(interval)

    def _route_holders(self) -> list[tuple[str, SessionShardRef | ConvShardRef]]:
        """The shards that hold hubs' connections, by actor name: session shards, and conversation
        shards when they route fan-out themselves."""
        convs = self._peers.convs if self._config.fanout_via == "conv" else []
        return [(p.name, SessionShardRef(p)) for p in self._peers.sessions] + [(p.name, ConvShardRef(p)) for p in convs]

    async def _probe(self, name: str, timeout: float) -> None:
        try:
            load = await HubRef(self._peers.hub(name)).load(timeout=timeout)
        except Unavailable:
            if name in self._table.hubs and self._table.hubs[name].alive:
                log.warning("hub %s missed its heartbeat; no longer handed out", name)
                self._hub_gone(name)
            self._table.mark_dead(name)
            return
        if not load.get("url"):
            # A restarted hub comes back empty: its old connections are gone, then start it again.
            self._hub_gone(name)
            try:
                await HubRef(self._peers.hub(name)).ready(timeout=10 * timeout)
            except Unavailable as exc:
                log.warning("hub %s did not restart: %s", name, exc)
            return
        info = self._table.hubs.get(name)
        if info is not None and not info.alive:
            # Back after a missed heartbeat (slow, not dead): sessions forgot its connections when
            # it was declared gone, so it announces them again.
            log.warning("hub %s answers again", name)
            hub = HubRef(self._peers.hub(name))
            for index in range(len(self._peers.sessions)):
                hub.reannounce(index)
            if self._config.fanout_via == "conv":
                for index in range(len(self._peers.convs)):
                    hub.reannounce_routes(index)
        self._table.update(
            name,
            load["url"],
            int(load.get("connections", 0)),
            bool(load.get("draining", False)),
            str(load.get("incarnation", "")),
        )

    def _hub_gone(self, name: str) -> None:
        """Sessions (and route-holding conversation shards) stop routing to ``name``: its
        connections are gone (offline devices get pushes)."""
        for _, holder in self._route_holders():
            holder.hub_gone(name)
