"""Client tokens: HS256 JWTs with claims ``sub`` (user id) and ``exp`` (PROTOCOL.md section 1)."""

from __future__ import annotations

import time

import jwt

from im_actors import ids
from im_actors.config import Config
from im_actors.errors import CLOSE_AUTH, CloseConnection

__all__ = ["issue_token", "verify_token"]

_ALGORITHM = "HS256"


def issue_token(config: Config, user: str) -> str:
    """A token for ``user`` valid ``jwt_ttl_s`` seconds (development login and tests)."""
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + config.jwt_ttl_s}, config.jwt_secret, algorithm=_ALGORITHM)


def verify_token(config: Config, token: str) -> str:
    """The user id a token was issued to.

    Raises :class:`CloseConnection` 4401 for a forged, malformed or expired token, or one whose
    ``sub`` is not a valid user id.
    """
    try:
        claims = jwt.decode(token, config.jwt_secret, algorithms=[_ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise CloseConnection(CLOSE_AUTH, "token expired") from None
    except jwt.PyJWTError:
        raise CloseConnection(CLOSE_AUTH, "invalid token") from None
    user = claims.get("sub")
    if not ids.valid_id(user):
        raise CloseConnection(CLOSE_AUTH, "token subject is not a valid user id")
    assert isinstance(user, str)
    return user
