"""The accuracy monitor: a detached, named singleton (`tbml-accuracy-monitor`, 0 CPUs) that resolves
served predictions once their target bar has closed, keeps the live accuracy of every production
model, and queues a retrain when one has lost its edge.

A thin shell over `ml.evaluation.live` (the rules and the bookkeeping live there). Every
`live.resolve_interval_s` seconds, and on `tick()`, for each pair with prediction history:

1. reads the records served since the last pass through the Storage actor's query;
2. reads the candles their target bars need from the candle store (read-only; for every source, since
   the market feed keeps the store current);
3. writes `realizedClose, realizedDirection, correct, resolvedAt` into those records through the
   Storage actor (the single writer);
4. computes the rolling numbers of the production version of every model type and stores them as
   the document `training/{PAIR}/live.json` (also through the Storage actor; the ingress reads it
   for `GET /api/models/{pair}/status`), written only when something changed;
5. when a production version turns degraded (`ml.evaluation.live.degraded`) and was not flagged
   before, submits a retrain to the TrainingQueue actor (priority `live.retrain_priority`, source
   `degraded`). A refused submit (cooldown, paused) is retried on later passes; a version is flagged
   once the queue took the job (or already had one). The flags are in the document, so a restarted
   monitor does not queue again.

`get_or_create_monitor_actor()` is the way to reach it; `tbml up` creates it and the ingress does so
lazily (a plain `serve deploy` gets one too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from actors.metrics import record_live
from actors.training_queue import QUEUE_ACTOR_NAME
from ml.clock import now_ms
from ml.config import LiveSettings
from ml.registry.production import Production, read_production

log = logging.getLogger(__name__)

MONITOR_ACTOR_NAME = "tbml-accuracy-monitor"
LIVE_CATEGORY = "training"   # the Storage's document categories have no "live"; training/{PAIR}/live.json
LIVE_DOCUMENT = "live"
RETRAIN_SOURCE = "degraded"
LIVE_KEYS = frozenset(LiveSettings.model_fields)  # the `live` settings section's keys
ACTOR_KEYS = {"queue_name", "queue_overrides", "pairs", "scan_limit"}


def _settings():
    from ml.config import get_settings

    return get_settings()


def _describe(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


def live_document(reader, pair: str) -> dict | None:
    """The monitor's last published numbers of `pair` (a read-only Storage is enough)."""
    return reader.get_document(LIVE_CATEGORY, LIVE_DOCUMENT, None, pair=pair)


