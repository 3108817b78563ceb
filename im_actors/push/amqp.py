"""The AMQP plumbing the push publisher and worker share: the broker URL, opening a confirmed channel
with the push topology declared, reconnect backoff, and waiting for a connection to end.

Errors of the broker (aiormq's ``AMQPError`` tree, ``ConnectionError``, ``OSError``, timeouts) are
left to the callers, whose reconnect loops treat every one of them as "the broker went away".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection

from im_actors.config import Config
from im_actors.push.topology import PushNames, declare_topology

__all__ = [
    "DEFAULT_RABBITMQ_URL",
    "CONNECT_TIMEOUT_S",
    "Backoff",
    "rabbitmq_url",
    "open_channel",
    "wait_closed",
    "close_quietly",
]

log = logging.getLogger(__name__)

#: Broker used when ``config.rabbitmq_url`` is empty.
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: Longest wait for a connection, its channel and the topology declarations (s).
CONNECT_TIMEOUT_S = 10.0


def rabbitmq_url(config: Config) -> str:
    """``config.rabbitmq_url``, or :data:`DEFAULT_RABBITMQ_URL` when it is empty."""
    return config.rabbitmq_url or DEFAULT_RABBITMQ_URL


class Backoff:
    """Jittered exponential reconnect delays: ``first_s``, doubling up to ``max_s`` (each +-20%)."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0) -> None:
        self._first = first_s
        self._max = max_s
        self._next = first_s

    def reset(self) -> None:
        """Start again from ``first_s`` (after a connection that worked)."""
        self._next = self._first

    def next_delay(self) -> float:
        """The delay to sleep now (s); the one after it is twice as long, up to ``max_s``."""
        delay = self._next
        self._next = min(self._next * 2, self._max)
        return delay * random.uniform(0.8, 1.2)


async def open_channel(
    config: Config, *, prefetch: int | None = None
) -> tuple[AbstractConnection, AbstractChannel, PushNames]:
    """Connect to the broker, open a channel with publisher confirms, declare the push topology.

    ``prefetch`` sets ``basic_qos(prefetch_count=...)`` on the channel (consumers). Returns
    ``(connection, channel, names)``; the caller closes the connection. Raises whatever the broker or
    the network raise, or ``TimeoutError`` after :data:`CONNECT_TIMEOUT_S`; nothing is left open then.
    """
    connection: AbstractConnection | None = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            connection = await aiormq.connect(rabbitmq_url(config))
            channel = await connection.channel(publisher_confirms=True)
            names = await declare_topology(channel, config)
            if prefetch is not None:
                await channel.basic_qos(prefetch_count=prefetch)
        return connection, channel, names
    except BaseException:
        if connection is not None:
            await close_quietly(connection)
        raise


async def wait_closed(
    connection: AbstractConnection, channel: AbstractChannel, stop: asyncio.Event, *also: asyncio.Event
) -> bool:
    """Wait until the connection or the channel closes or one of ``also`` is set (False), or until
    ``stop`` is set (True)."""
    watchers = [
        asyncio.ensure_future(connection.closing),
        asyncio.ensure_future(channel.closing),
        asyncio.ensure_future(stop.wait()),
        *(asyncio.ensure_future(event.wait()) for event in also),
    ]
    try:
        await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watcher in watchers:
            watcher.cancel()
        for watcher in watchers:
            with contextlib.suppress(BaseException):
                await watcher
    return stop.is_set()


async def close_quietly(connection: AbstractConnection, timeout_s: float = 2.0) -> None:
    """Close ``connection``, ignoring every error (it is often already broken)."""
    try:
        await asyncio.wait_for(connection.close(), timeout_s)
    except Exception as exc:  # a dead connection can fail to close in many ways
        log.debug("closing %s: %r", connection, exc)
