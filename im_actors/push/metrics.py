"""The offline-push metrics of a deployment in one map, from the stats of its actors (DESIGN.md section 6).

:func:`push_summary` adds up what the session shards' publishers and the push workers count::

    published   jobs handed to RabbitMQ (republications after a lost confirm included)
    confirmed   jobs RabbitMQ confirmed
    dropped     jobs dropped from a full outbox (push_outbox_max)
    outbox      jobs waiting in the outboxes now
    jobs        jobs the session shards made; coalesced: entries folded into another job;
                repeats: entries of a repeated fan-out, skipped
    delivered   jobs a provider accepted
    retried     jobs sent to the retry queue after a transient failure
    dead        jobs sent to the dead queue
    invalid     invalid tokens (removed)
    duplicates  copies of jobs that had already reached their provider, not sent again
    deferred    copies held by another worker's claim
    queues      {"jobs", "retry", "dead"}: ready messages, as the first worker that read them saw them

``im-actors status`` prints it under ``"push"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["push_summary", "PUBLISHER_KEYS", "WORKER_KEYS", "PLANNER_KEYS"]

PUBLISHER_KEYS = ("published", "confirmed", "dropped", "outbox")
PLANNER_KEYS = ("jobs", "coalesced", "repeats")
WORKER_KEYS = ("delivered", "retried", "dead", "invalid", "duplicates", "deferred")


def push_summary(actors: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The summed push counters of ``actors`` (``{name: {"role": str, "stats": {...}}}``; entries without
    stats are skipped). Session shards contribute their ``push`` (publisher) and ``push_planner`` maps,
    push workers their own counters and ``queues``."""
    out: dict[str, Any] = {key: 0 for key in (*PUBLISHER_KEYS, *PLANNER_KEYS, *WORKER_KEYS)}
    out["queues"] = {}
    for entry in actors.values():
        stats = entry.get("stats")
        if not isinstance(stats, Mapping):
            continue
        if entry.get("role") == "session":
            for part, keys in (("push", PUBLISHER_KEYS), ("push_planner", PLANNER_KEYS)):
                counters = stats.get(part)
                if isinstance(counters, Mapping):
                    for key in keys:
                        out[key] += int(counters.get(key, 0))
        elif entry.get("role") == "push":
            for key in WORKER_KEYS:
                out[key] += int(stats.get(key, 0))
            if not out["queues"] and stats.get("queues"):
                out["queues"] = dict(stats["queues"])
    return out