class AccuracyMonitorActor:
    """Async actor: one event loop, passes serialised by a lock (the loop and tick() never overlap)."""

    def __init__(self, *, namespace: str, name: str = MONITOR_ACTOR_NAME, data_dir: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        from ml.data.store import CandleStore
        from ml.evaluation.live import SCAN_LIMIT, LiveTracker
        from ml.storage.store import Storage

        overrides = dict(overrides or {})
        unknown = set(overrides) - LIVE_KEYS - ACTOR_KEYS
        if unknown:
            raise ValueError(f"unknown accuracy monitor settings: {', '.join(sorted(unknown))}")
        settings = _settings()
        live = type(settings.live).model_validate(
            {**settings.live.model_dump(), **{k: v for k, v in overrides.items() if k in LIVE_KEYS}})
        self._namespace = namespace
        self._name = name
        self._data_dir = str(data_dir or settings.data_dir)
        self._source = settings.data.source
        self._tf = settings.timeframe_ms
        self._model_types = list(settings.model.enabled_types)
        self._interval_s = max(0.1, float(live.resolve_interval_s))
        self._window = int(live.window)
        self._min_n = int(live.degraded_min_n)
        self._margin = float(live.degraded_margin)
        self._priority = int(live.retrain_priority)
        self._queue_name = str(overrides.get("queue_name") or QUEUE_ACTOR_NAME)
        self._queue_overrides = overrides.get("queue_overrides")
        self._fixed_pairs = [str(p) for p in overrides["pairs"]] if overrides.get("pairs") else None
        self._tracker = LiveTracker(self._tf, self._window,
                                    scan_limit=int(overrides.get("scan_limit") or SCAN_LIMIT))
        self._store = CandleStore(self._data_dir, settings.timeframe)
        self._reader = Storage.reader(self._data_dir)
        self._storage = None
        self._queue = None
        self._docs: dict[str, dict] = {}          # pair -> last published live document
        self._retry_at: dict[tuple[str, str], int] = {}  # refused retrain submits: when to ask again
        self._ticks = 0
        self._last_tick: int | None = None
        self._last_summary: dict[str, Any] | None = None
        self._last_error: str | None = None
        self._started_at = now_ms()
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        try:  # Ray runs an async actor's __init__ on its event loop
            asyncio.get_running_loop()
            self._start()
        except RuntimeError:
            pass

    # ------------------------------------------------------------------ plumbing
    def _start(self) -> None:
        if self._task is None:
            self._lock = asyncio.Lock()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        # The first pass comes one interval after start: it never adds to the service's start-up
        # load, and passes asked for with tick() (tests, operators) are the only ones before it.
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.tick()
            except Exception as exc:  # never let the loop die
                self._last_error = _describe(exc)
                log.exception("accuracy monitor pass failed")

    async def _storage_handle(self):
        if self._storage is None:
            from actors.storage import get_or_create_storage_actor

            self._storage = await asyncio.to_thread(get_or_create_storage_actor, self._data_dir, self._namespace)
        return self._storage

    async def _queue_handle(self):
        if self._queue is None:
            from actors.training_queue import get_or_create_queue_actor

            self._queue = await asyncio.to_thread(get_or_create_queue_actor, self._namespace, self._data_dir,
                                                  self._queue_overrides, name=self._queue_name)
        return self._queue

    async def _pairs(self, storage) -> list[str]:
        if self._fixed_pairs is not None:
            return list(self._fixed_pairs)
        return list(await storage.prediction_pairs.remote())

    def _production(self, pair: str) -> dict[str, Production | None]:
        """{model type: its production version or None}, read from the shared volume (read-only)."""
        return {mt: read_production(self._reader, pair, mt) for mt in self._model_types}

    def _candles(self, pair: str, span: tuple[int, int]):
        from ml.data.store import NoCandlesError

        try:
            return self._store.read(pair, start_ts=span[0], end_ts=span[1])
        except (NoCandlesError, FileNotFoundError):
            return None

    # ------------------------------------------------------------------ one pass
    async def tick(self) -> dict[str, Any]:
        """Run one pass now (waits for a running one); returns what it did."""
        self._start()
        async with self._lock:
            t0 = time.perf_counter()
            summary: dict[str, Any] = {"source": self._source, "pairs": [], "resolved": {}, "degraded": [],
                                       "retrains": [], "errors": {}}
            storage = await self._storage_handle()  # every source: the feed keeps the candle store current
            for pair in await self._pairs(storage):
                try:
                    await self._pass(storage, pair, summary)
                    summary["pairs"].append(pair)
                except Exception as exc:  # noqa: BLE001 - one pair must not starve the others
                    summary["errors"][pair] = _describe(exc)
                    log.warning("accuracy monitor: %s failed: %s", pair, summary["errors"][pair])
            summary["durationMs"] = round((time.perf_counter() - t0) * 1000, 3)
            summary["timestamp"] = now_ms()
            self._ticks += 1
            self._last_tick = summary["timestamp"]
            self._last_summary = summary
            if summary["errors"]:
                self._last_error = next(iter(summary["errors"].values()))
            return summary

    async def _pass(self, storage, pair: str, summary: dict[str, Any]) -> None:
        from ml.evaluation.live import degraded, reference_rate

        tracker = self._tracker
        limit, since = tracker.query_args(pair)
        records = await storage.query_predictions.remote(pair, limit, since)
        now = now_ms()
        tracker.observe(pair, records, now)
        span = tracker.bars_needed(pair, now)
        if span is not None:
            candles = await asyncio.to_thread(self._candles, pair, span)
            updates = tracker.due_updates(pair, candles, now)
            if updates:
                await storage.update_predictions.remote(pair, updates)
                summary["resolved"][pair] = tracker.mark_resolved(pair, updates)

        production = await asyncio.to_thread(self._production, pair)
        previous = self._docs.get(pair)
        if previous is None:
            previous = await storage.get_document.remote(LIVE_CATEGORY, LIVE_DOCUMENT, None, pair) or {}
        models: dict[str, Any] = {}
        for mt, prod in production.items():
            if prod is None:
                continue
            version = prod.version
            stats = tracker.stats(pair, mt, version, reference_rate(prod.meta))
            flag, reason = degraded(stats, self._min_n, self._margin)
            before = (previous.get("models") or {}).get(mt) or {}
            same_version = before.get("version") == version
            entry: dict[str, Any] = {"version": version, **stats, "degraded": flag, "reason": reason,
                                     "testAccuracy": (prod.metrics.get("model") or {}).get("accuracy"),
                                     "testBrier": (prod.metrics.get("model") or {}).get("brier"),
                                     "flagged": False, "flaggedAt": None, "retrain": None}
            if same_version:  # a flag (and its retrain) belongs to the version it was raised for
                entry.update({k: before.get(k) for k in ("flagged", "flaggedAt", "retrain")})
                entry["flagged"] = bool(entry["flagged"])
            if flag:
                summary["degraded"].append(f"{pair}/{mt}")
                if not entry["flagged"]:
                    await self._queue_retrain(pair, mt, version, reason, entry, summary)
            models[mt] = entry
        record_live(pair, models, production, now_ms())  # actors/metrics.py
        doc = {"pair": pair, "window": self._window, "minN": self._min_n, "margin": self._margin,
               "models": models}
        if doc != {k: v for k, v in previous.items() if k != "updatedAt"}:  # write only what changed
            doc["updatedAt"] = now_ms()
            await storage.put_document.remote(LIVE_CATEGORY, LIVE_DOCUMENT, doc, pair)
        else:
            doc["updatedAt"] = previous.get("updatedAt")
        self._docs[pair] = doc

    async def _queue_retrain(self, pair: str, mt: str, version: str, reason: str, entry: dict[str, Any],
                             summary: dict[str, Any]) -> None:
        """Ask the queue for a retrain of a degraded production version (once per version)."""
        now = now_ms()
        if self._retry_at.get((pair, mt), 0) > now:
            return
        try:
            queue = await self._queue_handle()
            out = await queue.submit.remote({"pair": pair, "model_type": mt, "priority": self._priority,
                                             "source": RETRAIN_SOURCE})
        except Exception as exc:  # noqa: BLE001 - the queue is down: try again next pass
            self._queue = None
            out = {"status": "unavailable", "message": _describe(exc)}
        status = out.get("status")
        entry["retrain"] = {"status": status, "jobId": out.get("jobId"), "priority": self._priority,
                            "message": out.get("message"), "submittedAt": now, "reason": reason}
        summary["retrains"].append({"pair": pair, "modelType": mt, "version": version, "status": status,
                                    "jobId": out.get("jobId")})
        if status in ("queued", "duplicate"):
            entry["flagged"] = True
            entry["flaggedAt"] = now
            self._retry_at.pop((pair, mt), None)
            log.warning("accuracy monitor: %s/%s %s degraded (%s): retrain %s %s", pair, mt, version, reason,
                        status, out.get("jobId"))
        else:
            wait_s = float(out.get("retryAfterSeconds") or 0) if status == "cooldown" else 60.0
            self._retry_at[(pair, mt)] = now + int(max(self._interval_s, wait_s) * 1000)

    # ------------------------------------------------------------------ public API
    async def status(self, pair: str | None = None) -> dict[str, Any]:
        """The latest numbers per pair (or of one pair: None when unknown) and the monitor's settings."""
        self._start()
        if pair is not None:
            doc = self._docs.get(pair)
            return None if doc is None else {**doc, **self._tracker.counts(pair)}
        return {"name": self._name, "namespace": self._namespace, "dataDir": self._data_dir,
                "source": self._source, "intervalS": self._interval_s, "window": self._window,
                "minN": self._min_n, "margin": self._margin, "retrainPriority": self._priority,
                "queue": self._queue_name, "ticks": self._ticks, "lastTick": self._last_tick,
                "lastError": self._last_error, "startedAt": self._started_at,
                "lastPass": self._last_summary,
                "pairs": {p: {**d, **self._tracker.counts(p)} for p, d in self._docs.items()}}

    async def ping(self) -> bool:
        self._start()
        return True


AccuracyMonitor = ray.remote(AccuracyMonitorActor)


def get_or_create_monitor_actor(namespace: str | None = None, data_dir: str | None = None,
                                overrides: dict[str, Any] | None = None, *, name: str = MONITOR_ACTOR_NAME):
    """The detached singleton of `namespace` (default: settings.namespace); created when missing.

    Overrides (the `live` settings' keys, queue_name, queue_overrides, pairs, scan_limit) apply only
    when this call creates the actor.
    """
    settings = _settings()
    ns = namespace or settings.namespace
    return AccuracyMonitor.options(
        name=name, namespace=ns, lifetime="detached", get_if_exists=True, max_restarts=-1,
        max_task_retries=-1, max_concurrency=64, num_cpus=0,
    ).remote(namespace=ns, name=name, data_dir=str(data_dir or settings.data_dir), overrides=overrides)


__all__ = ["MONITOR_ACTOR_NAME", "AccuracyMonitor", "AccuracyMonitorActor", "get_or_create_monitor_actor",
           "live_document"]
