"""The reconnect storm: many clients lose their hub at once and all come back, with nothing lost.

:func:`reconnect_storm` runs a synthetic workload of ``clients`` users (one client each, in groups)
through :func:`drivers.run.run_workload_async` and, once every client is connected and the sends have
begun (after the groups are made), kills the hub actor holding the most connections (``ray.kill``, Ray
restarts it empty). Its clients reconnect at once, each after the client library's jittered exponential backoff
(:func:`im_actors.client.backoff_delay`: equal jitter, 50 ms doubling up to 5 s), to another hub or to
the restarted one, resend their unacked sends with the same cmid and sync.

"Back" is read from the clients, through the runner's progress snapshots (about twice a second from
every driver process, so it works with any number of them): all are back when the clients have made at
least as many reconnections as the killed hub held connections since the kill, and every client is
connected again. The hubs' open connections (``HubActor.load``, summed) are sampled beside it every
``poll_s`` for the report. The report is the run's report plus:

- ``storm``: ``clients``, ``hub`` (the one killed), ``hub_clients`` (its connections at the kill),
  ``killed_at_s`` (since the first connection poll), ``all_back_s`` (from the kill until every client
  was connected again, to the snapshot's half second; None when that was not seen within
  ``back_timeout_s``), ``connections`` (``[[s since the kill, connections at the hubs, clients
  connected, reconnections since the kill], ...]`` samples);
- ``faults``: the kill as a ``hub`` fault whose ``recovery_s`` is ``all_back_s``, so the verdict
  (:func:`drivers.verdict.judge`) fails a storm that did not end with every client back, and the report's
  plots mark it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from drivers.live import LiveView
from drivers.run import run_workload_async
from drivers.synthetic import SyntheticWorkload
from im_actors import ids
from im_actors.config import Config

__all__ = ["reconnect_storm", "hub_connections"]

log = logging.getLogger(__name__)


async def hub_connections(config: Config, timeout_s: float = 2.0) -> dict[str, int]:
    """Open connections per hub name (a hub that does not answer, e.g. restarting, counts 0)."""
    names = [ids.actor_name("hub", i, config.actor_prefix) for i in range(config.hubs)]

    async def one(name: str) -> int:
        try:
            handle = ray.get_actor(name, namespace=ids.NAMESPACE)
            load: dict[str, Any] = await asyncio.wait_for(handle.load.remote(), timeout_s)
            return int(load.get("connections", 0))
        except Exception:  # noqa: BLE001 - a dead or restarting hub holds no connection
            return 0

    counts = await asyncio.gather(*(one(n) for n in names))
    return dict(zip(names, counts, strict=True))


async def reconnect_storm(
    config: Config,
    router_url: str,
    clients: int = 2000,
    rate: float = 100.0,
    duration_s: float = 30.0,
    group_size: int = 10,
    kill_after_s: float = 3.0,
    back_timeout_s: float = 120.0,
    poll_s: float = 0.2,
    processes: int = 1,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run the storm against the deployment of ``config`` at ``router_url`` (see the module docstring).

    ``rate`` msgs/s in total for ``duration_s`` s of sends among ``clients`` users in groups of
    ``group_size``; the hub is killed ``kill_after_s`` s after the sends began. Other keyword
    options go to :func:`drivers.run.run_workload_async` (``drain_timeout_s``, ``send_deadline_s``,
    ``tokens``, ...). Raises RuntimeError when the clients never all connect (the run's own error, if
    it failed first).
    """
    workload = SyntheticWorkload(users=clients, rate=rate, duration_s=duration_s, group_size=min(group_size, clients))
    options.setdefault("drain_timeout_s", 60.0)
    options.setdefault("send_deadline_s", max(60.0, back_timeout_s))
    sending = asyncio.Event()
    seen = {"connected": 0, "reconnects": 0}

    def phase(name: str) -> None:
        if name == "sending":
            sending.set()

    def update(view: LiveView) -> None:
        seen["connected"], seen["reconnects"] = view.connected, view.reconnects

    run = asyncio.create_task(
        run_workload_async(router_url, workload, processes, progress, on_phase=phase, on_update=update, **options)
    )
    started = time.monotonic()
    try:
        # groups are made before the sends start, and group creation is not retried: kill only then
        while not sending.is_set() or sum((await hub_connections(config)).values()) < clients:
            if run.done():
                await run  # raises the run's error
                raise RuntimeError("the run ended before its sends began")
            await asyncio.sleep(poll_s)
        await asyncio.sleep(kill_after_s)
        before = await hub_connections(config)
        victim = max(before, key=lambda name: before[name])
        killed_at = time.monotonic()
        kill_ms = time.time() * 1000.0
        reconnects_before = seen["reconnects"]
        ray.kill(ray.get_actor(victim, namespace=ids.NAMESPACE), no_restart=False)
        log.warning("storm: killed %s holding %d connections", victim, before[victim])
        samples: list[list[float]] = []
        all_back: float | None = None
        while time.monotonic() - killed_at < back_timeout_s and not run.done():
            total = sum((await hub_connections(config)).values())
            since = time.monotonic() - killed_at
            again = seen["reconnects"] - reconnects_before
            samples.append([round(since, 3), total, seen["connected"], again])
            if again >= before[victim] and seen["connected"] >= clients:
                all_back = since
                break
            await asyncio.sleep(poll_s)
    except BaseException:
        run.cancel()
        raise
    report = await run
    report["storm"] = {
        "clients": clients,
        "hub": victim,
        "hub_clients": before[victim],
        "killed_at_s": round(killed_at - started, 3),
        "all_back_s": None if all_back is None else round(all_back, 3),
        "connections": samples,
    }
    fault = {
        "kind": "hub",
        "target": victim,
        "at_s": round(killed_at - started, 3),
        "at_ms": round(kill_ms, 1),
        "recovery_s": report["storm"]["all_back_s"],
        "worst_delivery_latency_ms": None,
        "error": None,
    }
    report["faults"] = [*report.get("faults", []), fault]
    return report
