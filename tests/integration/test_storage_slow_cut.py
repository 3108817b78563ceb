"""Storage that answers slowly or drops connections mid-reply (issue 14): the ``mongodb-slow`` and
``mongodb-cut`` chaos kinds on a deployment of its own.

The deployment talks to a private SecantusDB through a :class:`drivers.tcpproxy.TcpProxy` on a thread
of the test process (as the demo runs it); the test's :class:`drivers.chaos.ChaosMonkey` switches the
faults. The shared Redis is only used under the deployment's own key prefix; nothing shared is slowed.
While a synthetic workload runs (its oracle counts lost, duplicated and reordered deliveries), a raw
WebSocket sender sends every 100 ms through the fault and times each answer: every send must be
answered, ack or ``unavailable``, within the documented bound; after the window every unacked one is
resent with its cmid, and every ack must name the entry that history holds for that cmid.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from drivers.chaos import ChaosMonkey, ChaosSpec
from drivers.run import run_workload_async
from drivers.synthetic import SyntheticWorkload
from drivers.tcpproxy import TcpProxy, mongo_upstream, proxied_mongo_url
from im_actors import ids
from im_actors.client import Client
from im_actors.cluster import Deployment, deploy, teardown
from im_actors.config import Config
from im_actors.refs import DEFAULT_CALL_TIMEOUT_S
from im_actors.services import LocalServices, purge_deployment, start_secantus
from tests.rawconn import RawConn

pytestmark = pytest.mark.integration

#: The documented bound of a send's answer (drivers/chaos.py): a hub answers ``unavailable`` itself
#: once its call to the shard passes DEFAULT_CALL_TIMEOUT_S, and a send waits behind one batch at most.
ANSWER_BOUND_S = 2 * DEFAULT_CALL_TIMEOUT_S
#: Each MongoDB operation's bound here (ms): a 300 ms delay stays under it, 1,500 ms goes past it.
MONGO_TIMEOUT_MS = 1000
FAULT_S = 4.0


@dataclass
class ProxiedStack:
    deployment: Deployment
    proxy: TcpProxy
    services: LocalServices = field(default_factory=LocalServices)


@pytest.fixture(scope="module")
def stack(base_config: Config, local_ray: None) -> Iterator[ProxiedStack]:
    services = LocalServices()
    url = start_secantus(services)
    proxy = TcpProxy(mongo_upstream(url))
    port = proxy.start_thread()  # actors connect while deploy() blocks this thread
    cfg = base_config.model_copy(
        update={
            "deployment": f"{base_config.deployment}p{secrets.token_hex(2)}",
            "mongo_url": proxied_mongo_url(url, port),
            "mongo_timeout_ms": MONGO_TIMEOUT_MS,
            "push_workers": 0,
        }
    )
    st = ProxiedStack(Deployment(cfg), proxy, services)
    try:
        st.deployment = deploy(cfg)
        yield st
    finally:
        proxy.heal()
        teardown(cfg)
        purge_deployment(cfg)
        proxy.stop_thread()
        services.stop()


class RawSender:
    """One WebSocket of ``user`` that sends numbered frames and times every answer (loop seconds)."""

    def __init__(self, ws: Any, conv: str) -> None:
        self.ws = ws
        self.conv = conv
        self.sent: dict[int, float] = {}
        self.answers: dict[int, tuple[float, dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        async for data in self.ws:
            frame = msgpack.unpackb(data, raw=False)
            rid = frame.get("id")
            if rid in self.sent and rid not in self.answers:
                self.answers[rid] = (loop.time(), frame)

    async def send_every(self, period_s: float, until_s: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + until_s
        n = 0
        while loop.time() < end:
            n += 1
            self.sent[n] = loop.time()
            frame = {"t": "send", "id": n, "conv": self.conv, "cmid": f"raw-{n}", "body": f"raw {n}"}
            await self.ws.send(msgpack.packb(frame))
            await asyncio.sleep(period_s)

    async def wait_answered(self, bound_s: float) -> None:
        """Until every send has its answer; fails naming the first one past ``bound_s``."""
        loop = asyncio.get_running_loop()
        while len(self.answers) < len(self.sent):
            late = [n for n, t in self.sent.items() if n not in self.answers and loop.time() - t > bound_s]
            assert not late, f"sends {late[:5]} not answered within {bound_s} s"
            await asyncio.sleep(0.1)
        self._reader.cancel()


async def _ambiguous_commits(dep: Deployment) -> float:
    """The store writers' ambiguous commits so far (each one read back)."""
    writers = [h for name, h in dep.actors.items() if ids.parse_actor_name(name, dep.config.actor_prefix)[0] == "store"]
    assert writers
    return sum(float(s["ambiguous_commits"]) for s in await asyncio.gather(*(w.stats.remote() for w in writers)))


