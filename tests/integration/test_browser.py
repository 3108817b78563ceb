"""The browser chat page (im_actors/web) in a real headless Chromium, driven by Playwright.

Chromium is the system's (Debian's ``chromium`` package: ``sh tests/install-browser.sh`` installs it
when apt-get is usable), handed to Playwright as ``executable_path``; Playwright never downloads a
browser here. The tests skip, saying so, only when no Chromium can be found (``IM_TEST_CHROMIUM``
names one explicitly).

Every check waits on the page's state (what the DOM shows), never on time: a wait has a deadline
only so that a broken page fails instead of hanging.

``IM_CHAT_SCREENSHOT=docs/chat.png`` saves the screenshot of the first test there (the README's).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import ray
from playwright.async_api import Browser, Page, Route, async_playwright

from im_actors import ids
from im_actors.client import Client
from im_actors.cluster import Deployment

WAIT_MS = 60_000  # deadline of one wait on the page (CPU contention on a shared 2-core machine)


def find_chromium() -> str | None:
    """Path of a Chromium to drive: ``IM_TEST_CHROMIUM``, else the first of the usual names on PATH."""
    explicit = os.environ.get("IM_TEST_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium found: run `sh tests/install-browser.sh` (apt-get install chromium) "
        "or set IM_TEST_CHROMIUM",
    ),
]

# The bodies of the non-system entries of the open conversation, in the order the page shows them.
_BODIES_JS = "() => [...document.querySelectorAll('#entries .msg:not(.system) .body')].map(e => e.textContent)"


class ChatPage:
    """One browser user: its own browser context (storage), one page, and the page's errors."""

    def __init__(self, page: Page, user: str) -> None:
        self.page = page
        self.user = user
        self.page_errors: list[str] = []
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))

    @classmethod
    async def sign_in(
        cls, browser: Browser, router_url: str, user: str, token: str = "", online: bool = True
    ) -> ChatPage:
        """Open the page in a new browser context and sign in: dev login for ``user``, or ``token``
        pasted; waits until the page is online unless ``online`` is false."""
        context = await browser.new_context(viewport={"width": 1100, "height": 680})
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        chat = cls(page, user)
        await page.goto(f"{router_url}/")
        await page.fill("#signin-user", user)
        await page.fill("#signin-token", token)
        await page.click("#signin-submit")
        if online:
            await chat.wait_online()
            chat.user = str(await page.text_content("#me"))
        return chat

    async def wait_online(self) -> None:
        await self.page.wait_for_selector("#status[data-state=online]")

    async def open_dm(self, peer: str) -> None:
        await self.page.fill("#dm-user", peer)
        await self.page.click("#dm-form button")
        await self.page.wait_for_selector(f"#conv[data-conv='{ids.direct_conv(self.user, peer)}']")

    async def create_group(self, name: str, members: list[str]) -> str:
        await self.page.fill("#group-name", name)
        await self.page.fill("#group-members", ", ".join(members))
        await self.page.click("#group-form button")
        await self.page.wait_for_selector("#conv[data-conv^='g:'] #entries .msg.system")
        return str(await self.page.get_attribute("#conv", "data-conv"))

    async def open_conv(self, conv: str) -> None:
        await self.page.click(f".conv[data-conv='{conv}']")
        await self.page.wait_for_selector(f"#conv[data-conv='{conv}']")

    async def send(self, text: str) -> None:
        await self.page.fill("#composer-text", text)
        await self.page.press("#composer-text", "Enter")

    async def bodies(self) -> list[str]:
        return list(await self.page.evaluate(_BODIES_JS))

    async def wait_bodies(self, expected: list[str]) -> None:
        """Wait until the open conversation shows exactly ``expected`` (in order) and no unsent message."""
        await self.page.wait_for_function(
            """(want) => {
                const got = [...document.querySelectorAll('#entries .msg:not(.system) .body')].map(e => e.textContent);
                return JSON.stringify(got) === JSON.stringify(want) && !document.querySelector('#outbox .msg');
            }""",
            arg=expected,
            polling=100,
        )

    async def wait_count(self, n: int) -> None:
        """Wait until the open conversation shows at least ``n`` messages and has no unsent one."""
        await self.page.wait_for_function(
            """(n) => document.querySelectorAll('#entries .msg:not(.system)').length >= n
                      && !document.querySelector('#outbox .msg')""",
            arg=n,
            polling=100,
        )

    async def wait_text(self, selector: str, text: str) -> None:
        await self.page.wait_for_function(
            "([sel, text]) => [...document.querySelectorAll(sel)].some(e => e.textContent.includes(text))",
            arg=[selector, text],
            polling=100,
        )

    async def scroll_to_start(self) -> None:
        """Scroll up (as a user would, page by page) until the page says the conversation begins."""
        await self.page.wait_for_function(
            """() => {
                const box = document.getElementById('messages');
                box.scrollTop = 0;
                box.dispatchEvent(new Event('scroll'));
                return document.getElementById('history-edge').dataset.atStart === 'yes';
            }""",
            polling=250,
        )

    async def state(self, expr: str) -> Any:
        return await self.page.evaluate(f"() => window.imChat.{expr}")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            yield b
        finally:
            await b.close()


