"""Rate limits of a hub: plain token buckets and the tables that hold them (docs/security.md).

No I/O and no clock of its own: every method takes ``now`` (seconds, monotonic), so tests drive
time by hand. The hub asks :class:`UserRates` before it dispatches each request and
:class:`AddressRates` before it accepts each WebSocket handshake.

Scope: buckets are per hub. A user whose devices are connected to two hubs gets each hub's rate
(at most ``hubs`` x the configured rate overall); a shared bucket would cost a remote call per
request. The number of a user's connections is bounded over all hubs by the session shard instead.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["TokenBucket", "UserRates", "RefusalWindow", "AddressRates", "REFUSALS_REMEMBERED"]


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` held; ``rate`` 0 = unlimited."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is there (nothing taken)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """True when the bucket holds ``burst`` tokens (forgetting it changes nothing)."""
        if self.rate <= 0:
            return True
        self._refill(now)
        return self.tokens >= self.burst


@dataclass
class _User:
    sends: TokenBucket
    requests: TokenBucket
    conns: int = 0


@dataclass
class UserRates:
    """Per-user buckets for sends and for all requests (``rate_send_*``, ``rate_request_*``).

    A user's entry lives while one of its connections is open on this hub and afterwards until its
    buckets are full again, so reconnecting does not refill them early; :meth:`prune` forgets the rest.
    """

    send_rate: float
    send_burst: int
    request_rate: float
    request_burst: int
    users: dict[str, _User] = field(default_factory=dict)

    def opened(self, user: str, now: float) -> None:
        """A connection of ``user`` was authenticated."""
        entry = self.users.get(user)
        if entry is None:
            entry = self.users[user] = _User(
                TokenBucket(self.send_rate, self.send_burst, now),
                TokenBucket(self.request_rate, self.request_burst, now),
            )
        entry.conns += 1

    def closed(self, user: str) -> None:
        """A connection of ``user`` went away."""
        entry = self.users.get(user)
        if entry is not None:
            entry.conns -= 1

    def check(self, user: str, t: str, now: float) -> int:
        """Admit one request of type ``t``: 0 when admitted, else milliseconds to wait (>= 1).

        Every request takes a token from the request bucket, a ``send`` also one from the send
        bucket; a refused request takes none (so obeying ``retry_after_ms`` always succeeds).
        """
        entry = self.users.get(user)
        if entry is None:
            return 0
        wait = entry.requests.take(now)
        if wait > 0:
            return max(1, int(wait * 1000 + 0.999))
        if t == "send":
            wait = entry.sends.take(now)
            if wait > 0:
                entry.requests.tokens += 1.0  # give the request token back
                return max(1, int(wait * 1000 + 0.999))
        return 0

    def prune(self, now: float) -> int:
        """Forget users with no connection here whose buckets are full; returns how many."""
        gone = [u for u, e in self.users.items() if e.conns <= 0 and e.sends.full(now) and e.requests.full(now)]
        for user in gone:
            del self.users[user]
        return len(gone)


#: Refused requests whose retry time a connection remembers (oldest forgotten first).
REFUSALS_REMEMBERED = 256


@dataclass
class RefusalWindow:
    """Counts the ``rate_limited`` answers of one connection that show abuse, in fixed windows of
    ``window_s`` seconds; one over ``max_refusals`` in a window closes the connection (4429).

    Not every refusal counts (issue 14, defect 3). A client with k requests in flight that obeys
    each ``retry_after_ms`` is refused about k - 1 times per refill of the bucket (its waiting
    requests all come back when the next token is due and one of them gets it), plus the new
    request it sends after each success: counting each refusal closed such a client within a
    second at the default rates. So, per refused request, identified by ``key`` (the hub uses
    ``(conv, cmid)`` for a send, the type and scalar fields for other requests):

    ============================================  ===============================================
    the refused request is                        counts toward ``max_refusals``
    ============================================  ===============================================
    a retry that came at or after its told time   never (it obeyed ``retry_after_ms``)
    a retry that came before its told time        always (it ignored ``retry_after_ms``)
    a new request                                 the first one in each refill window (from a
                                                  refusal until the next token is due) is free,
                                                  every further one in that window counts
    ============================================  ===============================================

    So a client that obeys is never closed, however many requests it has in flight, and one that
    re-sends before its time or fires new requests at an empty bucket is closed as before.
    ``key=None`` counts every refusal (the rule before this one).
    """

    max_refusals: int
    window_s: float
    start: float = 0.0
    count: int = 0
    told: dict[Hashable, float] = field(default_factory=dict)  # key -> when it was told to come back
    fresh_until: float = -1.0  # end of the refill window whose free new-request refusal is used

    def refused(self, now: float, key: Hashable | None = None, retry_after_s: float = 0.0) -> bool:
        """Count one refusal of request ``key``, told to come back in ``retry_after_s`` seconds;
        True when it is one too many (the hub closes with 4429)."""
        if now - self.start >= self.window_s:
            self.start, self.count = now, 0
        counts = True
        if key is not None:
            due = self.told.pop(key, None)
            if due is not None:
                counts = now < due  # a retry: it counts only when it came too early
            elif now >= self.fresh_until:
                counts = False  # the first new request refused in this refill window
                self.fresh_until = now + retry_after_s
            self.told[key] = now + retry_after_s
            if len(self.told) > REFUSALS_REMEMBERED:
                del self.told[next(iter(self.told))]
        if counts:
            self.count += 1
        return 0 < self.max_refusals < self.count


@dataclass
class AddressRates:
    """New connections per IP address: a token bucket each (``conn_rate_per_address_per_s``,
    ``conn_burst_per_address``) and a count of open ones (``max_conns_per_address``, 0 = no limit).

    At most ``max_tracked`` buckets are kept: when that many addresses are all busy, new addresses
    are refused until some go quiet (memory stays bounded under a spray of addresses). The hub
    passes an IPv6 address as its /64 network, the unit one subscriber usually holds.
    """

    rate: float
    burst: int
    max_open: int
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    open: dict[str, int] = field(default_factory=dict)
    max_tracked: int = 100000

    def admit(self, address: str, now: float) -> float:
        """Admit a new connection from ``address``: 0.0, or the seconds to wait before the next one."""
        if self.max_open and self.open.get(address, 0) >= self.max_open:
            return 1.0
        if self.rate <= 0:
            return 0.0
        bucket = self.buckets.get(address)
        if bucket is None:
            if len(self.buckets) >= self.max_tracked and not self.prune(now):
                return 1.0  # max_tracked addresses all busy at once: refuse rather than grow
            bucket = self.buckets[address] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def opened(self, address: str) -> None:
        """A connection from ``address`` is open."""
        self.open[address] = self.open.get(address, 0) + 1

    def closed(self, address: str) -> None:
        """A connection from ``address`` closed."""
        left = self.open.get(address, 0) - 1
        if left > 0:
            self.open[address] = left
        else:
            self.open.pop(address, None)

    def prune(self, now: float) -> int:
        """Forget full buckets (addresses that have been quiet); returns how many."""
        gone = [a for a, b in self.buckets.items() if b.full(now)]
        for address in gone:
            del self.buckets[address]
        return len(gone)
