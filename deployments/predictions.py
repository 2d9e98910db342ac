"""The prediction path of the ingress, per request:

1. The pair's snapshot (`ml.serving.snapshot`): last closed candle and production versions.
2. The cache key `cache_key(PREDICTIONS, pair, model, version, candle_ts, "h<horizon>")`: a new
   candle or a new production version is a new key, so nothing stale is ever answered. First the
   replica's L1 (`ml.serving.memo.ReplicaMemo`, answered without any await), else ONE Redis round
   trip (`Cache.get_or_compute`; concurrent misses on one key compute once, cluster-wide).
   `bypass` skips both.
3. On a miss: the predictor deployment, routed by `multiplexed_model_id = PAIR:model:version`.

Fallbacks (`fallback: true`, `reason`; never cached): no production model, no candle data, or a
failing predictor. The features endpoint reads the same cached windows as the predictor.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from deployments.errors import ApiError
from ml.clock import now_ms
from ml.serving.memo import ReplicaMemo
from ml.serving.model_ids import model_id
from ml.serving.prediction import failure_cause, fallback_prediction, with_data_lag
from ml.serving.snapshot import PairSnapshot, Snapshots
from ml.serving.views import features_block

log = logging.getLogger(__name__)

HANDLES = 128  # predictor handles kept, one per model id


class Predictions:
    def __init__(self, settings: Any, predictor: Any, features: Any, cache: Any, snapshots: Snapshots,
                 default_seq_len: int) -> None:
        self.settings = settings
        self.predictor = predictor
        self.features = features
        self.cache = cache
        self.snapshots = snapshots
        self.default_seq_len = default_seq_len
        self.tf = settings.timeframe_ms
        self.memo = ReplicaMemo(cache)  # predictions and feature rows this replica already has
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self.last_computed: dict[str, int] = {}
        self.served = 0
        self.fallbacks = 0
        self.metrics: Any = None  # deployments.metrics.ServeMetrics, set by the ingress

    def count(self, pred: dict[str, Any], *, fallbacks: bool = True) -> None:
        """One more answer served (and a fallback, if it is one and `fallbacks` counts them)."""
        self.served += 1
        if fallbacks and pred.get("fallback"):
            self.fallbacks += 1

    def failed(self, model_type: str, exc: BaseException) -> dict[str, Any]:
        """The fallback of a pair whose prediction raised (`GET /api/predictions` answers every pair)."""
        return fallback_prediction(model_type=model_type, version=None, horizon=self.settings.labels.horizons[0],
                                   reason=f"prediction failed: {failure_cause(exc)}")

    async def predict(self, pair: str, model_type: str, horizon: int | None, bypass: bool,
                      snap: PairSnapshot | None = None) -> tuple[dict[str, Any], Any]:
        """(prediction, cache hit or None) for one pair; raises ApiError only for bad input. A model
        answer on candles older than data.max_lag_bars says `stale: true`, `reason: "data"`. `snap`:
        predict on this snapshot instead of the pair's current one (a close being computed)."""
        pred, hit = await self._predict(pair, model_type, horizon, bypass, snap)
        if not bypass and self.metrics is not None:
            self.metrics.lookup("predictions", hit)
        return with_data_lag(pred, now_ms(), self.tf, self.settings.data.max_lag_bars), hit

    async def _predict(self, pair: str, model_type: str, horizon: int | None, bypass: bool,
                       snap: PairSnapshot | None = None) -> tuple[dict[str, Any], Any]:
        from ml.cache.keys import CacheKind, cache_key

        snap = snap or await self.snapshots.get(pair)
        prod = snap.production.get(model_type)
        version = prod.version if prod else None
        horizons = self.snapshots.horizons(prod)
        h = horizons[0] if horizon is None else int(horizon)
        if h not in horizons:
            raise ApiError(422, "invalid_horizon", f"horizon {h} is not predicted for {pair}/{model_type}",
                           availableHorizons=horizons)
        key = cache_key(CacheKind.PREDICTIONS, pair=pair, model=model_type, version=version,
                        candle_ts=snap.candle_ts, extra=f"h{h}", namespace=self.settings.namespace)

        async def compute() -> dict[str, Any]:
            return await self._compute(pair, model_type, version, snap, h)

        if not bypass:
            local = self.memo.get("predictions", key)
            if local is not None:
                return local
        try:
            if bypass:
                return await compute(), None
            value, hit = await self.cache.get_or_compute(CacheKind.PREDICTIONS, key, compute)
            self.memo.put("predictions", key, value, hit)
            return value, hit
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing predictor: neutral answer, not cached
            log.warning("prediction of %s/%s failed: %s", pair, model_type, exc)
            as_of = snap.candle_ts + self.tf if snap.candle_ts is not None else None
            return fallback_prediction(model_type=model_type, version=version, horizon=h, as_of=as_of,
                                       timeframe_ms=self.tf,
                                       reason=f"prediction failed: {failure_cause(exc)}"), None

    async def _compute(self, pair: str, model_type: str, version: str | None, snap: PairSnapshot, h: int
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
        self.last_computed[pair] = now_ms()
        return pred

    def _predictor_for(self, mid: str):
        handle = self._handles.get(mid)
        if handle is None:
            handle = self.predictor.options(multiplexed_model_id=mid)
            self._handles[mid] = handle
            while len(self._handles) > HANDLES:
                self._handles.popitem(last=False)
        return handle

    def cached_count(self, now: int) -> int:
        """Pairs whose last computed prediction is still within the predictions TTL."""
        ttl_ms = self.settings.cache.predictions_ttl_s * 1000
        return sum(1 for t in self.last_computed.values() if now - t < ttl_ms)

    async def feature_row(self, pair: str, default_model: str) -> tuple[dict[str, Any], Any]:
        """(features block, cache hit or None): the newest feature row of the window the default
        model type's production version reads (its seq_len; the profile's without a model)."""
        from ml.cache.keys import CacheKind, cache_key
        from ml.features import FEATURE_NAMES, last_row

        snap = await self.snapshots.get(pair)
        if snap.candle_ts is None:
            raise ApiError(404, "no_data", f"no candle data for {pair}")
        prod = snap.production.get(default_model)
        rows = int(prod.seq_len) if prod and prod.seq_len else self.default_seq_len
        key = cache_key(CacheKind.FEATURES, pair=pair, candle_ts=snap.candle_ts, extra=f"w{rows}",
                        namespace=self.settings.namespace)

        async def compute() -> dict:
            return await self.features.window.remote(pair, snap.candle_ts, rows)

        local = self.memo.get("features", key)
        if local is not None:
            return local
        payload, hit = await self.cache.get_or_compute(CacheKind.FEATURES, key, compute)
        if "error" in payload:
            raise ApiError(404 if payload["error"] == "no_data" else 503, payload["error"],
                           payload.get("message", payload["error"]))
        block = features_block(payload, last_row(payload).tolist(), FEATURE_NAMES, timeframe_ms=self.tf,
                               timeframe=self.settings.timeframe)
        self.memo.put("features", key, block, hit)
        return block, hit
