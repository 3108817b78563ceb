"""Backing-service checks fail at once, naming the service and how to provide it."""

from __future__ import annotations

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
