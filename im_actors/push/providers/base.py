"""What a push provider is: ``async send(job) -> Outcome`` (DESIGN.md section 6).

A provider delivers one job to one device through one service (APNs, FCM, a webhook, the log) and
says what happened as an :class:`Outcome`; it does not raise for anything the service or the network
does. The worker decides what follows from the outcome::

    delivered       ack the job
    invalid_token   the token will never work: remove it (on_invalid_token), ack, no retry
    retry           transient (429, 5xx, timeout, connection error): retry queue with backoff, or the
                    dead queue once push_max_attempts are used up; retry_after_ms is the service's wish
    failed          permanent for this job (a 4xx other than 404/410/429): dead queue
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from im_actors.push.jobs import PushJob

__all__ = ["OutcomeKind", "Outcome", "Provider"]


class OutcomeKind(StrEnum):
    """The four things a provider can answer."""

    DELIVERED = "delivered"
    INVALID_TOKEN = "invalid_token"
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    """A provider's answer to one job: ``kind``, an optional ``retry_after_ms`` (only with RETRY: the
    least delay the service asked for, ms) and a short ``detail`` for logs and the dead queue."""

    kind: OutcomeKind
    retry_after_ms: int | None = None
    detail: str = ""

    @classmethod
    def delivered(cls, detail: str = "") -> Outcome:
        """The service accepted the push."""
        return cls(OutcomeKind.DELIVERED, None, detail)

    @classmethod
    def invalid_token(cls, detail: str = "") -> Outcome:
        """The token is unknown or expired at the service: remove it, do not retry."""
        return cls(OutcomeKind.INVALID_TOKEN, None, detail)

    @classmethod
    def retry(cls, retry_after_ms: int | None = None, detail: str = "") -> Outcome:
        """A transient failure; try again after the backoff, or ``retry_after_ms`` when that is longer."""
        return cls(OutcomeKind.RETRY, retry_after_ms, detail)

    @classmethod
    def failed(cls, detail: str = "") -> Outcome:
        """A permanent failure of this job: it goes to the dead queue."""
        return cls(OutcomeKind.FAILED, None, detail)


class Provider(ABC):
    """Delivers push jobs through one service. Subclasses set :attr:`name` and implement :meth:`send`.

    Create providers with :func:`im_actors.push.providers.make_provider`; call :meth:`close` when done.
    """

    #: The value of ``job["provider"]`` this provider serves.
    name: ClassVar[str]

    @abstractmethod
    async def send(self, job: PushJob) -> Outcome:
        """Deliver ``job`` to ``job["token"]``; return the :class:`Outcome`. Must not raise for
        failures of the service or the network (those are outcomes); may be cancelled."""

    async def close(self) -> None:  # noqa: B027 - a provider without resources needs no close
        """Release sessions and connections (idempotent)."""
