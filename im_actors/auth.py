"""Client tokens: JWTs with claims ``sub`` (user id) and ``exp`` (PROTOCOL.md section 1).

Signed HS256 with ``jwt_secret`` or RS256 with the key pair whose public half is
``jwt_public_key`` (``jwt_algorithm``). Only the configured algorithm is accepted, so neither an
unsigned token (``alg: none``) nor an HS256 token "signed" with the RS256 public key as a secret
(algorithm confusion) is believed. ``aud`` and ``iss`` are required when configured.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

from im_actors import ids
from im_actors.config import Config
from im_actors.errors import CLOSE_AUTH, TOKEN_EXPIRED, CloseConnection, ConfigError

__all__ = ["issue_token", "verify_token", "verify_token_expiry"]


def _signing_key(config: Config) -> str:
    if config.jwt_algorithm == "RS256":
        if not config.jwt_private_key:
            raise ConfigError("jwt_private_key is required to issue RS256 tokens (development login)")
        return config.jwt_private_key
    return config.jwt_secret


def issue_token(config: Config, user: str, ttl_s: int | None = None) -> str:
    """A token for ``user`` valid ``ttl_s`` seconds (default ``jwt_ttl_s``), for development login
    and tests. Raises :class:`ConfigError` under RS256 without ``jwt_private_key``."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + (config.jwt_ttl_s if ttl_s is None else ttl_s)}
    if config.jwt_audience:
        claims["aud"] = config.jwt_audience
    if config.jwt_issuer:
        claims["iss"] = config.jwt_issuer
    return jwt.encode(claims, _signing_key(config), algorithm=config.jwt_algorithm)


def verify_token(config: Config, token: str) -> str:
    """The user id a token was issued to; see :func:`verify_token_expiry` for what is raised."""
    return verify_token_expiry(config, token)[0]


def verify_token_expiry(config: Config, token: str) -> tuple[str, float]:
    """``(user id, exp)``: who a token was issued to and when it runs out (s since the epoch).

    Raises :class:`CloseConnection` 4401 for a forged, malformed or expired token, one signed with
    another algorithm than ``jwt_algorithm``, one missing ``sub`` or ``exp`` (or a configured
    ``aud``/``iss``), or one whose ``sub`` is not a valid user id (PROTOCOL.md sections 3 and 7).
    """
    key = config.jwt_public_key if config.jwt_algorithm == "RS256" else config.jwt_secret
    if not key:  # an empty HS256 secret would let anyone sign: refuse every token instead
        raise CloseConnection(CLOSE_AUTH, "the server has no token key configured")
    required = ["sub", "exp"] + (["aud"] if config.jwt_audience else []) + (["iss"] if config.jwt_issuer else [])
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[config.jwt_algorithm],
            audience=config.jwt_audience or None,
            issuer=config.jwt_issuer or None,
            leeway=config.jwt_leeway_s,
            options={"require": required, "verify_aud": bool(config.jwt_audience)},
        )
    except jwt.ExpiredSignatureError:
        raise CloseConnection(CLOSE_AUTH, TOKEN_EXPIRED) from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise CloseConnection(CLOSE_AUTH, "invalid token") from None
    user = claims.get("sub")
    if not ids.valid_id(user):
        raise CloseConnection(CLOSE_AUTH, "token subject is not a valid user id")
    assert isinstance(user, str)
    return user, float(claims["exp"])
