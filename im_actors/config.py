"""The frozen configuration object and its loaders (DESIGN.md section 7).

Precedence, highest first: command-line flags (keyword overrides), ``IM_*`` environment variables,
a TOML file, the defaults below. Nothing reads the environment at import time: only
:func:`load_config` does, once, in the process that deploys; every actor gets the resulting frozen
:class:`Config` at creation.

Every field's unit is in its description; ``0`` means "none" or "off" where it says so.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from im_actors.errors import ConfigError

__all__ = ["Config", "load_config"]

#: Push provider name -> the keys it needs (checked only when the provider is in push_providers).
_PROVIDER_KEYS: dict[str, tuple[str, ...]] = {
    "apns": ("apns_key_file", "apns_key_id", "apns_team_id", "apns_topic"),
    "fcm": ("fcm_credentials_file",),
    "huawei": ("huawei_app_id", "huawei_client_secret"),
    "xiaomi": ("xiaomi_app_secret", "xiaomi_package_name"),
    "webhook": (),
    "log": (),
}

_TOML_PATH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("im_toml_path", default=None)


class Config(BaseSettings):
    """Every knob of an im-actors deployment. Frozen: build a new one with ``model_copy(update=...)``."""

    model_config = SettingsConfigDict(env_prefix="IM_", frozen=True, extra="forbid", validate_default=True)

    # --- topology ---
    deployment: str = Field(
        "", description="prefix of actor names, Redis keys and RabbitMQ names; separates deployments on one cluster"
    )
    hubs: int = Field(2, ge=1, description="hub actors")
    session_shards: int = Field(1, ge=1, description="Ray actors hosting per-user sessions")
    conv_shards: int = Field(1, ge=1, description="Ray actors hosting per-conversation sequencers")
    group_shards: int = Field(1, ge=1, description="Ray actors hosting groups")
    store_writers: int = Field(
        0,
        ge=0,
        description="store writer actors (0: conversation shards commit to storage themselves, "
        "one Ray hop and one process less per send: the faster choice on small machines)",
    )
    push_workers: int = Field(1, ge=0, description="push worker actors (0: no offline push)")
    placement: Literal["spread", "pack"] = Field(
        "spread",
        description=(
            "spread: the i-th hub, session and conversation shard on the i-th alive node "
            "(soft affinity, round robin); pack: wherever Ray places them"
        ),
    )

    # --- network ---
    host: str = Field("127.0.0.1", description="address hubs and the router listen on")
    advertise_host: str = Field(
        "", description="host put in hub URLs; empty = the Ray node's IP, or host when that is loopback"
    )
    router_port: int = Field(8080, ge=0, le=65535, description="router HTTP port (0 = any free port)")
    hub_port: int = Field(
        0, ge=0, le=65535, description="first hub WebSocket port; hub i uses hub_port+i (0 = any free port)"
    )

    # --- backing services ---
    redis_url: str = Field("", description="Redis URL; empty = redis://127.0.0.1:6379/0 when it answers")
    rabbitmq_url: str = Field("", description="AMQP URL; empty = amqp://guest:guest@127.0.0.1:5672/ when it answers")
    mongo_url: str = Field("", description="MongoDB URL; empty = start a local SecantusDB process for the run")
    mongo_db: str = Field("im", description="MongoDB database name")
    mongo_write_concern: Literal["majority", "1"] = Field(
        "majority", description="write concern of history commits (w=0 is not offered: a commit must be acknowledged)"
    )
    mongo_timeout_ms: int = Field(
        5000,
        ge=100,
        description="bound of one MongoDB operation, retries, server selection and socket waits included (ms; "
        "pymongo's timeoutMS); a commit makes at most three in a row",
    )
    mongo_max_idle_ms: int = Field(
        60_000,
        ge=100,
        description="a pooled MongoDB connection idle this long is closed by the client (ms; pymongo's "
        "maxIdleTimeMS): below the server's own idle timeout (SecantusDB: 300 s; proxies and load balancers "
        "have theirs), else the next write on it fails (AutoReconnect) where it cannot be retried; a "
        "maxIdleTimeMS in mongo_url wins",
    )
    redis_prefix: str = Field("im:", description="prefix of every Redis key (the deployment prefix is added in front)")
    recent_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="how long Redis keeps a recent entry (s)")

    # --- batching (DESIGN.md sections 2 and 9) ---
    hub_batch_max: int = Field(64, ge=1, description="frames per hub-to-conversation-shard call")
    hub_batch_ms: float = Field(
        0.0,
        ge=0,
        description="window of a hub-to-conversation-shard batch (ms); 0 = natural batching: a batch leaves at "
        "once when no call to that shard is in flight, and what arrives meanwhile forms the next one",
    )
    hub_inflight: int = Field(
        1,
        ge=1,
        description="send batches a hub has in flight to one conversation shard (a batch's call lasts until its "
        "commit; the shard queues them in arrival order). 1 makes the biggest batches: on 2 cores 4 carried "
        "a third less at 500-1,000 msgs/s offered (benchmarks/pipeline.py --hub-inflight 4 1)",
    )
    hub_send_queue_max: int = Field(
        512,
        ge=1,
        description="admission control: sends a hub holds for one conversation shard, waiting for its batch; "
        "a send over it is refused at once (unavailable, with retry_after_ms) instead of queueing (overload)",
    )
    store_batch_max: int = Field(512, ge=1, description="entries per store commit")
    store_inflight: int = Field(4, ge=1, description="store commits in flight per conversation shard")
    conv_recent_cmids: int = Field(
        4096,
        ge=1,
        description="committed cmids a sequencer keeps to answer a resend (dup) without storage; older resends are "
        "settled by MongoDB's unique (conv, sender, cmid) index. About 460 bytes each (measured): a busy "
        "conversation holds up to this many, an idle one what it committed",
    )
    conv_active_max: int = Field(
        100_000,
        ge=0,
        description="sequencers a conversation shard keeps in memory; beyond it the least recently used idle ones "
        "are dropped and re-activated from storage on their next use (0: never drop)",
    )
    fanout_batch_max: int = Field(256, ge=1, description="entries per fan-out call (to a session shard, to a hub)")
    fanout_via: Literal["conv", "session"] = Field(
        "conv",
        description="conv: conversation shards hold every connection's route and fan entries out to the hubs "
        "themselves (one Ray hop per delivery; session shards only plan offline pushes); session: through the "
        "recipients' session shards (one hop more)",
    )
    hub_direct_write: bool = Field(
        True,
        description="a hub writes a frame to a connection at once when nothing of it waits (no task switch); "
        "false: every frame through the connection's writer task (see im_actors.hub.write_now)",
    )
    answer_copies: bool = Field(
        True,
        description="direct conversations (fanout_via = conv, hub_inflight = 1): the copies of an entry for "
        "connections on its sender's hub travel in the send's answer instead of a deliver call, one Ray call "
        "less per message; false: every copy through a deliver call (see docs/design.md, step 5)",
    )
    trace_sample: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of sends that carry stage timestamps (hub_in, seq, committed, fanout, hub_queued) "
        "to their recipients in the msg frame's 'trace' field; 0 = off, and costs nothing",
    )
    fanout_batch_ms: float = Field(
        0.0, ge=0, description="window of a fan-out batch (ms); 0 = natural batching, as for hub_batch_ms"
    )

    # --- connections and auth (docs/security.md) ---
    jwt_secret: str = Field(
        "",
        description="HS256 secret of client tokens; the demo generates one per run when empty",
    )
    jwt_algorithm: Literal["HS256", "RS256"] = Field(
        "HS256",
        description="signature of client tokens: HS256 with jwt_secret, or RS256 with jwt_public_key; "
        "tokens signed any other way (none, the other algorithm) are refused with 4401",
    )
    jwt_public_key: str = Field("", description="PEM public key verifying RS256 tokens (required with RS256)")
    jwt_private_key: str = Field(
        "", description="PEM private key signing RS256 tokens of development login (only used with dev_login)"
    )
    jwt_audience: str = Field("", description="required aud claim of client tokens (empty: not checked)")
    jwt_issuer: str = Field("", description="required iss claim of client tokens (empty: not checked)")
    jwt_leeway_s: int = Field(0, ge=0, le=300, description="clock skew allowed when checking exp (s)")
    jwt_ttl_s: int = Field(24 * 3600, ge=1, description="lifetime of tokens issued by development login (s)")
    dev_login: bool = Field(False, description="enable POST /v1/login (development only; 404 otherwise)")
    auth_timeout_s: float = Field(5.0, gt=0, description="time a connection has to send auth (s); 4408 after")
    max_frame_bytes: int = Field(
        1 << 20, ge=1024, description="largest WebSocket frame accepted (bytes), closed 1009 above"
    )
    max_body_bytes: int = Field(65536, ge=1, description="largest message body (bytes), answered too_large above")
    max_group_members: int = Field(10000, ge=2, description="largest group (members)")
    dm_policy: Literal["anyone", "contacts"] = Field(
        "anyone",
        description="who may send a direct message: anyone, or accepted contacts only; a block always refuses",
    )
    presence_debounce_ms: int = Field(
        1000,
        ge=0,
        description="a user's presence change is announced to contacts at most once per window (ms, 0 = at once)",
    )
    max_page_bytes: int = Field(
        1 << 20, ge=1024, description="bodies in one sync/history page (bytes); at least one entry is always sent"
    )
    max_pending_requests: int = Field(
        256, ge=1, description="unanswered requests per connection; above it the hub stops reading that socket"
    )
    send_queue_frames: int = Field(10000, ge=1, description="per-connection send queue bound (frames); 4508 above")
    send_queue_bytes: int = Field(16 << 20, ge=1024, description="per-connection send queue bound (bytes); 4508 above")
    ping_interval_s: float = Field(20.0, gt=0, description="WebSocket ping interval (s)")
    ping_timeout_s: float = Field(
        20.0, gt=0, description="WebSocket pong timeout (s); the peer is closed and counted offline after it"
    )
    socket_send_buffer_bytes: int = Field(
        0,
        ge=0,
        description="SO_SNDBUF of each client socket at a hub (bytes; 0 = the kernel's autotuned default, up to "
        "net.ipv4.tcp_wmem's max per connection): bounds the kernel memory a client that never reads can pin",
    )
    max_frame_items: int = Field(
        10000, ge=16, description="entries of any one map or list in a client frame; 4400 above (>= max_group_members)"
    )
    max_frame_depth: int = Field(16, ge=11, description="nesting of maps and lists in a client frame; 4400 above")
    read_queue_frames: int = Field(
        4,
        ge=1,
        description="frames the WebSocket layer buffers per connection before it stops reading the socket; "
        "with max_frame_bytes it bounds a connection's read memory",
    )

    # --- rate limits (per user per hub; docs/security.md) ---
    rate_send_per_s: float = Field(
        50.0, ge=0, description="sends per second per user on one hub (token bucket refill; 0 = no limit)"
    )
    rate_send_burst: int = Field(200, ge=1, description="sends a user may make at once on one hub (bucket size)")
    rate_request_per_s: float = Field(
        100.0, ge=0, description="requests of any kind per second per user on one hub (0 = no limit)"
    )
    rate_request_burst: int = Field(400, ge=1, description="requests a user may make at once on one hub")
    rate_refusals_max: int = Field(
        100,
        ge=0,
        description="rate_limited answers one connection may get within rate_refusals_window_s; "
        "one more closes it with 4429 (0 = never close)",
    )
    rate_refusals_window_s: float = Field(10.0, gt=0, description="window of rate_refusals_max (s)")
    conn_rate_per_address_per_s: float = Field(
        20.0,
        ge=0,
        description="new WebSocket connections per second from one IP address at one hub (0 = no limit); "
        "refused in the handshake with HTTP 429 above",
    )
    conn_burst_per_address: int = Field(100, ge=1, description="new connections one IP address may open at once")
    max_conns_per_address: int = Field(
        0, ge=0, description="open connections from one IP address at one hub (0 = no limit); HTTP 429 above"
    )
    conn_limit_exempt: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="networks (CIDR) the per-address connection limits do not apply to: by default loopback, "
        "where local load drivers and a local reverse proxy connect from",
    )
    max_connections_per_user: int = Field(
        16,
        ge=0,
        description="devices of one user connected at once over all hubs, counted by the user's session "
        "shard; a new device above it is closed with 4429 (0 = no limit)",
    )

    # --- TLS and browsers ---
    tls_cert_file: str = Field(
        "", description="PEM certificate chain: the router serves HTTPS and hubs WSS (with tls_key_file)"
    )
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="browser Origins a hub accepts (e.g. https://chat.example.com); empty = any; "
        "clients that send no Origin (not browsers) are always accepted; others get HTTP 403",
    )

    # --- router ---
    heartbeat_s: float = Field(1.0, gt=0, description="router heartbeat of every hub (s); a hub missing one is dropped")
    hub_ttl_s: int = Field(30, ge=1, description="ttl_s answered with a hub (s)")

    # --- lifecycle (drain, rolling restart) ---
    drain_window_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="a draining hub closes its clients with 1001 at random times spread over this window (s), "
        "so that they reconnect elsewhere without a storm; 0 = all at once",
    )
    hub_ready_timeout_s: float = Field(
        60.0, gt=0, description="how long a restarted hub may take to answer GET /ready with 200 (s)"
    )

    # --- offline push (DESIGN.md section 6) ---
    push_collapse_ms: int = Field(
        0, ge=0, description="pushes for one device and conversation within this window coalesce (ms, 0 = off)"
    )
    push_max_attempts: int = Field(5, ge=1, description="provider attempts before a job goes to the dead queue")
    push_retry_base_ms: int = Field(1000, ge=1, description="first retry delay; doubles per attempt (ms)")
    push_prefetch: int = Field(64, ge=1, description="unacked jobs per push worker")
    push_outbox_max: int = Field(
        100000, ge=1, description="jobs kept while RabbitMQ is unreachable; the oldest are dropped above"
    )
    push_timeout_s: float = Field(10.0, gt=0, description="provider call timeout (s)")
    webhook_secret: str = Field("", description="HMAC-SHA256 key of the webhook signature header (empty: unsigned)")
    webhook_allow_private: bool = Field(
        False,
        description="let webhook tokens (URLs that clients register) reach loopback, private, link-local and other "
        "non-public addresses; off, such a job goes to the dead queue (the demo and tests, whose receivers are "
        "local, turn it on)",
    )
    push_providers: tuple[str, ...] = Field(
        ("webhook", "log"),
        description="providers a push worker serves (apns, fcm, huawei, xiaomi, webhook, log); jobs for any other "
        "go to the dead queue. An enabled provider's required keys below must be set",
    )
    push_dedup_ttl_s: int = Field(
        6 * 3600,
        ge=0,
        description="how long a worker remembers in Redis that a job reached its provider, so a redelivered or "
        "republished copy is not sent again (s, 0 = no dedup: at least once); one key of about 150 bytes per "
        "job, so Redis holds about rate x ttl of them. Copies come from redeliveries (seconds) and from "
        "republications after a broker outage (its length)",
    )
    push_claim_ms: int = Field(
        0,
        ge=0,
        description="how long a worker's claim on a job it is sending lasts in Redis; a copy of the job seen while "
        "the claim lasts waits for it (ms, 0 = push_timeout_s + 5 s)",
    )
    # APNs (token-based authentication, HTTP/2)
    apns_url: str = Field(
        "https://api.push.apple.com", description="APNs base URL (sandbox: api.sandbox.push.apple.com)"
    )
    apns_key_file: str = Field("", description="path of the APNs signing key (.p8, PEM, ES256); required for apns")
    apns_key_id: str = Field("", description="the key's 10-character Key ID (JWT header kid); required for apns")
    apns_team_id: str = Field("", description="Apple developer Team ID (JWT claim iss); required for apns")
    apns_topic: str = Field("", description="apns-topic: the app's bundle id; required for apns")
    apns_push_type: Literal["alert", "background"] = Field(
        "alert", description="apns-push-type (priority 10 for alert, 5 for background)"
    )
    apns_expiration_s: int = Field(
        86400, ge=0, description="apns-expiration: how long APNs keeps an undelivered push (s, 0 = try once)"
    )
    # FCM HTTP v1
    fcm_url: str = Field("https://fcm.googleapis.com", description="FCM HTTP v1 base URL")
    fcm_credentials_file: str = Field(
        "",
        description="path of the Firebase service-account JSON (project_id, client_email, private_key, token_uri); "
        "required for fcm",
    )
    # Huawei Push Kit
    huawei_url: str = Field("https://push-api.cloud.huawei.com", description="Huawei Push Kit base URL")
    huawei_token_url: str = Field(
        "https://oauth-login.cloud.huawei.com/oauth2/v3/token", description="Huawei OAuth 2.0 token endpoint"
    )
    huawei_app_id: str = Field("", description="Huawei app id (OAuth client_id); required for huawei")
    huawei_client_secret: str = Field("", description="Huawei app secret (OAuth client_secret); required for huawei")
    # Xiaomi MiPush
    xiaomi_url: str = Field(
        "https://api.xmpush.xiaomi.com", description="MiPush base URL (global: api.xmpush.global.xiaomi.com)"
    )
    xiaomi_app_secret: str = Field("", description="MiPush AppSecret (Authorization: key=...); required for xiaomi")
    xiaomi_package_name: str = Field("", description="restricted_package_name: the app's package; required for xiaomi")

    # --- Ray (DESIGN.md section 9) ---
    ray_health_check_period_ms: int = Field(
        500, ge=100, description="RAY_health_check_period_ms for local clusters (Ray's default 3000)"
    )
    ray_health_check_failure_threshold: int = Field(
        3, ge=1, description="RAY_health_check_failure_threshold (Ray's default 5)"
    )
    ray_worker_niceness: int = Field(
        0,
        ge=0,
        le=19,
        description="RAY_worker_niceness of local clusters: Ray's default 15 starves actors behind any busy "
        "normal process (clients, the MongoDB server)",
    )
    ray_health_check_timeout_ms: int = Field(
        500, ge=100, description="RAY_health_check_timeout_ms (Ray's default 10000)"
    )

    # --- resources: the CPU each role asks Ray for (issue 11 item 5) ---
    # Fractions of a CPU: Ray's scheduler and autoscaler see the demand, and the defaults keep every
    # actor schedulable where the tests and the demo run: a default deployment asks for about 0.5 CPU,
    # so several fit on a 2-CPU machine at once (the integration tests run up to three), and a
    # bundle of hub + session + conversation shard (0.25) on each 1-CPU node of tests/cluster. On
    # dedicated nodes set them to what each role really uses (up to 1.0 for a busy hub or
    # conversation shard: each actor is one Python process, one core at most).
    hub_num_cpus: float = Field(0.1, ge=0, le=64, description="CPUs each hub asks Ray for (a fraction is fine)")
    session_num_cpus: float = Field(0.05, ge=0, le=64, description="CPUs each session shard asks Ray for")
    conv_num_cpus: float = Field(0.1, ge=0, le=64, description="CPUs each conversation shard asks Ray for")
    group_num_cpus: float = Field(0.02, ge=0, le=64, description="CPUs each group shard asks Ray for")
    store_num_cpus: float = Field(0.05, ge=0, le=64, description="CPUs each store writer asks Ray for")
    push_num_cpus: float = Field(0.02, ge=0, le=64, description="CPUs each push worker asks Ray for")
    router_num_cpus: float = Field(0.02, ge=0, le=64, description="CPUs the router asks Ray for")

    # --- operations: metrics and logs (issue 11 items 1 and 4) ---
    metrics_interval_s: float = Field(
        5.0,
        ge=0,
        description="how often each actor copies its counters to Ray's metrics (s; 0 = no metrics); Ray's "
        "Prometheus endpoint exports them as ray_im_* (im_actors/metrics.py)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING",
        description="level of the actors' logs (Ray's logging config of the job that deploys them); INFO adds "
        "connections of push publishers and workers, presence and event drops; the websockets library's own "
        "per-connection lines stay at WARNING",
    )
    log_format: Literal["json", "text"] = Field(
        "json",
        description="json: one JSON object per line with Ray's ids (job, worker, node, actor) and ours "
        "(user, device, conv, cmid, request id) as fields; text: Ray's plain text lines",
    )

    @model_validator(mode="after")
    def _provider_keys(self) -> Config:
        unknown = [p for p in self.push_providers if p not in _PROVIDER_KEYS]
        if unknown:
            raise ValueError(
                f"push_providers: unknown {', '.join(unknown)} (known: {', '.join(sorted(_PROVIDER_KEYS))})"
            )
        for provider in self.push_providers:
            for key in _PROVIDER_KEYS[provider]:
                if not getattr(self, key):
                    raise ValueError(f"{key} (IM_{key.upper()}) must be set: push_providers includes {provider}")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.jwt_algorithm == "RS256" and not self.jwt_public_key:
            raise ValueError("jwt_public_key is required when jwt_algorithm is RS256")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        for net in self.conn_limit_exempt:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"conn_limit_exempt: {net!r} is not a network such as 10.0.0.0/8") from None
        if self.max_frame_items < self.max_group_members:
            raise ValueError("max_frame_items must be at least max_group_members")
        return self

    @field_validator("deployment")
    @classmethod
    def _deployment_chars(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError("only letters, digits, - and _")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _TOML_PATH.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived names ---
    @property
    def actor_prefix(self) -> str:
        """Prefix of actor names (``<deployment>-`` or empty)."""
        return f"{self.deployment}-" if self.deployment else ""

    @property
    def key_prefix(self) -> str:
        """Prefix of every Redis key."""
        return f"{self.deployment}:{self.redis_prefix}" if self.deployment else self.redis_prefix

    @property
    def amqp_prefix(self) -> str:
        """Prefix of RabbitMQ exchange and queue names (``im.push`` becomes ``<deployment>.im.push``)."""
        return f"{self.deployment}." if self.deployment else ""

    def knobs(self) -> dict[str, Any]:
        """Every knob as plain data, secrets masked (for reports)."""
        out = self.model_dump()
        for key in ("jwt_secret", "jwt_private_key", "webhook_secret", "huawei_client_secret", "xiaomi_app_secret"):
            if out.get(key):
                out[key] = "***"
        for key in ("redis_url", "rabbitmq_url", "mongo_url"):
            out[key] = mask_url(out[key])
        return out


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for reports, logs and errors)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in cred else url


def _problem(err: Any) -> str:
    if not err["loc"]:  # a check across keys: its message names them
        return str(err["msg"]).removeprefix("Value error, ")
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key} (IM_{key.upper()}): {err['msg']}"


def load_config(toml_file: str | Path | None = None, **overrides: Any) -> Config:
    """Build the configuration: ``overrides`` (flags) > ``IM_*`` environment > ``toml_file`` > defaults.

    ``None`` overrides are ignored (an unset flag). Raises :class:`ConfigError` naming each bad key.
    """
    path = Path(toml_file) if toml_file is not None else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    token = _TOML_PATH.set(path)
    try:
        return Config(**{k: v for k, v in overrides.items() if v is not None})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except SettingsError as exc:  # an IM_* value that is not even parseable, e.g. a list not in JSON
        field = re.search(r'field "([a-z0-9_]+)"', str(exc))
        key = field.group(1) if field else "?"
        raise ConfigError(
            f"{key} (IM_{key.upper()}): cannot parse the environment value; lists and maps are JSON there, "
            f'e.g. IM_{key.upper()}=\'["a", "b"]\''
        ) from None
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        where = f" (config file {path}, IM_* environment, flags)" if path else ""
        raise ConfigError(f"bad configuration{where}: {problems}") from None
    finally:
        _TOML_PATH.reset(token)
