"""benchmarks/fuzz.py in small (issue 14): 5,000 fuzzed frames of every request type, both
subprotocols, against one hub of the deployment while a DM pair and a group chat through it. No
``internal`` answer, no 1011, no frame PROTOCOL.md refuses accepted, no answer that breaks it, no
request left unanswered, no hub restart, and the chat loses, duplicates and reorders nothing."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp
import pytest

from benchmarks import fuzz
from im_actors.cluster import Deployment
from im_actors.config import Config

pytestmark = pytest.mark.integration

FRAMES = 5000


async def _live_hubs(router_url: str, timeout_s: float = 30.0) -> dict[str, str]:
    """``{hub name: ws url}`` of the live hubs, from the router (a hub restarted by an earlier test
    listens on a new port); waits for the first heartbeat of a deployment just made."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        async with aiohttp.ClientSession() as http, http.get(f"{router_url}/v1/health") as resp:
            health = await resp.json()
        hubs = {h["hub"]: h["url"] for h in health["hubs"] if h["alive"]}
        if hubs or loop.time() > deadline:
            return hubs
        await asyncio.sleep(0.2)


async def test_five_thousand_fuzzed_frames_cost_the_hub_and_the_chat_nothing(
    deployment: Deployment, base_config: Config
) -> None:
    run = secrets.token_hex(2)
    hub, url = sorted((await _live_hubs(deployment.router_url)).items())[0]
    before = fuzz.hub_record(base_config, hub)
    chat = fuzz.Chat(deployment.router_url, run, hub, rate=2.0)
    await chat.start()
    chat.run()
    try:
        tally = await fuzz.fuzz_hub(
            url,
            base_config,
            FRAMES,
            8,
            seed=14,
            run=run,
            bystanders=chat.users,
            foreign_convs=list(chat.convs),
            foreign_groups=[chat.group],
        )
    finally:
        report: dict[str, Any] = await chat.stop()
    after = fuzz.hub_record(base_config, hub)

    assert tally.frames == FRAMES
    found = {kind: tally.examples.get(kind) for kind in tally.findings if kind not in ("unavailable", "surprise")}
    assert not found, found
    assert tally.answers["err:bad_request"] > 0 and tally.closes, (tally.answers, tally.closes)
    assert set(tally.closes) <= {"1002", "1007", "1009", "4400", "4429", "no ready in 20 s"}, tally.closes
    assert (after["restarts"], after["pid"]) == (before["restarts"], before["pid"])
    internal = [r["stats"].get("answers", {}).get("internal", 0) for r in (before, after)]
    assert internal[1] == internal[0], internal
    assert report["sent"] == report["acked"] > 0 and not report["send_errors"], report
    assert (report["lost"], report["duplicates"], report["order_violations"], report["dup_acks"]) == (0, 0, 0, 0)
    assert all(stats["reconnects"] == 0 for stats in report["clients"].values()), report["clients"]
