"""What travels between actors on the hot path: a send, its answer, the stage stamps of a traced one.

Plain values with no I/O and no storage imports, so the hub (which never touches storage) imports
them without pymongo. The hub hands a conversation shard a batch of :class:`SendItem`; the shard
answers each with an :data:`Answer`: an ack (:func:`ack_answer`) or an error (:func:`err_answer`),
in the batch's order, a batch mixing conversations so one item's failure does not fail the others.
The hub turns an answer into the client's ``ack`` or ``err`` frame with
:func:`im_actors.protocol.answer_frame`.

A committed entry travels as a dict ``{conv, seq, sender, cmid, ts, kind, body, meta}`` (see
:mod:`im_actors.store`), with ``trace`` added on its way to recipients when the send was traced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from im_actors.errors import RequestError

__all__ = ["SendItem", "Answer", "ack_answer", "err_answer", "stamp"]

#: A conversation shard's answer to one send: ``{"conv", "seq", "ts", "dup"}`` (an ack) or
#: ``{"err": code, "msg", "retry", ...extra such as retry_after_ms}`` (an error). An ack of a new
#: entry may carry ``"copies": (entry, [connection id, ...])``: the entry's copies for connections on
#: the hub that asked, queued by it after the ack (config ``answer_copies``).
Answer = dict[str, Any]


@dataclass
class SendItem:
    """One send as the hub hands it over: who, where, what."""

    sender: str
    conv: str
    cmid: str
    body: str | bytes
    kind: str = "text"
    meta: dict[str, Any] | None = None
    trace: dict[str, float] | None = None  # stage -> ms since the epoch, for a sampled send (trace_sample)


def ack_answer(conv: str, seq: int, ts: int, dup: bool) -> Answer:
    """The answer to a committed send (``dup``: the cmid was committed before, with this seq)."""
    return {"conv": conv, "seq": seq, "ts": ts, "dup": dup}


def err_answer(exc: RequestError) -> Answer:
    """The answer to a send that failed with ``exc`` (its code, message, retry flag and extras)."""
    return {"err": exc.code, "msg": exc.msg, "retry": exc.retry, **exc.extra}


def stamp(trace: dict[str, float] | None, stage: str) -> None:
    """Record that a sampled send reached ``stage`` now (ms since the epoch, float); no-op for
    ``None``, the unsampled case. The stages, in order: ``hub_in`` (decoded by its hub),
    ``shard_in`` (its batch reached the conversation shard), ``seq`` (numbered), ``committed``
    (MongoDB confirmed), ``fanout`` (routed to hubs by the conversation shard, or by a session
    shard with ``fanout_via = "session"``), ``hub_queued`` (queued on the recipient's
    connection); clients see them in ``msg.trace`` (config ``trace_sample``)."""
    if trace is not None:
        trace[stage] = time.time() * 1000.0
