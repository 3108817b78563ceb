"""Hub drain and rolling restart under load (issue 11, lifecycle): nothing acked is lost.

A deployment of this module's own (its own name, actors, Redis keys, RabbitMQ names and MongoDB
database, all removed afterwards), so that restarting its hubs leaves the session's deployment alone.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import aiohttp
import pytest
import ray

from drivers.run import run_workload_async
from drivers.synthetic import SyntheticWorkload
from im_actors import ids
from im_actors.client import Client
from im_actors.cluster import (
    Deployment,
    deploy,
    drain_hub,
    hub_ready,
    list_deployments,
    restart_hub,
    restart_hubs,
    running_config,
    teardown,
)
from im_actors.config import Config
from im_actors.errors import ConfigError
from im_actors.services import free_port, purge_deployment

pytestmark = pytest.mark.integration


def _own_config(base: Config, tag: str, **knobs: Any) -> Config:
    """A deployment of a test's own: its name (``tag`` and random hex), its MongoDB database, no push
    workers and no store writer, and ``knobs``."""
    name = f"{tag}{secrets.token_hex(3)}"
    return base.model_copy(
        update={"deployment": name, "mongo_db": f"im_{name}", "push_workers": 0, "store_writers": 0, **knobs}
    )


@pytest.fixture(scope="module")
def own(base_config: Config, local_ray: None) -> Iterator[Deployment]:
    """Three hubs, 1 s drain window, a deployment of this module's own."""
    name = f"lc{secrets.token_hex(3)}"
    cfg = base_config.model_copy(
        update={"deployment": name, "hubs": 3, "drain_window_s": 1.0, "mongo_db": f"im_{name}", "push_workers": 0}
    )
    dep = deploy(cfg)
    try:
        yield dep
    finally:
        try:
            teardown(cfg)
        finally:
            purge_deployment(cfg, drop_mongo_db=True)


def _clean(report: dict[str, Any]) -> None:
    assert report["sent"] == report["acked"], report.get("send_errors")
    assert report["lost"] == 0, report["lost_entries"]
    assert report["duplicates"] == 0
    assert report["order_violations"] == 0
    assert report["delivered"] == report["expected_deliveries"] > 0


async def _hub_names(router_url: str, n: int) -> set[str]:
    async with aiohttp.ClientSession() as http:
        names = set()
        for _ in range(n):
            async with http.get(f"{router_url}/v1/hub") as resp:
                names.add((await resp.json())["hub"])
        return names


async def test_restart_hubs_one_at_a_time_under_load_loses_nothing(own: Deployment) -> None:
    cfg = own.config
    workload = SyntheticWorkload(users=18, rate=40, duration_s=12, group_size=4, direct_share=0.3, seed=7)
    sending = asyncio.Event()  # groups made (group.create is not retried across a drain): restart then
    run = asyncio.create_task(
        run_workload_async(
            own.router_url, workload, progress=False, on_phase=lambda p: sending.set() if p == "sending" else None
        )
    )
    await asyncio.wait_for(sending.wait(), 60)
    await asyncio.sleep(1.0)
    results = await asyncio.to_thread(restart_hubs, cfg, 1.0)
    report = await run
    _clean(report)
    assert [r["hub"] for r in results] == [ids.actor_name("hub", i, cfg.actor_prefix) for i in range(3)]
    assert sum(r["closed"] for r in results) > 0  # the drains closed clients, who came back elsewhere
    assert report["reconnects"] >= sum(r["closed"] for r in results)
    for r in results:
        assert r["closed"] == r["connections"]
        assert r["ready_s"] is not None and hub_ready(r["url"])


