"""Push providers and the registry that makes them by name.

``make_provider("webhook", config)`` returns a :class:`~im_actors.push.providers.base.Provider`;
``PROVIDERS`` lists the names that exist; ``make_providers(config)`` makes the ones in
``config.push_providers`` (jobs for any other go to the dead queue of the worker).

::

    apns.py     Apple Push Notification service, HTTP/2, ES256 provider token
    fcm.py      Firebase Cloud Messaging HTTP v1, service-account OAuth 2.0 token
    huawei.py   Huawei Push Kit, client-credentials OAuth 2.0 token
    xiaomi.py   Xiaomi MiPush, AppSecret key
    webhook.py  POST with an HMAC-SHA256 signature
    log.py      the log (demos, load tests)
    http.py     what the HTTP providers share (timeouts, token cache)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from im_actors.config import Config
from im_actors.errors import ConfigError
from im_actors.push.providers.apns import ApnsProvider
from im_actors.push.providers.base import Outcome, OutcomeKind, Provider
from im_actors.push.providers.fcm import FcmProvider
from im_actors.push.providers.huawei import HuaweiProvider
from im_actors.push.providers.log import LogProvider
from im_actors.push.providers.webhook import WebhookProvider
from im_actors.push.providers.xiaomi import XiaomiProvider

__all__ = [
    "Outcome",
    "OutcomeKind",
    "Provider",
    "LogProvider",
    "WebhookProvider",
    "ApnsProvider",
    "FcmProvider",
    "HuaweiProvider",
    "XiaomiProvider",
    "PROVIDERS",
    "make_provider",
    "make_providers",
]

#: Provider name -> factory taking the Config. Read-only.
PROVIDERS: Mapping[str, Callable[[Config], Provider]] = MappingProxyType(
    {
        "apns": ApnsProvider,
        "fcm": FcmProvider,
        "huawei": HuaweiProvider,
        "xiaomi": XiaomiProvider,
        "webhook": WebhookProvider,
        "log": LogProvider,
    }
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
    """One provider of each of ``names`` (default: ``config.push_providers``), keyed by name, for a worker.

    Raises :class:`ConfigError` naming the key when an enabled provider's configuration is unusable
    (a key file that cannot be read, for instance).
    """
    return {name: make_provider(name, config) for name in (names if names is not None else config.push_providers)}
