"""The HTTP ingress (FastAPI on Ray Serve): every route of SPEC §8.

Request path of a prediction, `GET /api/predictions/{pair}`:

1. Validate the pair (404 with `availablePairs`), the model type and the horizon (422).
2. Per-replica snapshot of the pair, refreshed at most every `snapshot_interval_s` (1 s): the
   open time of the last closed candle (candle store footer; wall clock with the `core` source)
   and the production version of every model type (production pointer + meta on the shared
   volume). No actor call, no Redis.
3. The cache key `cache_key(PREDICTIONS, pair, model, version, candle_ts, "h<horizon>")`. A new
   candle or a new production version is a new key, so nothing stale is ever answered. First the
   replica's L1 (`ReplicaMemo`: answers it already got, kept exactly until their Redis entry
   expires; the value under a key never changes), answered without any await; else ONE Redis
   round trip (`Cache.get_or_compute`). A hit answers at once (`cached: true`, `cacheAge`).
   `?bypassCache=true` (or `fresh=true`) skips both.
4. On a miss: the predictor deployment (routed by `multiplexed_model_id = PAIR:model:version`,
   called over Serve's direct gRPC channel), which gets the feature window from its memory, Redis
   or the feature deployment and runs batched inference; the answer is cached. Concurrent misses
   on one key compute once (cluster-wide).
5. The served prediction is appended to an in-memory buffer; a background task sends the
   buffer to the Storage actor every `history_flush_s` (0.25 s): the response never waits for it.

Fallbacks (always 200, `fallback: true`, `reason`): no production model, no candle data, or a
failing predictor (not cached). Redis down: the cache serves from memory, health says `degraded`.
`GET /api/predictions` answers every pair even if some fail.

Live accuracy (`/history`, `/accuracy`, the `live` block of model status): records carry their
realized outcome (`ml.evaluation.live`), persisted by the accuracy monitor actor (which the ingress
creates in the background when it is missing) and resolved on the fly by the same rule for what the
monitor has not reached yet.

`GET /api/ping` answers `{"ok": true}` touching nothing: the anchor of every latency figure.
Mutating routes need `Authorization: Bearer <TBML_API_TOKEN>` when a token is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Path, Query
from ray import serve
from starlette.responses import Response

from deployments import errors
from deployments.common import AppArgs, apply_env, direct, last_row, model_id, now_ms, replica_tag
from deployments.errors import JSON, ApiError
from deployments.predictor import fallback_prediction
from deployments.schemas import (
    AccuracyResponse,
    ActionResponse,
    AllPredictionsResponse,
    CancelBody,
    CleanupBody,
    CleanupResponse,
    ClearCooldownsBody,
    EmergencyStopBody,
    ErrorResponse,
    FeaturesResponse,
    HealthResponse,
    HistoryResponse,
    JobResponse,
    ModelStatusResponse,
    PairsResponse,
    PingResponse,
    PredictionResponse,
    PromoteBody,
    PromoteResponse,
    QueueResponse,
    RollbackBody,
    SaveResponse,
    StorageStatsResponse,
    TrainAccepted,
    TrainBody,
    VersionsResponse,
)
from ml.config import PAIR_PATTERN
from ml.evaluation.live import (
    apply_updates,
    bars_needed,
    degraded,
    pending_count,
    reference_rate,
    resolve,
    rolling_stats,
)

log = logging.getLogger(__name__)

SERVICE = "trading-bot-ml"
PAIRS_REFRESH_S = 5.0
MAX_PAIR_ECHO = 40
_PAIR_RE = re.compile(PAIR_PATTERN)
_PING_BODY = b'{"ok":true}'
L1_MAX_ITEMS = 4096
ACCURACY_SCAN = 20_000  # newest history records the accuracy endpoint scores
MONITOR_RETRY_S = 30.0


@dataclass(frozen=True)
class _LocalHit:
    """A hit on the replica's L1 (shaped like ml.cache.client.CacheHit)."""

    age_s: float
    source: str = "replica"


class ReplicaMemo:
    """L1 in front of Redis for keys whose value never changes (they name the candle and the model
    version), each kept exactly until its Redis entry expires.

    A hit answers without any await: no Redis round trip, and no extra proxy round trip (Ray Serve
    asks the proxy for the request's messages whenever an HTTP handler suspends). Hits are added to
    the shared Redis hit counters once a second, in one call per kind.
    """

    def __init__(self, cache, max_items: int = L1_MAX_ITEMS) -> None:
        self.cache = cache
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[float, Any, float]] = OrderedDict()
        self._unflushed: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._items)

    def get(self, kind: str, key: str) -> tuple[Any, _LocalHit] | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value, stored_at = item
        if time.monotonic() >= expires:
            del self._items[key]
            return None
        self.hits[kind] = self.hits.get(kind, 0) + 1
        self._unflushed[kind] = self._unflushed.get(kind, 0) + 1
        task = self._task
        if task is None or task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())
        return value, _LocalHit(max(0.0, time.time() - stored_at))

    def put(self, kind: str, key: str, value: Any, hit) -> None:
        """Keep `value` (just computed: hit None; or read from Redis: its age) until its TTL ends."""
        age = hit.age_s if hit is not None else 0.0
        left = self.cache.ttl_for(kind) - age
        if left <= 0:
            return
        self._items[key] = (time.monotonic() + left, value, time.time() - age)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    async def _flush(self) -> None:
        from ml.cache.client import CacheKind

        await asyncio.sleep(1.0)
        counts, self._unflushed = self._unflushed, {}
        add = getattr(self.cache, "_count", None)  # ml.cache.client's own counting path (Redis, or pending)
        if add is None:
            return
        for kind, n in counts.items():
            try:
                await add(CacheKind(kind), True, n)
            except Exception as exc:  # noqa: BLE001 - counters are best effort
                log.warning("adding %d local %s hits to the shared counters failed: %s", n, kind, exc)


def _settings():
    from ml.config import get_settings

    return get_settings()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("trading-bot-ml")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0.0.0"


app = FastAPI(
    title="trading-bot-ml",
    version=_version(),
    description="ML price-direction predictions for crypto pairs, served by Ray Serve (SPEC §8). "
                "Errors are JSON: {error, message, ...}. Mutating endpoints need "
                "`Authorization: Bearer <token>` when TBML_API_TOKEN is set.",
    redirect_slashes=False,
)
errors.install(app)
app.add_middleware(errors.BodyLimitMiddleware, limit=lambda: _settings().api.max_body_bytes)


async def require_token(authorization: str | None = Header(None, include_in_schema=False)) -> None:
    errors.check_token(_settings().api.token, authorization)


AUTH = [Depends(require_token)]
E404 = {404: {"model": ErrorResponse}}
E422 = {422: {"model": ErrorResponse}}
EAUTH = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}


def _round_ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _short(x: str) -> str:
    return x if len(x) <= MAX_PAIR_ECHO else x[:MAX_PAIR_ECHO] + "..."


