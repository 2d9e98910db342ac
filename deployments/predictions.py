"""The prediction path of the ingress, per request:

1. The pair's snapshot (`ml.serving.snapshot`): last closed candle and production versions.
2. The cache key `cache_key(PREDICTIONS, pair, model, version, candle_ts, "all")`: the all-horizon
   record of `ml.serving.forecast`, one per model version and candle, whatever horizon is asked (the
   answer picks it). A new candle or a new production version is a new key, so nothing stale is
   ever answered. First the replica's L1 (`ml.serving.memo.ReplicaMemo`, answered without any
   await), else ONE Redis round trip (`Cache.get_or_compute`; concurrent misses on one key compute
   once, cluster-wide). `bypass` skips both.
3. On a miss: the predictor deployment, routed by `multiplexed_model_id = PAIR:model:version`.

`model=ensemble` (`ml.serving.ensemble_choice`): a promoted ensemble asks each member version it
lists through steps 2-3 (so a member answer is shared with `model=<member>`), combines them with
`ml.serving.ensemble.combine` and caches the result under the ensemble's own version; without one,
the best single member's record answers, with an `ensemble` block that says so.

Fallbacks (`fallback: true`, `reason`): no production model or no candle data (cached like an
answer: the key changes when a model or a candle arrives), or a failing predictor (never cached).
The features endpoint reads the same cached windows as the predictor.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from deployments.errors import ApiError
from ml.clock import now_ms
from ml.serving.ensemble_choice import EnsembleChoice, best_member, choose, member_briers
from ml.serving.forecast import (
    default_horizon,
    fallback_record,
    forecast_record,
    outputs_of,
    pick,
    record_horizons,
)
from ml.serving.memo import ReplicaMemo
from ml.serving.model_ids import ENSEMBLE, model_id
from ml.serving.prediction import failure_cause, fallback_prediction, with_data_lag
from ml.serving.snapshot import PairSnapshot, Snapshots
from ml.serving.views import features_block

log = logging.getLogger(__name__)

HANDLES = 128  # predictor handles kept, one per model id


class Predictions:
    def __init__(self, settings: Any, predictor: Any, features: Any, cache: Any, snapshots: Snapshots,
                 default_seq_len: int, model_types: list[str] | None = None) -> None:
        self.settings = settings
        self.predictor = predictor
        self.features = features
        self.cache = cache
        self.snapshots = snapshots
        self.default_seq_len = default_seq_len
        self.model_types = list(model_types if model_types is not None else settings.model.enabled_types)
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

    def default_horizon(self, horizons: list[int]) -> int:
        return default_horizon(horizons, self.settings.labels.default_horizon)

    def failed(self, model_type: str, exc: BaseException) -> dict[str, Any]:
        """The fallback of a pair whose prediction raised (`GET /api/predictions` answers every pair)."""
        horizons = [int(h) for h in self.settings.labels.horizons]
        return fallback_prediction(model_type=model_type, version=None, horizon=self.default_horizon(horizons),
                                   horizons=horizons, reason=f"prediction failed: {failure_cause(exc)}")

    async def predict(self, pair: str, model_type: str, horizon: int | None, bypass: bool,
                      snap: PairSnapshot | None = None) -> tuple[dict[str, Any], Any]:
        """(prediction at `horizon`, cache hit or None) for one pair; raises ApiError only for bad
        input. A model answer on candles older than data.max_lag_bars says `stale: true`,
        `reason: "data"`. `snap`: predict on this snapshot instead of the pair's current one (a close
        being computed)."""
        snap = snap or await self.snapshots.get(pair)
        if model_type == ENSEMBLE:
            choice = self.ensemble_choice(pair, snap)
            h = self._horizon(pair, model_type, choice.horizons, horizon)
            record, hit = await self._ensemble(pair, snap, choice, bypass)
        else:
            prod = snap.production.get(model_type)
            h = self._horizon(pair, model_type, self.snapshots.horizons(prod), horizon)
            record, hit = await self.record(pair, model_type, prod.version if prod else None, snap, bypass)
        if not bypass and self.metrics is not None:
            self.metrics.lookup("predictions", hit)
        if str(h) not in record["horizons"]:  # e.g. a member answering alone predicts other horizons
            raise ApiError(422, "invalid_horizon", f"horizon {h} is not predicted for {pair}/{model_type}",
                           availableHorizons=record_horizons(record))
        return with_data_lag(pick(record, h), now_ms(), self.tf, self.settings.data.max_lag_bars), hit

    def _horizon(self, pair: str, model_type: str, horizons: list[int], horizon: int | None) -> int:
        h = self.default_horizon(horizons) if horizon is None else int(horizon)
        if h not in horizons:
            raise ApiError(422, "invalid_horizon", f"horizon {h} is not predicted for {pair}/{model_type}",
                           availableHorizons=horizons)
        return h

    # ------------------------------------------------------------------------------ one model type
    async def record(self, pair: str, model_type: str, version: str | None, snap: PairSnapshot, bypass: bool
                     ) -> tuple[dict[str, Any], Any]:
        """(all-horizon record, cache hit or None) of one version on the snapshot's candle: ONE key per
        (pair, model type, version, candle), whatever horizon is asked."""
        from ml.cache.keys import CacheKind, cache_key

        key = cache_key(CacheKind.PREDICTIONS, pair=pair, model=model_type, version=version,
                        candle_ts=snap.candle_ts, extra="all", namespace=self.settings.namespace)

        async def compute() -> dict[str, Any]:
            return await self._compute(pair, model_type, version, snap)

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
            return fallback_record(model_type=model_type, version=version, horizons=self._horizons_of(snap, model_type),
                                   as_of=self._as_of(snap), timeframe_ms=self.tf,
                                   reason=f"prediction failed: {failure_cause(exc)}"), None

    def _as_of(self, snap: PairSnapshot) -> int | None:
        return snap.candle_ts + self.tf if snap.candle_ts is not None else None

    def _horizons_of(self, snap: PairSnapshot, model_type: str) -> list[int]:
        return self.snapshots.horizons(snap.production.get(model_type))

    async def _compute(self, pair: str, model_type: str, version: str | None, snap: PairSnapshot
                       ) -> dict[str, Any]:
        horizons = self._horizons_of(snap, model_type)
        if snap.candle_ts is None:
            record = fallback_record(model_type=model_type, version=version, horizons=horizons,
                                     reason=f"no candle data for {pair}")
        elif version is None:
            record = fallback_record(model_type=model_type, version=None, horizons=horizons, as_of=self._as_of(snap),
                                     timeframe_ms=self.tf,
                                     reason=f"no production {model_type} model for {pair} yet: "
                                            f"POST /api/train/{pair}/{model_type}")
        else:
            req = {"pair": pair, "modelType": model_type, "version": version, "candleTs": snap.candle_ts}
            out = await self._predictor_for(model_id(pair, model_type, version)).predict.remote(req)
            record = out["prediction"]
        self.last_computed[pair] = now_ms()
        return record

    # ------------------------------------------------------------------------------ the ensemble
    def ensemble_choice(self, pair: str, snap: PairSnapshot) -> EnsembleChoice:
        return choose(pair, self.model_types, snap.production, snap.production.get(ENSEMBLE),
                      [int(h) for h in self.settings.labels.horizons], snap.newest_ensemble)

    async def _ensemble(self, pair: str, snap: PairSnapshot, choice: EnsembleChoice, bypass: bool
                        ) -> tuple[dict[str, Any], Any]:
        """`model=ensemble`: the promoted ensemble's combination of its members (cached under its own
        version), or the best single member's record with the `ensemble` block saying why."""
        from ml.cache.keys import CacheKind, cache_key

        if not choice.combine:
            if choice.answered_by is None:
                record = fallback_record(model_type=ENSEMBLE, version=None, horizons=choice.horizons,
                                         as_of=self._as_of(snap), timeframe_ms=self.tf, reason=choice.reason or "")
                return {**record, "ensemble": choice.block()}, None
            prod = snap.production[choice.answered_by]
            record, hit = await self.record(pair, choice.answered_by, prod.version if prod else None, snap, bypass)
            return {**record, "ensemble": choice.block()}, hit

        key = cache_key(CacheKind.PREDICTIONS, pair=pair, model=ENSEMBLE, version=choice.version,
                        candle_ts=snap.candle_ts, extra="all", namespace=self.settings.namespace)
        if not bypass:
            local = self.memo.get("predictions", key)
            if local is not None:
                return local
        members = await asyncio.gather(*(self.record(pair, mt, v, snap, bypass) for mt, v in choice.members.items()))
        records = {mt: rec for mt, (rec, _hit) in zip(choice.members, members, strict=True)}
        missing = {mt: rec.get("reason") for mt, rec in records.items() if outputs_of(rec) is None}
        if missing:  # a member without an answer: the best member that has one answers, not cached
            return self._without(pair, snap, choice, records, missing), None

        async def compute() -> dict[str, Any]:
            return self._combined(choice, records)

        try:
            if bypass:
                return await compute(), None
            value, hit = await self.cache.get_or_compute(CacheKind.PREDICTIONS, key, compute)
            self.memo.put("predictions", key, value, hit)
            return value, hit
        except Exception as exc:  # noqa: BLE001 - the combination failed: the best member answers
            log.warning("ensemble %s of %s failed: %s", choice.version, pair, exc)
            return self._without(pair, snap, choice, records, {ENSEMBLE: f"combining failed: {failure_cause(exc)}"}), None

    def _combined(self, choice: EnsembleChoice, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from ml.serving.ensemble import combine

        outputs = {mt: outputs_of(rec) for mt, rec in records.items()}
        values = combine(choice.meta, outputs)
        first = next(iter(records.values()))
        signals = self.settings.signals
        record = forecast_record(values, choice.horizons, model_type=ENSEMBLE, version=choice.version,
                                 as_of=first["asOf"], timeframe_ms=self.tf,
                                 stale=any(rec.get("stale") for rec in records.values()),
                                 features=first["features"], strong=signals.strong, weak=signals.weak)
        record["ensemble"] = choice.block()
        return record

    def _without(self, pair: str, snap: PairSnapshot, choice: EnsembleChoice, records: dict[str, dict[str, Any]],
                 missing: dict[str, str | None]) -> dict[str, Any]:
        """The promoted ensemble could not combine: the member with the lowest test Brier among those
        that answered, or a fallback naming what is missing."""
        why = "; ".join(f"{mt}: {r or 'no answer'}" for mt, r in missing.items())
        answered = [mt for mt in records if mt not in missing and outputs_of(records[mt]) is not None]
        best, _ = best_member(answered, snap.production, member_briers(choice.meta))
        if best is None and answered:
            best = answered[0]
        block = {**choice.block(), "answeredBy": best,
                 "reason": f"the ensemble {choice.version} cannot combine its members now ({why})"
                           + (f": {best} answers alone" if best else "")}
        if best is None:
            record = fallback_record(model_type=ENSEMBLE, version=choice.version, horizons=choice.horizons,
                                     as_of=self._as_of(snap), timeframe_ms=self.tf, reason=block["reason"])
        else:
            record = records[best]
        log.warning("ensemble of %s: %s", pair, block["reason"])
        return {**record, "ensemble": block}

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
