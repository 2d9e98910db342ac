"""The service's detached actors in its namespace: Storage, TrainingQueue, the accuracy monitor
(resolves served predictions, flags degraded models) and the market feed (`actors.feed`), whose
first tick makes the embedded synthetic history current. All calls need a connected Ray driver."""

from __future__ import annotations

import contextlib
from typing import Any


def start_core_actors(namespace: str, data_dir: str, timeout_s: float) -> tuple[Any, Any]:
    """Create (or find) Storage, TrainingQueue and the accuracy monitor; returns (storage, queue)."""
    import ray

    from actors.accuracy_monitor import get_or_create_monitor_actor
    from actors.storage import get_or_create_storage_actor
    from actors.training_queue import get_or_create_queue_actor

    storage = get_or_create_storage_actor(data_dir, namespace)
    queue = get_or_create_queue_actor(namespace, data_dir)
    ray.get(queue.ping.remote(), timeout=timeout_s)
    monitor = get_or_create_monitor_actor(namespace, data_dir)
    ray.get(monitor.ping.remote(), timeout=timeout_s)
    return storage, queue


def start_feed(namespace: str, data_dir: str, pairs: list[str], interval_s: float,
               timeout_s: float) -> dict[str, Any]:
    """Create the feed actor and run its first tick now; returns the feed's run-state entry."""
    import ray

    from actors.feed import get_or_create_feed

    feed = get_or_create_feed(namespace, data_dir, pairs, interval_s)
    added = ray.get(feed.tick.remote(), timeout=timeout_s)
    status = ray.get(feed.status.remote(), timeout=60)
    failing = {p: s["lastError"] for p, s in (status.get("byPair") or {}).items() if s.get("failures")}
    return {"source": status["source"], "intervalS": interval_s, "initialBarsAdded": added,
            "initialErrors": failing}


def stop_actors(namespace: str | None) -> dict[str, str]:
    """Kill the monitor, feed and queue, then let the Storage flush before it goes; returns what it did."""
    import ray

    from actors.accuracy_monitor import MONITOR_ACTOR_NAME
    from actors.feed import FEED_ACTOR_NAME
    from actors.storage import ACTOR_NAME as STORAGE_NAME
    from actors.training_queue import QUEUE_ACTOR_NAME

    done: dict[str, str] = {}
    # the monitor first: it writes through the Storage and submits to the queue
    for name in (MONITOR_ACTOR_NAME, FEED_ACTOR_NAME, QUEUE_ACTOR_NAME):
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    with contextlib.suppress(ValueError):
        storage = ray.get_actor(STORAGE_NAME, namespace=namespace)
        try:
            saved = ray.get(storage.shutdown.remote(), timeout=30)
            done["storage"] = f"flushed ({saved.get('savedCount', 0)} records)"
        except Exception:  # noqa: BLE001 - it exits while answering; the kill below is a no-op then
            pass
        with contextlib.suppress(Exception):
            ray.kill(storage, no_restart=True)
    return done


def actor_reports(namespace: str | None) -> dict[str, Any]:
    """What the feed, the queue and the accuracy monitor say about themselves (errors per actor)."""
    import ray

    from actors.accuracy_monitor import MONITOR_ACTOR_NAME
    from actors.feed import FEED_ACTOR_NAME
    from actors.training_queue import QUEUE_ACTOR_NAME

    out: dict[str, Any] = {}
    try:
        out["feed"] = ray.get(ray.get_actor(FEED_ACTOR_NAME, namespace=namespace).status.remote(), timeout=10)
    except Exception as exc:  # noqa: BLE001
        out["feed"] = {"error": str(exc)[:300]}
    try:
        out["queue"] = ray.get(ray.get_actor(QUEUE_ACTOR_NAME, namespace=namespace).summary.remote(), timeout=10)
    except Exception as exc:  # noqa: BLE001
        out["queue"] = {"error": str(exc)[:300]}
    try:
        mon = ray.get(ray.get_actor(MONITOR_ACTOR_NAME, namespace=namespace).status.remote(), timeout=10)
        out["monitor"] = {k: mon.get(k) for k in ("source", "intervalS", "ticks", "lastTick", "lastError")}
        out["monitor"]["degraded"] = sorted(
            f"{p}/{mt}" for p, doc in (mon.get("pairs") or {}).items()
            for mt, m in (doc.get("models") or {}).items() if m.get("degraded"))
    except Exception as exc:  # noqa: BLE001
        out["monitor"] = {"error": str(exc)[:300]}
    return out
