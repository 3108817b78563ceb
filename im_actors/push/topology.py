"""RabbitMQ names and declarations of offline push (DESIGN.md section 6).

Every name carries ``config.amqp_prefix`` (``<deployment>.`` or empty), so deployments and test runs
sharing one broker never see each other's jobs::

    <p>im.push         exchange, direct, durable
    <p>im.push.jobs    durable queue, bound to the exchange with routing key "job"; workers consume it
    <p>im.push.retry.<ms>   durable queues, one per delay level (ms = 16, 32, ... 4194304: the powers of
                            two from MIN_RETRY_LEVEL_MS to MAX_RETRY_LEVEL_MS), no consumer, each with the
                            queue TTL x-message-ttl = <ms> and dead-lettered to the exchange with routing
                            key "job", i.e. back into the work queue after <ms>. A job waiting d ms goes to
                            the smallest level >= d (at most twice d; the largest level for longer waits)
    <p>im.push.dead    durable queue, no consumer: jobs that failed for good (an operator looks at them)

One queue per delay level, rather than one queue with a per-message TTL, because RabbitMQ expires
messages only at the head of a queue: a long wait (a Retry-After, a job held by another worker's
claim) at the head would hold back every shorter one behind it. Within a level all waits are equal, so
the head always expires first.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiormq.abc import AbstractChannel

from im_actors.config import Config

__all__ = [
    "ROUTING_KEY",
    "MAX_RETRY_DELAY_MS",
    "MIN_RETRY_LEVEL_MS",
    "MAX_RETRY_LEVEL_MS",
    "RETRY_LEVELS_MS",
    "retry_level_ms",
    "PushNames",
    "push_names",
    "retry_delay_ms",
    "declare_topology",
    "delete_topology",
]

#: Routing key from the exchange to the work queue.
ROUTING_KEY = "job"

#: Longest delay put on a job in the retry queue (ms), whatever the backoff or Retry-After says.
MAX_RETRY_DELAY_MS = 3600_000

#: Shortest and longest retry delay levels (ms): powers of two.
MIN_RETRY_LEVEL_MS = 1 << 4
MAX_RETRY_LEVEL_MS = 1 << 22

#: Every retry delay level (ms), shortest first.
RETRY_LEVELS_MS: tuple[int, ...] = tuple(1 << k for k in range(4, 23))


def retry_level_ms(delay_ms: int) -> int:
    """The delay level a wait of ``delay_ms`` goes to: the smallest level >= it, or the largest."""
    for level in RETRY_LEVELS_MS:
        if level >= delay_ms:
            return level
    return MAX_RETRY_LEVEL_MS


@dataclass(frozen=True)
class PushNames:
    """The exchange and queue names of one deployment. ``retry`` is the prefix of the retry queues:
    :meth:`retry_queue` names the one of a delay, :attr:`retry_queues` lists them all."""

    exchange: str
    jobs: str
    retry: str
    dead: str
    routing_key: str = ROUTING_KEY

    def retry_queue(self, delay_ms: int) -> str:
        """The retry queue a job waiting ``delay_ms`` goes to (``<retry>.<level ms>``)."""
        return f"{self.retry}.{retry_level_ms(delay_ms)}"

    @property
    def retry_queues(self) -> tuple[str, ...]:
        """Every retry queue, shortest delay first."""
        return tuple(f"{self.retry}.{level}" for level in RETRY_LEVELS_MS)


def push_names(config: Config) -> PushNames:
    """The names for ``config`` (``config.amqp_prefix`` in front of each)."""
    base = f"{config.amqp_prefix}im.push"
    return PushNames(exchange=base, jobs=f"{base}.jobs", retry=f"{base}.retry", dead=f"{base}.dead")


def retry_delay_ms(config: Config, attempt: int, retry_after_ms: int | None = None) -> int:
    """Delay (ms) before retrying a job whose attempt number ``attempt`` (0-based) just failed.

    ``push_retry_base_ms * 2**attempt``, or the provider's ``retry_after_ms`` when that is longer,
    capped at :data:`MAX_RETRY_DELAY_MS`.
    """
    backoff = config.push_retry_base_ms * (2 ** max(0, min(attempt, 40)))
    if retry_after_ms is not None:
        backoff = max(backoff, retry_after_ms)
    return max(1, min(backoff, MAX_RETRY_DELAY_MS))


async def declare_topology(channel: AbstractChannel, config: Config) -> PushNames:
    """Declare the exchange, the work, retry and dead queues and the binding (idempotent); returns the names.

    Raises aiormq's errors: ``ChannelPreconditionFailed`` when a queue exists with other arguments,
    ``AMQPConnectionError`` and friends when the broker goes away.
    """
    names = push_names(config)
    await channel.exchange_declare(names.exchange, exchange_type="direct", durable=True)
    await channel.queue_declare(names.jobs, durable=True)
    await channel.queue_bind(names.jobs, names.exchange, routing_key=names.routing_key)
    for level, queue in zip(RETRY_LEVELS_MS, names.retry_queues, strict=True):
        await channel.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-message-ttl": level,
                "x-dead-letter-exchange": names.exchange,
                "x-dead-letter-routing-key": names.routing_key,
            },
        )
    await channel.queue_declare(names.dead, durable=True)
    return names


async def delete_topology(channel: AbstractChannel, config: Config) -> None:
    """Delete the queues and the exchange of ``config`` with everything in them (tests clean up with it)."""
    names = push_names(config)
    for queue in (names.jobs, *names.retry_queues, names.dead):
        await channel.queue_delete(queue)
    await channel.exchange_delete(names.exchange)
