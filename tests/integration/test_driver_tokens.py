"""drivers.run against a deployment with development login off: minted tokens, oracle clean."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import aiohttp
import pytest

from drivers.run import run_workload_async
from drivers.synthetic import SyntheticWorkload
from drivers.tokens import TokenSource
from drivers.verdict import judge
from im_actors.cluster import Deployment, deploy, teardown
from im_actors.config import Config
from im_actors.services import purge_deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def no_dev_login(base_config: Config, local_ray: None) -> Iterator[Deployment]:
    """A deployment of its own (1 hub, no push) that only accepts tokens signed with its secret."""
    cfg = base_config.model_copy(
        update={
            "deployment": f"{base_config.deployment}j{secrets.token_hex(2)}",
            "dev_login": False,
            "jwt_secret": secrets.token_hex(32),
            "jwt_audience": "im-test",
            "hubs": 1,
            "push_workers": 0,
        }
    )
    dep = deploy(cfg)
    try:
        yield dep
    finally:
        teardown(cfg)
        purge_deployment(cfg)


async def test_minted_tokens_drive_a_deployment_without_dev_login(no_dev_login: Deployment) -> None:
    cfg = no_dev_login.config
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{no_dev_login.router_url}/v1/login", json={"user": "x"}) as resp:
            assert resp.status == 404  # development login is off
    workload = SyntheticWorkload(users=10, rate=40.0, duration_s=2.0, group_size=4, direct_share=0.3, seed=4)
    tokens = TokenSource(secret=cfg.jwt_secret, audience="im-test", ttl_s=600)
    report = await run_workload_async(
        no_dev_login.router_url, workload, progress=False, drain_timeout_s=20.0, quiet_s=0.5, tokens=tokens
    )
    assert report["sent"] == report["acked"] == 80
    assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0), report["lost_entries"]
    assert report["delivered"] == report["expected_deliveries"] > 0
    assert judge(report).passed


async def test_a_wrong_secret_connects_nobody(no_dev_login: Deployment) -> None:
    workload = SyntheticWorkload(users=2, rate=2.0, duration_s=0.5)
    tokens = TokenSource(secret=secrets.token_hex(32), audience="im-test")
    with pytest.raises(Exception, match="401|token|auth|Unauthorized"):
        await run_workload_async(
            no_dev_login.router_url, workload, progress=False, drain_timeout_s=2.0, setup_timeout_s=10.0, tokens=tokens
        )
