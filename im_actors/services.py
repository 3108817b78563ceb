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
import pymongo
import redis

from im_actors.config import Config, mask_url
from im_actors.errors import ServiceError

__all__ = [
    "LocalServices",
    "ensure_services",
    "describe_services",
    "free_port",
    "start_secantus",
    "purge_deployment",
    "PrivateRedis",
    "PrivateRabbitMQ",
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
    """Processes and folders started for one run; :meth:`stop` removes them."""

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    #: The MongoDB-wire server started here, if any: its port, data folder and process.
    mongo_port: int = 0
    mongo_folder: Path | None = None
    mongo_proc: subprocess.Popen[bytes] | None = None
    #: Private Redis and RabbitMQ servers started for this run (chaos restarts them), if any.
    redis: PrivateRedis | None = None
    rabbitmq: PrivateRabbitMQ | None = None

    def stop_mongo(self) -> None:
        """Stop the MongoDB-wire server started here, keeping its data (a fault, for chaos runs)."""
        proc = self.mongo_proc
        if proc is None:
            raise ServiceError("MongoDB: no local server was started for this run (mongo_url was given)")
        self.mongo_proc = None
        self.processes.remove(proc)
        _terminate(proc)

    def start_mongo(self, wait: bool = True) -> str:
        """Start the stopped MongoDB-wire server again on its port and data; returns its URL.

        With ``wait`` False it returns at once (call :meth:`wait_mongo` later): the server must be
        spawned from a long-lived thread, since Linux kills it when the spawning thread exits.
        """
        if self.mongo_folder is None or not self.mongo_port:
            raise ServiceError("MongoDB: no local server was started for this run (mongo_url was given)")
        return start_secantus(self, port=self.mongo_port, folder=self.mongo_folder, wait=wait)

    def wait_mongo(self, timeout_s: float = 30.0) -> None:
        """Wait until the MongoDB-wire server started here answers; raises :class:`ServiceError`."""
        if self.mongo_proc is None or self.mongo_folder is None:
            raise ServiceError("MongoDB: no local server is running for this run")
        _wait_secantus(self.mongo_proc, _secantus_url(self.mongo_port), self.mongo_folder, timeout_s)

    def stop(self) -> None:
        """Stop every process started (SIGTERM, then SIGKILL after 5 s) and remove the folders."""
        if self.redis is not None:
            self.redis.stop()
        if self.rabbitmq is not None:
            self.rabbitmq.remove()
        for proc in self.processes:
            _terminate(proc)
        self.processes.clear()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.folders.clear()


def _terminate(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


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


def _wait_secantus(proc: subprocess.Popen[bytes], url: str, folder: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"MongoDB: SecantusDB exited with {proc.returncode}; see {folder / 'secantusd.log'}")
        try:
            client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(url, serverSelectionTimeoutMS=500)
            client.admin.command("ping")
            client.close()
            return
        except pymongo.errors.PyMongoError:
            time.sleep(0.2)
    raise ServiceError(f"MongoDB: SecantusDB did not answer at {url} within {timeout_s:.0f} s")


def start_secantus(
    services: LocalServices,
    timeout_s: float = 30.0,
    port: int = 0,
    folder: Path | None = None,
    wait: bool = True,
) -> str:
    """Start a SecantusDB server on loopback; returns its ``mongodb://`` URL.

    ``port`` 0 picks a free one; ``folder`` None makes a temporary one (removed by
    :meth:`LocalServices.stop`). Passing the port and folder of a stopped server starts it again
    on its data (the fault tests do). Raises :class:`ServiceError` when the command is missing or
    the server does not answer.
    """
    beside = Path(sys.executable).parent / SECANTUS_COMMAND  # the same virtualenv, activated or not
    exe = str(beside) if beside.exists() else shutil.which(SECANTUS_COMMAND)
    if exe is None:
        raise ServiceError(
            "MongoDB: no mongo_url configured and SecantusDB is not installed. "
            "Install it (pip install --pre SecantusDB) or set mongo_url / IM_MONGO_URL to a MongoDB server."
        )
    _sweep_orphan_folders()
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix=_FOLDER_PREFIX))
        services.folders.append(folder)
    port = port or free_port()
    log_file = open(folder / "secantusd.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            exe,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--storage-path",
            str(folder / "data"),
            "--log-level",
            "WARNING",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    services.processes.append(proc)
    services.mongo_port, services.mongo_folder, services.mongo_proc = port, folder, proc
    (folder / "owner.pid").write_text(str(os.getpid()))
    url = _secantus_url(port)
    if wait:
        _wait_secantus(proc, url, folder, timeout_s)
    return url


def _redis_executable() -> str:
    for name in ("redis-server", "valkey-server"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise ServiceError("Redis: no redis-server or valkey-server program found to start a private Redis")


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


def ensure_services(config: Config, private: Collection[str] = ()) -> tuple[Config, LocalServices]:
    """Fill in empty service URLs (see the module docstring); returns the new config and what was started.

    ``private`` names services (``"redis"``, ``"rabbitmq"``) to start as private servers of this
    run instead of using the shared ones on their default ports, when their URL is not configured:
    chaos runs restart those. When nothing answers on Redis's default port, a private Redis is
    started if a ``redis-server`` program is installed. Raises :class:`ServiceError` naming the
    missing service and how to provide it.
    """
    services = LocalServices()
    updates: dict[str, str] = {}
    try:
        if not config.redis_url:
            if "redis" in private or (not _redis_answers(DEFAULT_REDIS_URL) and _has_redis_program()):
                services.redis = PrivateRedis()
                updates["redis_url"] = services.redis.start()
            elif not _redis_answers(DEFAULT_REDIS_URL):
                raise ServiceError(
                    "Redis: nothing answers on 127.0.0.1:6379 and no redis-server is installed. Start one "
                    "(redis-server --port 6379) or set redis_url / IM_REDIS_URL."
                )
            else:
                updates["redis_url"] = DEFAULT_REDIS_URL
        elif not _redis_answers(config.redis_url):
            raise ServiceError(f"Redis: {mask_url(config.redis_url)} does not answer (key redis_url)")
        if not config.rabbitmq_url:
            if "rabbitmq" in private:
                services.rabbitmq = PrivateRabbitMQ()
                updates["rabbitmq_url"] = services.rabbitmq.start()
            elif not _rabbitmq_answers(DEFAULT_RABBITMQ_URL):
                raise ServiceError(
                    "RabbitMQ: nothing answers on 127.0.0.1:5672 as guest. Start one (rabbitmq-server -detached) "
                    "or set rabbitmq_url / IM_RABBITMQ_URL."
                )
            else:
                updates["rabbitmq_url"] = DEFAULT_RABBITMQ_URL
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
    try:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            config.mongo_url, serverSelectionTimeoutMS=2000
        )
        info = client.server_info()
        client.close()
        server = "SecantusDB" if "secantusVersion" in info else "mongod"
        version = info.get("secantusVersion") or info.get("version")
        out["mongodb"] = {
            "url": masked["mongo_url"],
            "server": server,
            "version": version,
            "wire_version": info.get("version"),
        }
    except pymongo.errors.PyMongoError as exc:
        out["mongodb"] = {"url": masked["mongo_url"], "error": str(exc)}

    async def amqp() -> dict[str, Any]:
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
        asyncio.run(drop_topology())
    except Exception as exc:  # noqa: BLE001 - best effort, logged
        log.warning("RabbitMQ names of %s not removed: %s", config.deployment, exc)
    if drop_mongo_db:
        try:
            mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                config.mongo_url, serverSelectionTimeoutMS=5000
            )
            mongo.drop_database(config.mongo_db)
            mongo.close()
        except pymongo.errors.PyMongoError as exc:
            log.warning("MongoDB database %s not dropped: %s", config.mongo_db, exc)
    return {"redis_keys": removed}
