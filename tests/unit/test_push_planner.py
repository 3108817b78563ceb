"""Who gets a push: the session shard's routing plus the PushPlanner (coalescing, repeated fan-outs)."""

from __future__ import annotations

import asyncio
from typing import Any

from im_actors.config import load_config
from im_actors.push.planner import RECENT_SEQS, PushPlanner
from im_actors.session import SessionShard


class Sink:
    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def publish(self, job: dict[str, Any]) -> None:
        self.jobs.append(job)


class HubPeers:
    def __init__(self) -> None:
        self.delivered: dict[str, list[Any]] = {}

    def hub(self, name: str) -> Any:
        peers = self

        class P:
            async def call(self, method: str, items: list[Any], timeout: float = 30) -> None:
                peers.delivered.setdefault(name, []).extend(items)

        return P()


def _entry(seq: int, conv: str = "g:club", body: str = "hi") -> dict[str, Any]:
    return {"conv": conv, "seq": seq, "sender": "alice", "cmid": f"c{seq}", "ts": 1, "kind": "text", "body": body}


def _shard(**over: Any) -> tuple[SessionShard, Sink, HubPeers]:
    sink, peers = Sink(), HubPeers()
    shard = SessionShard(load_config(fanout_batch_ms=0, **over), peers, None, sink)  # type: ignore[arg-type]
    return shard, sink, peers


async def test_one_connected_one_disconnected_device_gets_exactly_one_push() -> None:
    shard, sink, peers = _shard()
    shard.connect("bob", "laptop", "hub-0", 1)
    shard._session("bob").tokens = {"laptop": ("fcm", "tok-laptop"), "phone": ("apns", "ab12")}
    shard._route([(_entry(1), ["bob"])])
    await asyncio.sleep(0.02)
    assert peers.delivered == {"hub-0": [(_entry(1), [1])]}
    [job] = sink.jobs
    assert (job["device"], job["provider"], job["token"], job["seq"], job["badge"]) == ("phone", "apns", "ab12", 1, 1)


async def test_every_offline_device_with_a_token_and_none_without() -> None:
    shard, sink, _ = _shard()
    shard._session("bob").tokens = {"phone": ("apns", "ab12"), "tablet": ("fcm", "t2")}
    shard._session("carol").tokens = {}
    shard._route([(_entry(1), ["bob", "carol"])])
    assert sorted(j["device"] for j in sink.jobs) == ["phone", "tablet"]


async def test_a_repeated_fan_out_makes_no_second_job() -> None:
    shard, sink, _ = _shard()
    shard._session("bob").tokens = {"phone": ("apns", "ab12")}
    shard._route([(_entry(1), ["bob"]), (_entry(2), ["bob"])])
    shard._route([(_entry(2), ["bob"]), (_entry(1), ["bob"])])  # retried, out of order
    assert [j["job_id"] for j in sink.jobs] == ["bob/phone/g:club/1", "bob/phone/g:club/2"]
    assert shard.planner is not None and shard.planner.stats["repeats"] == 2


async def test_coalescing_within_the_window_counts_the_badge() -> None:
    shard, sink, _ = _shard(push_collapse_ms=100)
    shard._session("bob").tokens = {"phone": ("apns", "ab12")}
    for seq in (1, 2, 3):
        shard._route([(_entry(seq, body=f"m{seq}"), ["bob"])])
    shard._route([(_entry(1, conv="d:alice:bob"), ["bob"])])  # another conversation: its own job
    shard._route([(_entry(2), ["bob"])])  # a repeat inside the window is not counted twice
    assert sink.jobs == []
    await asyncio.sleep(0.2)
    by_conv = {j["conv"]: j for j in sink.jobs}
    assert len(sink.jobs) == 2
    assert (by_conv["g:club"]["seq"], by_conv["g:club"]["badge"], by_conv["g:club"]["preview"]) == (3, 3, "m3")
    assert by_conv["d:alice:bob"]["badge"] == 1
    shard._route([(_entry(4), ["bob"])])  # after the window: a new job
    await asyncio.sleep(0.2)
    assert [j["seq"] for j in sink.jobs if j["conv"] == "g:club"] == [3, 4]


async def test_a_device_that_connects_inside_the_window_gets_no_push() -> None:
    shard, sink, _ = _shard(push_collapse_ms=100)
    shard._session("bob").tokens = {"phone": ("apns", "ab12"), "tablet": ("fcm", "t2")}
    shard._route([(_entry(1), ["bob"])])
    shard.connect("bob", "phone", "hub-0", 5)
    await asyncio.sleep(0.2)
    assert [j["device"] for j in sink.jobs] == ["tablet"]
    assert shard.planner is not None and shard.planner.stats["dropped_online"] == 1


async def test_flush_publishes_held_jobs_now() -> None:
    sink = Sink()
    planner = PushPlanner(load_config(push_collapse_ms=60_000), sink)
    planner.offer("bob", "phone", "apns", "ab12", _entry(1))
    planner.offer("bob", "phone", "apns", "ab12", _entry(2))
    assert planner.held == 1 and planner.flush() == 1
    assert [(j["seq"], j["badge"]) for j in sink.jobs] == [(2, 2)]


def test_recent_seqs_and_keys_are_bounded() -> None:
    sink = Sink()
    planner = PushPlanner(load_config(), sink, max_keys=3)
    for seq in range(1, RECENT_SEQS + 10):
        planner.offer("bob", "phone", "log", "t", _entry(seq))
    planner.offer("bob", "phone", "log", "t", _entry(RECENT_SEQS + 5))  # remembered
    assert planner.stats["repeats"] == 1
    for conv in ("d:a:b", "d:a:c", "d:a:d"):
        planner.offer("bob", "phone", "log", "t", _entry(1, conv=conv))
    assert len(planner._recent) == 3


async def test_a_token_moved_to_a_user_of_another_shard_is_forgotten_here() -> None:
    shard, sink, _ = _shard()
    shard._session("carol").tokens = {"phone": ("apns", "ab12"), "tablet": ("fcm", "t2")}
    shard._session("bob").tokens = {"phone": ("apns", "ab12")}  # bob just registered it (here or elsewhere)
    assert shard.forget_token("ab12", "bob", "phone") == 1
    shard._route([(_entry(1), ["carol", "bob"])])
    assert sorted((j["user"], j["device"]) for j in sink.jobs) == [("bob", "phone"), ("carol", "tablet")]
