"""The reconnect storm (drivers.storm): the clients of a killed hub all come back, nothing is lost."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from drivers.storm import hub_connections, reconnect_storm
from drivers.verdict import judge
from im_actors.cluster import Deployment, deploy, teardown
from im_actors.config import Config
from im_actors.services import purge_deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def storm_deployment(base_config: Config, local_ray: None) -> Iterator[Deployment]:
    """A deployment of its own (2 hubs, no push): the storm counts every connection of its hubs."""
    cfg = base_config.model_copy(
        update={"deployment": f"{base_config.deployment}w{secrets.token_hex(2)}", "hubs": 2, "push_workers": 0}
    )
    dep = deploy(cfg)
    try:
        yield dep
    finally:
        teardown(cfg)
        purge_deployment(cfg)


async def test_every_client_of_a_killed_hub_comes_back(storm_deployment: Deployment) -> None:
    cfg = storm_deployment.config
    report = await reconnect_storm(
        cfg,
        storm_deployment.router_url,
        clients=40,
        rate=20.0,
        duration_s=8.0,
        group_size=5,
        kill_after_s=1.0,
        back_timeout_s=60.0,
        quiet_s=0.5,
    )
    storm = report["storm"]
    assert storm["clients"] == 40 and storm["hub"] in await hub_connections(cfg)
    assert storm["hub_clients"] > 0
    assert storm["all_back_s"] is not None and storm["all_back_s"] > 0, storm
    assert storm["connections"][-1][2:] >= [40, storm["hub_clients"]]  # all connected, each of them came back
    assert report["reconnects"] >= storm["hub_clients"]
    assert report["sent"] == report["acked"] == 160
    assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0), report["lost_entries"]
    assert report["faults"][-1]["recovery_s"] == storm["all_back_s"]
    assert judge(report).passed, judge(report).reasons()