# ==================================================================================== shaping


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def _performance(counters: dict) -> dict:
    hits = counters.get("hits", {})
    misses = counters.get("misses", {})
    return {"cacheHits": {"predictions": hits.get("predictions", 0), "features": hits.get("features", 0),
                          "modelStatus": hits.get("modelStatus", 0), "health": hits.get("health", 0)},
            "cacheMisses": {"predictions": misses.get("predictions", 0), "features": misses.get("features", 0),
                            "modelStatus": misses.get("modelStatus", 0), "health": misses.get("health", 0)},
            "hitRate": round(float(counters.get("hitRate", 0.0)), 4), "source": counters.get("source")}


def _storage_summary(st: dict) -> dict:
    cats = st.get("categories") or {}
    out: dict[str, Any] = {cat: {"count": c.get("count", 0), "sizeBytes": c.get("bytes", 0),
                                 "files": c.get("files", 0)} for cat, c in cats.items()}
    out.update(totalSizeBytes=st.get("totalBytes", 0), dataDir=st.get("dataDir"),
               tempFiles=st.get("tempFiles", 0), quarantine=st.get("quarantine"),
               bufferedPredictions=st.get("bufferedPredictions", 0), timestamp=st.get("timestamp"))
    return out


def _metrics_summary(metrics: dict | None) -> dict:
    m = (metrics or {}).get("model") or {}
    b = (metrics or {}).get("baseline") or {}
    return {"accuracy": m.get("accuracy"), "balancedAccuracy": m.get("balanced_accuracy"),
            "brier": m.get("brier"), "logLoss": m.get("log_loss"), "n": m.get("n"),
            "baselineBrier": b.get("brier"), "baselineLogLoss": b.get("log_loss"),
            "baseRate": b.get("base_rate")}


def _data_range(dr: dict | None) -> dict | None:
    if not isinstance(dr, dict):
        return None
    return {"start": dr.get("start"), "end": dr.get("end"), "counts": dr.get("counts")}


def _version_summary(meta: dict) -> dict:
    return {"version": meta.get("version"), "isProduction": bool(meta.get("isProduction")),
            "savedAt": meta.get("savedAt"), "trainedAt": meta.get("trainedAt"), "jobId": meta.get("jobId"),
            "epochsRun": meta.get("epochsRun"), "metrics": _metrics_summary(meta.get("metrics")),
            "promotion": meta.get("promotion"), "model": {k: (meta.get("model") or {}).get(k)
                                                          for k in ("layers", "hidden", "seq_len", "params",
                                                                    "horizons")}}


_LIVE_FIELDS = ("n", "accuracy", "brier", "baseRate", "baselineBrier", "referenceRate", "nDirectional", "since", "until",
                "degraded", "reason", "flagged", "flaggedAt", "retrain")


def _live_block(doc: dict | None, mt: str, production: dict | None) -> dict | None:
    """The monitor's live numbers of the production version, next to the test numbers it was promoted
    with. None without a production version; `available: false` until the monitor has scored it."""
    if not production:
        return None
    test = production.get("metrics") or {}
    out: dict[str, Any] = {"version": production.get("version"), "testAccuracy": test.get("accuracy"),
                           "testBrier": test.get("brier"), "testBaselineBrier": test.get("baselineBrier")}
    entry = ((doc or {}).get("models") or {}).get(mt)
    if not isinstance(entry, dict) or entry.get("version") != production.get("version"):
        out.update({k: None for k in _LIVE_FIELDS}, n=0, degraded=False, flagged=False, available=False,
                   reason="no live numbers for this version yet (the accuracy monitor publishes them)",
                   updatedAt=None)
        return out
    out.update({k: entry.get(k) for k in _LIVE_FIELDS}, degraded=bool(entry.get("degraded")), available=True,
               window=doc.get("window"), minN=doc.get("minN"), margin=doc.get("margin"),
               updatedAt=doc.get("updatedAt"))
    return out


@dataclass
class _Snap:
    """What the request path needs to know about a pair, read from the shared volume."""

    at: float
    candle_ts: int | None              # open time of the last closed candle (None: no data)
    coverage: dict[str, Any] | None
    production: dict[str, dict[str, Any] | None] = field(default_factory=dict)


