"""Take the README's screenshot of the chat page (docs/chat.png) from a running deployment.

    .venv/bin/python -m im_actors.web --port 8080 &      # a local deployment with development login
    .venv/bin/python tests/browser_screenshot.py http://127.0.0.1:8080 docs/chat.png

Three users sign in with headless Chromium (the system's, as in tests/integration/test_browser.py),
talk in a group and a direct conversation, and the first user's page is saved as a PNG. Needs the
router's development login. Exit 1 with a message when no Chromium is found.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from playwright.async_api import Page, async_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.test_browser import ChatPage, find_chromium  # noqa: E402


async def _say(page: Page, text: str, count: int) -> None:
    await page.fill("#composer-text", text)
    await page.press("#composer-text", "Enter")
    await page.wait_for_function(
        "(n) => document.querySelectorAll('#entries .msg:not(.system)').length >= n", arg=count
    )


async def shoot(router_url: str, out: Path) -> None:
    """Sign in alice, bob and carol, make a conversation, save alice's page to ``out`` (a PNG).

    Use a fresh deployment (``python -m im_actors.web`` makes one each time): the users are plain names.
    """
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no Chromium found: sh tests/install-browser.sh, or set IM_TEST_CHROMIUM")
    alice_id, bob_id, carol_id = "alice", "bob", "carol"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            alice = await ChatPage.sign_in(browser, router_url, alice_id)
            bob = await ChatPage.sign_in(browser, router_url, bob_id)
            carol = await ChatPage.sign_in(browser, router_url, carol_id)
            await bob.open_dm(alice_id)
            await _say(bob.page, "are you coming on Saturday?", 1)
            conv = await alice.create_group("weekend trip", [bob_id, carol_id])
            await _say(alice.page, "I made us a group for Saturday", 1)
            for other in (bob, carol):
                await other.page.wait_for_selector(f".conv[data-conv='{conv}']")
                await other.open_conv(conv)
            await _say(bob.page, "great, I'll bring the map", 2)
            await _say(carol.page, "train at 8:10 from the main station?", 3)
            await alice.page.wait_for_function(
                "() => document.querySelectorAll('#entries .msg:not(.system)').length >= 3"
            )
            await _say(alice.page, "8:10 works, see you there", 4)
            await bob.page.wait_for_function(
                "() => document.querySelectorAll('#entries .msg:not(.system)').length >= 4"
            )
            await carol.page.type("#composer-text", "I'll")
            await alice.wait_text("#typing", "is typing")
            await alice.wait_text("#entries .msg.mine .state", "read by")
            await alice.page.screenshot(path=str(out))
        finally:
            await browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    asyncio.run(shoot(sys.argv[1].rstrip("/"), Path(sys.argv[2])))
