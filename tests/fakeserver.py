"""An in-memory stand-in for im-actors (a router and N hubs) that speaks PROTOCOL.md, with fault hooks.

A test double, not part of the package: for the client library's and the drivers' own tests, and for
dry runs of a workload from a checkout (``python -m drivers.run --fake-hubs 2 ...``) while no real
deployment is at hand. It is not the server: one asyncio loop, no Ray, no storage, nothing durable.
``tests/contract.py`` holds it to the real hub: the same client-level cases run against it
(``tests/unit/test_contract_fake.py``) and against a real local deployment
(``tests/integration/test_contract_real.py``); a difference found there is fixed here. It keeps what a
client can observe: a router
(``GET /v1/hub`` with ``exclude``, ``POST /v1/login``), hubs on their own ports, auth/ready, per
conversation seqs from 1 with cmid dedup (``dup`` acks, ``conflict`` for a cmid reused with another
body), ``system`` entries for group creation and membership changes (with the ``meta`` of PROTOCOL.md
section 5), fan-out of every entry to every device of every member (the sender's included), in
commit order per connection, ``sync``/``history``/``convs``/``read``/``group.*``/``push.*``.

Faults a test can switch on (see the attributes of :class:`FakeServer`): answer sends ``unavailable``,
commit a send and drop the sender's connection before the ack, drop or duplicate fan-out frames, slow
``sync`` down, refuse hub lookups (503), kill a hub (close code or abnormal close), inject any frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from im_actors import ids
from im_actors.errors import (
    CLOSE_AUTH,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_GOING_AWAY,
    CLOSE_REPLACED,
    CloseConnection,
    Conflict,
    Forbidden,
    RequestError,
    Unavailable,
)
from im_actors.protocol import SUBPROTOCOLS, decode, encode, msg_frame, parse_auth, parse_request

__all__ = ["FakeServer"]

#: ``drop_fanout(entry, user, device) -> True`` skips that ``msg`` frame (entry: conv, seq, sender, ...).
FanoutFilter = Callable[[dict[str, Any], str, str], bool]


class _Conn:
    """One authenticated connection and its ordered outbound queue."""

    def __init__(self, ws: ServerConnection, hub: _Hub, user: str, device: str, subprotocol: str) -> None:
        self.ws = ws
        self.hub = hub
        self.user = user
        self.device = device
        self.subprotocol = subprotocol
        self.out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def push(self, frame: dict[str, Any]) -> None:
        self.out.put_nowait(frame)

    async def writer(self) -> None:
        while True:
            frame = await self.out.get()
            if frame is None:
                return
            try:
                await self.ws.send(encode(frame, self.subprotocol))
            except ConnectionClosed:
                return


class _Hub:
    def __init__(self, name: str) -> None:
        self.name = name
        self.alive = True
        self.server: Server | None = None
        self.port = 0
        self.conns: set[_Conn] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"


class FakeServer:
    """A router plus ``hubs`` hubs on 127.0.0.1 (random ports). Use ``async with FakeServer() as fake:``.

    State a test may read: ``entries`` (conv -> committed entries, index = seq - 1), ``groups``,
    ``send_log`` (every send request as (user, conv, cmid)), ``sync_log`` ((user, conv, after)),
    ``connects`` ((user, device, hub) per authenticated connection), ``logins`` (dev-login users).
    Tokens are ``"tok:<user>"``; anything else is refused with 4401.
    """

    def __init__(self, hubs: int = 1) -> None:
        self.hubs = [_Hub(f"hub-{i}") for i in range(hubs)]
        self.router_url = ""
        self.entries: dict[str, list[dict[str, Any]]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.cmids: dict[tuple[str, str, str], int] = {}
        self.reads: dict[tuple[str, str], int] = {}
        self.by_device: dict[tuple[str, str], _Conn] = {}
        self.by_user: dict[str, dict[str, _Conn]] = {}
        self.send_log: list[tuple[str, str, str]] = []
        self.sync_log: list[tuple[str, str, int]] = []
        self.connects: list[tuple[str, str, str]] = []
        self.logins: list[str] = []
        # --- faults ---
        #: Answer the next N sends ``unavailable`` (retry true), committing nothing.
        self.fail_sends = 0
        #: The ``retry_after_ms`` those answers carry, as an overloaded hub's do (None: none).
        self.fail_retry_after_ms: int | None = None
        #: Loop time of every send received (beside ``send_log``).
        self.send_times: list[float] = []
        #: Commit the next N sends and fan them out, then abort the sender's connection instead of acking.
        self.drop_after_commit = 0
        #: Skip the ``msg`` frames for which this returns True.
        self.drop_fanout: FanoutFilter | None = None
        #: Send every ``msg`` frame twice.
        self.duplicate_fanout = False
        #: Seconds every ``sync`` answer is held back.
        self.sync_delay_s = 0.0
        #: Seconds every send's ack is held back after its commit and fan-out (the connection's other
        #: requests go on meanwhile): a slow commit path, for open-loop drivers.
        self.ack_delay_s = 0.0
        #: When False the router answers 503 ``no_hub``.
        self.router_up = True
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gids = itertools.count(1)

    # --- lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> str:
        """Start the hubs and the router; returns the router URL."""
        for hub in self.hubs:
            hub.server = await serve(
                functools.partial(self._handle, hub),
                "127.0.0.1",
                0,
                subprotocols=[Subprotocol(s) for s in SUBPROTOCOLS],
                compression=None,
                max_size=64 * 2**20,
            )
            hub.port = next(iter(hub.server.sockets)).getsockname()[1]
        app = web.Application()
        app.router.add_get("/v1/hub", self._route_hub)
        app.router.add_post("/v1/login", self._route_login)
        app.router.add_get("/v1/health", self._route_health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.router_url = f"http://127.0.0.1:{port}"
        return self.router_url

    async def stop(self) -> None:
        """Close every connection, the hubs and the router."""
        for hub in self.hubs:
            if hub.server is not None:
                hub.server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(hub.server.wait_closed(), 3)
        if self._runner is not None:
            await self._runner.cleanup()
        for task in list(self._tasks):
            task.cancel()

    # --- faults ----------------------------------------------------------------------------------------

    def hub(self, name: str) -> _Hub:
        return next(h for h in self.hubs if h.name == name)

    async def kill_hub(self, name: str, code: int | None = None) -> None:
        """Take hub ``name`` out of the router and close its connections: with ``code``, or abnormally
        (TCP abort, the client sees 1006) when None. :meth:`revive_hub` puts it back."""
        hub = self.hub(name)
        hub.alive = False
        for conn in list(hub.conns):
            await self._drop(conn, code)

    def revive_hub(self, name: str) -> None:
        self.hub(name).alive = True

    async def disconnect(self, user: str, device: str = "d1", code: int | None = None) -> None:
        """Close the connection of (user, device) with ``code`` (None: abnormal close)."""
        conn = self.by_device.get((user, device))
        if conn is not None:
            await self._drop(conn, code)

    def inject(self, user: str, frame: dict[str, Any], device: str = "d1") -> None:
        """Queue ``frame`` as is on the connection of (user, device)."""
        self.by_device[(user, device)].push(frame)

    async def _drop(self, conn: _Conn, code: int | None) -> None:
        if code is None:
            if conn.ws.transport is not None:
                conn.ws.transport.abort()
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(code, "fake"), 2)

    # --- router ----------------------------------------------------------------------------------------

    async def _route_hub(self, request: web.Request) -> web.Response:
        exclude = set(request.query.getall("exclude", []))
        live = [h for h in self.hubs if h.alive and h.name not in exclude]
        if not self.router_up or not live:
            return web.json_response({"error": "no_hub"}, status=503)
        hub = min(live, key=lambda h: len(h.conns))
        return web.json_response({"hub": hub.name, "url": hub.url, "ttl_s": 30})

    async def _route_login(self, request: web.Request) -> web.Response:
        data = await request.json()
        user = data.get("user")
        if not ids.valid_id(user):
            return web.json_response({"error": "bad_request"}, status=400)
        self.logins.append(user)
        return web.json_response({"token": f"tok:{user}"})

    async def _route_health(self, request: web.Request) -> web.Response:
        return web.json_response({"hubs": [h.name for h in self.hubs if h.alive]})

    # --- hub -------------------------------------------------------------------------------------------

    async def _handle(self, hub: _Hub, ws: ServerConnection) -> None:
        subprotocol = ws.subprotocol or SUBPROTOCOLS[0]
        try:
            first = decode(await asyncio.wait_for(ws.recv(), 5), subprotocol)
            token, device = parse_auth(first)
        except TimeoutError:
            await ws.close(CLOSE_AUTH_TIMEOUT, "no auth")
            return
        except CloseConnection as exc:
            await ws.close(exc.close_code, exc.reason)
            return
        except ConnectionClosed:
            return
        user = token[4:] if token.startswith("tok:") else ""
        if not ids.valid_id(user):
            await ws.close(CLOSE_AUTH, "bad token")
            return
        if not hub.alive:
            await ws.close(CLOSE_GOING_AWAY, "draining")
            return
        old = self.by_device.get((user, device))
        if old is not None:
            self._spawn(self._drop(old, CLOSE_REPLACED))
        conn = _Conn(ws, hub, user, device, subprotocol)
        self.by_device[(user, device)] = conn
        self.by_user.setdefault(user, {})[device] = conn
        hub.conns.add(conn)
        self.connects.append((user, device, hub.name))
        writer = asyncio.create_task(conn.writer())
        conn.push({"t": "ready", "user": user, "device": device, "hub": hub.name, "server_ms": _now_ms()})
        try:
            async for data in ws:
                try:
                    frame = decode(data, subprotocol)
                except CloseConnection as exc:
                    await ws.close(exc.close_code, exc.reason)
                    break
                await self._request(conn, frame)
        except ConnectionClosed:
            pass
        finally:
            hub.conns.discard(conn)
            if self.by_device.get((user, device)) is conn:
                del self.by_device[(user, device)]
                del self.by_user[user][device]
            conn.out.put_nowait(None)
            writer.cancel()

    async def _request(self, conn: _Conn, frame: dict[str, Any]) -> None:
        try:
            req = parse_request(frame)
            answer = await self._answer(conn, req.t, req.fields)
        except RequestError as exc:
            rid = exc.request_id if exc.request_id is not None else frame.get("id")
            conn.push(exc.frame(rid))
            return
        if answer is not None and req.id is not None:
            if req.t == "send" and self.ack_delay_s > 0:
                self._spawn(self._push_later(conn, {**answer, "id": req.id}, self.ack_delay_s))
            else:
                conn.push({**answer, "id": req.id})

    @staticmethod
    async def _push_later(conn: _Conn, frame: dict[str, Any], delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        conn.push(frame)

    async def _answer(self, conn: _Conn, t: str, f: dict[str, Any]) -> dict[str, Any] | None:
        user = conn.user
        if t == "send":
            return await self._send(conn, f)
        if t == "sync":
            self.sync_log.append((user, f["conv"], f["after"]))
            self._check_member(user, f["conv"])
            if self.sync_delay_s:
                await asyncio.sleep(self.sync_delay_s)
            entries = self.entries.get(f["conv"], [])
            page = entries[f["after"] : f["after"] + f["limit"]]
            return {
                "t": "msgs",
                "conv": f["conv"],
                "msgs": [msg_frame(e) for e in page],
                "last": len(entries),
                "more": f["after"] + len(page) < len(entries),
            }
        if t == "history":
            self._check_member(user, f["conv"])
            entries = self.entries.get(f["conv"], [])
            top = len(entries) if f["before"] == 0 else max(f["before"] - 1, 0)  # before 0: the newest
            page = entries[:top][-f["limit"] :]
            return {
                "t": "msgs",
                "conv": f["conv"],
                "msgs": [msg_frame(e) for e in page],
                "last": len(entries),
                "more": False,
            }
        if t == "convs":
            return {
                "t": "convs",
                "convs": [
                    {"conv": c, "last": len(self.entries.get(c, [])), "read": self.reads.get((user, c), 0)}
                    for c in self._convs_of(user)
                ],
            }
        if t == "read":
            self._check_member(user, f["conv"])
            self.reads[(user, f["conv"])] = f["seq"]
            receipt = {"t": "receipt", "conv": f["conv"], "user": user, "seq": f["seq"]}
            for member in self._members(f["conv"]):
                for c in self._conns_of(member):
                    if c is not conn:
                        c.push(receipt)
            return {"t": "ok"}
        if t == "typing":
            for member in self._members(f["conv"]):
                if member != user:
                    for c in self._conns_of(member):
                        c.push({"t": "typing", "conv": f["conv"], "user": user})
            return None
        if t == "group.create":
            gid = f"fg{next(self._gids)}"
            members = list(dict.fromkeys([user, *f["members"]]))
            roles = {u: ("owner" if u == user else "member") for u in members}
            self.groups[gid] = {"name": f["name"], "members": members, "roles": roles}
            conv = ids.group_conv(gid)
            self.entries[conv] = []
            meta = {"event": "created", "name": f["name"], "owner": user, "users": members}
            self._commit(conv, user, f"sys-{len(self.entries[conv]) + 1}", "system", f"created by {user}", meta)
            return {"t": "ok", "group": gid, "conv": conv}
        if t in ("group.add", "group.remove"):
            group = self._group_of_member(user, f["group"])
            conv = ids.group_conv(f["group"])
            if t == "group.add":
                changed = [u for u in dict.fromkeys(f["users"]) if u not in group["members"]]
                group["members"] = [*group["members"], *changed]
                for u in changed:
                    group["roles"].setdefault(u, "member")
                meta = {"event": "added", "users": changed}
            else:
                changed = [u for u in dict.fromkeys(f["users"]) if u in group["members"]]
                for u in changed:
                    group["roles"].pop(u, None)
                meta = {"event": "removed", "users": changed}
            if changed:
                # the entry reaches the members after the change, and the removed users (their last entry)
                self._commit(
                    conv,
                    user,
                    f"sys-{len(self.entries[conv]) + 1}",
                    "system",
                    f"{t} {changed}",
                    meta,
                    also=changed if t == "group.remove" else (),
                )
                if t == "group.remove":
                    group["members"] = [u for u in group["members"] if u not in changed]
            return {"t": "ok"}
        if t == "group.info":
            group = self._group_of_member(user, f["group"])
            return {
                "t": "group",
                "group": f["group"],
                "name": group["name"],
                "members": list(group["members"]),
                "roles": dict(group["roles"]),
            }
        if t == "presence.get":
            return {
                "t": "presence",
                "users": {u: {"online": bool(self.by_user.get(u)), "last_seen": _now_ms()} for u in f["users"]},
            }
        if t == "contact.list":
            return {"t": "contacts", "contacts": []}
        return {"t": "ok"}

    async def _send(self, conn: _Conn, f: dict[str, Any]) -> dict[str, Any] | None:
        user, conv, cmid = conn.user, f["conv"], f["cmid"]
        self.send_log.append((user, conv, cmid))
        self.send_times.append(asyncio.get_running_loop().time())
        self._check_member(user, conv)
        key = (conv, user, cmid)
        if key in self.cmids:
            entry = self.entries[conv][self.cmids[key] - 1]
            if (entry["kind"], entry["body"], entry["meta"]) != (f["kind"], f["body"], f.get("meta")):
                raise Conflict("cmid already committed with a different body")
            return {"t": "ack", "conv": conv, "seq": entry["seq"], "ts": entry["ts"], "dup": True}
        if self.fail_sends > 0:
            self.fail_sends -= 1
            if self.fail_retry_after_ms is not None:
                raise Unavailable("fake: server overloaded", retry_after_ms=self.fail_retry_after_ms)
            raise Unavailable("fake: storage unavailable")
        entry = self._commit(conv, user, cmid, f["kind"], f["body"], f.get("meta"))
        if self.drop_after_commit > 0:
            self.drop_after_commit -= 1
            await asyncio.sleep(0.01)  # let the fan-out frames go out first
            await self._drop(conn, None)
            return None
        return {"t": "ack", "conv": conv, "seq": entry["seq"], "ts": entry["ts"], "dup": False}

    def _commit(
        self, conv: str, sender: str, cmid: str, kind: str, body: Any, meta: Any, also: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Append an entry and queue its ``msg`` on every device of every member and of the users in
        ``also`` (those a removal entry removes), with no await in between."""
        entries = self.entries.setdefault(conv, [])
        entry = {
            "conv": conv,
            "seq": len(entries) + 1,
            "sender": sender,
            "cmid": cmid,
            "ts": _now_ms(),
            "kind": kind,
            "body": body,
            "meta": meta,
        }
        entries.append(entry)
        self.cmids[(conv, sender, cmid)] = entry["seq"]
        frame = msg_frame(entry)
        for member in dict.fromkeys([*self._members(conv), *also]):
            for c in self._conns_of(member):
                if self.drop_fanout is not None and self.drop_fanout(entry, c.user, c.device):
                    continue
                c.push(frame)
                if self.duplicate_fanout:
                    c.push(frame)
        return entry

    # --- membership ------------------------------------------------------------------------------------

    def _members(self, conv: str) -> list[str]:
        if ids.conv_kind(conv) == "direct":
            return list(ids.direct_members(conv))
        group = self.groups.get(ids.group_id_of(conv))
        return list(group["members"]) if group else []

    def _check_member(self, user: str, conv: str) -> None:
        if user not in self._members(conv):
            raise Forbidden("not a member")

    def _group_of_member(self, user: str, gid: str) -> dict[str, Any]:
        group = self.groups.get(gid)
        if group is None or user not in group["members"]:
            raise Forbidden("not a member")
        return group

    def _convs_of(self, user: str) -> list[str]:
        out = [ids.group_conv(g) for g, grp in self.groups.items() if user in grp["members"]]
        out += [c for c in self.entries if c.startswith("d:") and user in ids.direct_members(c)]
        return out

    def _conns_of(self, user: str) -> list[_Conn]:
        return list(self.by_user.get(user, {}).values())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _now_ms() -> int:
    return int(time.time() * 1000)
