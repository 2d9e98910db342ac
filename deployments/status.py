"""The two composite reads of the ingress: service health (`GET /api/health`) and the status of a
pair's models (`GET /api/models/{pair}/status`). Each gathers storage, the cache, the training
queue, the market feed (health's `dataSource`: lag and last errors per pair) and the snapshots
concurrently; a part that fails is reported, never the whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from deployments.clients import ActorClients
from deployments.errors import ApiError
from deployments.history import HistoryBuffer
from deployments.predictions import Predictions
from ml.clock import now_ms
from ml.serving import views
from ml.serving.model_ids import ENSEMBLE, accepted_types
from ml.serving.prediction import failure_cause
from ml.serving.snapshot import Snapshots

log = logging.getLogger(__name__)

SERVICE = "trading-bot-ml"


class StatusReports:
    def __init__(self, *, settings: Any, cache: Any, reader: Any, actors: ActorClients, snapshots: Snapshots,
                 predictions: Predictions, history: HistoryBuffer, model_types: list[str], tag: str,
                 namespace: str, version: str) -> None:
        self.settings = settings
        self.cache = cache
        self.reader = reader
        self.actors = actors
        self.snapshots = snapshots
        self.predictions = predictions
        self.history = history
        self.model_types = model_types
        self.tag = tag
        self.namespace = namespace
        self.version = version
        self.started = time.monotonic()

    async def health(self, actor_timeout_s: float) -> dict[str, Any]:
        """The health body; `status` is unhealthy without storage, degraded without Redis, the
        training queue or a configured pair's candles."""
        from ml.cache.keys import CacheKind, cache_key

        t0 = time.perf_counter()
        s = self.settings
        pairs = list(s.pairs)
        quick = min(3.0, actor_timeout_s)

        async def storage_state() -> dict:
            try:
                ping = await self.actors.storage_call("ping", timeout=quick)
                return {"status": "healthy", "dataDir": ping.get("dataDir")}
            except ApiError as exc:
                return {"status": "unhealthy", "error": exc.message}

        async def queue_state() -> dict | None:
            with contextlib.suppress(ApiError):
                return await self.actors.queue_call("summary", timeout=quick)
            return None

        async def storage_stats() -> dict:
            async def compute() -> dict:
                return views.storage_summary(await self.actors.storage_call("stats"))

            try:
                key = cache_key(CacheKind.HEALTH, extra="storage-stats", namespace=s.namespace)
                return (await self.cache.get_or_compute(CacheKind.HEALTH, key, compute))[0]
            except Exception as exc:  # noqa: BLE001
                return {"error": failure_cause(exc)}

        async def supervisor() -> dict:
            try:  # a small file read: what `tbml up` restarted (views.SUPERVISOR_DOCUMENT)
                doc = await asyncio.to_thread(self.reader.get_document, *views.SUPERVISOR_DOCUMENT, None)
            except Exception as exc:  # noqa: BLE001 - unreadable: reported, not fatal
                return dict(views.supervisor_view(None), error=failure_cause(exc))
            return views.supervisor_view(doc)

        async def feed_state() -> tuple[dict | None, str | None]:
            try:  # the feed's per-pair view (last attempts, errors); short: health must answer anyway
                return await self.actors.feed_call("status", timeout=min(2.0, quick)), None
            except ApiError as exc:
                return None, exc.message

        redis_ok, storage, queue, stats, counters, snaps, supervised, (feed, feed_error) = await asyncio.gather(
            self.cache.ping(), storage_state(), queue_state(), storage_stats(), self.cache.counters(),
            asyncio.gather(*(self.snapshots.get(p) for p in pairs)), supervisor(), feed_state())
        redis = dict(self.cache.status(), status="healthy" if redis_ok else "degraded")
        now = now_ms()
        data_source = views.data_source_view(pairs, snaps, source=s.data.source, timeframe=s.timeframe,
                                             timeframe_ms=s.timeframe_ms, now=now,
                                             max_lag_bars=s.data.max_lag_bars, feed=feed, feed_error=feed_error)
        status = views.health_status(storage, redis_ok, queue, data_source["pairsWithoutData"],
                                     data_source["status"] != "healthy")
        if status == "healthy" and supervised["gaveUp"]:
            status = "degraded"  # a piece stays down: the supervisor stopped restarting it
        served = self.predictions
        return views.health_body(
            status=status, service=SERVICE, version=self.version, now=now,
            uptime_s=time.monotonic() - self.started,
            components={"ray": {"status": "healthy", "replica": self.tag, "namespace": self.namespace},
                        "redis": redis, "storage": storage, "dataSource": data_source,
                        "trainingQueue": {"status": "healthy" if queue is not None else "unavailable"}},
            models=views.models_loaded(pairs, snaps, self.model_types),
            predictions={"cached": served.cached_count(now),
                         "lastUpdate": max(served.last_computed.values(), default=None),
                         "served": served.served, "fallbacks": served.fallbacks, "history": self.history.stats()},
            training={"queue": queue, "maxConcurrent": s.queue.max_concurrent,
                      "cooldownMinutes": s.queue.cooldown_minutes},
            performance_={**views.performance(counters), "replicaLocalHits": dict(served.memo.hits)},
            storage_stats=stats, elapsed_s=time.perf_counter() - t0) | {"supervisor": supervised}

    async def model_status(self, pair: str) -> dict[str, Any]:
        """Per model type: what storage says (cached per production version), the training gate and
        any active job (the queue), and the live numbers (the accuracy monitor's document); with two
        or more enabled types also the ensemble, with what `model=ensemble` answers and its newest
        built version (`views.ensemble_status`)."""
        from actors.accuracy_monitor import live_document
        from ml.cache.keys import CacheKind, cache_key
        from ml.features import N_FEATURES

        snap = await self.snapshots.get(pair)
        types = accepted_types(self.model_types)  # + ensemble with two or more enabled types

        def stored(mt: str) -> dict:
            try:
                count = len(self.reader.models.version_ids(pair, mt))
            except Exception:  # noqa: BLE001
                count = 0
            return views.model_storage_status(mt, snap.production.get(mt), count)

        async def storage_part(mt: str) -> dict:
            prod = snap.production.get(mt)
            key = cache_key(CacheKind.MODEL_STATUS, pair=pair, model=mt, version=prod.version if prod else None,
                            namespace=self.settings.namespace)

            async def compute() -> dict:
                return await asyncio.to_thread(stored, mt)

            return (await self.cache.get_or_compute(CacheKind.MODEL_STATUS, key, compute))[0]

        async def queue_part() -> tuple[dict | None, dict[str, dict]]:
            try:
                view = await self.actors.queue_call("view", 0)
                gates = await asyncio.gather(*(self.actors.queue_call("can_train", pair, mt) for mt in types))
                return view, dict(zip(types, gates, strict=True))
            except ApiError as exc:
                na = {"allowed": None, "reason": exc.message, "cooldownRemainingMinutes": None}
                return None, {mt: na for mt in types}

        async def live_part() -> dict | None:
            try:
                return await asyncio.to_thread(live_document, self.reader, pair)
            except Exception as exc:  # noqa: BLE001 - unreadable document: no live numbers
                log.warning("live accuracy document of %s unreadable: %s", pair, exc)
                return None

        self.actors.ensure_monitor()
        parts, live_doc = await asyncio.gather(asyncio.gather(*(storage_part(mt) for mt in types)), live_part())
        view, gates = await queue_part()
        models = views.model_status_models(pair, types, parts, view, gates, live_doc)
        if ENSEMBLE in models:  # what model=ensemble answers: the predictions' own rule (ensemble_choice)
            choice = self.predictions.ensemble_choice(pair, snap)
            models[ENSEMBLE]["ensemble"] = views.ensemble_status(choice.block(), snap.newest_ensemble)
        return {"pair": pair, "featureCount": N_FEATURES, "hasModel": any(m["hasModel"] for m in models.values()),
                "models": models, "individual": models, "trainingQueue": views.queue_summary(view),
                "timestamp": now_ms()}
