"""Which push jobs a session shard makes (DESIGN.md section 6): one per offline device and entry, with
coalescing and without repeats.

The session shard decides *who* is offline (a device with a push token and no live connection when the
entry is fanned out) and calls :meth:`PushPlanner.offer` for each such (device, entry). The planner:

- skips an entry it already made a job for (same user, device, conversation and seq): a fan-out that a
  conversation shard retries, or a duplicate found in storage and fanned out again, makes no second job.
  It remembers the last ``RECENT_SEQS`` seqs of up to ``max_keys`` (user, device, conversation) keys, in
  memory: after a shard restart the job ids (``user/device/conv/seq``) are the same, and the workers'
  ledger (``ledger.py``) keeps a republished job from reaching the provider twice;
- with ``push_collapse_ms`` > 0, holds the first job for a (user, device, conversation) for that window
  and folds every later entry of the window into it: one job, for the newest seq, with ``badge`` = the
  number of entries folded together. :meth:`device_connected` drops held jobs of a device that came
  online (it syncs; a push would be spam). With ``push_collapse_ms`` = 0 every job is published at once.

Plain code: no awaits; the timers are the running event loop's ``call_later``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from im_actors.config import Config
from im_actors.push.jobs import make_job

__all__ = ["PushPlanner", "JobSink", "RECENT_SEQS"]

log = logging.getLogger(__name__)

#: Seqs remembered per (user, device, conversation) to recognise a repeated fan-out.
RECENT_SEQS = 64


class JobSink(Protocol):
    """Where push jobs go (the RabbitMQ publisher, or a list in tests)."""

    def publish(self, job: dict[str, Any]) -> None:
        """Queue one job; must not block."""


@dataclass
class _Held:
    """A job held for its coalescing window: the newest entry so far and how many were folded in."""

    provider: str
    token: str
    entry: dict[str, Any]
    count: int
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


Key = tuple[str, str, str]  # (user, device, conv)


class PushPlanner:
    """Turns (offline device, entry) offers into push jobs for ``sink``; see the module docstring.

    ``stats``: ``jobs`` (published), ``coalesced`` (entries folded into another job), ``repeats``
    (entries offered again and skipped), ``dropped_online`` (held jobs dropped because the device
    connected).
    """

    def __init__(self, config: Config, sink: JobSink, max_keys: int = 100_000) -> None:
        self._sink = sink
        self._window_s = config.push_collapse_ms / 1000
        self._max_keys = max_keys
        self._recent: OrderedDict[Key, set[int]] = OrderedDict()
        self._held: dict[Key, _Held] = {}
        self.stats = {"jobs": 0, "coalesced": 0, "repeats": 0, "dropped_online": 0}

    def offer(self, user: str, device: str, provider: str, token: str, entry: dict[str, Any]) -> None:
        """Entry ``entry`` (a committed entry: conv, seq, sender, body) is for ``device`` of ``user``,
        which is offline and has ``token`` at ``provider``: publish a job, hold it, or fold it in."""
        key = (user, device, entry["conv"])
        if self._seen(key, entry["seq"]):
            self.stats["repeats"] += 1
            return
        if self._window_s <= 0:
            self._publish(key, provider, token, entry, 1)
            return
        held = self._held.get(key)
        if held is not None:
            self.stats["coalesced"] += 1
            held.count += 1
            held.provider, held.token = provider, token
            if entry["seq"] > held.entry["seq"]:
                held.entry = entry
            return
        held = self._held[key] = _Held(provider, token, entry, 1)
        held.timer = asyncio.get_running_loop().call_later(self._window_s, self._release, key)

    def device_connected(self, user: str, device: str) -> None:
        """``device`` of ``user`` has a live connection now: its held jobs are dropped."""
        for key in [k for k in self._held if k[0] == user and k[1] == device]:
            held = self._held.pop(key)
            if held.timer is not None:
                held.timer.cancel()
            self.stats["dropped_online"] += 1

    def flush(self) -> int:
        """Publish every held job now (shutdown); returns how many."""
        keys = list(self._held)
        for key in keys:
            self._release(key)
        return len(keys)

    @property
    def held(self) -> int:
        """Jobs waiting for their coalescing window to end."""
        return len(self._held)

    def _seen(self, key: Key, seq: int) -> bool:
        """True when ``seq`` was offered for ``key`` before; remembers it otherwise."""
        seqs = self._recent.get(key)
        if seqs is None:
            seqs = self._recent[key] = set()
            if len(self._recent) > self._max_keys:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(key)
        if seq in seqs:
            return True
        seqs.add(seq)
        if len(seqs) > RECENT_SEQS:
            seqs.discard(min(seqs))
        return False

    def _release(self, key: Key) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            if held.timer is not None:
                held.timer.cancel()
            self._publish(key, held.provider, held.token, held.entry, held.count)

    def _publish(self, key: Key, provider: str, token: str, entry: dict[str, Any], count: int) -> None:
        user, device, conv = key
        body = entry.get("body", "")
        job = make_job(
            user=user,
            device=device,
            provider=provider,
            token=token,
            conv=conv,
            seq=entry["seq"],
            sender=entry["sender"],
            body=body if isinstance(body, str | bytes) else "",
            badge=count,
            collapse_key=conv,
        )
        try:
            self._sink.publish(job)
        except Exception:  # a closed publisher at shutdown: the job is lost, the message is not
            log.exception("push job %s not published", job["job_id"])
            return
        self.stats["jobs"] += 1
