"""Faults of DESIGN.md section 4 while real traffic flows; each run must end with the oracle clean.

Actors are killed with ``ray.kill(no_restart=False)``: Ray restarts them (``max_restarts=-1``) empty,
and they rebuild their state from storage and their peers. Every test leaves the deployment healthy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
import ray
from websockets.asyncio.client import connect

from drivers.run import run_workload_async
from drivers.synthetic import SyntheticWorkload
from im_actors import ids
from im_actors.client import Client
from im_actors.cluster import Deployment

pytestmark = pytest.mark.integration


def _clean(report: dict[str, Any]) -> None:
    assert report["sent"] == report["acked"], report.get("send_errors")
    assert report["lost"] == 0, report["lost_entries"]
    assert report["duplicates"] == 0
    assert report["order_violations"] == 0
    assert report["delivered"] == report["expected_deliveries"] > 0


async def _run_with_fault(deployment: Deployment, role: str, index: int, at_s: float = 1.5) -> dict[str, Any]:
    name = ids.actor_name(role, index, deployment.config.actor_prefix)
    workload = SyntheticWorkload(users=16, rate=40, duration_s=5, group_size=4, direct_share=0.3, seed=index)
    run = asyncio.create_task(run_workload_async(deployment.router_url, workload, progress=False))
    await asyncio.sleep(at_s + 1.0)  # setup (connects, groups) takes about a second
    ray.kill(ray.get_actor(name, namespace=ids.NAMESPACE), no_restart=False)
    return await run


@pytest.mark.parametrize("role", ["hub", "conv", "session", "store"])
async def test_actor_killed_mid_traffic_loses_nothing(deployment: Deployment, role: str) -> None:
    report = await _run_with_fault(deployment, role, 0)
    _clean(report)


async def test_twenty_concurrent_senders_on_two_hubs_get_seqs_1_to_n(router_url: str, uid: Any) -> None:
    names = [uid(f"s{i}") for i in range(20)]
    clients = [Client(router_url, n) for n in names]
    await asyncio.gather(*(c.connect() for c in clients))
    try:
        assert len({c.hub for c in clients}) == 2
        _, conv = await clients[0].group_create("busy", names[1:])
        acks = await asyncio.gather(*(c.send(conv, f"m{i}-{j}") for i, c in enumerate(clients) for j in range(5)))
        assert sorted(a.seq for a in acks) == list(range(2, 102))  # seq 1 is "created"
        page = await clients[5].sync(conv, 0, 500)
        assert [m["seq"] for m in page.msgs] == list(range(1, 102)) and not page.more
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_lost_ack_resend_through_another_hub_is_a_dup(deployment: Deployment, uid: Any) -> None:
    import aiohttp

    user, peer = uid("alice"), uid("bob")
    conv = ids.direct_conv(user, peer)
    async with aiohttp.ClientSession() as http:
        token = (await (await http.post(f"{deployment.router_url}/v1/login", json={"user": user})).json())["token"]
        first_hub = await (await http.get(f"{deployment.router_url}/v1/hub")).json()
        params = {"exclude": first_hub["hub"]}
        other_hub = await (await http.get(f"{deployment.router_url}/v1/hub", params=params)).json()
    assert first_hub["hub"] != other_hub["hub"]
    urls = [first_hub["url"], other_hub["url"]]
    frames = []
    for url in urls:  # the same send on hub A (its ack is never read), then on hub B
        ws = await connect(url, subprotocols=["im.v1.msgpack"])  # type: ignore[list-item]
        await ws.send(msgpack.packb({"t": "auth", "token": token, "device": "d1", "proto": 1}))
        assert msgpack.unpackb(await ws.recv())["t"] == "ready"
        await ws.send(msgpack.packb({"t": "send", "id": 1, "conv": conv, "cmid": "only-once", "body": "hi"}))
        while True:
            frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
            if frame["t"] == "ack":
                frames.append(frame)
                break
        await ws.close()
    first, second = frames
    assert (second["seq"], second["ts"], second["dup"]) == (first["seq"], first["ts"], True)


async def test_read_receipts_and_typing(router_url: str, uid: Any) -> None:
    a_user, b_user = uid("alice"), uid("bob")
    events: dict[str, list[dict[str, Any]]] = {"a1": [], "a2": [], "b": []}

    def sink(key: str) -> Any:
        return lambda ev: events[key].append(ev)

    a1 = Client(router_url, a_user, "phone", on_event=sink("a1"))
    a2 = Client(router_url, a_user, "laptop", on_event=sink("a2"))
    b = Client(router_url, b_user, on_event=sink("b"))
    await asyncio.gather(a1.connect(), a2.connect(), b.connect())
    try:
        conv = ids.direct_conv(a_user, b_user)
        ack = await b.send(conv, "read me")
        await a1.read(conv, ack.seq)
        await a1.read(conv, 0)  # never backwards
        await a1.typing(conv)
        for _ in range(200):
            if events["b"] and events["a2"] and any(e["t"] == "typing" for e in events["b"]):
                break
            await asyncio.sleep(0.02)
        receipt = {"t": "receipt", "conv": conv, "user": a_user, "seq": ack.seq}
        assert receipt in events["b"] and receipt in events["a2"]
        assert not [e for e in events["a1"] if e["t"] == "receipt"]  # not echoed to the reader
        assert {"t": "typing", "conv": conv, "user": a_user} in events["b"]
        assert not [e for e in events["a2"] if e["t"] == "typing"]  # typing goes to the others
        convs = {c["conv"]: c for c in await a2.convs()}
        assert convs[conv]["read"] == ack.seq
    finally:
        await asyncio.gather(a1.close(), a2.close(), b.close())


async def test_restarted_session_shard_gets_connections_reannounced(deployment: Deployment, uid: Any) -> None:
    a_user, b_user = uid("alice"), uid("bob")
    got: list[dict[str, Any]] = []
    alice = Client(deployment.router_url, a_user)
    bob = Client(deployment.router_url, b_user, on_msg=got.append)
    await asyncio.gather(alice.connect(), bob.connect())
    try:
        conv = ids.direct_conv(a_user, b_user)
        await alice.send(conv, "before")
        for _ in range(250):  # delivered live before the fault
            if got:
                break
            await asyncio.sleep(0.02)
        index = ids.shard_of(b_user, deployment.config.session_shards)
        name = ids.actor_name("session", index, deployment.config.actor_prefix)
        ray.kill(ray.get_actor(name, namespace=ids.NAMESPACE), no_restart=False)
        await asyncio.sleep(4 * deployment.config.heartbeat_s + 2)  # restart, then one supervision round
        await alice.send(conv, "after")
        for _ in range(250):
            if len(got) == 2:
                break
            await asyncio.sleep(0.02)
        assert [m["body"] for m in got] == ["before", "after"]
        assert bob.gap_fills == 0 and bob.reconnects == 0  # delivered live, not by catch-up
    finally:
        await asyncio.gather(alice.close(), bob.close())


async def test_chaos_every_actor_kind_and_a_redis_flush_twice(deployment: Deployment) -> None:
    from drivers.chaos import ChaosMonkey, ChaosSpec

    spec = ChaosSpec(("hub", "conv", "session", "store", "push", "redis"))
    monkey = ChaosMonkey(deployment.config, deployment.router_url, spec, services=None)
    await monkey.start()
    workload = SyntheticWorkload(users=16, rate=40, duration_s=14, group_size=4, direct_share=0.3, seed=7)
    run = asyncio.create_task(run_workload_async(deployment.router_url, workload, progress=False))
    await monkey.run(spec.schedule(2.0, 13.0))
    report = await run
    faults = await monkey.finish()
    _clean(report)
    assert sorted(f["kind"] for f in faults) == sorted(spec.kinds * 2)
    assert all(f["error"] is None and f["recovery_s"] is not None for f in faults), faults


async def test_offline_user_catches_up_500_entries_in_3_groups_while_live_ones_arrive(
    router_url: str, uid: Any
) -> None:
    owner_name, late_name = uid("owner"), uid("late")
    owner = Client(router_url, owner_name)
    late_got: list[dict[str, Any]] = []
    late = Client(router_url, late_name, on_msg=late_got.append)
    await asyncio.gather(owner.connect(), late.connect())
    convs = [(await owner.group_create(f"room{i}", [late_name]))[1] for i in range(3)]
    for _ in range(250):
        if len(late_got) == 3:  # the three "created" entries
            break
        await asyncio.sleep(0.02)
    saved = late.held  # what the device had delivered, as an app would persist it
    await late.close()  # offline from here
    try:
        for n in range(500):
            await owner.send(convs[n % 3], f"m{n}")
        late = Client(router_url, late_name, on_msg=late_got.append, held=saved)
        reconnect = asyncio.create_task(late.connect())  # catch-up runs while live entries arrive
        live = [await owner.send(conv, "live") for conv in convs]
        await reconnect
        per_conv = [len(range(i, 500, 3)) for i in range(3)]  # 167, 167, 166 messages
        # seq 1 is "created", then the messages, then the live one
        expected = {conv: list(range(1, per_conv[i] + 3)) for i, conv in enumerate(convs)}
        for i, conv in enumerate(convs):
            assert live[i].seq == expected[conv][-1]
        for _ in range(500):
            if all(max((m["seq"] for m in late_got if m["conv"] == c), default=0) == expected[c][-1] for c in convs):
                break
            await asyncio.sleep(0.02)
        for conv in convs:
            seqs = [m["seq"] for m in late_got if m["conv"] == conv]
            assert seqs == expected[conv]  # every entry once, in seq order ("created" and "live" included)
    finally:
        await asyncio.gather(owner.close(), late.close())


async def test_same_device_twice_within_100_ms_gives_one_connection_and_no_duplicates(
    router_url: str, uid: Any
) -> None:
    a_name, b_name = uid("a"), uid("b")
    got: list[list[dict[str, Any]]] = [[], []]
    first = Client(router_url, b_name, "phone", on_msg=got[0].append)
    second = Client(router_url, b_name, "phone", on_msg=got[1].append)
    sender = Client(router_url, a_name)
    await sender.connect()
    await asyncio.gather(first.connect(), asyncio.sleep(0.05))
    await second.connect()
    try:
        conv = ids.direct_conv(a_name, b_name)
        acks = [await sender.send(conv, f"m{i}") for i in range(10)]
        for _ in range(250):
            if len(got[1]) == 10:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert [m["seq"] for m in got[1]] == [a.seq for a in acks]  # the live one: all, once, in order
        assert not first.connected and got[0] == []  # the replaced one (4409) got nothing more
    finally:
        await asyncio.gather(first.close(), second.close(), sender.close())
