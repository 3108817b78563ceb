"""What a hub spends writing a fan-out to its connections, per frame (issue 10, target 4).

A group's entry reaches a hub as one ``deliver`` item naming hundreds of connections; the hub
encodes the ``msg`` frame once and writes it to each. This runs the hub's own code
(:class:`im_actors.hub.Hub` through tests/hubkit.py: the real WebSocket server, auth and
per-connection send queues; peers faked, the session core real) in this process, opens
``--connections`` clients on it from a child process (msgpack, authenticated, reading every frame),
then hands the hub ``--messages`` entries addressed to every connection, one every ``--gap-ms``
(an 80 msgs/s group is one every 12.5 ms), ``--batch`` entries per ``deliver`` call (a conversation
shard's fan-out batch under load: the hub then writes each connection's frames of one call in one
write), and measures this process's CPU time (``process_time``:
the hub's, the clients are elsewhere) until every frame is written, in microseconds per frame.

Each round runs every variant of ``hub_direct_write`` (the hub writes a frame at once when nothing of
that connection waits, :func:`im_actors.hub.write_now`; off: every frame through the connection's
writer task and ``send``), alternating, each on a fresh hub; the medians over ``--rounds`` and
their ratio are printed. CPU time, not wall time: the machine may be shared.

    python benchmarks/hub_writes.py --connections 200 --messages 300 --rounds 3
    python benchmarks/hub_writes.py --connections 200 --messages 300 --rounds 3 --batch 4
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from im_actors.config import load_config  # noqa: E402

VARIANTS = (True, False)


def _clients(url: str, tokens: list[str], ready: Any) -> None:
    """Child process: one authenticated connection per token, reading until the hub closes."""

    async def one(token: str, opened: asyncio.Queue[None]) -> None:
        async with connect(url, subprotocols=["im.v1.msgpack"], compression=None, max_size=None) as ws:  # type: ignore[list-item]
            await ws.send(msgpack.packb({"t": "auth", "token": token, "device": "d1", "proto": 1}))
            assert msgpack.unpackb(await ws.recv())["t"] == "ready"
            opened.put_nowait(None)
            async for _ in ws:
                pass

    async def main() -> None:
        opened: asyncio.Queue[None] = asyncio.Queue()
        tasks = [asyncio.create_task(one(t, opened)) for t in tokens]
        for _ in tokens:
            await opened.get()
        ready.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


async def _one(direct: bool, connections: int, messages: int, gap_ms: float, body_bytes: int, batch: int = 1) -> float:
    """Microseconds of this process's CPU per frame written, for one variant on a fresh hub."""
    from tests.hubkit import HubKit, NoContactsStore

    config = load_config(
        deployment="hubwrites", jwt_secret="x" * 32, hub_direct_write=direct, send_queue_frames=100_000
    )
    kit = HubKit(config)
    kit.peers.sessions_core.store = NoContactsStore()  # type: ignore[assignment]
    url = await kit.start()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_clients, args=(url, [kit.token(f"u{i:04d}") for i in range(connections)], ready))
    child.start()
    try:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ready.wait)
        conn_ids = list(kit.hub.conns)
        await asyncio.sleep(0.3)
        body = "x" * body_bytes
        started = time.process_time()
        for first in range(1, messages + 1, batch):
            items = [
                (
                    {
                        "conv": "g:bench",
                        "seq": seq,
                        "sender": "u0000",
                        "cmid": f"c{seq}",
                        "ts": 0,
                        "kind": "text",
                        "body": body,
                        "meta": None,
                    },
                    conn_ids,
                )
                for seq in range(first, min(first + batch, messages + 1))
            ]
            kit.hub.deliver(items)
            await asyncio.sleep(gap_ms * len(items) / 1000.0)
        while any(c.queue or c.writing for c in kit.hub.conns.values()):
            await asyncio.sleep(0.001)
        cpu_s = time.process_time() - started
        written = messages * len(conn_ids)
        return cpu_s / written * 1e6
    finally:
        await kit.stop()
        child.join(10)
        if child.is_alive():
            child.kill()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--connections", type=int, default=200, help="connections on the hub, each a target of every entry")
    ap.add_argument("--messages", type=int, default=300, help="entries fanned out per variant and round")
    ap.add_argument("--gap-ms", type=float, default=12.5, help="time between entries (ms)")
    ap.add_argument("--body-bytes", type=int, default=64, help="message body (bytes)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each running every variant once")
    ap.add_argument("--batch", type=int, default=1, help="entries per deliver call (the gap grows with it)")
    args = ap.parse_args()
    results: dict[bool, list[float]] = {v: [] for v in VARIANTS}
    print(
        f"# {args.connections} connections x {args.messages} entries every {args.gap_ms:g} ms, "
        f"{args.body_bytes}-byte bodies, {args.batch} per deliver call, {args.rounds} rounds "
        "(hub CPU per frame written, us)",
        flush=True,
    )
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            us = asyncio.run(_one(variant, args.connections, args.messages, args.gap_ms, args.body_bytes, args.batch))
            results[variant].append(us)
            print(f"round {r + 1}  hub_direct_write={str(variant).lower():5}  {us:6.1f} us/frame", flush=True)
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"# median: direct write {on:.1f} us/frame, writer task {off:.1f} us/frame, ratio {on / off:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
