"""Push providers and the registry that makes them by name.

``make_provider("webhook", config)`` returns a :class:`~im_actors.push.providers.base.Provider`;
``PROVIDERS`` lists the names that exist (``"apns"`` and ``"fcm"`` are not written yet: jobs for them
go to the dead queue of a worker that has no such provider).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from im_actors.config import Config
from im_actors.errors import ConfigError
from im_actors.push.providers.base import Outcome, OutcomeKind, Provider
from im_actors.push.providers.log import LogProvider
from im_actors.push.providers.webhook import WebhookProvider

__all__ = [
    "Outcome",
    "OutcomeKind",
    "Provider",
    "LogProvider",
    "WebhookProvider",
    "PROVIDERS",
    "make_provider",
    "make_providers",
]

#: Provider name -> factory taking the Config. Read-only.
PROVIDERS: Mapping[str, Callable[[Config], Provider]] = MappingProxyType(
    {"webhook": WebhookProvider, "log": LogProvider}
)


def make_provider(name: str, config: Config) -> Provider:
    """A new provider called ``name`` configured from ``config``; raises :class:`ConfigError` for an
    unknown name."""
    try:
        factory = PROVIDERS[name]
    except KeyError:
        raise ConfigError(f"unknown push provider {name!r} (known: {', '.join(sorted(PROVIDERS))})") from None
    return factory(config)


def make_providers(config: Config, names: tuple[str, ...] | None = None) -> dict[str, Provider]:
    """One provider of each of ``names`` (default: all of :data:`PROVIDERS`), keyed by name, for a worker."""
    return {name: make_provider(name, config) for name in (names if names is not None else tuple(PROVIDERS))}
