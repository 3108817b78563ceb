"""Rate limits of a hub: plain token buckets and the tables that hold them (docs/security.md).

No I/O and no clock of its own: every method takes ``now`` (seconds, monotonic), so tests drive
time by hand. The hub asks :class:`UserRates` before it dispatches each request and
:class:`AddressRates` before it accepts each WebSocket handshake.

Scope: buckets are per hub. A user whose devices are connected to two hubs gets each hub's rate
(at most ``hubs`` x the configured rate overall); a shared bucket would cost a remote call per
request. The number of a user's connections is bounded over all hubs by the session shard instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TokenBucket", "UserRates", "RefusalWindow", "AddressRates"]


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


@dataclass
class RefusalWindow:
    """Counts ``rate_limited`` answers of one connection in fixed windows of ``window_s`` seconds."""

    max_refusals: int
    window_s: float
    start: float = 0.0
    count: int = 0

    def refused(self, now: float) -> bool:
        """Count one refusal; True when it is one too many (the hub closes with 4429)."""
        if now - self.start >= self.window_s:
            self.start, self.count = now, 0
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
