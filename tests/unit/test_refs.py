"""The peer wrapper's answers (refs.py, issue 14 defect 1): a bug is ``internal``, only what is
transient is ``unavailable``, and no answer names an actor. Ray's handle is faked."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import ray.exceptions

from im_actors.errors import BadRequest, Internal, StorageUnavailable, Unavailable
from im_actors.refs import Peer, answers_internal

NAME = "t1234-im-group-0"


class _Method:
    def __init__(self, outcome: BaseException | None) -> None:
        self.outcome = outcome

    def remote(self, *args: Any) -> Any:
        async def run() -> str:
            await asyncio.sleep(0)
            if self.outcome is not None:
                raise self.outcome
            return "ok"

        return run()


class FakeHandle:
    """``handle.<method>.remote(...)`` raising what the test chose."""

    def __init__(self, outcome: BaseException | None) -> None:
        self.outcome = outcome

    def __getattr__(self, method: str) -> _Method:
        return _Method(self.outcome)


def peer_raising(outcome: BaseException | None) -> Peer:
    peer = Peer(NAME)
    peer._handle = FakeHandle(outcome)
    return peer


def task_error(cause: BaseException) -> ray.exceptions.RayTaskError:
    return ray.exceptions.RayTaskError("create", "Traceback (most recent call last): ...", cause)


async def test_an_unexpected_exception_inside_the_actor_is_internal_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="im_actors.refs")
    with pytest.raises(Internal) as caught:
        await peer_raising(task_error(UnicodeEncodeError("utf-8", "\ud83d", 0, 1, "surrogates not allowed"))).call(
            "create", "alice", "\ud83d", []
        )
    assert caught.value.code == "internal"
    assert NAME not in caught.value.msg and "group" not in caught.value.msg
    assert any(NAME in r.getMessage() and "create" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "outcome",
    [
        task_error(TimeoutError()),
        task_error(ConnectionResetError()),
        ray.exceptions.RayActorError(),
        TimeoutError(),
        ray.exceptions.GetTimeoutError(),
    ],
)
async def test_what_is_transient_is_unavailable_without_actor_names(outcome: BaseException) -> None:
    with pytest.raises(Unavailable) as caught:
        await peer_raising(outcome).call("create")
    assert type(caught.value) is Unavailable
    assert NAME not in caught.value.msg and "group" not in caught.value.msg


@pytest.mark.parametrize("ours", [BadRequest("name is bad"), StorageUnavailable("MongoDB unreachable: x")])
async def test_our_own_errors_pass_unchanged(ours: Exception) -> None:
    with pytest.raises(type(ours)) as caught:
        await peer_raising(task_error(ours)).call("create")
    assert type(caught.value) is type(ours) and caught.value.msg == ours.msg  # type: ignore[attr-defined]


async def test_a_missing_actor_is_unavailable_without_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str, namespace: str) -> Any:
        raise ValueError(f"Failed to look up actor with name '{name}'")

    monkeypatch.setattr(ray, "get_actor", missing)
    with pytest.raises(Unavailable) as caught:
        await Peer(NAME).call("create")
    assert NAME not in caught.value.msg


@answers_internal
class Shell:
    """An actor shell as the decorator sees it (no Ray needed: the decorator wraps plain methods)."""

    async def buggy(self, name: str) -> None:
        name.encode()

    async def refused(self) -> None:
        raise BadRequest("no")

    async def slow(self) -> None:
        raise TimeoutError

    def sync_buggy(self) -> int:
        return {}["missing"]  # type: ignore[no-any-return]

    async def fine(self, x: int) -> int:
        return x + 1


async def test_the_actor_side_decorator_logs_bugs_in_the_actor_and_raises_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="im_actors.refs")
    shell = Shell()
    with pytest.raises(Internal):
        await shell.buggy("\ud83d")
    assert any("Shell.buggy" in r.getMessage() and "UnicodeEncodeError" in r.getMessage() for r in caplog.records)
    with pytest.raises(Internal):
        shell.sync_buggy()
    with pytest.raises(BadRequest):
        await shell.refused()
    with pytest.raises(TimeoutError):  # transient: left to Peer.call, which answers unavailable
        await shell.slow()
    assert await shell.fine(1) == 2
    assert asyncio.iscoroutinefunction(Shell.buggy) and not asyncio.iscoroutinefunction(Shell.sync_buggy)


@pytest.mark.parametrize(
    ("ref", "actor_path"),
    [
        ("ConvShardRef", "im_actors.conversation:ConversationShardActor"),
        ("HubRef", "im_actors.hub:HubActor"),
        ("StoreRef", "im_actors.store:StoreWriter"),
        ("SessionShardRef", "im_actors.session:SessionShardActor"),
        ("GroupShardRef", "im_actors.groups:GroupShardActor"),
        ("RouterRef", "im_actors.router:RouterActor"),
    ],
)
def test_each_typed_reference_matches_its_actors_methods(ref: str, actor_path: str) -> None:
    """A typed reference's method calls the actor's method of the same name with the same parameters
    (a route travels as one tuple, a call's timeout is the caller's): renaming or reordering one
    side alone fails here, not in a cluster."""
    import importlib
    import inspect

    from im_actors import refs

    module, _, name = actor_path.partition(":")
    actor = getattr(importlib.import_module(module), name).__ray_metadata__.modified_class
    typed = getattr(refs, ref)
    methods = [m for m, fn in vars(typed).items() if inspect.isfunction(fn) and not m.startswith("_")]
    assert methods
    for method in methods:
        mine = [p for p in inspect.signature(getattr(typed, method)).parameters if p not in ("self", "timeout")]
        theirs = [
            p for p in inspect.signature(getattr(actor, method)).parameters if p not in ("self", "_ray_trace_ctx")
        ]
        spelled: dict[tuple[str, ...], list[str]] = {
            ("route",): ["user", "device", "hub", "conn_id"],
            ("routes",): ["conns"],
        }
        assert spelled.get(tuple(mine), mine) == theirs, (ref, method, mine, theirs)


async def test_a_typed_reference_passes_its_arguments_through_call() -> None:
    from im_actors.refs import ConvShardRef
    from im_actors.wire import SendItem

    class Recording:
        def __init__(self) -> None:
            self.calls: list[tuple[str, tuple[Any, ...], float | None]] = []

        async def call(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
            self.calls.append((method, args, timeout))
            return [{"conv": "d:a:b", "seq": 1, "ts": 0, "dup": False}]

        def notify(self, method: str, *args: Any) -> None:
            self.calls.append((method, args, None))

    peer = Recording()
    item = SendItem("a", "d:a:b", "c1", "hi")
    assert (await ConvShardRef(peer).send_batch([item], "hub-0"))[0]["seq"] == 1
    await ConvShardRef(peer).route(("a", "d1", "hub-0", 7), timeout=2.0)
    ConvShardRef(peer).unroute(("a", "d1", "hub-0", 7))
    assert peer.calls == [
        ("send_batch", ([item], "hub-0"), 30.0),
        ("route", ("a", "d1", "hub-0", 7), 2.0),
        ("unroute", ("a", "d1", "hub-0", 7), None),
    ]
