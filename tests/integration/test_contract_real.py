"""The client-level contract (tests/contract.py) against a real local deployment: what holds the fake
server (tests/fakeserver.py) to the real hub."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.contract import CASES, Env

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
async def test_deployment_keeps_the_contract(case: Callable[[Env], Awaitable[None]], router_url: str, uid: Any) -> None:
    env = Env(router_url, uid)
    try:
        await case(env)
    finally:
        await env.close_all()
