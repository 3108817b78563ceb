"""Push jobs: the plain, msgpack-serialisable dicts that travel through RabbitMQ (DESIGN.md section 6).

A job is a ``dict`` with exactly these keys (see :data:`JOB_FIELDS`)::

    job_id        str   "<user>/<device>/<conv>/<seq>": unique per (device, conversation, seq); the
                        AMQP message_id, and the X-Im-Job header receivers deduplicate on
    user          str   recipient user id
    device        str   recipient device id
    provider      str   "webhook", "log" (later "apns", "fcm", ...): which Provider delivers it
    token         str   the device's push token for that provider (a URL for "webhook")
    conv          str   conversation id
    seq           int   seq of the entry being announced (>= 1)
    sender        str   user id of the entry's sender
    preview       str   at most PREVIEW_MAX characters of the body ("" for a binary body)
    badge         int   unread count to show (>= 0)
    collapse_key  str   pushes with the same key replace each other on the device (default: conv)
    attempt       int   provider attempts already made (0 for a new job)
    created_ms    int   creation time, ms since the Unix epoch

No I/O here: :func:`make_job` builds a job, :func:`encode_job` and :func:`decode_job` turn it into
bytes and back (decode validates and raises :class:`BadJob`), :func:`next_attempt` copies it for a retry.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

__all__ = [
    "PushJob",
    "JOB_FIELDS",
    "PREVIEW_MAX",
    "BadJob",
    "job_id_of",
    "preview_of",
    "make_job",
    "encode_job",
    "decode_job",
    "check_job",
    "next_attempt",
]

#: A push job (see the module docstring for its keys).
PushJob = dict[str, Any]

#: Longest preview, in characters (not bytes).
PREVIEW_MAX = 100

#: Every key of a job and its type.
JOB_FIELDS: dict[str, type] = {
    "job_id": str,
    "user": str,
    "device": str,
    "provider": str,
    "token": str,
    "conv": str,
    "seq": int,
    "sender": str,
    "preview": str,
    "badge": int,
    "collapse_key": str,
    "attempt": int,
    "created_ms": int,
}


class BadJob(ValueError):
    """Bytes or a dict that are not a well-formed push job (the message names what is wrong)."""


def job_id_of(user: str, device: str, conv: str, seq: int) -> str:
    """The job id of the push for entry ``seq`` of ``conv`` to ``device`` of ``user``."""
    return f"{user}/{device}/{conv}/{seq}"


def preview_of(body: str | bytes) -> str:
    """At most :data:`PREVIEW_MAX` characters of a message body; ``""`` for a binary body."""
    if isinstance(body, str):
        return body[:PREVIEW_MAX]
    return ""


def make_job(
    *,
    user: str,
    device: str,
    provider: str,
    token: str,
    conv: str,
    seq: int,
    sender: str,
    body: str | bytes = "",
    badge: int = 0,
    collapse_key: str | None = None,
    created_ms: int | None = None,
) -> PushJob:
    """A new job (``attempt`` 0) announcing entry ``seq`` of ``conv`` from ``sender`` to one device.

    ``body`` is cut to a :func:`preview_of` it; ``collapse_key`` defaults to ``conv``; ``created_ms``
    defaults to now. Raises :class:`BadJob` when a field has the wrong type or ``seq < 1``.
    Hand the result to :meth:`PushPublisher.publish <im_actors.push.publisher.PushPublisher.publish>`.
    """
    job: PushJob = {
        "job_id": job_id_of(user, device, conv, seq),
        "user": user,
        "device": device,
        "provider": provider,
        "token": token,
        "conv": conv,
        "seq": seq,
        "sender": sender,
        "preview": preview_of(body),
        "badge": badge,
        "collapse_key": conv if collapse_key is None else collapse_key,
        "attempt": 0,
        "created_ms": int(time.time() * 1000) if created_ms is None else created_ms,
    }
    return check_job(job)


def check_job(job: Any) -> PushJob:
    """Return ``job`` when it is a well-formed job, else raise :class:`BadJob` naming the problem.

    Extra keys are refused too: a job is exactly :data:`JOB_FIELDS`.
    """
    if not isinstance(job, dict):
        raise BadJob(f"a job is a map, not {type(job).__name__}")
    missing = [k for k in JOB_FIELDS if k not in job]
    if missing:
        raise BadJob(f"job lacks {', '.join(missing)}")
    extra = [str(k) for k in job if k not in JOB_FIELDS]
    if extra:
        raise BadJob(f"job has unknown keys {', '.join(sorted(extra))}")
    for key, typ in JOB_FIELDS.items():
        value = job[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise BadJob(f"job.{key} must be {typ.__name__}, not {type(value).__name__}")
    if job["seq"] < 1:
        raise BadJob("job.seq must be >= 1")
    if job["attempt"] < 0 or job["badge"] < 0:
        raise BadJob("job.attempt and job.badge must be >= 0")
    if len(job["preview"]) > PREVIEW_MAX:
        raise BadJob(f"job.preview is over {PREVIEW_MAX} characters")
    return job


def encode_job(job: PushJob) -> bytes:
    """The msgpack bytes of ``job`` (validated first; raises :class:`BadJob`)."""
    return msgpack.packb(check_job(job), use_bin_type=True)


def decode_job(data: bytes) -> PushJob:
    """The job in msgpack ``data``; raises :class:`BadJob` for undecodable or malformed bytes."""
    try:
        job = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BadJob(f"undecodable job: {exc}") from None
    return check_job(job)


def next_attempt(job: PushJob) -> PushJob:
    """A copy of ``job`` with ``attempt`` one higher (what goes to the retry queue)."""
    return {**job, "attempt": job["attempt"] + 1}