async def test_drained_hub_is_not_handed_out_and_its_clients_move(own: Deployment) -> None:
    cfg = own.config
    suffix = secrets.token_hex(3)
    clients = [Client(own.router_url, f"dr{i}-{suffix}") for i in range(9)]
    await asyncio.gather(*(c.connect() for c in clients))
    try:
        busiest = max({c.hub for c in clients}, key=lambda h: sum(1 for c in clients if c.hub == h))
        assert busiest is not None
        name = busiest
        index = ids.parse_actor_name(name, cfg.actor_prefix)[1]
        on_hub = [c for c in clients if c.hub == name]
        result = await asyncio.to_thread(drain_hub, cfg, index, 1.0)
        assert result["closed"] == len(on_hub) and result["window_s"] == 1.0
        assert name not in await _hub_names(own.router_url, 30)
        hubs = {h["name"]: h for h in ray.get(own.actors[ids.actor_name("router", 0, cfg.actor_prefix)].hubs.remote())}
        assert hubs[name]["draining"]
        assert not hub_ready(hubs[name]["url"])  # drained and no longer listening
        for _ in range(100):
            if all(c.hub not in (None, name) for c in on_hub):
                break
            await asyncio.sleep(0.1)
        assert all(c.hub not in (None, name) for c in on_hub)
        _, conv = await clients[0].group_create("after drain", [c.user for c in clients[1:]])
        ack = await on_hub[0].send(conv, "moved")
        assert ack.seq > 1
        back = await asyncio.to_thread(restart_hub, cfg, index, 0.0)  # empty now: nothing to spread
        assert back["closed"] == 0 and hub_ready(back["url"])
        assert name in await _hub_names(own.router_url, 60)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def test_running_deployment_is_listed_and_a_changed_config_is_refused(own: Deployment) -> None:
    cfg = own.config
    listed = list_deployments()[cfg.deployment]
    assert ids.actor_name("router", 0, cfg.actor_prefix) in listed
    assert sum(1 for n in listed if ids.parse_actor_name(n, cfg.actor_prefix)[0] == "hub") == 3
    assert running_config(cfg.deployment) == cfg
    assert deploy(cfg).router_url == own.router_url  # the same configuration: found running, unchanged
    with pytest.raises(ConfigError, match="hubs"):
        deploy(cfg.model_copy(update={"hubs": 4}))


def test_teardown_finds_actors_the_config_does_not_name(base_config: Config, local_ray: None) -> None:
    name = f"td{secrets.token_hex(3)}"
    cfg = base_config.model_copy(
        update={"deployment": name, "hubs": 2, "mongo_db": f"im_{name}", "push_workers": 0, "store_writers": 0}
    )
    smaller = cfg.model_copy(update={"hubs": 1})
    try:
        first = deploy(smaller)  # kept: a non-detached actor goes when the last handle to it does
        assert len(first.hub_urls) == 1
        dep = deploy(cfg, replace=True)  # a changed configuration replaces the running one
        assert len(dep.hub_urls) == 2 and running_config(name) == cfg
        # A config that forgot a hub still removes it.
        killed = teardown(smaller)
        assert ids.actor_name("hub", 1, cfg.actor_prefix) in killed
        for _ in range(50):
            if name not in list_deployments():
                break
            time.sleep(0.1)
        assert name not in list_deployments()
    finally:
        teardown(cfg)
        purge_deployment(cfg, drop_mongo_db=True)


def test_cli_down_status_purge_name_the_deployment(base_config: Config, local_ray: None, own: Deployment) -> None:
    from typer.testing import CliRunner

    from im_actors.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["down", "--deployment", "nosuchdeployment"])
    assert missing.exit_code == 1 and "not running" in missing.output
    assert own.config.deployment in missing.output  # the running ones are named
    status = runner.invoke(app, ["status", "--deployment", own.config.deployment])
    assert ids.actor_name("hub", 2, own.config.actor_prefix) in status.output
    busy = runner.invoke(app, ["purge", "--deployment", own.config.deployment, "--yes"])
    assert busy.exit_code == 1 and "is running" in busy.output

    name = f"cl{secrets.token_hex(3)}"
    cfg = base_config.model_copy(
        update={"deployment": name, "hubs": 1, "mongo_db": f"im_{name}", "push_workers": 0, "store_writers": 0}
    )
    try:
        dep = deploy(cfg, detached=True)
        assert dep.hub_urls
        refused = runner.invoke(app, ["down", "--deployment", name, "--drain-window", "0", "--purge"], input="n\n")
        assert refused.exit_code == 1 and "nothing removed" in refused.output  # the actors went, the data stays
        for _ in range(50):
            if name not in list_deployments():
                break
            time.sleep(0.1)
        assert name not in list_deployments()
        env = {"IM_REDIS_URL": cfg.redis_url, "IM_RABBITMQ_URL": cfg.rabbitmq_url, "IM_MONGO_URL": cfg.mongo_url}
        env["IM_MONGO_DB"] = cfg.mongo_db
        purged = runner.invoke(app, ["purge", "--deployment", name, "--yes"], env=env)
        assert purged.exit_code == 0, purged.output
        assert f"purged deployment '{name}'" in purged.output
    finally:
        teardown(cfg)
        purge_deployment(cfg, drop_mongo_db=True)


