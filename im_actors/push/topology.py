"""RabbitMQ names and declarations of offline push (DESIGN.md section 6).

Every name carries ``config.amqp_prefix`` (``<deployment>.`` or empty), so deployments and test runs
sharing one broker never see each other's jobs::

    <p>im.push         exchange, direct, durable
    <p>im.push.jobs    durable queue, bound to the exchange with routing key "job"; workers consume it
    <p>im.push.retry   durable queue, no consumer: a job is published to it through the default exchange
                       with a per-message ``expiration`` (ms); when that runs out RabbitMQ dead-letters it
                       to the exchange with routing key "job", i.e. back into the work queue
    <p>im.push.dead    durable queue, no consumer: jobs that failed for good (an operator looks at them)

# BUG: RabbitMQ expires per-message TTLs only at the head of a queue, so a job with a long delay at the
# head of the retry queue holds back shorter-delayed jobs behind it until it expires (at most
# :data:`MAX_RETRY_DELAY_MS`). One retry queue per delay level would remove this.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiormq.abc import AbstractChannel

from im_actors.config import Config

__all__ = [
    "ROUTING_KEY",
    "MAX_RETRY_DELAY_MS",
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


@dataclass(frozen=True)
class PushNames:
    """The exchange and queue names of one deployment."""

    exchange: str
    jobs: str
    retry: str
    dead: str
    routing_key: str = ROUTING_KEY


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
    """Declare the exchange, the three queues and the binding (idempotent); returns the names.

    Raises aiormq's errors: ``ChannelPreconditionFailed`` when a queue exists with other arguments,
    ``AMQPConnectionError`` and friends when the broker goes away.
    """
    names = push_names(config)
    await channel.exchange_declare(names.exchange, exchange_type="direct", durable=True)
    await channel.queue_declare(names.jobs, durable=True)
    await channel.queue_bind(names.jobs, names.exchange, routing_key=names.routing_key)
    await channel.queue_declare(
        names.retry,
        durable=True,
        arguments={"x-dead-letter-exchange": names.exchange, "x-dead-letter-routing-key": names.routing_key},
    )
    await channel.queue_declare(names.dead, durable=True)
    return names


async def delete_topology(channel: AbstractChannel, config: Config) -> None:
    """Delete the queues and the exchange of ``config`` with everything in them (tests clean up with it)."""
    names = push_names(config)
    for queue in (names.jobs, names.retry, names.dead):
        await channel.queue_delete(queue)
    await channel.exchange_delete(names.exchange)
