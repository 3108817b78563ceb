"""What each storage operation of the message path costs on this MongoDB-wire server (issue 10).

The operations the conversation shard makes around a batch of first-seen direct conversations,
through the real :class:`im_actors.store.Store` (its documents, indexes, write concern and client
settings), on a database filled with ``--entries`` message documents first:

- ``commit``: :meth:`Store.commit` of one entry in each of ``--convs`` new direct conversations
  (each the conversation's first entry, so each carries its listing);
- ``recent_last_seqs``: Redis's last seqs of them (the sender's activation, one ``MGET``);
- ``last_seqs``: the larger of Redis's and MongoDB's (a reader's activation), for conversations
  Redis knows (``known``) and for new ones (``new``);
- ``or_scan``: the single ``$or`` aggregate of narrow ranges that ``last_seqs`` sent before 2026-12-02,
  kept here to show why it is gone (SecantusDB 0.7 answers it with a collection scan);
- ``user_convs_insert``: the separate ``user_convs`` rows a first commit needed before (two per
  conversation), now carried by the entry itself;
- ``contact_sides``: :meth:`Store.contact_sides_many` of the batch's users.

Each operation runs ``--rounds`` times, the operations alternating within a round, and the median
and p90 latency (ms) of each are printed, with the server's name and version. With no
``mongo_url`` it starts a private SecantusDB (as the demo does); Redis is the machine's, under a
key prefix of the run's own, removed afterwards.

    python benchmarks/storage_ops.py --entries 20000 --convs 5 --rounds 40
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from im_actors import ids  # noqa: E402
from im_actors.config import Config, load_config  # noqa: E402
from im_actors.services import describe_services, ensure_services, purge_deployment  # noqa: E402
from im_actors.store import Store  # noqa: E402


def _entry(conv: str, seq: int, sender: str, n: int) -> dict[str, Any]:
    return {"conv": conv, "seq": seq, "sender": sender, "cmid": f"c{n}", "ts": 0, "kind": "text", "body": "x" * 64}


async def _run(cfg: Config, entries: int, convs: int, rounds: int) -> dict[str, list[float]]:
    store = Store(cfg)
    await store.setup()
    users = [f"u{i:03d}" for i in range(200)]
    batch: list[dict[str, Any]] = []
    for n in range(entries):  # one entry in each of `entries` conversations, committed in batches
        a, b = users[n % 200], users[(n * 7 + 1) % 200]
        if a == b:
            b = users[(n + 1) % 200]
        batch.append(_entry(f"{ids.direct_conv(a, b)}x{n}", 1, a, n))
        if len(batch) == 500:
            await store.commit(batch)
            batch = []
    if batch:
        await store.commit(batch)
    await store.flush_cache()
    known = [f"{ids.direct_conv(users[i % 200], users[(i * 7 + 1) % 200])}x{i}" for i in range(1, 1 + convs)]
    times: dict[str, list[float]] = {}

    async def timed(name: str, op: Callable[[], Awaitable[Any]]) -> None:
        started = time.perf_counter()
        await op()
        times.setdefault(name, []).append((time.perf_counter() - started) * 1000)

    for r in range(rounds):
        new = [ids.direct_conv(f"n{r}a{j}", f"n{r}b{j}") for j in range(convs)]
        await timed("recent_last_seqs", lambda: store.recent_last_seqs(new))  # noqa: B023
        await timed("last_seqs (new)", lambda: store.last_seqs(new))  # noqa: B023
        await timed("last_seqs (known)", lambda: store.last_seqs(known))
        or_match: dict[str, Any] = {"$or": [{"conv": c, "seq": {"$gte": 1}} for c in known]}
        pipeline: list[dict[str, Any]] = [{"$match": or_match}, {"$group": {"_id": "$conv", "last": {"$max": "$seq"}}}]

        async def or_scan(pipeline: list[dict[str, Any]] = pipeline) -> None:
            cursor = await store.messages.aggregate(pipeline)
            _ = [d async for d in cursor]

        await timed("or_scan (before)", or_scan)
        rows = {c: sorted(ids.direct_members(c)) for c in new}
        await timed("user_convs_insert (before)", lambda: store.add_user_convs_many(rows))  # noqa: B023
        pair_users = [u for c in new for u in ids.direct_members(c)]
        await timed("contact_sides", lambda: store.contact_sides_many(pair_users))  # noqa: B023
        firsts = [_entry(c, 1, ids.direct_members(c)[0], r) for c in new]
        await timed("commit", lambda: store.commit(firsts))  # noqa: B023
    await store.flush_cache()
    await store.close()
    return times


def main(argv: list[str] | None = None) -> int:
    """Run once and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=20000, help="message documents stored before measuring")
    ap.add_argument("--convs", type=int, default=5, help="conversations per operation (a batch's first-seen ones)")
    ap.add_argument("--rounds", type=int, default=40, help="times each operation runs")
    args = ap.parse_args(argv)
    run = f"so{secrets.token_hex(3)}"
    cfg = load_config(deployment=run, mongo_db=f"im_{run}", push_workers=0)  # a database of its own, dropped
    cfg, services = ensure_services(cfg, push_optional=True)
    try:
        server = describe_services(cfg)["mongodb"]
        times = asyncio.run(_run(cfg, args.entries, args.convs, args.rounds))
    finally:
        purge_deployment(cfg, drop_mongo_db=True)
        services.stop()
    print(f"# MongoDB-wire server: {server.get('server')} {server.get('version')}; {args.entries:,} entries stored;")
    print(f"# {args.convs} conversations per operation, {args.rounds} rounds, operations alternating")
    print(f"{'operation':<28} {'median ms':>10} {'p90 ms':>8}")
    for name, vals in times.items():
        vals.sort()
        print(f"{name:<28} {statistics.median(vals):>10.2f} {vals[int(len(vals) * 0.9)]:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
