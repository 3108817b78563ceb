"""Push jobs, names and delays: pure code, no broker."""

from __future__ import annotations

import msgpack
import pytest

from im_actors.config import load_config
from im_actors.push.jobs import (
    JOB_FIELDS,
    PREVIEW_MAX,
    BadJob,
    check_job,
    decode_job,
    encode_job,
    make_job,
    next_attempt,
)
from im_actors.push.topology import MAX_RETRY_DELAY_MS, push_names, retry_delay_ms


def _job(**over: object) -> dict:
    fields: dict = dict(
        user="bob",
        device="phone",
        provider="webhook",
        token="http://127.0.0.1:9/hook",
        conv="d:alice:bob",
        seq=7,
        sender="alice",
        body="hello",
        badge=3,
        created_ms=1_700_000_000_000,
    )
    fields.update(over)
    return make_job(**fields)


def test_make_job_fields() -> None:
    job = _job()
    assert set(job) == set(JOB_FIELDS)
    assert job["job_id"] == "bob/phone/d:alice:bob/7"
    assert job["preview"] == "hello"
    assert job["collapse_key"] == "d:alice:bob"
    assert job["attempt"] == 0
    assert job["created_ms"] == 1_700_000_000_000
    assert job["badge"] == 3


def test_make_job_defaults_time_and_collapse_key() -> None:
    job = make_job(user="u", device="d", provider="log", token="t", conv="g:abc", seq=1, sender="s", collapse_key="k")
    assert job["collapse_key"] == "k"
    assert job["created_ms"] > 1_600_000_000_000
    assert job["preview"] == ""


def test_preview_is_cut_to_100_characters() -> None:
    body = "é" * 150  # characters, not bytes
    assert _job(body=body)["preview"] == "é" * PREVIEW_MAX
    assert _job(body=b"\x00\x01binary")["preview"] == ""


def test_encode_decode_round_trip() -> None:
    job = _job(body="x" * 500)
    data = encode_job(job)
    assert isinstance(data, bytes)
    assert decode_job(data) == job


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"job_id": "x"}),
    ],
)
def test_decode_refuses_garbage(data: bytes) -> None:
    with pytest.raises(BadJob):
        decode_job(data)


@pytest.mark.parametrize(
    "change",
    [
        {"seq": "7"},
        {"seq": 0},
        {"badge": True},
        {"attempt": -1},
        {"preview": "x" * (PREVIEW_MAX + 1)},
        {"token": None},
        {"extra": 1},
    ],
)
def test_check_refuses_bad_fields(change: dict) -> None:
    job = {**_job(), **change}
    with pytest.raises(BadJob):
        check_job(job)
    with pytest.raises(BadJob):
        decode_job(msgpack.packb(job))


def test_make_job_refuses_bad_seq() -> None:
    with pytest.raises(BadJob):
        _job(seq=0)


def test_next_attempt_copies() -> None:
    job = _job()
    again = next_attempt(job)
    assert again["attempt"] == 1 and job["attempt"] == 0
    assert {k: v for k, v in again.items() if k != "attempt"} == {k: v for k, v in job.items() if k != "attempt"}


def test_names_carry_the_deployment_prefix() -> None:
    names = push_names(load_config(deployment="t1"))
    assert (names.exchange, names.jobs, names.retry, names.dead) == (
        "t1.im.push",
        "t1.im.push.jobs",
        "t1.im.push.retry",
        "t1.im.push.dead",
    )
    assert names.routing_key == "job"
    assert names.retry_queue(1) == "t1.im.push.retry.16"
    assert names.retry_queue(1000) == "t1.im.push.retry.1024"
    assert names.retry_queue(1024) == "t1.im.push.retry.1024"
    assert names.retry_queue(3600_000) == "t1.im.push.retry.4194304"
    assert len(names.retry_queues) == 19 and names.retry_queues[0] == "t1.im.push.retry.16"
    assert push_names(load_config(deployment="")).jobs == "im.push.jobs"


def test_retry_delay_doubles_and_honours_retry_after() -> None:
    config = load_config(push_retry_base_ms=50)
    assert [retry_delay_ms(config, a) for a in range(4)] == [50, 100, 200, 400]
    assert retry_delay_ms(config, 0, retry_after_ms=3000) == 3000
    assert retry_delay_ms(config, 3, retry_after_ms=10) == 400
    assert retry_delay_ms(config, 0, retry_after_ms=10**12) == MAX_RETRY_DELAY_MS
    assert retry_delay_ms(config, 10_000) == MAX_RETRY_DELAY_MS


def test_public_surface_is_pinned() -> None:
    import im_actors.push as push
    import im_actors.push.providers as providers

    assert sorted(push.__all__) == sorted(
        [
            "BadJob",
            "PushJob",
            "make_job",
            "encode_job",
            "decode_job",
            "PushPublisher",
            "PushNames",
            "push_names",
            "declare_topology",
            "delete_topology",
        ]
    )
    assert sorted(providers.__all__) == sorted(
        [
            "Outcome",
            "OutcomeKind",
            "Provider",
            "LogProvider",
            "WebhookProvider",
            "ApnsProvider",
            "FcmProvider",
            "HuaweiProvider",
            "XiaomiProvider",
            "PROVIDERS",
            "make_provider",
            "make_providers",
        ]
    )
    for module in (push, providers):
        for name in module.__all__:
            assert hasattr(module, name), name
