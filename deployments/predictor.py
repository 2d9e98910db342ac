"""The predictor deployment: production models per PAIR+model version, batched inference.

* Models: Serve model multiplexing. A model id is `PAIR:model_type:version`; the ingress sends
  each request with `multiplexed_model_id` set, so Serve routes it to a replica that already holds
  that model, and `get_model` loads a missing one from the registry (`ml.registry.loader.load_model` on
  the shared volume, read-only) and keeps at most MAX_MODELS_PER_REPLICA per replica (LRU).
  A newly promoted version is simply a new model id: the next request loads it, no restart; the
  old one ages out of the LRU.
* Features: the latest window comes from the Redis cache (key with the candle ts, shared by every
  replica: a window computed after a miss on one replica is a hit on all others) or, on a miss,
  from the feature deployment (concurrent misses compute once). A replica also keeps the windows
  it decoded (at most LOCAL_WINDOWS, for the features TTL): the key names the candle, so a kept
  window can never be stale. Hits on that local copy are not in the shared Redis counters.
* Inference: `@serve.batch` collects concurrent requests; each batch is split by model and every
  model runs ONE pass over its stacked windows in the replica's inference thread
  (`run_in_executor`), so the event loop keeps accepting requests while the model computes. A model
  is whatever `load_model` returns (a network, LightGBM, ...): its `forecast(x)` gives P(up) and the
  volatility of every horizon at once. With the default `batch_wait_timeout_s = 0`, a lone request
  is not delayed; under load the requests that arrive while a batch runs form the next batch.

`predict` returns `{"prediction": {...}, "replica", "featuresCached", ...}`; the prediction is the
all-horizon record of `ml.serving.forecast` (the ingress picks the requested horizon from it).
Expected conditions (not enough data, features that differ from the model's) come back as fallback
records with a `reason`; exceptions are real failures (the ingress answers with a fallback too and
does not cache it). `ml.features` is imported lazily: it reads the settings at import, after `apply_env`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from deployments.args import AppArgs
from deployments.replica import apply_env, direct, replica_tag
from ml.clock import now_ms
from ml.serving.forecast import fallback_record, forecast_record
from ml.serving.model_ids import model_id, parse_model_id
from ml.serving.prediction import feature_sample

log = logging.getLogger(__name__)

MAX_MODELS_PER_REPLICA = 8
LOCAL_WINDOWS = 256  # decoded feature windows kept per replica (keys name the candle: never stale)


def _init_inference_thread(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class PredictorImpl:
    """The predictor replica; deployed as `PredictorDeployment` (end of module)."""

    def __init__(self, features, args: dict[str, Any] | None = None) -> None:
        self.args = AppArgs.model_validate(args or {})
        self.settings = apply_env(self.args.replica_env())
        import torch

        torch.set_num_threads(self.args.torch_threads)
        # One inference thread (batches run one at a time anyway). Its own torch thread setting:
        # OpenMP's thread count is per OS thread, and a pool thread left at the default spins up
        # as many OpenMP threads as cores, which made one forward pass ~5x slower on 2 cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tbml-infer",
                                            initializer=_init_inference_thread,
                                            initargs=(self.args.torch_threads,))
        from ml.cache.client import Cache
        from ml.storage.store import Storage

        self.features = direct(features, self.args.handle_grpc)
        self.reader = Storage.reader(self.settings.data_dir)
        self.cache = Cache.from_settings(self.settings)
        self.tf = self.settings.timeframe_ms
        self.tag = replica_tag()
        self._infer.set_max_batch_size(self.args.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self._windows: OrderedDict[str, tuple[float, np.ndarray, int, str | None]] = OrderedDict()
        self.stats_ = {"requests": 0, "batches": 0, "batchedItems": 0, "maxBatch": 0, "modelLoads": 0,
                       "loadErrors": 0, "featureHits": 0, "featureMisses": 0, "featureLocalHits": 0}

    # ---------------------------------------------------------------------------------- models
    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, mid: str):
        """Load one version from the registry (called by Serve's LRU on a miss)."""
        pair, model_type, version = parse_model_id(mid)
        from ml.features import FEATURE_NAMES
        from ml.registry.loader import FeatureMismatchError, load_model

        try:
            model = await asyncio.to_thread(load_model, self.reader, pair, model_type, version)
        except Exception:
            self.stats_["loadErrors"] += 1
            raise
        if list(model.feature_names) != list(FEATURE_NAMES):
            model.check_feature_names(FEATURE_NAMES)  # raises with the differences
            raise FeatureMismatchError(f"{mid}: feature order differs from the serving features")
        self.stats_["modelLoads"] += 1
        log.info("predictor %s loaded %s", self.tag, mid)
        return model

    # ---------------------------------------------------------------------------------- predict
    async def predict(self, req: dict[str, Any]) -> dict[str, Any]:
        """req: {pair, modelType, version, candleTs}: the version's forecast of every horizon it predicts,
        as the all-horizon record of `ml.serving.forecast` (a request picks its horizon from it)."""
        from ml.cache.keys import CacheKind, cache_key
        from ml.features.window import decode_window
        from ml.serving.signals import is_stale

        self.stats_["requests"] += 1
        t0 = time.perf_counter()
        pair, model_type, version = req["pair"], req["modelType"], req["version"]
        candle_ts = req.get("candleTs")
        mid = model_id(pair, model_type, version)
        model = await self.get_model(mid)
        horizons = [int(h) for h in model.horizons]
        rows = int(model.seq_len)
        key = cache_key(CacheKind.FEATURES, pair=pair, candle_ts=candle_ts, extra=f"w{rows}",
                        namespace=self.settings.namespace)
        local = self._windows.get(key)
        if local is not None and local[0] > time.monotonic():
            self._windows.move_to_end(key)
            _, window, last_ts, feature_hash = local
            source = "local"
            self.stats_["featureLocalHits"] += 1
        else:
            payload, hit = await self.cache.get_or_compute(
                CacheKind.FEATURES, key, self._window_loader(pair, candle_ts, rows))
            source = "redis" if hit is not None else None
            self.stats_["featureHits" if hit is not None else "featureMisses"] += 1
            if "error" in payload:
                return self._answer(fallback_record(
                    model_type=model_type, version=version, horizons=horizons, timeframe_ms=self.tf,
                    reason=payload.get("message", payload["error"])), source)
            window, last_ts, feature_hash = decode_window(payload), int(payload["ts"][-1]), payload.get("featureHash")
            # The key names the candle, so the window never changes: keep the decoded array (L1).
            self._windows[key] = (time.monotonic() + self.settings.cache.features_ttl_s, window, last_ts,
                                  feature_hash)
            while len(self._windows) > LOCAL_WINDOWS:
                self._windows.popitem(last=False)
        as_of = last_ts + self.tf  # close time of the last candle used
        if feature_hash and model.feature_hash and feature_hash != model.feature_hash:
            return self._answer(fallback_record(
                model_type=model_type, version=version, horizons=horizons, as_of=as_of, timeframe_ms=self.tf,
                reason=f"serving features (hash {feature_hash[:12]}) differ from the model's "
                       f"(hash {model.feature_hash[:12]}): retrain {pair}/{model_type}"), source)
        out = await self._infer((mid, model, window))
        if isinstance(out, str):  # the batch reported an error for this model
            raise RuntimeError(out)
        signals = self.settings.signals
        record = forecast_record(
            out, horizons, model_type=model_type, version=version, as_of=as_of, timeframe_ms=self.tf,
            stale=is_stale(model.meta.get("trainedAt"), now_ms(), signals.expire_hours),
            features=feature_sample(window[-1]), strong=signals.strong, weak=signals.weak)
        answer = self._answer(record, source)
        answer["predictorMs"] = round((time.perf_counter() - t0) * 1000, 3)
        return answer

    def _answer(self, prediction: dict[str, Any], features_source: str | None) -> dict[str, Any]:
        return {"prediction": prediction, "replica": self.tag, "featuresCached": features_source is not None,
                "featuresSource": features_source, "computedAt": now_ms()}

    def _window_loader(self, pair: str, candle_ts: int | None, rows: int) -> Callable[[], Awaitable[dict]]:
        async def load() -> dict:
            return await self.features.window.remote(pair, candle_ts, rows)

        return load

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _infer(self, items: list[tuple[str, Any, np.ndarray]]) -> list[Any]:
        """One forward pass per model over the stacked windows of the batch (in a worker thread): each
        item gets its forecast (2H,), P(up) then volatility per horizon (`forecast` of the loader)."""
        n = len(items)
        self.stats_["batches"] += 1
        self.stats_["batchedItems"] += n
        self.stats_["maxBatch"] = max(self.stats_["maxBatch"], n)
        groups: dict[str, list[int]] = {}
        for i, (mid, _model, _window) in enumerate(items):
            groups.setdefault(mid, []).append(i)
        out: list[Any] = [None] * n
        for mid, idx in groups.items():
            model = items[idx[0]][1]
            stacked = np.stack([items[i][2] for i in idx])
            try:
                values = await asyncio.get_running_loop().run_in_executor(self._executor, model.forecast, stacked)
            except Exception as exc:  # noqa: BLE001 - reported to each caller of this model
                log.exception("inference of %s failed", mid)
                for i in idx:
                    out[i] = f"inference of {mid} failed: {type(exc).__name__}: {exc}"
                continue
            values = np.asarray(values, dtype=np.float64).reshape(len(idx), -1)
            for j, i in enumerate(idx):
                out[i] = values[j]
        return out

    # ---------------------------------------------------------------------------------- status
    async def stats(self) -> dict[str, Any]:
        models = []
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        if wrapper is not None:
            models = list(getattr(wrapper, "models", {}).keys())
        return {"replica": self.tag, "models": models, **self.stats_, "cache": self.cache.status(),
                "at": now_ms()}


# Decorated here (not with @): the class stays importable by name, so Serve pickles it by reference.
# Its options (replicas, autoscaling, resources) come from serve_config.yaml only.
PredictorDeployment = serve.deployment(name="Predictor")(PredictorImpl)
