"""Push tokens of a session shard through the storage door (the FakeStore's methods), no Ray."""

from __future__ import annotations

from typing import Any

import pytest

from im_actors.config import load_config
from im_actors.errors import BadRequest
from im_actors.session import SessionShard
from tests.fakes import FakeStore


class _NoPeers:
    sessions: list[Any] = []


def make(**cfg: Any) -> tuple[SessionShard, FakeStore]:
    store = FakeStore()
    return SessionShard(load_config(fanout_batch_ms=0, **cfg), _NoPeers(), store, None), store  # type: ignore[arg-type]


async def test_a_provider_that_is_not_enabled_is_bad_request_and_nothing_is_stored() -> None:
    shard, store = make(push_providers=["log"])
    with pytest.raises(BadRequest, match="push provider webhook is not enabled on this server \\(enabled: log\\)"):
        await shard.register_push("bob", "phone", "webhook", "https://example.invalid/hook")
    assert store.devices.docs == {}
    await shard.register_push("bob", "phone", "log", "tok-1")
    assert store.devices.docs == {"tok-1": {"user": "bob", "device": "phone", "provider": "log"}}
    assert shard.users["bob"].tokens == {"phone": ("log", "tok-1")}


async def test_tokens_are_registered_moved_and_removed_through_the_store() -> None:
    shard, store = make()
    await shard.register_push("bob", "phone", "log", "tok-1")
    await shard.register_push("bob", "phone", "log", "tok-2")  # one token per device
    assert set(store.devices.docs) == {"tok-2"}
    await shard.unregister_push("bob", "phone")
    assert store.devices.docs == {} and shard.users["bob"].tokens == {}
