"""TLS for the router (HTTPS) and the hubs (WSS) from ``tls_cert_file`` and ``tls_key_file``."""

from __future__ import annotations

import ssl

from im_actors.config import Config
from im_actors.errors import ConfigError

__all__ = ["server_context"]


def server_context(config: Config) -> ssl.SSLContext | None:
    """A server-side TLS context (TLS 1.2 or newer) loaded from the configured PEM files, or None
    when TLS is not configured. Raises :class:`ConfigError` naming the key when a file is missing
    or is not a matching certificate and key."""
    if not config.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls_cert_file / tls_key_file ({config.tls_cert_file}, {config.tls_key_file}): {exc}"
        ) from None
    return ctx
