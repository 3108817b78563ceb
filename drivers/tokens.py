"""Client tokens for load runs against real deployments (no development login).

A :class:`TokenSource` says where each simulated user's token comes from:

- minted here, per user, with PyJWT: HS256 signed with the deployment's ``jwt_secret``
  (``--jwt-secret``), or RS256/ES256 signed with a private key whose public half the deployment
  checks (``--jwt-key FILE``, PEM); claims ``sub`` (the user id), ``iat``, ``exp`` (now + ``ttl_s``),
  and ``aud`` / ``iss`` when given, as the hub verifies them (``im_actors.auth``);
- read from a token file (``--token-file``): a JSON object ``{"<user id>": "<token>", ...}``, or lines
  ``<user id> <token>`` (blank lines and ``#`` comments skipped); the user ids must then be known
  before the run, so pass ``--user-prefix`` (the synthetic users are ``<prefix>s0``, ``<prefix>s1``, ...);
- neither: the router's development login (``POST /v1/login``), the default.

It is plain data (picklable: the runner ships it to its worker processes, which mint there).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

__all__ = ["TokenSource"]


@dataclass(frozen=True)
class TokenSource:
    """Where the clients' tokens come from (see the module docstring). ``ttl_s``: lifetime of minted
    tokens (s); ``algorithm`` of minted tokens (``HS256`` with ``secret``; ``RS256`` or ``ES256`` with
    ``private_key``, a PEM string)."""

    secret: str = ""
    private_key: str = ""
    algorithm: str = ""
    ttl_s: int = 3600
    audience: str = ""
    issuer: str = ""
    tokens: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.secret and self.private_key:
            raise ValueError("give a JWT secret or a private key, not both")
        if self.tokens and (self.secret or self.private_key):
            raise ValueError("give a token file or a way to mint tokens, not both")
        if not self.algorithm:
            object.__setattr__(self, "algorithm", "HS256" if self.secret else "RS256")
        if self.secret and self.algorithm != "HS256":
            raise ValueError(f"a JWT secret signs HS256, not {self.algorithm}")
        if self.private_key and self.algorithm not in ("RS256", "ES256"):
            raise ValueError(f"a private key signs RS256 or ES256, not {self.algorithm}")
        if self.ttl_s < 1:
            raise ValueError("the token lifetime must be at least 1 s")

    @property
    def dev_login(self) -> bool:
        """True when the clients log in through the router's development login."""
        return not (self.secret or self.private_key or self.tokens)

    @classmethod
    def from_key_file(cls, path: str | Path, **kw: Any) -> TokenSource:
        """Mint with the PEM private key at ``path``; raises OSError, or ValueError for a file that is
        not a PEM private key."""
        pem = Path(path).read_text(encoding="utf-8")
        if "PRIVATE KEY" not in pem:
            raise ValueError(f"{path}: not a PEM private key")
        if "EC PRIVATE KEY" in pem and "algorithm" not in kw:
            kw["algorithm"] = "ES256"
        return cls(private_key=pem, **kw)

    @classmethod
    def from_token_file(cls, path: str | Path) -> TokenSource:
        """The tokens of a token file (JSON object or ``user token`` lines); ValueError for a bad one."""
        text = Path(path).read_text(encoding="utf-8")
        tokens: dict[str, str] = {}
        if text.lstrip().startswith("{"):
            data = json.loads(text)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
                raise ValueError(f"{path}: a JSON token file maps user ids to token strings")
            tokens = dict(data)
        else:
            for n, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{path}:{n}: expected '<user id> <token>'")
                tokens[parts[0]] = parts[1]
        if not tokens:
            raise ValueError(f"{path}: no tokens")
        return cls(tokens=tokens)

    def token_for(self, user: str, now: float | None = None) -> str | None:
        """The token of ``user`` (None: use development login). Raises KeyError naming the user when a
        token file has none for it."""
        if self.tokens:
            try:
                return self.tokens[user]
            except KeyError:
                raise KeyError(f"the token file has no token for user {user!r}") from None
        if self.dev_login:
            return None
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {"sub": user, "iat": issued, "exp": issued + self.ttl_s}
        if self.audience:
            claims["aud"] = self.audience
        if self.issuer:
            claims["iss"] = self.issuer
        return jwt.encode(claims, self.secret or self.private_key, algorithm=self.algorithm)
