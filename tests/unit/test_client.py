"""The client library against the in-memory fake server (tests.fakeserver): no Ray, no real services."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from im_actors.client import Ack, Client, ClientClosed, ConnState, backoff_delay
from im_actors.errors import CloseConnection, Forbidden, Unavailable
from im_actors.ids import direct_conv
from im_actors.protocol import SUBPROTOCOL_JSON, msg_frame
from tests.fakeserver import FakeServer

AB = direct_conv("alice", "bob")


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with FakeServer(hubs=2) as server:
        yield server


class App:
    """A client plus what its application received."""

    def __init__(self, fake: FakeServer, user: str, **kw: Any) -> None:
        self.got: list[dict[str, Any]] = []
        kw.setdefault("on_msg", self.got.append)
        self.client = Client(fake.router_url, user, backoff_base_s=0.01, backoff_max_s=0.1, request_timeout_s=2.0, **kw)

    def seqs(self, conv: str) -> list[int]:
        return [m["seq"] for m in self.got if m["conv"] == conv]


@pytest.fixture
async def apps(fake: FakeServer) -> AsyncIterator[Callable[..., Any]]:
    made: list[App] = []

    async def make(user: str, connect: bool = True, **kw: Any) -> App:
        app = App(fake, user, **kw)
        made.append(app)
        if connect:
            await app.client.connect()
        return app

    yield make
    await asyncio.gather(*(a.client.close() for a in made))


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_send_delivers_to_every_device_once_in_order(fake: FakeServer, apps: Any) -> None:
    alice, bob = await apps("alice"), await apps("bob")
    acks = [await alice.client.send(AB, f"m{i}") for i in range(3)]
    assert [(a.conv, a.seq, a.dup) for a in acks] == [(AB, 1, False), (AB, 2, False), (AB, 3, False)]
    assert isinstance(acks[0], Ack) and acks[0].ts > 0
    await wait_until(lambda: len(alice.got) == 3 and len(bob.got) == 3)
    assert alice.seqs(AB) == bob.seqs(AB) == [1, 2, 3]
    assert [m["body"] for m in bob.got] == ["m0", "m1", "m2"]
    assert alice.client.held == bob.client.held == {AB: 3}


async def test_baseline_skips_older_entries_and_new_conversations_start_at_zero(fake: FakeServer, apps: Any) -> None:
    alice = await apps("alice")
    await alice.client.send(AB, "before bob")
    await alice.client.send(AB, "before bob again")
    bob, carol = await apps("bob"), await apps("carol")
    assert bob.client.held == {AB: 2}  # baseline from convs: history, not news
    await alice.client.send(AB, "after")
    await wait_until(lambda: bob.seqs(AB) == [3])
    group, conv = await alice.client.group_create("friends", ["bob", "carol"])
    await wait_until(lambda: carol.seqs(conv) == [1])  # a conversation seen later starts at 0
    assert carol.got[0]["kind"] == "system"
    info = await carol.client.group_info(group)
    assert set(info["members"]) == {"alice", "bob", "carol"}
    assert bob.client.dups_dropped == 0 and bob.client.gap_fills == 0


async def test_duplicate_frames_are_dropped(fake: FakeServer, apps: Any) -> None:
    fake.duplicate_fanout = True
    alice, bob = await apps("alice"), await apps("bob")
    for i in range(5):
        await alice.client.send(AB, f"m{i}")
    await wait_until(lambda: bob.client.dups_dropped == 5 and alice.client.dups_dropped == 5)
    assert bob.seqs(AB) == alice.seqs(AB) == [1, 2, 3, 4, 5]


async def test_gap_is_filled_with_sync(fake: FakeServer, apps: Any) -> None:
    fake.drop_fanout = lambda entry, user, device: user == "bob" and entry["seq"] in (2, 3)
    alice, bob = await apps("alice"), await apps("bob")
    for i in range(4):
        await alice.client.send(AB, f"m{i}")
    await wait_until(lambda: len(bob.got) == 4)
    assert bob.seqs(AB) == [1, 2, 3, 4]
    assert [m["body"] for m in bob.got] == ["m0", "m1", "m2", "m3"]
    assert bob.client.gap_fills == 1
    assert ("bob", AB, 1) in fake.sync_log
    assert alice.client.gap_fills == 0


async def test_out_of_order_frames_are_buffered(fake: FakeServer, apps: Any) -> None:
    fake.drop_fanout = lambda entry, user, device: user == "bob" and entry["seq"] >= 2
    fake.sync_delay_s = 0.3
    alice, bob = await apps("alice"), await apps("bob")
    for i in range(3):
        await alice.client.send(AB, f"m{i}")
    await wait_until(lambda: bob.seqs(AB) == [1])
    fake.inject("bob", msg_frame(fake.entries[AB][2]))  # seq 3 first: buffered, a fill starts
    await asyncio.sleep(0.05)
    assert bob.seqs(AB) == [1]
    fake.inject("bob", msg_frame(fake.entries[AB][1]))  # then seq 2: delivered with 3 behind it
    await wait_until(lambda: bob.seqs(AB) == [1, 2, 3], timeout=0.2)
    await asyncio.sleep(0.4)  # the slow sync answer arrives and adds nothing
    assert bob.seqs(AB) == [1, 2, 3]
    assert bob.client.held == {AB: 3}


async def test_resend_with_the_same_cmid_after_unavailable(fake: FakeServer, apps: Any) -> None:
    alice, bob = await apps("alice"), await apps("bob")
    fake.fail_sends = 2
    ack = await alice.client.send(AB, "hello", cmid="c-1")
    assert (ack.seq, ack.dup) == (1, False)
    assert fake.send_log == [("alice", AB, "c-1")] * 3
    assert alice.client.resends == 2
    assert len(fake.entries[AB]) == 1
    await wait_until(lambda: bob.seqs(AB) == [1])


async def test_an_overloaded_servers_retry_after_is_waited_before_the_resend(fake: FakeServer, apps: Any) -> None:
    # An overloaded hub answers unavailable with retry_after_ms (docs/protocol.md): resending sooner
    # than it asks only adds to the load, so the client waits at least that long, as for rate_limited.
    alice = await apps("alice")
    fake.fail_sends, fake.fail_retry_after_ms = 2, 300
    ack = await alice.client.send(AB, "hello", cmid="c-1")
    assert ack.seq == 1 and alice.client.resends == 2
    gaps = [b - a for a, b in zip(fake.send_times, fake.send_times[1:], strict=False)]
    assert len(gaps) == 2 and min(gaps) >= 0.3, gaps


async def test_resend_with_the_same_cmid_after_a_dropped_connection(fake: FakeServer, apps: Any) -> None:
    alice, bob = await apps("alice"), await apps("bob")
    first_hub = alice.client.hub
    fake.drop_after_commit = 1
    ack = await alice.client.send(AB, "hello")
    assert (ack.seq, ack.dup) == (1, True)  # committed before the drop: the resend finds the cmid
    cmids = {cmid for user, _, cmid in fake.send_log if user == "alice"}
    assert len(cmids) == 1 and len(fake.send_log) == 2
    assert len(fake.entries[AB]) == 1
    assert alice.client.reconnects == 1 and alice.client.hub != first_hub
    await wait_until(lambda: alice.seqs(AB) == [1] and bob.seqs(AB) == [1])
    await asyncio.sleep(0.1)
    assert alice.seqs(AB) == [1]


async def test_reconnect_catches_up_known_and_new_conversations(fake: FakeServer, apps: Any) -> None:
    alice, bob = await apps("alice"), await apps("bob")
    assert alice.client.hub != bob.client.hub
    await alice.client.send(AB, "m0")
    await wait_until(lambda: bob.seqs(AB) == [1])
    dead = bob.client.hub
    assert dead is not None
    fake.router_up = False
    await fake.kill_hub(dead)  # abnormal close (1006)
    await wait_until(lambda: not bob.client.connected)
    for i in range(1, 4):
        await alice.client.send(AB, f"m{i}")
    _, gconv = await alice.client.group_create("g", ["bob"])
    await alice.client.send(gconv, "in the group")
    fake.router_up = True
    await wait_until(lambda: bob.seqs(AB) == [1, 2, 3, 4] and bob.seqs(gconv) == [1, 2])
    assert bob.client.reconnects == 1
    assert bob.client.hub != dead
    assert [m["kind"] for m in bob.got if m["conv"] == gconv] == ["system", "text"]
    assert bob.client.dups_dropped == 0


@pytest.mark.parametrize("code", [1001, 1011, 4508, 4429])
async def test_reconnectable_close_codes(fake: FakeServer, apps: Any, code: int) -> None:
    alice, bob = await apps("alice"), await apps("bob")
    await fake.disconnect("bob", code=code)
    await wait_until(lambda: bob.client.reconnects == 1 and bob.client.connected, timeout=10)
    await alice.client.send(AB, "after")
    await wait_until(lambda: bob.seqs(AB) == [1])


async def test_replaced_connection_is_final(fake: FakeServer, apps: Any) -> None:
    bob = await apps("bob")
    await apps("bob")  # same (user, device): the first is closed with 4409
    await wait_until(lambda: not bob.client.connected)
    await asyncio.sleep(0.1)
    assert bob.client.reconnects == 0
    with pytest.raises(CloseConnection) as err:
        await bob.client.send(AB, "x")
    assert err.value.close_code == 4409


async def test_non_retryable_error_raises_at_once(fake: FakeServer, apps: Any) -> None:
    alice = await apps("alice")
    with pytest.raises(Forbidden):
        await alice.client.send(direct_conv("bob", "carol"), "x")
    assert len(fake.send_log) == 1


async def test_send_gives_up_at_its_deadline(fake: FakeServer, apps: Any) -> None:
    alice = await apps("alice")
    fake.fail_sends = 10**6
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await alice.client.send(AB, "x", deadline_s=0.3)
    assert time.monotonic() - started < 1.0
    assert len({cmid for _, _, cmid in fake.send_log}) == 1


async def test_connect_retries_while_the_router_has_no_hub(fake: FakeServer, apps: Any) -> None:
    fake.router_up = False
    alice = await apps("alice", connect=False)
    task = asyncio.create_task(alice.client.connect())
    await asyncio.sleep(0.2)
    assert not task.done()
    fake.router_up = True
    await asyncio.wait_for(task, 5)
    assert alice.client.connected


async def test_json_subprotocol_and_binary_body(fake: FakeServer, apps: Any) -> None:
    alice = await apps("alice", subprotocol=SUBPROTOCOL_JSON)
    bob = await apps("bob")
    await alice.client.send(AB, b"\x00\x01\xff", meta={"t": 1.5})
    await wait_until(lambda: len(alice.got) == 1 and len(bob.got) == 1)
    assert alice.got[0]["body"] == bob.got[0]["body"] == b"\x00\x01\xff"
    assert bob.got[0]["meta"] == {"t": 1.5}


async def test_async_callback_and_queue(fake: FakeServer, apps: Any) -> None:
    order: list[int] = []

    async def on_msg(msg: dict[str, Any]) -> None:
        await asyncio.sleep(0.01 if msg["seq"] == 1 else 0)
        order.append(msg["seq"])

    bob = await apps("bob", on_msg=on_msg)
    alice = await apps("alice", on_msg=None)
    for i in range(3):
        await alice.client.send(AB, f"m{i}")
    await wait_until(lambda: order == [1, 2, 3])
    queue = alice.client.messages()
    assert [queue.get_nowait()["seq"] for _ in range(3)] == [1, 2, 3]
    assert bob.client.stats()["delivered"] == 3


async def test_requests(fake: FakeServer, apps: Any) -> None:
    alice = await apps("alice")
    for i in range(5):
        await alice.client.send(AB, f"m{i}")
    page = await alice.client.sync(AB, after=1, limit=2)
    assert [m["seq"] for m in page.msgs] == [2, 3] and page.last == 5 and page.more
    old = await alice.client.history(AB, before=5, limit=2)
    assert [m["seq"] for m in old.msgs] == [3, 4]
    await alice.client.read(AB, 5)
    assert await alice.client.convs() == [{"conv": AB, "last": 5, "read": 5}]
    group, _ = await alice.client.group_create("g", [])
    await alice.client.group_add(group, ["bob"])
    assert (await alice.client.group_info(group))["members"] == ["alice", "bob"]
    await alice.client.push_register("webhook", "https://example.invalid/hook")
    assert (await alice.client.request("contact.list"))["contacts"] == []


async def test_given_token_skips_dev_login_and_a_bad_one_is_refused(fake: FakeServer, apps: Any) -> None:
    alice = await apps("alice", token="tok:alice")
    assert alice.client.connected and fake.logins == []
    intruder = await apps("mallory", connect=False, token="forged")
    with pytest.raises(CloseConnection) as err:
        await intruder.client.connect()
    assert err.value.close_code == 4401
    assert fake.logins == []


async def test_calls_before_connect_and_after_close(fake: FakeServer) -> None:
    client = Client(fake.router_url, "alice")
    with pytest.raises(ClientClosed):
        await client.send(AB, "x")
    await client.connect()
    await client.close()
    with pytest.raises(ClientClosed):
        await client.send(AB, "x")


def test_backoff_is_jittered_and_capped() -> None:
    for attempt in range(20):
        cap = min(1.0, 0.1 * 2**attempt)
        d = backoff_delay(attempt, 0.1, 1.0)
        assert cap / 2 <= d <= cap


def test_public_surface() -> None:
    import im_actors.client as client_module

    assert sorted(client_module.__all__) == sorted(
        [
            "Ack",
            "Msgs",
            "Client",
            "ClientClosed",
            "ConnectFailed",
            "ConnectionLost",
            "NO_RECONNECT_CLOSE_CODES",
            "backoff_delay",
        ]
    )
    assert {1001, 1006, 1011, 4408, 4429, 4508}.isdisjoint(client_module.NO_RECONNECT_CLOSE_CODES)
    assert {1007, 1009, 4400, 4401, 4409} == client_module.NO_RECONNECT_CLOSE_CODES


async def test_connection_states_are_logged_and_close_awaits_every_task(
    fake: FakeServer, apps: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="im_actors.client")
    alice = await apps("alice", connect=False)
    assert alice.client.state is ConnState.NEW
    await alice.client.connect()
    assert alice.client.state is ConnState.OPEN
    await fake.disconnect("alice", code=1001)
    await wait_until(lambda: alice.client.reconnects == 1 and alice.client.connected)
    fake.drop_fanout = lambda entry, user, device: entry["seq"] == 1
    await alice.client.send(AB, "m1")
    await alice.client.send(AB, "m2")  # a gap: a fill task runs
    await wait_until(lambda: alice.seqs(AB) == [1, 2])
    await alice.client.close()
    assert alice.client.state is ConnState.CLOSED
    changes = [
        (r.args[2], r.args[3])
        for r in caplog.records
        if r.name == "im_actors.client" and isinstance(r.args, tuple) and len(r.args) == 5
    ]
    assert changes == [
        ("new", "connecting"),
        ("connecting", "open"),
        ("open", "reconnecting"),
        ("reconnecting", "open"),
        ("open", "closed"),
    ]
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("im-client-")] == []


async def test_a_refused_connect_leaves_the_client_failed(fake: FakeServer, apps: Any) -> None:
    intruder = await apps("mallory", connect=False, token="forged")
    with pytest.raises(CloseConnection):
        await intruder.client.connect()
    assert intruder.client.state is ConnState.FAILED
    with pytest.raises(CloseConnection) as err:
        await intruder.client.send(AB, "x")
    assert err.value.close_code == 4401
    await intruder.client.close()
    assert intruder.client.state is ConnState.CLOSED


async def test_a_request_lost_while_its_frame_is_written_leaves_no_unretrieved_future() -> None:
    """The reader fails every pending request when the connection drops; a request whose frame was
    still being written gets the transport error from ``send`` and must also retrieve its future's
    (asyncio otherwise logs "Future exception was never retrieved", seen in a drain demo)."""
    import gc

    from websockets.exceptions import ConnectionClosedError
    from websockets.frames import Close

    from im_actors.client import ConnectionLost, _Connection

    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))

    class DroppingWs:
        async def send(self, _data: Any) -> None:
            for fut in conn.pending.values():  # what the reader does on the close
                fut.set_exception(ConnectionLost(1001, "hub draining"))
            raise ConnectionClosedError(Close(1001, "hub draining"), None)

    conn = _Connection(DroppingWs(), "hub-0", "im.v1.msgpack", {})  # type: ignore[arg-type]
    client = Client("http://127.0.0.1:1", "alice")
    with pytest.raises(ConnectionLost):
        await client._request_on(conn, {"t": "ping"}, 1.0)
    gc.collect()
    await asyncio.sleep(0)
    assert not [c for c in seen if "never retrieved" in str(c.get("message", ""))], seen


def test_a_reader_closed_after_its_loop_ended_does_not_try_to_reconnect() -> None:
    """At interpreter shutdown a reader task's coroutine can be closed by the garbage collector after
    its event loop is gone; its ``finally`` used to start a reconnect there and raise ``RuntimeError:
    no running event loop`` (seen at the end of demo runs)."""
    from im_actors.client import _Connection

    class Suspend:
        def __await__(self) -> Any:
            yield None  # suspends the coroutine driving it, no event loop needed

    class SilentWs:
        close_code = None
        close_reason = None

        def __aiter__(self) -> SilentWs:
            return self

        async def __anext__(self) -> bytes:
            await Suspend()
            raise StopAsyncIteration

    client = Client("http://127.0.0.1:1", "alice")
    conn = _Connection(SilentWs(), "hub-0", "im.v1.msgpack", {})  # type: ignore[arg-type]
    client._state, client._conn = ConnState.OPEN, conn
    reader = client._read_loop(conn)
    reader.send(None)  # the reader waits for a frame
    reader.close()  # what the garbage collector does later: GeneratorExit at that await, with no loop
    assert conn.lost is not None and client.state is ConnState.OPEN
