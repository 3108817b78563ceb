"""Ray's Prometheus endpoint of a local deployment exports every role's ``ray_im_*`` series (issue 11 item 1)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterable
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from im_actors import ids
from im_actors.client import Client
from im_actors.cluster import Deployment, metrics_endpoints
from im_actors.errors import Forbidden
from im_actors.metrics import SERIES, exported_names

pytestmark = pytest.mark.integration

#: Series that the traffic of the test makes non-zero, beside every actor's ``im_up``.
DRIVEN = (
    "ray_im_hub_connections",
    "ray_im_hub_connects_total",
    "ray_im_hub_frames_in_total",
    "ray_im_hub_frames_out_total",
    "ray_im_hub_sends_total",
    "ray_im_hub_acks_total",
    "ray_im_hub_errors_total",
    "ray_im_hub_delivery_ms_bucket",
    "ray_im_conv_committed_total",
    "ray_im_conv_commits_total",
    "ray_im_conv_activations_total",
    "ray_im_conv_active",
    "ray_im_conv_commit_ms_bucket",
    "ray_im_conv_commit_batch_count",
    "ray_im_store_commits_total",
    "ray_im_store_mongo_ms_count",
    "ray_im_store_redis_ms_sum",
    "ray_im_session_users",
    "ray_im_router_hubs_live",
    "ray_im_push_jobs_total",
    "ray_im_push_published_total",
    "ray_im_push_confirmed_total",
    "ray_im_push_delivered_total",
)
#: Gauges that may well be 0 here, but are exported.
PRESENT = ("ray_im_push_in_flight", "ray_im_group_cached")


def _scrape(urls: Iterable[str]) -> list[Any]:
    """Every sample of every endpoint (prometheus_client's parser)."""
    samples = []
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            samples.extend(family.samples)
    return samples


def _ours(samples: list[Any], deployment: str) -> list[Any]:
    return [s for s in samples if s.name.startswith("ray_im_") and s.labels.get("deployment") == deployment]


async def _webhook(received: list[bytes]) -> tuple[web.AppRunner, str]:
    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"


async def test_every_role_exports_its_series(deployment: Deployment, uid: Any) -> None:
    cfg = deployment.config
    a_user, b_user, c_user = uid("ma"), uid("mb"), uid("mc")
    received: list[bytes] = []
    runner, hook_url = await _webhook(received)
    alice = Client(deployment.router_url, a_user, "d1")
    bob = Client(deployment.router_url, b_user, "d1")
    carol = Client(deployment.router_url, c_user, "phone")
    await alice.connect()
    await bob.connect()
    await carol.connect()
    try:
        await carol.push_register("webhook", hook_url)
        await carol.close()  # offline: a message to her becomes a push job
        conv = ids.direct_conv(a_user, b_user)
        acks = [await alice.send(conv, f"m{i}") for i in range(5)]
        assert [a.seq for a in acks] == [1, 2, 3, 4, 5]
        await alice.send(ids.direct_conv(a_user, c_user), "a push for carol")
        with pytest.raises(Forbidden):  # an error frame, counted by code
            await alice.send(ids.direct_conv(uid("x"), uid("y")), "not a member")

        urls = metrics_endpoints()
        assert urls, "no Ray node has a metrics export port (is ray[default] installed?)"
        expected_up = {(name, ids.parse_actor_name(name, cfg.actor_prefix)[0]) for name in deployment.actors}
        deadline = asyncio.get_running_loop().time() + 60  # Ray's agent exports every few seconds
        while True:
            ours = _ours(await asyncio.to_thread(_scrape, urls), cfg.deployment)
            names = {s.name for s in ours if s.value > 0}
            up = {(s.labels["actor"], s.labels["role"]) for s in ours if s.name == "ray_im_up" and s.value == 1}
            present = {s.name for s in ours}
            missing = [n for n in DRIVEN if n not in names] + [n for n in PRESENT if n not in present]
            missing_up = expected_up - up
            if not missing and not missing_up:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not exported: {missing}; actors without im_up: {sorted(missing_up)}")
            await asyncio.sleep(1.0)
    finally:
        await alice.close()
        await bob.close()
        await runner.cleanup()
    assert received  # the push job reached its provider
    assert {s.name for s in ours} <= exported_names()  # nothing exported that SERIES does not define
    for s in ours:  # every series tagged with the deployment and a real actor of it
        assert s.labels["actor"] in deployment.actors
    errors = {s.labels["code"] for s in ours if s.name == "ray_im_hub_errors_total"}
    assert "forbidden" in errors
    roles = {s.role for s in SERIES if s.role != "*"}
    assert roles == set(ids.ROLES)  # the table covers every role
    acked = sum(s.value for s in ours if s.name == "ray_im_hub_acks_total")
    assert acked >= 5


def test_status_of_a_live_deployment(deployment: Deployment) -> None:
    from rich.console import Console

    from im_actors.cluster import status, status_table

    out = status(deployment.config)
    assert set(out["actors"]) == set(deployment.actors)
    for name, entry in out["actors"].items():
        assert entry["up"] and entry["state"] == "ALIVE", name
        assert isinstance(entry["restarts"], int) and entry["num_cpus"] > 0
        assert "error" not in entry and isinstance(entry["stats"], dict), name  # every role answers stats
    assert out["router_url"] == deployment.router_url
    assert out["metrics"] == metrics_endpoints()
    console = Console(record=True, width=240)
    console.print(status_table(out))
    text = console.export_text()
    assert all(name in text for name in deployment.actors)
