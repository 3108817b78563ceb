"""A whole deployment on a local Ray, with the real Redis and RabbitMQ and a private SecantusDB.

One deployment per test session. It gets a unique name, so its Ray actors, Redis keys
(``<deployment>:im:``) and RabbitMQ exchange and queues (``<deployment>.im.push...``) are its own;
all of them are removed afterwards. The MongoDB-wire server is a private SecantusDB process in a
temporary folder (or ``IM_TEST_MONGO_URL`` for a real mongod, with a unique database name).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from im_actors.cluster import Deployment, deploy, init_local_ray, teardown
from im_actors.config import Config, load_config
from im_actors.services import ensure_services, purge_deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def base_config() -> Iterator[Config]:
    """The test run's configuration with its service URLs filled in; services stopped afterwards."""
    name = f"t{secrets.token_hex(4)}"
    mongo = os.environ.get("IM_TEST_MONGO_URL", "")
    cfg = load_config(
        deployment=name,
        hubs=2,
        session_shards=2,
        conv_shards=2,
        store_writers=2,
        push_workers=1,
        dev_login=True,
        jwt_secret=secrets.token_hex(32),
        router_port=0,
        mongo_url=mongo or None,
        mongo_db=f"im_{name}" if mongo else "im",
        push_retry_base_ms=100,
        heartbeat_s=0.5,
        metrics_interval_s=1.0,  # test_metrics scrapes the counters: copy them to Ray's metrics often
        webhook_secret="test-secret",
        webhook_allow_private=True,  # the tests' webhook receivers listen on loopback
    )
    cfg, services = ensure_services(cfg)
    try:
        yield cfg
    finally:
        try:
            purge_deployment(cfg, drop_mongo_db=bool(mongo))
        finally:
            services.stop()


@pytest.fixture(scope="session")
def local_ray(base_config: Config) -> Iterator[None]:
    """One local Ray cluster for the whole test run."""
    init_local_ray(base_config)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def deployment(base_config: Config, local_ray: None) -> Iterator[Deployment]:
    """A running deployment: 2 hubs, 2 session and 2 conversation shards, 2 writers, 1 push worker."""
    dep = deploy(base_config)
    try:
        yield dep
    finally:
        teardown(base_config)


@pytest.fixture
def router_url(deployment: Deployment) -> str:
    return deployment.router_url


@pytest.fixture
def uid() -> Any:
    """Unique user ids per test: ``uid("alice")`` -> ``alice-3f2a``."""
    suffix = secrets.token_hex(3)
    return lambda name: f"{name}-{suffix}"