async def _wait_hubs_live(router_url: str, n: int, deadline_s: float = 60.0) -> None:
    """Wait until the router hands out ``n`` live hubs again (the deployment is left as found)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{router_url}/v1/health") as resp:
                live = (await resp.json(content_type=None)).get("hubs_live", 0)
            if live >= n:
                return
            if loop.time() > end:
                raise AssertionError(f"only {live} of {n} hubs live after {deadline_s} s")
            await asyncio.sleep(0.2)


async def test_two_users_dm_and_group_then_reload_keeps_history(
    browser: Browser, router_url: str, uid: Any, tmp_path: Path
) -> None:
    alice_id, bob_id, carol_id = uid("alice"), uid("bob"), uid("carol")
    alice = await ChatPage.sign_in(browser, router_url, alice_id)
    bob = await ChatPage.sign_in(browser, router_url, bob_id)
    dm = ids.direct_conv(alice_id, bob_id)
    # Bad input is refused on the page, with the reason shown.
    await alice.page.fill("#dm-user", "not valid!")
    await alice.page.click("#dm-form button")
    await alice.wait_text("#errors .error", "a user id is 1 to 64")
    await alice.page.click("#errors .error button")  # dismissed
    await alice.page.wait_for_selector("#errors .error", state="detached")

    # A direct conversation: alice opens it with bob's id; bob finds it in his list.
    await alice.open_dm(bob_id)
    await alice.send("hi bob")
    await bob.page.wait_for_selector(f".conv[data-conv='{dm}']")
    await bob.open_conv(dm)
    await bob.wait_bodies(["hi bob"])
    await bob.send("hello alice")
    await alice.wait_bodies(["hi bob", "hello alice"])
    # Read receipt: bob had the conversation open, so alice's message shows it read.
    await alice.wait_text("#entries .msg.mine .state", "read")
    # Presence (presence.get for the open direct conversation) and typing.
    await alice.page.wait_for_selector("#conv-sub[data-presence=online]")
    await bob.page.type("#composer-text", "typ")
    await alice.wait_text("#typing", f"{bob_id} is typing")
    await bob.page.fill("#composer-text", "")

    # A group: alice creates it with bob, both write, alice adds carol, bob leaves.
    group_conv = await alice.create_group("team", [bob_id])
    await alice.send("welcome to the team")
    await bob.page.wait_for_selector(f".conv[data-conv='{group_conv}']")
    await bob.open_conv(group_conv)
    await bob.wait_bodies(["welcome to the team"])
    await bob.send("thanks")
    await alice.wait_bodies(["welcome to the team", "thanks"])
    await alice.wait_text("#entries .msg.mine .state", f"read by {bob_id}")
    # carol signs in with a pasted token (no user id typed: the hub's ready frame names her); the
    # group appears in her list when alice adds her.
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router_url}/v1/login", json={"user": carol_id}) as resp:
            token = (await resp.json())["token"]
    carol = await ChatPage.sign_in(browser, router_url, "", token=token)
    assert await carol.page.text_content("#me") == carol_id
    await alice.page.fill("#add-users", carol_id)
    await alice.page.click("#add-form button")
    await bob.wait_text("#entries .msg.system", f"added {carol_id}")
    await alice.wait_text("#conv-sub", "3 members")
    await carol.open_conv(group_conv)
    await carol.wait_text("#entries .msg.system", f"added {carol_id}")
    # A forged token: the page stays on the sign-in form and says why.
    mallory = await ChatPage.sign_in(browser, router_url, "", token=token[:-4] + "AAAA", online=False)
    await mallory.wait_text("#errors .error", "unauthorized")
    assert await mallory.page.is_visible("#signin-form")
    shot = tmp_path / "chat.png"
    await alice.page.screenshot(path=str(shot))
    if os.environ.get("IM_CHAT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["IM_CHAT_SCREENSHOT"])
    bob.page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await bob.page.click("#leave")
    await alice.wait_text("#entries .msg.system", f"{bob_id} left")
    await bob.page.wait_for_selector("#composer", state="hidden")

    # 70 more direct messages from alice's other device (the client library), then bob reloads.
    helper = Client(router_url, alice_id, device="script")
    await helper.connect()
    try:
        extra = [f"m{i:02d}" for i in range(70)]
        for text in extra:
            await helper.send(dm, text)
    finally:
        await helper.close()
    await bob.page.reload()
    await bob.wait_online()
    await bob.open_conv(dm)
    expected = ["hi bob", "hello alice", *extra]
    await bob.wait_count(30)  # the newest page
    assert (await bob.bodies()) == expected[-len(await bob.bodies()) :]
    await bob.scroll_to_start()
    await bob.wait_bodies(expected)  # every entry once, in order, older pages loaded on scrolling up
    assert alice.page_errors == [] and bob.page_errors == [] and carol.page_errors == []
    assert shot.stat().st_size > 10_000


async def test_hub_killed_page_reconnects_and_loses_nothing(browser: Browser, deployment: Deployment, uid: Any) -> None:
    router_url = deployment.router_url
    await _wait_hubs_live(router_url, deployment.config.hubs)
    alice_id, bob_id = uid("alice"), uid("bob")
    alice = await ChatPage.sign_in(browser, router_url, alice_id)
    bob = await ChatPage.sign_in(browser, router_url, bob_id)
    dm = ids.direct_conv(alice_id, bob_id)
    await alice.open_dm(bob_id)
    await alice.send("a0")
    await bob.page.wait_for_selector(f".conv[data-conv='{dm}']")
    await bob.open_conv(dm)
    await bob.wait_bodies(["a0"])
    sent_a, sent_b = ["a0"], []
    for i in range(1, 5):
        sent_a.append(f"a{i}")
        await alice.send(sent_a[-1])
        sent_b.append(f"b{i}")
        await bob.send(sent_b[-1])

    hub = await alice.state("hub")
    assert hub, "alice's page is not connected to a hub"
    ray.kill(ray.get_actor(hub, namespace=ids.NAMESPACE), no_restart=False)
    # Written while the page notices the loss, reconnects through the router and catches up.
    for i in range(5, 15):
        sent_a.append(f"a{i}")
        await alice.send(sent_a[-1])
        sent_b.append(f"b{i}")
        await bob.send(sent_b[-1])
    await alice.wait_online()
    await alice.wait_count(len(sent_a) + len(sent_b))
    await bob.wait_count(len(sent_a) + len(sent_b))

    seen_alice, seen_bob = await alice.bodies(), await bob.bodies()
    assert seen_alice == seen_bob  # one order for both
    assert sorted(seen_alice) == sorted(sent_a + sent_b)  # every message exactly once
    assert [b for b in seen_alice if b.startswith("a")] == sent_a  # each sender's messages in send order
    assert [b for b in seen_alice if b.startswith("b")] == sent_b
    stats = await alice.state("stats")
    print(f"alice's page after the hub kill: {stats} on {await alice.state('hub')} (killed {hub})")
    assert stats["reconnects"] >= 1
    # What the server committed: each message once (a resent cmid was answered dup, not committed twice).
    check = Client(router_url, bob_id, device="check")
    await check.connect()
    try:
        page = await check.sync(dm, 0, 500)
    finally:
        await check.close()
    assert [m["body"] for m in page.msgs] == seen_alice

    # Her new hub dies too, and this time the router cannot be reached from her page: what she writes
    # waits in the outbox (shown as sending), and survives a reload of the page, which sends it then.
    await _wait_hubs_live(router_url, deployment.config.hubs)

    async def unreachable(route: Route) -> None:
        await route.abort()

    await alice.page.route("**/v1/hub*", unreachable)
    hub = await alice.state("hub")
    ray.kill(ray.get_actor(hub, namespace=ids.NAMESPACE), no_restart=False)
    await alice.page.wait_for_selector("#status[data-state=reconnecting]")
    queued = [f"q{i}" for i in range(5)]
    for text in queued:
        await alice.send(text)
    await alice.page.wait_for_function(
        "() => document.querySelectorAll('#outbox .msg[data-state=sending]').length === 5", polling=100
    )
    await alice.page.unroute("**/v1/hub*")
    await alice.page.reload()
    await alice.wait_online()
    await alice.open_conv(dm)
    await alice.scroll_to_start()
    await alice.wait_bodies(seen_alice + queued)
    await bob.wait_bodies(seen_alice + queued)
    assert alice.page_errors == [] and bob.page_errors == []
    await _wait_hubs_live(router_url, deployment.config.hubs)


async def test_conv_cursor_drops_duplicates_and_fills_gaps(browser: Browser, router_url: str) -> None:
    """The page's ConvCursor (imclient.js, no I/O) keeps PROTOCOL.md section 5's delivery rule."""
    page = await browser.new_page()
    await page.goto(f"{router_url}/chat/")
    result = await page.evaluate(
        """async () => {
            const { ConvCursor } = await import('./imclient.js');
            const m = (seq) => ({ conv: 'd:a:b', seq, from: 'a', ts: seq, cmid: `c${seq}`, kind: 'text', body: '' });
            const cur = new ConvCursor('d:a:b');
            const early = cur.offer(m(4));                          // before the newest page: kept aside
            const load = cur.loadedNewest({ msgs: [m(2), m(3)], more: true, last: 3 });
            const dup = cur.offer(m(3));                            // already held
            const gap = cur.offer(m(7));                            // 5 and 6 missing
            const run = cur.offer(m(5));                            // 5 fills part of it
            const synced = cur.synced({ msgs: [m(6), m(7), m(9)], more: false, last: 9 }); // no 8 for this user
            const older = cur.older({ msgs: [m(1)], more: false, last: 9 });
            return {
                early: early.added.length, loaded: load.added.map((e) => e.seq), dup: dup.added.length,
                dupsDropped: cur.dupsDropped, gap: [gap.added.length, gap.gap], run: run.added.map((e) => e.seq),
                synced: synced.added.map((e) => e.seq), held: cur.held, behind: cur.behind,
                older: older.map((e) => e.seq), atStart: cur.atStart, seqs: cur.entries.map((e) => e.seq),
            };
        }"""
    )
    assert result == {
        "early": 0,
        "loaded": [2, 3, 4],
        "dup": 0,
        "dupsDropped": 1,
        "gap": [0, True],
        "run": [5],
        "synced": [6, 7, 9],
        "held": 9,
        "behind": False,
        "older": [1],
        "atStart": True,
        "seqs": [1, 2, 3, 4, 5, 6, 7, 9],
    }