class IngressImpl:
    """The ingress replica (FastAPI routes below); deployed as `Ingress` (end of module)."""

    def __init__(self, features, predictor, args: dict[str, Any] | None = None) -> None:
        self.args = AppArgs.model_validate(args or {})
        self.settings = apply_env(self.args.replica_env())
        from ml.cache.client import Cache
        from ml.data.store import CandleStore
        from ml.storage.store import Storage

        s = self.settings
        self.features = direct(features, self.args.handle_grpc)
        self.predictor = direct(predictor, self.args.handle_grpc)
        self.cache = Cache.from_settings(s)
        self.store = CandleStore(s.data_dir, s.timeframe)
        self.reader = Storage.reader(s.data_dir)
        self.data_dir = str(self.reader.data_dir)
        self.namespace = self.args.namespace or s.namespace
        self.tf = s.timeframe_ms
        self.model_types = list(s.model.enabled_types)
        self.default_model = s.model.default_type if s.model.default_type in self.model_types \
            else self.model_types[0]
        self.default_seq_len = int(s.model.profiles[s.model.profile].seq_len) \
            if s.model.profile in s.model.profiles else 30
        self.started = time.monotonic()
        self.tag = replica_tag()
        self._snaps: dict[str, _Snap] = {}
        self._snap_tasks: dict[str, asyncio.Task] = {}
        self._meta_cache: OrderedDict[tuple[str, str, str], dict] = OrderedDict()
        self._pairs: list[str] = list(s.pairs)
        self._pairs_set: set[str] = set(self._pairs)
        self._pairs_at = 0.0
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._storage_handle = None
        self._queue_handle = None
        self._monitor_handle = None
        self._monitor_task: asyncio.Task | None = None
        self._monitor_retry_at = 0.0
        self._history: list[dict] = []
        self._history_task: asyncio.Task | None = None
        self._history_dropped = 0
        self._history_sent = 0
        self._last_computed: dict[str, int] = {}
        self._served = 0
        self._fallbacks = 0
        self._l1 = ReplicaMemo(self.cache)  # predictions and feature rows this replica already has

    # ================================================================================ helpers

    def _known_pairs(self) -> list[str]:
        if time.monotonic() - self._pairs_at > PAIRS_REFRESH_S:
            self._pairs_at = time.monotonic()
            try:
                stored = self.store.pairs() if self.settings.data.source != "core" else []
            except OSError:
                stored = []
            configured = list(self.settings.pairs)
            self._pairs = configured + sorted(set(stored) - set(configured))
            self._pairs_set = set(self._pairs)
        return self._pairs

    def _pair(self, raw: str) -> str:
        """The canonical pair, or 404 with the available pairs."""
        pair = raw.strip().upper() if raw.isascii() and len(raw) <= 64 else raw
        pairs = self._known_pairs()
        if not _PAIR_RE.fullmatch(pair) or pair not in self._pairs_set:
            why = "is not a valid pair name (2-15 letters or digits, e.g. BTC)" \
                if not _PAIR_RE.fullmatch(pair) else "is not served here"
            raise ApiError(404, "pair_not_found", f"pair {_short(raw)!r} {why}", availablePairs=pairs)
        return pair

    def _model_query(self, model: str | None) -> str:
        if model is None or model == "":
            return self.default_model
        mt = model.lower()
        if mt not in self.model_types:
            raise ApiError(422, "invalid_model", f"model {_short(model)!r} is not enabled",
                           availableModels=self.model_types)
        return mt

    def _model_path(self, model: str) -> str:
        mt = model.lower()
        if mt not in self.model_types:
            raise ApiError(404, "model_not_found", f"model type {_short(model)!r} is not enabled",
                           availableModels=self.model_types)
        return mt

    async def _snap(self, pair: str, *, force: bool = False) -> _Snap:
        snap = self._snaps.get(pair)
        if snap is not None and not force and time.monotonic() - snap.at < self.args.snapshot_interval_s:
            return snap
        task = self._snap_tasks.get(pair)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._read_snap, pair))
            self._snap_tasks[pair] = task
        snap = await asyncio.shield(task)
        self._snaps[pair] = snap
        return snap

    def _invalidate(self, pair: str) -> None:
        self._snaps.pop(pair, None)

    def _read_snap(self, pair: str) -> _Snap:
        """Candle coverage and production versions of one pair (worker thread)."""
        coverage = None
        candle_ts = None
        if self.settings.data.source == "core":
            from ml.clock import last_closed_bar_ts

            candle_ts = last_closed_bar_ts(self.tf)
            coverage = {"bars": None, "start": None, "end": candle_ts, "live": True}
        else:
            try:
                coverage = self.store.coverage(pair)
            except Exception as exc:  # noqa: BLE001 - unreadable file: treated as no data
                log.warning("coverage of %s failed: %s", pair, exc)
            if coverage and coverage.get("bars"):
                candle_ts = int(coverage["end"])
        production: dict[str, dict | None] = {}
        for mt in self.model_types:
            production[mt] = self._production(pair, mt)
        return _Snap(at=time.monotonic(), candle_ts=candle_ts, coverage=coverage, production=production)

    def _production(self, pair: str, mt: str) -> dict | None:
        try:
            pointer = self.reader.get_production(pair, mt)
        except Exception as exc:  # noqa: BLE001 - damaged pointer: no model (doctor repairs)
            log.warning("production pointer of %s/%s unreadable: %s", pair, mt, exc)
            return None
        if not pointer or not pointer.get("version"):
            return None
        version = pointer["version"]
        meta = self._meta(pair, mt, version)
        if meta is None:
            return None
        spec = meta.get("model") or {}
        horizons = [int(h) for h in spec.get("horizons") or []] or list(self.settings.labels.horizons)
        return {"version": version, "trainedAt": meta.get("trainedAt"), "horizons": horizons,
                "seqLen": spec.get("seq_len"), "promotedAt": pointer.get("promotedAt"),
                "reason": pointer.get("reason"), "previous": pointer.get("previous")}

    def _meta(self, pair: str, mt: str, version: str) -> dict | None:
        key = (pair, mt, version)
        meta = self._meta_cache.get(key)
        if meta is None:
            try:
                meta = self.reader.get_version_meta(pair, mt, version)
            except Exception as exc:  # noqa: BLE001
                log.warning("meta of %s/%s/%s unreadable: %s", pair, mt, version, exc)
                return None
            if meta is None:
                return None
            self._meta_cache[key] = meta
            while len(self._meta_cache) > 256:
                self._meta_cache.popitem(last=False)
        return meta

    def _predictor_for(self, mid: str):
        handle = self._handles.get(mid)
        if handle is None:
            handle = self.predictor.options(multiplexed_model_id=mid)
            self._handles[mid] = handle
            while len(self._handles) > 128:
                self._handles.popitem(last=False)
        return handle

    async def _storage(self):
        if self._storage_handle is None:
            from actors.storage import get_or_create_storage_actor

            try:
                self._storage_handle = await asyncio.wait_for(asyncio.to_thread(
                    get_or_create_storage_actor, self.data_dir, self.namespace), self.args.actor_timeout_s)
            except Exception as exc:  # noqa: BLE001
                raise ApiError(503, "storage_unavailable", f"the Storage actor is not reachable: {exc}") from None
        return self._storage_handle

    async def _storage_call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        handle = await self._storage()
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args),
                                          timeout or self.args.actor_timeout_s)
        except ApiError:
            raise
        except TimeoutError:
            raise ApiError(503, "storage_unavailable", f"the Storage actor did not answer {method} in time") from None
        except (ValueError, PermissionError) as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - RayActorError, RayTaskError, ...
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ValueError | LookupError):
                raise ApiError(422, "invalid_request", str(cause)) from None
            raise ApiError(503, "storage_unavailable", f"Storage actor {method} failed: {exc}") from None

    async def _queue(self):
        if self._queue_handle is None:
            from actors.training_queue import get_or_create_queue_actor

            try:
                self._queue_handle = await asyncio.wait_for(asyncio.to_thread(
                    get_or_create_queue_actor, self.namespace, self.data_dir, self.args.queue_overrides,
                    name=self.args.queue_name), self.args.actor_timeout_s)
            except Exception as exc:  # noqa: BLE001
                raise ApiError(503, "queue_unavailable", f"the TrainingQueue actor is not reachable: {exc}") from None
        return self._queue_handle

    async def _queue_call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        handle = await self._queue()
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args),
                                          timeout or self.args.actor_timeout_s)
        except TimeoutError:
            raise ApiError(503, "queue_unavailable", f"the TrainingQueue did not answer {method} in time") from None
        except Exception as exc:  # noqa: BLE001
            raise ApiError(503, "queue_unavailable", f"TrainingQueue {method} failed: {exc}") from None

    def _ensure_monitor(self) -> None:
        """Make sure the accuracy monitor actor exists (so a plain `serve deploy` gets one): created in
        the background, never on a request's path; retried later if it fails."""
        if self._monitor_handle is not None or not self.args.monitor:
            return
        if (self._monitor_task is not None and not self._monitor_task.done()) \
                or time.monotonic() < self._monitor_retry_at:
            return
        self._monitor_task = asyncio.get_running_loop().create_task(self._monitor())

    async def _monitor(self):
        from actors.accuracy_monitor import get_or_create_monitor_actor

        overrides = {"queue_name": self.args.queue_name, "queue_overrides": self.args.queue_overrides,
                     **(self.args.monitor_overrides or {})}
        try:
            self._monitor_handle = await asyncio.wait_for(asyncio.to_thread(
                get_or_create_monitor_actor, self.namespace, self.data_dir, overrides,
                name=self.args.monitor_name), self.args.actor_timeout_s)
        except Exception as exc:  # noqa: BLE001 - live accuracy is optional; the API works without it
            self._monitor_retry_at = time.monotonic() + MONITOR_RETRY_S
            log.warning("the accuracy monitor could not be created: %s", _cause(exc))
        return self._monitor_handle

    # ================================================================================ history

    def _record(self, pair: str, pred: dict[str, Any], cached: bool, ts: int) -> None:
        rec = {
            "id": uuid.uuid4().hex,
            "requestId": f"{pair}_{ts}",
            "pair": pair,
            "timestamp": ts,
            "direction": pred.get("direction"),
            "probability": pred.get("probability"),
            "confidence": pred.get("confidence"),
            "signal": pred.get("signal"),
            "modelType": pred.get("modelType"),
            "modelVersion": pred.get("modelVersion"),
            "horizon": pred.get("horizon"),
            "asOf": pred.get("asOf"),
            "targetTime": pred.get("targetTime"),
            "stale": pred.get("stale"),
            "fallback": pred.get("fallback"),
            "cached": cached,
        }
        if pred.get("reason"):
            rec["reason"] = pred["reason"]
        if len(self._history) >= self.args.history_max_buffer:
            self._history.pop(0)
            self._history_dropped += 1
        self._history.append(rec)
        task = self._history_task
        if task is None or task.done():
            self._history_task = asyncio.get_running_loop().create_task(self._history_loop())

    async def _history_loop(self) -> None:
        while self._history:
            await asyncio.sleep(self.args.history_flush_s)
            try:
                await self._flush_history()
                self._ensure_monitor()  # there is history to resolve now
            except Exception as exc:  # noqa: BLE001 - keep the records for the next round
                log.warning("sending prediction history failed: %s", exc)
                await asyncio.sleep(1.0)

    async def _flush_history(self) -> int:
        sent = 0
        while self._history:
            n = self.args.history_max_batch
            batch, self._history = self._history[:n], self._history[n:]
            try:
                await self._storage_call("append_predictions", batch)
            except Exception:
                self._history[:0] = batch  # put back in front (bounded by history_max_buffer)
                overflow = len(self._history) - self.args.history_max_buffer
                if overflow > 0:
                    del self._history[:overflow]
                    self._history_dropped += overflow
                raise
            sent += len(batch)
            self._history_sent += len(batch)
        return sent

    # ================================================================================ predictions

    async def _predict(self, pair: str, model_type: str, horizon: int | None, bypass: bool
                       ) -> tuple[dict[str, Any], Any]:
        """(prediction, CacheHit or None) for one pair; raises ApiError only for bad input."""
        from ml.cache.client import CacheKind, cache_key

        snap = await self._snap(pair)
        prod = snap.production.get(model_type)
        version = prod["version"] if prod else None
        horizons = prod["horizons"] if prod else list(self.settings.labels.horizons)
        h = horizons[0] if horizon is None else int(horizon)
        if h not in horizons:
            raise ApiError(422, "invalid_horizon", f"horizon {h} is not predicted for {pair}/{model_type}",
                           availableHorizons=horizons)
        key = cache_key(CacheKind.PREDICTIONS, pair=pair, model=model_type, version=version,
                        candle_ts=snap.candle_ts, extra=f"h{h}", namespace=self.settings.namespace)

        async def compute() -> dict[str, Any]:
            return await self._compute(pair, model_type, version, snap, h)

        if not bypass:
            local = self._l1.get("predictions", key)
            if local is not None:
                return local
        try:
            if bypass:
                return await compute(), None
            value, hit = await self.cache.get_or_compute(CacheKind.PREDICTIONS, key, compute)
            self._l1.put("predictions", key, value, hit)
            return value, hit
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing predictor: neutral answer, not cached
            log.warning("prediction of %s/%s failed: %s", pair, model_type, exc)
            as_of = snap.candle_ts + self.tf if snap.candle_ts is not None else None
            return fallback_prediction(model_type=model_type, version=version, horizon=h, as_of=as_of,
                                       timeframe_ms=self.tf,
                                       reason=f"prediction failed: {_cause(exc)}"), None

    async def _compute(self, pair: str, model_type: str, version: str | None, snap: _Snap, h: int
                       ) -> dict[str, Any]:
        as_of = snap.candle_ts + self.tf if snap.candle_ts is not None else None
        if snap.candle_ts is None:
            pred = fallback_prediction(model_type=model_type, version=version, horizon=h,
                                       reason=f"no candle data for {pair}")
        elif version is None:
            pred = fallback_prediction(model_type=model_type, version=None, horizon=h, as_of=as_of,
                                       timeframe_ms=self.tf,
                                       reason=f"no production {model_type} model for {pair} yet: "
                                              f"POST /api/train/{pair}/{model_type}")
        else:
            req = {"pair": pair, "modelType": model_type, "version": version, "candleTs": snap.candle_ts,
                   "horizon": h}
            out = await self._predictor_for(model_id(pair, model_type, version)).predict.remote(req)
            pred = out["prediction"]
        self._last_computed[pair] = now_ms()
        return pred

    def _prediction_body(self, pair: str, pred: dict, hit, t0: float, ts: int) -> dict[str, Any]:
        body = {"pair": pair, "prediction": pred, "timestamp": ts, "cached": hit is not None}
        if hit is not None:
            body["cacheAge"] = int(hit.age_s * 1000)
        body["responseTime"] = _round_ms(time.perf_counter() - t0)
        return body

    # ================================================================================ routes

    @app.get("/api/ping", response_model=PingResponse, tags=["health"],
             summary="No-op: touches nothing (the latency anchor)")
    async def ping(self) -> Response:
        return Response(content=_PING_BODY, media_type="application/json")

    @app.get("/api/predictions/{pair}", response_model=PredictionResponse, responses={**E404, **E422},
             tags=["predictions"], summary="Prediction of one pair (cached per candle and model version)")
    async def prediction(self, pair: str, model: str | None = Query(None, max_length=32),
                         horizon: int | None = Query(None, ge=1, le=10_000),
                         bypassCache: bool = Query(False, description="skip the cache (recompute)"),
                         fresh: bool = Query(False, description="same as bypassCache")) -> JSON:
        t0 = time.perf_counter()
        p = self._pair(pair)
        mt = self._model_query(model)
        pred, hit = await self._predict(p, mt, horizon, bypassCache or fresh)
        ts = now_ms()
        self._served += 1
        if pred.get("fallback"):
            self._fallbacks += 1
        self._record(p, pred, hit is not None, ts)
        return JSON(self._prediction_body(p, pred, hit, t0, ts))

    @app.get("/api/predictions", response_model=AllPredictionsResponse, tags=["predictions"],
             summary="Predictions of every configured pair (a failing pair gets a fallback)")
    async def predictions(self, model: str | None = Query(None, max_length=32)) -> JSON:
        t0 = time.perf_counter()
        mt = self._model_query(model)
        pairs = list(self.settings.pairs)
        results = await asyncio.gather(*(self._predict(p, mt, None, False) for p in pairs),
                                       return_exceptions=True)
        ts = now_ms()
        out: dict[str, Any] = {}
        cached: dict[str, bool] = {}
        for pair, res in zip(pairs, results, strict=True):
            if isinstance(res, BaseException):
                pred = fallback_prediction(model_type=mt, version=None,
                                           horizon=self.settings.labels.horizons[0],
                                           reason=f"prediction failed: {_cause(res)}")
                hit = None
            else:
                pred, hit = res
            out[pair] = pred
            cached[pair] = hit is not None
            self._served += 1
            self._record(pair, pred, hit is not None, ts)
        return JSON({"predictions": out, "count": len(out), "timestamp": ts, "cached": cached,
                     "responseTime": _round_ms(time.perf_counter() - t0)})

    @app.get("/api/predictions/{pair}/history", response_model=HistoryResponse, responses={**E404, **E422},
             tags=["predictions"], summary="Served predictions, newest first, with realized outcomes")
    async def history(self, pair: str, limit: int = Query(100, ge=1, le=10_000),
                      since: int | None = Query(None, ge=0, description="epoch ms")) -> JSON:
        p = self._pair(pair)
        with contextlib.suppress(Exception):
            await self._flush_history()
        records, total = await asyncio.gather(self._storage_call("query_predictions", p, limit, since),
                                              self._storage_call("count_predictions", p))
        records = await asyncio.to_thread(self._resolve, p, records)
        return JSON({"pair": p, "predictions": records, "count": len(records), "totalCount": total,
                     "timestamp": now_ms()})

    @app.get("/api/predictions/{pair}/accuracy", response_model=AccuracyResponse, responses={**E404, **E422},
             tags=["predictions"], summary="Rolling live accuracy and Brier of resolved predictions vs the base rate")
    async def accuracy(self, pair: str,
                       window: int | None = Query(None, ge=1, le=10_000,
                                                  description="resolved predictions (default live.window)"),
                       model: str | None = Query(None, max_length=32)) -> JSON:
        p = self._pair(pair)
        mt = self._model_query(model) if model else None
        live = self.settings.live
        w = int(window or live.window)
        self._ensure_monitor()
        with contextlib.suppress(Exception):
            await self._flush_history()
        records, snap = await asyncio.gather(self._storage_call("query_predictions", p, ACCURACY_SCAN, None),
                                             self._snap(p))
        records = await asyncio.to_thread(self._resolve, p, records)

        def judged(stats: dict) -> dict:
            flag, reason = degraded(stats, live.degraded_min_n, live.degraded_margin)
            return {**stats, "degraded": flag, "degradedReason": reason}

        def reference(t: str) -> float | None:  # the production version's training up-rate
            prod = snap.production.get(t)
            return reference_rate(self._meta(p, t, prod["version"])) if prod else None

        models = {}
        for t in ([mt] if mt else self.model_types):
            prod = snap.production.get(t)
            version = prod["version"] if prod else None
            stats = rolling_stats(records, w, model_type=t, model_version=version, reference=reference(t)) \
                if version else None
            models[t] = {"version": version, **judged(stats)} if stats is not None else {"version": None}
        overall = rolling_stats(records, w, model_type=mt, reference=reference(mt or self.default_model))
        out = {"pair": p, "window": w, "modelType": mt, **judged(overall),
               "pending": pending_count(records, mt), "minN": live.degraded_min_n, "margin": live.degraded_margin,
               "models": models, "timestamp": now_ms()}
        return JSON(out)

    def _resolve(self, pair: str, records: list[dict]) -> list[dict]:
        """Records with their realized outcome: the monitor's persisted resolution where it has run,
        else resolved here on the fly by the same rule (ml.evaluation.live; not persisted, so answers
        stay fresh between monitor passes). `outcome` repeats realizedDirection for older clients."""
        if self.settings.data.source != "core":
            now = now_ms()
            span = bars_needed(records, self.tf, now)
            if span is not None:
                try:
                    candles = self.store.read(pair, start_ts=span[0], end_ts=span[1])
                except Exception:  # noqa: BLE001 - no candles: nothing resolves on the fly
                    candles = None
                apply_updates(records, resolve(records, candles, self.tf, now))
        for r in records:
            if r.get("realizedDirection") is not None:
                r["outcome"] = r["realizedDirection"]
        return records

    @app.get("/api/features/{pair}", response_model=FeaturesResponse, responses=E404, tags=["features"],
             summary="The latest feature row of a pair (cached per candle)")
    async def features_of(self, pair: str) -> JSON:
        from ml.cache.client import CacheKind, cache_key
        from ml.features import FEATURE_NAMES

        p = self._pair(pair)
        snap = await self._snap(p)
        if snap.candle_ts is None:
            raise ApiError(404, "no_data", f"no candle data for {p}")
        prod = snap.production.get(self.default_model)
        rows = int(prod["seqLen"]) if prod and prod.get("seqLen") else self.default_seq_len
        key = cache_key(CacheKind.FEATURES, pair=p, candle_ts=snap.candle_ts, extra=f"w{rows}",
                        namespace=self.settings.namespace)

        async def compute() -> dict:
            return await self.features.window.remote(p, snap.candle_ts, rows)

        local = self._l1.get("features", key)
        if local is not None:
            block, hit = local
        else:
            payload, hit = await self.cache.get_or_compute(CacheKind.FEATURES, key, compute)
            if "error" in payload:
                raise ApiError(404 if payload["error"] == "no_data" else 503, payload["error"],
                               payload.get("message", payload["error"]))
            values = [None if not math.isfinite(v) else float(f"{v:.7g}") for v in last_row(payload).tolist()]
            block = {
                "count": len(values),
                "names": list(FEATURE_NAMES) if len(FEATURE_NAMES) == len(values) else
                [f"f{i}" for i in range(len(values))],
                "values": values,
                "metadata": {"asOf": int(payload["ts"][-1]) + self.tf, "bars": int(payload.get("bars", 0)),
                             "extractedAt": int(payload.get("extractedAt", 0)),
                             "featureHash": payload.get("featureHash"), "timeframe": self.settings.timeframe},
            }
            self._l1.put("features", key, block, hit)
        return JSON({"pair": p, "features": block, "timestamp": now_ms(), "cached": hit is not None})

    @app.get("/api/pairs", response_model=PairsResponse, tags=["predictions"],
             summary="Configured pairs with candle coverage and production models")
    async def pairs(self) -> JSON:
        pairs = self._known_pairs()
        snaps = await asyncio.gather(*(self._snap(p) for p in pairs))
        now = now_ms()
        from ml.serving.signals import is_stale

        out = []
        for pair, snap in zip(pairs, snaps, strict=True):
            models = {}
            for mt, prod in snap.production.items():
                models[mt] = {"hasModel": prod is not None,
                              "version": prod["version"] if prod else None,
                              "trainedAt": prod.get("trainedAt") if prod else None,
                              "promotedAt": prod.get("promotedAt") if prod else None,
                              "horizons": prod.get("horizons") if prod else None,
                              "stale": is_stale(prod.get("trainedAt"), now, self.settings.signals.expire_hours)
                              if prod else None}
            cov = dict(snap.coverage) if snap.coverage else None
            if cov and cov.get("end") is not None:
                cov["lastClose"] = int(cov["end"]) + self.tf
            out.append({"pair": pair, "configured": pair in self.settings.pairs, "coverage": cov,
                        "hasData": snap.candle_ts is not None, "models": models})
        return JSON({"pairs": out, "count": len(out), "timeframe": self.settings.timeframe,
                     "source": self.settings.data.source, "timestamp": now})

    # ================================================================================ health

    @app.get("/api/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}},
             tags=["health"], summary="Service health: components, models, cache, queue, storage")
    async def health(self) -> JSON:
        from ml.cache.client import CacheKind, cache_key

        t0 = time.perf_counter()
        s = self.settings
        pairs = list(s.pairs)

        async def storage_state() -> dict:
            try:
                ping = await self._storage_call("ping", timeout=min(3.0, self.args.actor_timeout_s))
                return {"status": "healthy", "dataDir": ping.get("dataDir")}
            except ApiError as exc:
                return {"status": "unhealthy", "error": exc.message}

        async def queue_state() -> dict | None:
            try:
                return await self._queue_call("summary", timeout=min(3.0, self.args.actor_timeout_s))
            except ApiError:
                return None

        async def storage_stats() -> dict:
            async def compute() -> dict:
                st = await self._storage_call("stats")
                return _storage_summary(st)

            try:
                value, _ = await self.cache.get_or_compute(
                    CacheKind.HEALTH, cache_key(CacheKind.HEALTH, extra="storage-stats", namespace=s.namespace),
                    compute)
                return value
            except Exception as exc:  # noqa: BLE001
                return {"error": _cause(exc)}

        redis_ok, storage, queue, stats, counters, snaps = await asyncio.gather(
            self.cache.ping(), storage_state(), queue_state(), storage_stats(), self.cache.counters(),
            asyncio.gather(*(self._snap(p) for p in pairs)))
        redis = dict(self.cache.status())
        redis["status"] = "healthy" if redis_ok else "degraded"
        data_pairs = {p: {"bars": sn.coverage.get("bars") if sn.coverage else 0,
                          "lastClose": sn.candle_ts + self.tf if sn.candle_ts is not None else None}
                      for p, sn in zip(pairs, snaps, strict=True)}
        missing = [p for p, sn in zip(pairs, snaps, strict=True) if sn.candle_ts is None]
        data_source = {"status": "healthy" if not missing else "degraded", "type": s.data.source,
                       "timeframe": s.timeframe, "pairs": data_pairs, "pairsWithoutData": missing}
        loaded = sorted({p for p, sn in zip(pairs, snaps, strict=True) if any(sn.production.values())})
        n_models = sum(1 for sn in snaps for v in sn.production.values() if v)
        if storage["status"] != "healthy":
            status = "unhealthy"
        elif not redis_ok or queue is None or missing:
            status = "degraded"
        else:
            status = "healthy"
        ttl_ms = s.cache.predictions_ttl_s * 1000
        now = now_ms()
        body = {
            "status": status,
            "service": SERVICE,
            "version": app.version,
            "timestamp": now,
            "uptime": _uptime(time.monotonic() - self.started),
            "components": {
                "ray": {"status": "healthy", "replica": self.tag, "namespace": self.namespace},
                "redis": redis,
                "storage": storage,
                "dataSource": data_source,
                "trainingQueue": {"status": "healthy" if queue is not None else "unavailable"},
            },
            "models": {"loaded": n_models, "pairs": loaded, "types": self.model_types},
            "predictions": {
                "cached": sum(1 for t in self._last_computed.values() if now - t < ttl_ms),
                "lastUpdate": max(self._last_computed.values(), default=None),
                "served": self._served, "fallbacks": self._fallbacks,
                "history": {"buffered": len(self._history), "sent": self._history_sent,
                            "dropped": self._history_dropped},
            },
            "training": {"queue": queue, "maxConcurrent": s.queue.max_concurrent,
                         "cooldownMinutes": s.queue.cooldown_minutes},
            "performance": {**_performance(counters), "replicaLocalHits": dict(self._l1.hits)},
            "storage": {"enabled": True, "stats": stats},
            "responseTime": _round_ms(time.perf_counter() - t0),
        }
        return JSON(body, status_code=503 if status == "unhealthy" else 200)

    # ================================================================================ models

    @app.get("/api/models/{pair}/status", response_model=ModelStatusResponse, responses=E404, tags=["models"],
             summary="Per model type: production version, metrics, versions count, training gate")
    async def model_status(self, pair: str) -> JSON:
        from ml.cache.client import CacheKind, cache_key
        from ml.features import N_FEATURES

        p = self._pair(pair)
        snap = await self._snap(p)

        async def storage_part(mt: str) -> dict:
            prod = snap.production.get(mt)
            version = prod["version"] if prod else None
            key = cache_key(CacheKind.MODEL_STATUS, pair=p, model=mt, version=version,
                            namespace=self.settings.namespace)

            async def compute() -> dict:
                return await asyncio.to_thread(self._model_storage_status, p, mt, prod)

            value, _ = await self.cache.get_or_compute(CacheKind.MODEL_STATUS, key, compute)
            return value

        async def queue_part() -> tuple[dict | None, dict[str, dict]]:
            try:
                view = await self._queue_call("view", 0)
                gates = await asyncio.gather(*(self._queue_call("can_train", p, mt) for mt in self.model_types))
                return view, dict(zip(self.model_types, gates, strict=True))
            except ApiError as exc:
                na = {"allowed": None, "reason": exc.message, "cooldownRemainingMinutes": None}
                return None, {mt: na for mt in self.model_types}

        async def live_part() -> dict | None:
            from actors.accuracy_monitor import live_document

            try:
                return await asyncio.to_thread(live_document, self.reader, p)
            except Exception as exc:  # noqa: BLE001 - unreadable document: no live numbers
                log.warning("live accuracy document of %s unreadable: %s", p, exc)
                return None

        self._ensure_monitor()
        parts, live_doc = await asyncio.gather(asyncio.gather(*(storage_part(mt) for mt in self.model_types)),
                                               live_part())
        view, gates = await queue_part()
        active = {(j.get("pair"), j.get("modelType")): j for j in ((view or {}).get("active") or {}).get("jobs", [])}
        models = {}
        for mt, part in zip(self.model_types, parts, strict=True):
            entry = dict(part)
            job = active.get((p, mt))
            entry["modelInfo"] = dict(entry.get("modelInfo") or {}, isTraining=job is not None)
            if job is not None:
                entry["activeJob"] = job
            entry["training"] = gates.get(mt)
            entry["live"] = _live_block(live_doc, mt, entry.get("production"))
            models[mt] = entry
        summary = None
        if view is not None:
            summary = {"active": view["active"]["count"], "queued": view["queued"]["count"],
                       "paused": view.get("paused"), "maxConcurrent": view["active"].get("maxConcurrent"),
                       "cooldowns": view.get("cooldowns")}
        return JSON({"pair": p, "featureCount": N_FEATURES, "hasModel": any(m["hasModel"] for m in models.values()),
                     "models": models, "individual": models, "trainingQueue": summary, "timestamp": now_ms()})

    def _model_storage_status(self, pair: str, mt: str, prod: dict | None) -> dict:
        try:
            count = len(self.reader.models.version_ids(pair, mt))
        except Exception:  # noqa: BLE001
            count = 0
        if prod is None:
            return {"hasModel": False, "modelInfo": {}, "production": None, "versions": count}
        meta = self._meta(pair, mt, prod["version"]) or {}
        spec = meta.get("model") or {}
        return {
            "hasModel": True,
            "modelInfo": {"type": mt, "layers": spec.get("layers"), "hidden": spec.get("hidden"),
                          "seqLen": spec.get("seq_len"), "totalParams": spec.get("params"),
                          "features": spec.get("n_features"), "horizons": spec.get("horizons")},
            "production": {"version": prod["version"], "trainedAt": meta.get("trainedAt"),
                           "promotedAt": prod.get("promotedAt"), "reason": prod.get("reason"),
                           "metrics": _metrics_summary(meta.get("metrics")),
                           "epochsRun": meta.get("epochsRun"), "dataRange": _data_range(meta.get("dataRange"))},
            "versions": count,
        }

    @app.get("/api/models/{pair}/versions", response_model=VersionsResponse, responses={**E404, **E422},
             tags=["models"], summary="Every stored version per model type, newest first")
    async def model_versions(self, pair: str, model: str | None = Query(None, max_length=32)) -> JSON:
        p = self._pair(pair)
        types = [self._model_query(model)] if model else self.model_types

        def read() -> dict:
            out = {}
            for mt in types:
                metas = self.reader.list_versions(p, mt)
                prod = next((m.get("version") for m in metas if m.get("isProduction")), None)
                out[mt] = {"production": prod, "count": len(metas), "versions": [_version_summary(m) for m in metas]}
            return out

        return JSON({"pair": p, "models": await asyncio.to_thread(read), "timestamp": now_ms()})

    async def _set_production(self, pair: str, mt: str, version: str, reason: str, previous: str | None
                              ) -> JSON:
        if await asyncio.to_thread(self._meta, pair, mt, version) is None:
            known = [m.get("version") for m in await asyncio.to_thread(self.reader.list_versions, pair, mt)]
            raise ApiError(404, "version_not_found", f"no version {_short(version)!r} of {pair}/{mt}",
                           availableVersions=known[:50])
        pointer = await self._storage_call("set_production", pair, mt, version, reason)
        self._invalidate(pair)
        return JSON({"success": True, "message": f"{pair}/{mt} production is now {version}", "pair": pair,
                     "modelType": mt, "version": version, "previousVersion": previous,
                     "promotedAt": pointer.get("promotedAt") if isinstance(pointer, dict) else None,
                     "reason": reason, "timestamp": now_ms()})

    @app.post("/api/models/{pair}/{model}/promote", response_model=PromoteResponse, dependencies=AUTH,
              responses={**E404, **E422, **EAUTH}, tags=["models"],
              summary="Make a stored version production (the next prediction uses it)")
    async def promote(self, pair: str, model: str, body: PromoteBody) -> JSON:
        p = self._pair(pair)
        mt = self._model_path(model)
        snap = await self._snap(p, force=True)
        prod = snap.production.get(mt)
        return await self._set_production(p, mt, body.version, body.reason or "manual promotion (HTTP API)",
                                          prod["version"] if prod else None)

    @app.post("/api/models/{pair}/{model}/rollback", response_model=PromoteResponse, dependencies=AUTH,
              responses={**E404, **E422, **EAUTH, 409: {"model": ErrorResponse}}, tags=["models"],
              summary="Point production back to a version (default: the previous one)")
    async def rollback(self, pair: str, model: str, body: Annotated[RollbackBody | None, Body()] = None) -> JSON:
        p = self._pair(pair)
        mt = self._model_path(model)
        body = body or RollbackBody()
        snap = await self._snap(p, force=True)
        prod = snap.production.get(mt)
        current = prod["version"] if prod else None
        target = body.version or (prod or {}).get("previous")
        if not target:
            raise ApiError(409, "no_previous_version", f"{p}/{mt} has no previous production version; "
                                                       "name one in the body: {\"version\": ...}")
        return await self._set_production(p, mt, target, body.reason or f"rollback from {current} to {target}",
                                          current)

    # ================================================================================ training

    async def _submit(self, pair: str, mt: str, body: TrainBody) -> tuple[int, dict, dict[str, str]]:
        req = {"pair": pair, "model_type": mt, "epochs": body.epochs, "batch_size": body.batchSize,
               "learning_rate": body.learningRate, "priority": body.priority, "max_attempts": body.maxAttempts,
               "horizon": body.horizon}
        out = await self._queue_call("submit", req)
        ts = now_ms()
        status = out.get("status")
        base = {"pair": pair, "modelType": mt, "canTrain": out.get("canTrain"), "timestamp": ts}
        if status == "queued":
            return 202, {"message": out.get("message") or f"Training job queued for {pair}:{mt}",
                         "jobId": out.get("jobId"), "status": "queued", "queuePosition": out.get("queuePosition"),
                         "queueStatus": out.get("queueStatus"), "job": out.get("job"), **base}, {}
        if status == "duplicate":
            return 409, {"error": "duplicate", "message": out.get("message"), "jobId": out.get("jobId"),
                         "existingJobId": out.get("existingJobId"), "queuePosition": out.get("queuePosition"),
                         **base}, {}
        if status == "cooldown":
            retry = float(out.get("retryAfterSeconds") or 0)
            return 429, {"error": "cooldown", "message": out.get("message"), "retryAfterSeconds": retry,
                         "cooldownRemainingMinutes": out.get("cooldownRemainingMinutes"), **base}, \
                {"Retry-After": str(max(1, math.ceil(retry)))}
        if status == "paused":
            return 503, {"error": "paused", "message": out.get("message") or "training is paused (emergency stop)",
                         **base}, {}
        return int(out.get("httpStatus") or 422), {"error": out.get("error", "invalid_request"),
                                                   "message": out.get("message", "invalid request"), **base}, {}

    @app.post("/api/train/{pair}/{model}", response_model=TrainAccepted, status_code=202, dependencies=AUTH,
              responses={**E404, **E422, **EAUTH, 409: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                         503: {"model": ErrorResponse}}, tags=["training"],
              summary="Queue a training job (202; 409 duplicate, 429 cooldown, 503 paused)")
    async def train_model(self, pair: str, model: str, body: Annotated[TrainBody | None, Body()] = None) -> JSON:
        p = self._pair(pair)
        mt = self._model_path(model)
        status, payload, headers = await self._submit(p, mt, body or TrainBody())
        return JSON(payload, status_code=status, headers=headers)

    @app.post("/api/train/{pair}", response_model=TrainAccepted, status_code=202, dependencies=AUTH,
              responses={**E404, **E422, **EAUTH, 409: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                         503: {"model": ErrorResponse}}, tags=["training"],
              summary="Queue training of every enabled model type of a pair")
    async def train_all(self, pair: str, body: Annotated[TrainBody | None, Body()] = None) -> JSON:
        p = self._pair(pair)
        body = body or TrainBody()
        results = [await self._submit(p, mt, body) for mt in self.model_types]
        accepted = [r for r in results if r[0] == 202]
        chosen = accepted[0] if accepted else results[0]
        payload = dict(chosen[1])
        payload["results"] = [dict(r[1], httpStatus=r[0]) for r in results]
        if accepted:
            payload["jobs"] = [r[1]["jobId"] for r in accepted]
            payload["message"] = f"{len(accepted)} of {len(results)} training job(s) queued for {p}"
        return JSON(payload, status_code=chosen[0], headers=chosen[2])

    @app.get("/api/training/queue", response_model=QueueResponse, tags=["training"],
             summary="Active, queued and recent jobs, cooldowns, pause flag")
    async def training_queue(self, recent: int = Query(20, ge=0, le=1000)) -> JSON:
        view = await self._queue_call("view", recent)
        return JSON({"queue": view, "timestamp": now_ms()})

    @app.get("/api/training/job/{job_id}", response_model=JobResponse, responses=E404, tags=["training"],
             summary="One job with its progress (epoch, loss, ETA)")
    async def training_job(self, job_id: str = Path(..., max_length=128)) -> JSON:
        job = await self._queue_call("job", job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"no training job {_short(job_id)!r}")
        return JSON({"job": job, "timestamp": now_ms()})

    @app.delete("/api/training/job/{job_id}", response_model=ActionResponse, dependencies=AUTH,
                responses={**E404, **EAUTH, 409: {"model": ErrorResponse}}, tags=["training"],
                summary="Cancel a queued or running job (a running one is really stopped)")
    async def cancel_job(self, job_id: str = Path(..., max_length=128),
                         body: Annotated[CancelBody | None, Body()] = None) -> JSON:
        reason = (body.reason if body else None) or "cancelled via HTTP API"
        out = await self._queue_call("cancel", job_id, reason)
        if not out.get("ok"):
            code = out.get("error", "not_found")
            raise ApiError(404 if code == "not_found" else 409, "job_not_found" if code == "not_found" else code,
                           out.get("message", code), jobId=job_id)
        return JSON({"success": True, "message": f"job {job_id} cancelled", "jobId": job_id,
                     "wasRunning": out.get("wasRunning"), "stopped": out.get("stopped"), "job": out.get("job"),
                     "timestamp": now_ms()})

    @app.post("/api/training/emergency-stop", response_model=ActionResponse, dependencies=AUTH,
              responses=EAUTH, tags=["training"],
              summary="Cancel everything queued, stop everything running, pause until resume")
    async def emergency_stop(self, body: Annotated[EmergencyStopBody | None, Body()] = None) -> JSON:
        out = await self._queue_call("emergency_stop", (body.reason if body else None) or "emergency stop (HTTP API)")
        return JSON({"success": True, "message": "training stopped and paused until POST /api/training/resume",
                     "paused": True, "cancelledQueued": out.get("cancelledQueued"),
                     "stoppedActive": out.get("stoppedActive"), "timestamp": now_ms()})

    @app.post("/api/training/resume", response_model=ActionResponse, dependencies=AUTH, responses=EAUTH,
              tags=["training"], summary="Unpause the queue after an emergency stop")
    async def resume(self) -> JSON:
        out = await self._queue_call("resume")
        return JSON({"success": True, "message": "training queue resumed", "paused": False,
                     "wasPaused": out.get("wasPaused"), "timestamp": now_ms()})

    @app.post("/api/training/clear-cooldowns", response_model=ActionResponse, dependencies=AUTH,
              responses={**E404, **EAUTH}, tags=["training"],
              summary="Lift the cooldown of one PAIR+model, of a pair, or all")
    async def clear_cooldowns(self, body: Annotated[ClearCooldownsBody | None, Body()] = None) -> JSON:
        body = body or ClearCooldownsBody()
        pair = self._pair(body.pair) if body.pair else None
        mt = self._model_path(body.modelType) if body.modelType else None
        out = await self._queue_call("clear_cooldowns", pair, mt)
        what = f"{pair or 'all pairs'}/{mt or 'all models'}"
        return JSON({"success": True, "message": f"cleared {out.get('cleared', 0)} cooldown(s) of {what}",
                     "cleared": out.get("cleared", 0), "pair": pair, "modelType": mt, "timestamp": now_ms()})

    # ================================================================================ storage

    @app.get("/api/storage/stats", response_model=StorageStatsResponse, tags=["storage"],
             summary="Count and size per category of the shared volume")
    async def storage_stats(self) -> JSON:
        st, counters = await asyncio.gather(self._storage_call("stats"), self.cache.counters())
        storage = _storage_summary(st)
        files = st.get("files") or []
        storage["files"] = files[:200]
        storage["filesTruncated"] = bool(st.get("filesTruncated")) or len(files) > 200
        try:
            queue = await self._queue_call("summary", timeout=3.0)
        except ApiError:
            queue = None
        return JSON({"storage": storage, "performance": _performance(counters), "trainingQueue": queue,
                     "timestamp": now_ms()})

    @app.post("/api/storage/save", response_model=SaveResponse, dependencies=AUTH, responses=EAUTH,
              tags=["storage"], summary="Flush buffered prediction history to disk (atomic writes)")
    async def storage_save(self) -> JSON:
        t0 = time.perf_counter()
        with contextlib.suppress(ApiError):
            await self._flush_history()
        out = await self._storage_call("save")
        saved = int(out.get("savedCount", 0))
        return JSON({"success": True, "message": f"ML data saved with atomic writes ({saved} records flushed)",
                     "savedCount": saved, "durationMs": _round_ms(time.perf_counter() - t0),
                     "timestamp": now_ms()})

    @app.post("/api/storage/cleanup", response_model=CleanupResponse, dependencies=AUTH,
              responses={**E422, **EAUTH}, tags=["storage"],
              summary="Remove records older than maxAgeHours and surplus non-production versions")
    async def storage_cleanup(self, body: Annotated[CleanupBody | None, Body()] = None) -> JSON:
        body = body or CleanupBody()
        out = await self._storage_call("cleanup", float(body.maxAgeHours), timeout=max(60.0, self.args.actor_timeout_s))
        n = int(out.get("cleanedCount", 0))
        return JSON({"success": True, "message": f"Cleaned up {n} old ML records", "cleanedCount": n,
                     "maxAgeHours": body.maxAgeHours, "predictions": out.get("predictions"),
                     "trainingRecords": out.get("trainingRecords"), "modelVersions": out.get("modelVersions"),
                     "durationMs": out.get("durationMs"), "timestamp": now_ms()})

    # ================================================================================ internals

    async def internal_stats(self) -> dict[str, Any]:
        """Handle-only diagnostics (tests, bench)."""
        return {"replica": self.tag, "served": self._served, "fallbacks": self._fallbacks,
                "localHits": dict(self._l1.hits), "localItems": len(self._l1),
                "historyBuffered": len(self._history), "historySent": self._history_sent,
                "historyDropped": self._history_dropped, "cache": self.cache.status()}


# Decorated here, not with @ on the class: Serve pickles the class when the deployment is created,
# and a class that is importable by its name is pickled by reference, so replicas run this very
# module (its globals included) instead of a by-value copy frozen half-way through the import.
Ingress = serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.2})(
    serve.ingress(app)(IngressImpl))
