"""The publisher's outbox without a broker: bound, drop-oldest, never raising when RabbitMQ is away."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from im_actors.config import Config, load_config
from im_actors.push.jobs import BadJob, make_job
from im_actors.push.publisher import PushPublisher


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job(seq: int) -> dict:
    return make_job(user="bob", device="phone", provider="log", token="t", conv="d:alice:bob", seq=seq, sender="alice")


def _config(**over: Any) -> Config:
    url = f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"
    return load_config(deployment="unit", rabbitmq_url=url, **over)


def test_outbox_drops_the_oldest_when_full() -> None:
    publisher = PushPublisher(_config(push_outbox_max=3))
    for seq in range(1, 6):
        publisher.publish(_job(seq))
    stats = publisher.stats()
    assert stats["dropped"] == 2
    assert stats["outbox"] == 3
    assert stats["published"] == 0 and stats["confirmed"] == 0
    assert [job["seq"] for job in publisher.outbox_jobs()] == [3, 4, 5]


def test_outbox_of_one_keeps_the_newest() -> None:
    publisher = PushPublisher(_config(push_outbox_max=1))
    for seq in range(1, 4):
        publisher.publish(_job(seq))
    assert [job["seq"] for job in publisher.outbox_jobs()] == [3]
    assert publisher.stats()["dropped"] == 2


def test_publish_refuses_a_malformed_job() -> None:
    publisher = PushPublisher(_config())
    with pytest.raises(BadJob):
        publisher.publish({"job_id": "x"})
    assert publisher.stats()["outbox"] == 0


async def test_start_without_broker_does_not_raise_and_keeps_jobs() -> None:
    publisher = PushPublisher(_config(push_outbox_max=10))
    await publisher.start()
    try:
        for seq in range(1, 13):
            publisher.publish(_job(seq))
        assert await publisher.flush(0.3) is False
        stats = publisher.stats()
        assert stats["connected"] is False
        assert stats["confirmed"] == 0
        assert stats["outbox"] == 10
        assert stats["dropped"] == 2
        assert [job["seq"] for job in publisher.outbox_jobs()] == list(range(3, 13))
    finally:
        await publisher.close()
    with pytest.raises(RuntimeError):
        publisher.publish(_job(99))


async def test_flush_of_an_empty_outbox_is_immediate() -> None:
    publisher = PushPublisher(_config())
    assert await publisher.flush(0.01) is True
    await publisher.close()
    await publisher.close()  # idempotent
