"""The deployment's push metrics summed from its actors' stats."""

from __future__ import annotations

from im_actors.push.metrics import push_summary


def test_push_summary_adds_publishers_planners_and_workers() -> None:
    publisher = {"published": 10, "confirmed": 9, "dropped": 1, "outbox": 1, "connected": True}
    planner = {"jobs": 10, "coalesced": 3, "repeats": 2, "dropped_online": 0, "held": 0}
    worker = {"delivered": 7, "retried": 2, "dead": 1, "invalid": 1, "duplicates": 1, "deferred": 0}
    actors = {
        "im-session-0": {"up": True, "role": "session", "stats": {"push": publisher, "push_planner": planner}},
        "im-session-1": {"up": True, "role": "session", "stats": {"push": publisher, "push_planner": planner}},
        "im-push-0": {"up": True, "role": "push", "stats": {**worker, "queues": {"jobs": 4, "retry": 2, "dead": 1}}},
        "im-push-1": {"up": True, "role": "push", "stats": {**worker, "queues": {}}},
        "im-hub-0": {"up": True, "role": "hub", "stats": {"delivered": 1000}},  # not a push counter
        "im-session-2": {"up": False},
        "im-push-2": {"up": True, "role": "push", "error": "timed out"},
    }
    summary = push_summary(actors)
    assert summary == {
        "published": 20,
        "confirmed": 18,
        "dropped": 2,
        "outbox": 2,
        "jobs": 20,
        "coalesced": 6,
        "repeats": 4,
        "delivered": 14,
        "retried": 4,
        "dead": 2,
        "invalid": 2,
        "duplicates": 2,
        "deferred": 0,
        "queues": {"jobs": 4, "retry": 2, "dead": 1},
    }
