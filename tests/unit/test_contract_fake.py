"""The client-level contract (tests/contract.py) against the in-memory fake server."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

import pytest

from tests.contract import CASES, Env
from tests.fakeserver import FakeServer


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
async def test_fake_server_keeps_the_contract(case: Callable[[Env], Awaitable[None]]) -> None:
    suffix = secrets.token_hex(3)
    async with FakeServer(hubs=2) as fake:
        env = Env(fake.router_url, lambda name: f"{name}-{suffix}")
        try:
            await case(env)
        finally:
            await env.close_all()
