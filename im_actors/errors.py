"""One exception tree, mapped one to one onto PROTOCOL.md's error codes and close codes.

::

    ImError                      base of everything im-actors raises on purpose
     +-- RequestError            answered with an ``err`` frame; the connection stays open
     |    +-- BadRequest         bad_request   (retry false)
     |    +-- Unauthorized       unauthorized  (retry false)
     |    +-- Forbidden          forbidden     (retry false)
     |    +-- TooLarge           too_large     (retry false)
     |    +-- Conflict           conflict      (retry false)
     |    +-- RateLimited        rate_limited  (retry true, carries retry_after_ms)
     |    +-- Unavailable        unavailable   (retry true: nothing was committed, resend the same cmid)
     |    |    +-- StorageUnavailable   MongoDB (or Redis where it is needed) did not answer: another
     |    |                             store writer would not do better, so the commit is not retried there
     |    +-- Internal           internal      (retry true: a bug, logged with the request id)
     +-- CloseConnection         the connection is closed with ``close_code`` (PROTOCOL.md section 7)
     +-- ConfigError             bad configuration, raised at start, names the key
     +-- ServiceError            a backing service (Redis, RabbitMQ, MongoDB) is missing and could not start
     |
     |   raised by the client library only (defined in im_actors/client.py):
     +-- ClientClosed            a call before Client.connect() or after Client.close()
     +-- ConnectionLost          the WebSocket closed while a request was in flight (``close_code``)
     +-- ConnectFailed           no hub reachable within the connect timeout (``hub``: the one that failed)

Source of the codes: PROTOCOL.md sections 6 and 7.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

__all__ = [
    "ImError",
    "RequestError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "TooLarge",
    "Conflict",
    "RateLimited",
    "Unavailable",
    "StorageUnavailable",
    "Internal",
    "CloseConnection",
    "ConfigError",
    "ServiceError",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_UTF8",
    "CLOSE_TOO_BIG",
    "CLOSE_PROTOCOL",
    "CLOSE_AUTH",
    "TOKEN_EXPIRED",
    "CLOSE_AUTH_TIMEOUT",
    "CLOSE_REPLACED",
    "CLOSE_RATE",
    "CLOSE_SLOW",
    "CLOSE_RECONNECT",
    "RECONNECT_CLOSE_CODES",
    "NO_RECONNECT_CLOSE_CODES",
    "error_from_frame",
]

# Close codes, PROTOCOL.md section 7.
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_UTF8 = 1007
CLOSE_TOO_BIG = 1009
CLOSE_PROTOCOL = 4400
CLOSE_AUTH = 4401
#: The reason of a 4401 close for a token that ran out during the connection: a client holding a
#: development-login token logs in again and reconnects; other clients bring a fresh token.
TOKEN_EXPIRED = "token expired"
CLOSE_AUTH_TIMEOUT = 4408
CLOSE_REPLACED = 4409
CLOSE_RATE = 4429
CLOSE_SLOW = 4508

#: PROTOCOL.md section 7's "reconnect?" column, the one source of both sets below: close code ->
#: whether a client reconnects after it. A code not in the table (1000, 1006 abnormal, 1011, ...) is a
#: transport failure, after which a client reconnects too.
CLOSE_RECONNECT: Mapping[int, bool] = MappingProxyType(
    {
        CLOSE_GOING_AWAY: True,
        CLOSE_INVALID_UTF8: False,
        CLOSE_TOO_BIG: False,
        CLOSE_PROTOCOL: False,
        CLOSE_AUTH: False,
        CLOSE_AUTH_TIMEOUT: True,
        CLOSE_REPLACED: False,
        CLOSE_RATE: True,
        CLOSE_SLOW: True,
    }
)
#: Close codes after which a client reconnects (to another hub where it makes sense).
RECONNECT_CLOSE_CODES = frozenset(code for code, again in CLOSE_RECONNECT.items() if again)
#: Close codes after which a client does not reconnect: invalid UTF-8, frame too big, protocol
#: violation, authentication failed, replaced by a newer connection of the same device.
NO_RECONNECT_CLOSE_CODES = frozenset(code for code, again in CLOSE_RECONNECT.items() if not again)


class ImError(Exception):
    """Base of every error im-actors raises on purpose."""


class RequestError(ImError):
    """A request failed; answered ``{"t": "err", "id", "code", "msg", "retry"}``, connection kept."""

    code: ClassVar[str] = "internal"
    retry: ClassVar[bool] = True

    def __init__(self, msg: str = "", **extra: Any) -> None:
        super().__init__(msg or self.code)
        self.msg = msg or self.code
        self.extra = extra
        #: The id of the request being answered, when the validator could read it.
        self.request_id: int | None = None

    def frame(self, request_id: int | None) -> dict[str, Any]:
        """The ``err`` frame for this error, answering request ``request_id``."""
        out: dict[str, Any] = {"t": "err", "id": request_id, "code": self.code, "msg": self.msg, "retry": self.retry}
        out.update(self.extra)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the message and extras when Ray pickles the error across actors.
        return (_rebuild, (type(self), self.msg, self.extra))


def _rebuild(cls: type[RequestError], msg: str, extra: dict[str, Any]) -> RequestError:
    return cls(msg, **extra)


class BadRequest(RequestError):
    """Malformed or missing fields."""

    code = "bad_request"
    retry = False


class Unauthorized(RequestError):
    """Token missing, forged or expired."""

    code = "unauthorized"
    retry = False


class Forbidden(RequestError):
    """Not a member, blocked or not allowed; the same answer whether or not the target exists."""

    code = "forbidden"
    retry = False


class TooLarge(RequestError):
    """Body over ``max_body_bytes``."""

    code = "too_large"
    retry = False


class Conflict(RequestError):
    """The cmid was already committed with a different body."""

    code = "conflict"
    retry = False


class RateLimited(RequestError):
    """Over the user's rate; the frame carries ``retry_after_ms``."""

    code = "rate_limited"
    retry = True


class Unavailable(RequestError):
    """A component could not commit now; nothing was committed; resend the same cmid."""

    code = "unavailable"
    retry = True


class StorageUnavailable(Unavailable):
    """Storage did not answer (raised only by :mod:`im_actors.store`, which maps MongoDB's and
    Redis's errors to it in one place). Answered ``unavailable`` like its parent; a caller that
    could retry elsewhere (a commit on another store writer) does not, since every writer talks
    to the same storage."""


class Internal(RequestError):
    """A bug; logged on the server with the request id."""

    code = "internal"
    retry = True


_BY_CODE: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (BadRequest, Unauthorized, Forbidden, TooLarge, Conflict, RateLimited, Unavailable, Internal)
}


def error_from_frame(frame: dict[str, Any]) -> RequestError:
    """The exception matching an ``err`` frame (client side); unknown codes become :class:`Internal`."""
    cls = _BY_CODE.get(str(frame.get("code")), Internal)
    extra = {k: v for k, v in frame.items() if k not in ("t", "id", "code", "msg", "retry")}
    return cls(str(frame.get("msg", "")), **extra)


class CloseConnection(ImError):
    """Close the connection with ``close_code`` (PROTOCOL.md section 7) and ``reason``."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(f"{close_code}: {reason}")
        self.close_code = close_code
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (CloseConnection, (self.close_code, self.reason))


class ConfigError(ImError):
    """Bad configuration, raised at start; the message names the key."""


class ServiceError(ImError):
    """A backing service (Redis, RabbitMQ, MongoDB) is missing and could not be started."""