@pytest.mark.parametrize(
    ("kind", "delay_ms"),
    [("mongodb-slow", 300.0), ("mongodb-slow", 1500.0), ("mongodb-cut", 0.0)],
    ids=["slow-under-timeout", "slow-past-timeout", "cut"],
)
async def test_slow_or_cut_storage_answers_every_send_in_bounded_time_and_no_ack_lies(
    stack: ProxiedStack, kind: str, delay_ms: float
) -> None:
    dep = stack.deployment
    monkey = ChaosMonkey(
        dep.config,
        dep.router_url,
        ChaosSpec((kind,)),
        stack.services,
        outage_s=FAULT_S,
        mongo_proxy=stack.proxy,
        slow_ms=delay_ms,
    )
    a, b = f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"
    conv = ids.direct_conv(a, b)
    alice = Client(dep.router_url, a)
    await alice.connect()
    await alice.send(conv, "before")  # the conversation is active before the fault
    ws = (await RawConn.open(dep.router_url, a)).ws
    try:
        raw = RawSender(ws, conv)
        ambiguous_before = await _ambiguous_commits(dep)
        workload = SyntheticWorkload(users=12, rate=30, duration_s=10, group_size=4, direct_share=0.3, seed=7)
        run = asyncio.create_task(run_workload_async(dep.router_url, workload, progress=False))
        sender = asyncio.create_task(raw.send_every(0.1, FAULT_S + 4.0))
        await asyncio.sleep(2.0)
        fault = await monkey.inject(kind)  # returns once healed
        await sender
        await raw.wait_answered(ANSWER_BOUND_S)
        report = await run

        assert fault.error is None and fault.proxy is not None
        if kind == "mongodb-slow":
            assert fault.proxy["delay_ms"] == delay_ms and fault.proxy["delayed"] > 0
        else:
            assert fault.proxy["cuts"] > 0
        codes = [f["t"] if f["t"] == "ack" else f["code"] for _, f in raw.answers.values()]
        assert set(codes) <= {"ack", "unavailable"}, codes
        if delay_ms > MONGO_TIMEOUT_MS:
            assert "unavailable" in codes  # the fault was felt, and answered honestly
        elif kind == "mongodb-cut":
            # A cut reply makes a commit ambiguous; the store reads it back, and only when the read
            # back fails too is the send answered unavailable. Either way the fault reached the store.
            ambiguous = await _ambiguous_commits(dep) - ambiguous_before
            assert "unavailable" in codes or ambiguous > 0, (codes, ambiguous)
        worst = max(t - raw.sent[n] for n, (t, _) in raw.answers.items())
        print(
            f"{kind} {delay_ms:g} ms: {codes.count('ack')} acked, {codes.count('unavailable')} unavailable, "
            f"worst answer {worst:.2f} s; proxy {fault.proxy}"
        )

        # Resend every unavailable send with its cmid (PROTOCOL.md: "resend the same cmid").
        acked = {n: int(f["seq"]) for n, (_, f) in raw.answers.items() if f["t"] == "ack"}
        for n in sorted(set(raw.sent) - set(acked)):
            acked[n] = (await alice.send(conv, f"raw {n}", cmid=f"raw-{n}")).seq
        # Every ack names the entry history holds for its cmid: no ack lies, none lost, none twice.
        stored: list[dict[str, Any]] = []
        after = 0
        while True:
            page = await alice.sync(conv, after, 500)
            stored += page.msgs
            after = page.last if not page.msgs else page.msgs[-1]["seq"]
            if not page.more:
                break
        by_cmid = {m["cmid"]: m["seq"] for m in stored}
        assert len(by_cmid) == len(stored), "a cmid committed twice"
        assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
        assert {n: by_cmid.get(f"raw-{n}") for n in acked} == acked

        assert report["sent"] == report["acked"], report.get("send_errors")
        assert (report["lost"], report["duplicates"], report["order_violations"]) == (0, 0, 0), report["lost_entries"]
        assert report["delivered"] == report["expected_deliveries"] > 0
    finally:
        stack.proxy.heal()
        await ws.close()
        await alice.close()