async def test_restarted_router_serves_again_on_its_port(base_config: Config, local_ray: None) -> None:
    """Ray restarts a killed router; nobody calls ``ready`` on a restart, so the router must start
    serving by itself, on its configured port, and learn the live hubs from its heartbeats."""
    cfg = _own_config(base_config, "rr", hubs=1, router_port=free_port(), heartbeat_s=0.5)
    name = cfg.deployment
    try:
        dep = await asyncio.to_thread(deploy, cfg)
        router = ray.get_actor(ids.actor_name("router", 0, cfg.actor_prefix), namespace=ids.NAMESPACE)
        ray.kill(router, no_restart=False)
        deadline = time.monotonic() + 60
        hub: str | None = None
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline and hub is None:
                try:
                    async with http.get(f"{dep.router_url}/v1/hub", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            hub = (await resp.json())["hub"]
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.3)
        assert hub == ids.actor_name("hub", 0, cfg.actor_prefix), "the restarted router never served its port"
        # the hub it hands out still serves
        client = Client(dep.router_url, f"rr-alice-{name}")
        await client.connect()
        await client.close()
    finally:
        await asyncio.to_thread(teardown, cfg)
        await asyncio.to_thread(purge_deployment, cfg, drop_mongo_db=True)


async def test_overlapping_ready_calls_start_one_server(base_config: Config, local_ray: None) -> None:
    """deploy and the router's heartbeat may both call ``ready`` on a restarted hub at once: one
    WebSocket server must come of it, every caller getting its URL."""
    import psutil

    cfg = _own_config(base_config, "rh", hubs=1)
    try:
        dep = await asyncio.to_thread(deploy, cfg)  # kept: non-detached actors go with their last handle
        hub = ray.get_actor(ids.actor_name("hub", 0, cfg.actor_prefix), namespace=ids.NAMESPACE)
        old = (await hub.load.remote())["incarnation"]
        # the router would call ready on the restarted hub itself, first: out of the way
        ray.kill(ray.get_actor(ids.actor_name("router", 0, cfg.actor_prefix), namespace=ids.NAMESPACE), no_restart=True)
        ray.kill(hub, no_restart=False)
        load: dict[str, Any] | None = None
        errs: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the restarted process answers
            try:
                load = await hub.load.remote()
                if load["incarnation"] != old:
                    break
            except ray.exceptions.RayActorError as exc:
                errs.append(repr(exc)[:300])
            await asyncio.sleep(0.1)
        assert load is not None and load["incarnation"] != old and load["url"] == "", errs[-3:]
        urls = await asyncio.gather(*(hub.ready.remote() for _ in range(4)))
        assert len(set(urls)) == 1 and urls[0]
        pid = (await hub.vitals.remote())["pid"]
        ports = {
            c.laddr.port
            for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.ip in ("127.0.0.1", "0.0.0.0")
        }
        servers = [p for p in sorted(ports) if hub_ready(f"ws://127.0.0.1:{p}/v1/ws", timeout_s=1.0)]
        assert servers == [urlparse(urls[0]).port]
        del dep  # held until here
    finally:
        await asyncio.to_thread(teardown, cfg)
        await asyncio.to_thread(purge_deployment, cfg, drop_mongo_db=True)
