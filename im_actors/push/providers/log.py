"""The ``log`` provider: writes each job to the log and calls it delivered (demos, load tests)."""

from __future__ import annotations

import logging

from im_actors.config import Config
from im_actors.push.jobs import PushJob
from im_actors.push.providers.base import Outcome, Provider

__all__ = ["LogProvider"]

log = logging.getLogger(__name__)


class LogProvider(Provider):
    """Logs ``job`` at INFO on logger ``im_actors.push.providers.log``; always :meth:`Outcome.delivered`."""

    name = "log"

    def __init__(self, config: Config | None = None) -> None:
        self.sent = 0

    async def send(self, job: PushJob) -> Outcome:
        """Log the job (token left out) and answer delivered."""
        self.sent += 1
        log.info(
            "push %s to %s/%s: conv=%s seq=%d from=%s badge=%d preview=%r",
            job["job_id"],
            job["user"],
            job["device"],
            job["conv"],
            job["seq"],
            job["sender"],
            job["badge"],
            job["preview"],
        )
        return Outcome.delivered()
