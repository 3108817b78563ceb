"""Identifiers, actor names, shard choice and configuration loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from im_actors import ids
from im_actors.config import load_config
from im_actors.errors import BadRequest, ConfigError


def test_direct_conv_is_ordered_by_bytes() -> None:
    assert ids.direct_conv("bob", "alice") == "d:alice:bob"
    assert ids.direct_conv("B", "a") == "d:B:a"  # "B" < "a" in byte order
    assert ids.conv_kind("d:alice:bob") == "direct"
    assert ids.direct_members("d:alice:bob") == ("alice", "bob")


@pytest.mark.parametrize("conv", ["d:bob:alice", "d:a:a", "d:a", "g:", "g:a b", "x", 3, None])
def test_bad_conversation_ids(conv: object) -> None:
    with pytest.raises(BadRequest):
        ids.conv_kind(conv)


@pytest.mark.parametrize("value", ["alice\n", "alice\r\n", "\nalice", "a\n" * 2])
def test_an_id_with_a_newline_is_not_an_id(value: str) -> None:
    # Found by benchmarks/fuzz.py: "$" also matches before a final newline, so "alice\n" passed.
    assert not ids.valid_id(value)
    with pytest.raises(BadRequest):
        ids.check_id(value, "user")
    for conv in (f"d:{value}:zz", f"d:a:{value}", f"g:{value}"):
        with pytest.raises(BadRequest):
            ids.conv_kind(conv)


def test_actor_names_round_trip() -> None:
    name = ids.actor_name("conv", 3, "t1-")
    assert name == "t1-im-conv-3"
    assert ids.parse_actor_name(name, "t1-") == ("conv", 3)
    with pytest.raises(ValueError):
        ids.parse_actor_name("im-nope-1")


def test_shard_of_is_stable_and_spread() -> None:
    assert ids.shard_of("alice", 8) == ids.shard_of("alice", 8)
    assert len({ids.shard_of(f"u{i}", 4) for i in range(100)}) == 4


def test_config_precedence_flag_env_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "im.toml"
    toml.write_text("hubs = 5\nconv_shards = 7\nstore_writers = 3\n")
    monkeypatch.setenv("IM_CONV_SHARDS", "6")
    cfg = load_config(toml, store_writers=9)
    assert (cfg.hubs, cfg.conv_shards, cfg.store_writers) == (5, 6, 9)
    with pytest.raises(ValidationError):
        cfg.hubs = 1  # type: ignore[misc]  # frozen


def test_bad_config_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IM_HUBS", "many")
    with pytest.raises(ConfigError, match="hubs"):
        load_config()
    monkeypatch.delenv("IM_HUBS")
    monkeypatch.setenv("IM_PUSH_PROVIDERS", "apns")  # a list not in JSON: unparseable, still named
    with pytest.raises(ConfigError, match=r"push_providers \(IM_PUSH_PROVIDERS\): .*JSON"):
        load_config()
    monkeypatch.delenv("IM_PUSH_PROVIDERS")
    toml = tmp_path / "im.toml"
    toml.write_text("hub_count = 2\n")
    with pytest.raises(ConfigError, match="hub_count"):
        load_config(toml)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_knobs_mask_secrets() -> None:
    cfg = load_config(jwt_secret="s3cret", rabbitmq_url="amqp://guest:guest@127.0.0.1:5672/")
    knobs = cfg.knobs()
    assert knobs["jwt_secret"] == "***"
    assert knobs["rabbitmq_url"] == "amqp://guest:***@127.0.0.1:5672/"


def test_split_by_shard_groups_keys_by_their_shard_in_first_order() -> None:
    from im_actors.ids import shard_of, split_by_shard

    users = [f"u{i}" for i in range(20)]
    split = split_by_shard(users, lambda u: shard_of(u, 3))
    assert sorted(u for part in split.values() for u in part) == sorted(users)
    for index, part in split.items():
        assert all(shard_of(u, 3) == index for u in part)
        assert part == [u for u in users if shard_of(u, 3) == index]
