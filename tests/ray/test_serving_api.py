"""The Serve application over its real HTTP proxy (the contract of docs/api.md): shapes, caching,
fallbacks, training, bad input, autoscaling, shared cache, Redis outage.

One application (`deployments.app:build_app`, the options of serve_config.yaml with fast test
autoscaling and tiny CPU reservations) is deployed once for the module on the session's Ray
cluster, with Serve's proxy on a free port and the session's real redis-server. Pairs are private
to this module (SVA: a trained production model, SVB: data but no model, SVT: trained over HTTP,
SVX: a production version whose weights are garbage, so its predictions fail; SVL, created by the
last test, is not configured: the ingress finds it in the candle store), so other modules' models in
the shared data directory never interfere. The accuracy monitor the ingress creates is private too
and watches only these pairs.

The tests run in file order and build on each other where that saves minutes (Serve tests on 2
cores are slow): e.g. the autoscaling test reuses the deployed app.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid

import pytest
from polling import free_port, wait_for

pytestmark = pytest.mark.ray
_wait_for = functools.partial(wait_for, retry_errors=True)  # the app may still be starting

TOKEN = "serve-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAIRS = ["SVA", "SVB", "SVT", "SVX"]
LIVE = "SVL"  # live accuracy on the streaming synthetic source (last test)
BROKEN = "v20990101000000-deadbeef"
APP = "tbml-serve-test"
TF = 300_000
BARS = 2500
TINY = {"bars": 1500, "seq_len": 20, "hidden": 8, "batch_size": 256, "patience": 500}  # seq_len >= labels.vol_window
HORIZONS = [1, 3, 6, 12]  # labels.horizons
DEFAULT_H = 6             # labels.default_horizon
FAST_AUTOSCALING = {
    "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5, "downscale_delay_s": 3.0, "metrics_interval_s": 0.5, "look_back_period_s": 1.5,
}


def ingress_sees_candle(client, pair: str, candle_ts: int, timeout: float = 15.0) -> None:
    """Wait until the ingress's snapshot of `pair` ends with the candle opening at `candle_ts` (it
    re-reads the candle store at most every snapshot_interval_s)."""
    def seen() -> bool:
        by = {p["pair"]: p for p in _json(client.get("/api/pairs"))["pairs"]}
        return ((by.get(pair) or {}).get("coverage") or {}).get("end") == candle_ts

    _wait_for(seen, timeout, interval=0.05, what=f"the ingress to see the {pair} candle {candle_ts}")


class _ActorStorage:
    """Registry writes through the Storage actor (the single writer), blocking."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __getattr__(self, name):
        import ray

        def call(*args, **kwargs):
            return ray.get(getattr(self.handle, name).remote(*args, **kwargs), timeout=120)

        return call


def _train_and_register(pair: str, seed: int, storage, model_type: str = "lstm") -> str:
    """A small real model of `model_type` on the pair's synthetic candles, registered (its version)."""
    from ml.data.sources import synthetic_candles
    from ml.registry.versions import Registry
    from ml.training.config import TrainConfig
    from ml.training.dataset import prepare_dataset
    from ml.training.gbm import train_gbm
    from ml.training.local import train_local

    candles = synthetic_candles(pair, bars=1500)
    if model_type == "lightgbm":
        cfg = TrainConfig.from_settings(pair, model_type, bars=1500, seed=seed, threads=1,
                                        lightgbm={"n_estimators": 40, "early_stopping_rounds": 10})
        result = train_gbm(cfg, prepare_dataset(candles, cfg))
    else:
        cfg = TrainConfig.from_settings(pair, model_type, epochs=1, bars=1500, seed=seed, threads=1)
        result = train_local(cfg, candles)
    return Registry(storage).register(pair, result)["version"]


@pytest.fixture(scope="module")
def served(ray_cluster, redis_server):
    """Candles, two registered versions of SVA (the first in production), a private training
    queue, Serve on a free port and the application."""
    import httpx
    import ray
    from ray import serve

    from actors.storage import get_or_create_storage_actor
    from actors.training_queue import get_or_create_queue_actor
    from deployments.app import app_from_config
    from ml.data.sources import synthetic_candles
    from ml.data.store import CandleStore

    data_dir = ray_cluster["data_dir"]
    ns = ray_cluster["namespace"]
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.flush()

    store = CandleStore(data_dir, "5m")
    for pair in PAIRS:
        store.write(pair, synthetic_candles(pair, bars=BARS))
    storage = get_or_create_storage_actor(data_dir=str(data_dir), namespace=ns)
    remote = _ActorStorage(storage)
    v1 = _train_and_register("SVA", 7, remote)
    v2 = _train_and_register("SVA", 8, remote)
    ray.get(storage.set_production.remote("SVA", "lstm", v1, "test fixture"))
    g1 = _train_and_register("SVA", 7, remote, "lightgbm")
    ray.get(storage.set_production.remote("SVA", "lightgbm", g1, "test fixture"))
    meta = ray.get(storage.get_version_meta.remote("SVA", "lstm", v1))
    meta = {k: v for k, v in meta.items() if k not in ("files", "version", "pair", "modelType", "savedAt")}
    scaler = ray.get(storage.read_model_file.remote("SVA", "lstm", v1, "scaler.json"))
    ray.get(storage.save_model_version.remote("SVX", "lstm", BROKEN, meta,
                                              {"weights.pt": b"not a state dict", "scaler.json": scaler}))
    ray.get(storage.set_production.remote("SVX", "lstm", BROKEN, "broken on purpose"))

    queue_name = f"tq-serve-{uuid.uuid4().hex[:8]}"
    monitor_name = f"mon-serve-{uuid.uuid4().hex[:8]}"
    queue = get_or_create_queue_actor(ns, str(data_dir), {
        "tick_s": 0.1, "cooldown_minutes": 30, "retry_base_s": 0.5, "train_overrides": TINY,
        "num_workers": 1, "cpus_per_worker": 0.5, "max_attempts": 1}, name=queue_name)
    ray.get(queue.ping.remote(), timeout=120)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # If an earlier module left Serve running, its proxy keeps the port it was started with.
    from ray.serve.context import _get_global_client

    port = int(_get_global_client().get_serve_details().get("http_options", {}).get("port") or port)
    tiny = {"ray_actor_options": {"num_cpus": 0.05}}
    spec = app_from_config(
        args={"data_dir": str(data_dir), "namespace": ns, "redis_url": redis_server.url, "api_token": TOKEN,
              "pairs": PAIRS, "snapshot_interval_s": 0.2, "queue_name": queue_name, "actor_timeout_s": 60,
              "monitor_name": monitor_name,
              # passes only when a test asks (tick()); never anything but this module's pairs
              "monitor_overrides": {"pairs": [*PAIRS, LIVE], "resolve_interval_s": 3600}},
        deployments={"Ingress": tiny, "Features": tiny,
                     "Predictor": {**tiny, "autoscaling_config": FAST_AUTOSCALING}},
    )
    serve.run(spec["app"], name=APP, route_prefix="/", logging_config=spec["logging_config"])
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=60)
    _wait_for(lambda: client.get("/api/ping").status_code == 200, 120, what="the HTTP proxy")
    ctx = {"base": base, "port": port, "client": client, "data_dir": data_dir, "store": store, "v1": v1,
           "v2": v2, "g1": g1, "storage": storage, "queue": queue, "queue_name": queue_name, "namespace": ns,
           "redis": redis_server, "monitor_name": monitor_name}
    try:
        yield ctx
    finally:
        client.close()
        with contextlib.suppress(Exception):
            ray.get(queue.emergency_stop.remote("test teardown"), timeout=60)
        with contextlib.suppress(Exception):
            ray.kill(queue, no_restart=True)
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):  # after Serve: the ingress could create it again
            ray.kill(ray.get_actor(monitor_name, namespace=ns), no_restart=True)
        if redis_server.proc is None or redis_server.proc.poll() is not None:
            redis_server.start()


def _json(r):
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text[:300])
    return r.json()


# ============================================================================================ shapes


def test_every_read_endpoint_answers_its_documented_shape(served):
    from deployments import schemas as S

    c = served["client"]
    r = c.get("/api/ping")
    assert r.status_code == 200 and _json(r) == {"ok": True}

    r = c.get("/api/health")
    assert r.status_code == 200, r.text
    health = S.HealthResponse.model_validate(_json(r))
    assert health.status == "healthy", health.components
    assert set(health.components) >= {"ray", "redis", "storage", "dataSource"}
    assert set(health.performance["cacheHits"]) >= {"predictions", "features", "modelStatus"}
    assert health.storage["enabled"] is True and "models" in health.storage["stats"]
    assert "SVA" in health.models["pairs"] and health.training["maxConcurrent"] >= 1

    pairs = S.PairsResponse.model_validate(_json(c.get("/api/pairs")))
    by = {p.pair: p for p in pairs.pairs}
    assert set(by) >= set(PAIRS)
    assert by["SVA"].models["lstm"]["version"] == served["v1"] and by["SVB"].models["lstm"]["hasModel"] is False
    assert by["SVA"].coverage["bars"] == BARS

    S.FeaturesResponse.model_validate(_json(c.get("/api/features/SVA")))
    S.ModelStatusResponse.model_validate(_json(c.get("/api/models/SVA/status")))
    versions = S.VersionsResponse.model_validate(_json(c.get("/api/models/SVA/versions")))
    assert {v["version"] for v in versions.models["lstm"]["versions"]} >= {served["v1"], served["v2"]}
    assert versions.models["lstm"]["production"] == served["v1"]
    S.QueueResponse.model_validate(_json(c.get("/api/training/queue")))
    S.StorageStatsResponse.model_validate(_json(c.get("/api/storage/stats")))
    S.AllPredictionsResponse.model_validate(_json(c.get("/api/predictions")))
    S.HistoryResponse.model_validate(_json(c.get("/api/predictions/SVA/history")))
    S.AccuracyResponse.model_validate(_json(c.get("/api/predictions/SVA/accuracy")))

    docs = c.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = _json(c.get("/openapi.json"))
    assert "/api/predictions/{pair}" in spec["paths"] and "/api/train/{pair}/{model}" in spec["paths"]
    r = c.get("/no/such/route")
    assert r.status_code == 404 and _json(r)["error"] == "not_found"


# ============================================================================================ predictions


def test_prediction_is_real_cached_and_recomputed_on_new_candle_and_new_version(served):
    from deployments.schemas import AccuracyResponse, HistoryResponse, PredictionResponse

    c, store, v1, v2 = served["client"], served["store"], served["v1"], served["v2"]
    from ml.data.sources import synthetic_candles

    def new_candle() -> int:
        """Append the next closed candle of SVA; returns its open time."""
        end = store.coverage("SVA")["end"]
        assert store.append("SVA", synthetic_candles("SVA", bars=1, end_ts=end + TF)) == 1
        ingress_sees_candle(c, "SVA", end + TF)
        return end + TF

    before = _json(c.get("/api/predictions/SVA/history", params={"limit": 1}))["totalCount"]
    end = new_candle()  # a key no earlier test has seen

    first = PredictionResponse.model_validate(_json(c.get("/api/predictions/SVA")))
    p = first.prediction
    assert not p.fallback and p.reason is None, p
    assert (p.modelType, p.modelVersion, p.horizon) == ("lstm", v1, DEFAULT_H)
    assert p.asOf == end + TF and p.targetTime == p.asOf + DEFAULT_H * TF
    assert p.volatility is not None and p.volatility > 0 and list(p.horizons) == [str(h) for h in HORIZONS]
    assert 0.0 <= p.probability <= 1.0 and abs(p.confidence - abs(p.probability - 0.5) * 2) < 1e-6
    assert p.features.count == 136 and "rsi_14" in p.features.sample
    assert first.cached is False and first.responseTime > 0

    again = PredictionResponse.model_validate(_json(c.get("/api/predictions/SVA")))
    assert again.cached is True and again.cacheAge is not None and again.cacheAge >= 0
    assert again.prediction.model_dump() == p.model_dump()
    bypass = PredictionResponse.model_validate(_json(c.get("/api/predictions/SVA", params={"bypassCache": "true"})))
    assert bypass.cached is False and bypass.prediction.probability == p.probability

    # A new closed candle: the next answer is recomputed (new key), one bar later.
    assert new_candle() == end + TF
    after_candle = PredictionResponse.model_validate(_json(c.get("/api/predictions/SVA")))
    assert after_candle.cached is False and after_candle.prediction.asOf == end + 2 * TF

    # A newly promoted version: the next answer comes from it (no restart, not from the cache).
    r = c.post("/api/models/SVA/lstm/promote", json={"version": v2}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert _json(r)["previousVersion"] == v1
    promoted = PredictionResponse.model_validate(_json(c.get("/api/predictions/SVA")))
    assert promoted.cached is False and promoted.prediction.modelVersion == v2
    assert not promoted.prediction.fallback
    assert _json(c.get("/api/predictions/SVA"))["cached"] is True

    r = c.post("/api/models/SVA/lstm/rollback", json={}, headers=AUTH)  # back to the previous one
    assert r.status_code == 200 and _json(r)["version"] == v1, r.text
    back = PredictionResponse.model_validate(_json(c.get("/api/predictions/SVA")))
    assert back.prediction.modelVersion == v1

    # Every served prediction (cached or not) is in the history, newest first.
    hist = HistoryResponse.model_validate(_json(c.get("/api/predictions/SVA/history", params={"limit": 50})))
    assert hist.totalCount - before == 7
    stamps = [rec.timestamp for rec in hist.predictions]
    assert stamps == sorted(stamps, reverse=True)
    assert hist.predictions[0].model_extra["modelVersion"] == v1
    since = _json(c.get("/api/predictions/SVA/history", params={"since": now_plus(3600)}))
    assert since["count"] == 0 and since["predictions"] == []

    # The candles appended here run ahead of the clock. A bar that has not closed on the clock does
    # not resolve a prediction, even when the store holds it (a bar still forming has no final close):
    # the records whose target time is ahead show no outcome. (Resolution itself: the last test.)
    last = store.coverage("SVA")["end"]
    assert store.append("SVA", synthetic_candles("SVA", bars=6, end_ts=last + 6 * TF)) == 6
    records = _json(c.get("/api/predictions/SVA/history", params={"limit": 100}))["predictions"]
    now = now_plus(0)
    ahead = [r for r in records if not r["fallback"] and r["targetTime"] > now]
    assert ahead and not any(r.get("outcome") or r.get("realizedDirection") for r in ahead)
    acc = AccuracyResponse.model_validate(_json(c.get("/api/predictions/SVA/accuracy")))
    assert acc.pending >= 1 and acc.degraded is False, acc
    ingress_sees_candle(c, "SVA", last + 6 * TF)

    # hits (also those answered from the replica's memory) reach the shared counters in Redis
    def hits() -> int:
        return _json(c.get("/api/health"))["performance"]["cacheHits"]["predictions"]

    c.get("/api/predictions/SVA")  # the new candle's answer, now cached
    h0 = hits()
    for _ in range(5):
        assert _json(c.get("/api/predictions/SVA"))["cached"] is True
    _wait_for(lambda: hits() >= h0 + 5, 30, what="5 more prediction hits in the shared counters")


def now_plus(seconds: float) -> int:
    return int((time.time() + seconds) * 1000)


def test_fallbacks_and_all_pairs(served):
    from deployments.schemas import AllPredictionsResponse, PredictionResponse

    c = served["client"]
    r = PredictionResponse.model_validate(_json(c.get("/api/predictions/SVB")))
    p = r.prediction
    assert p.fallback is True and "no production" in p.reason
    assert (p.direction, p.signal, p.probability, p.confidence) == ("neutral", "HOLD", 0.5, 0.0)
    assert p.modelVersion is None and p.asOf is not None
    assert p.volatility is None and p.horizon == DEFAULT_H and list(p.horizons) == [str(h) for h in HORIZONS]
    assert all((e.probability, e.signal, e.volatility) == (0.5, "HOLD", None) for e in p.horizons.values())

    # a pair whose production model cannot be loaded: a fallback that names the failure, not cached
    for _ in range(2):
        broken = PredictionResponse.model_validate(_json(c.get("/api/predictions/SVX")))
        assert broken.cached is False and broken.prediction.fallback is True
        assert broken.prediction.reason.startswith("prediction failed"), broken.prediction.reason
        assert broken.prediction.modelVersion == BROKEN

    every = AllPredictionsResponse.model_validate(_json(c.get("/api/predictions")))
    assert every.count == len(PAIRS) and set(every.predictions) == set(PAIRS)
    assert every.predictions["SVA"].fallback is False and every.predictions["SVB"].fallback is True
    assert every.predictions["SVX"].fallback is True and every.predictions["SVX"].reason.startswith("prediction")

    feats = _json(c.get("/api/features/SVA"))
    assert feats["features"]["count"] == len(feats["features"]["names"]) == len(feats["features"]["values"]) == 136
    assert feats["features"]["metadata"]["asOf"] == served["store"].coverage("SVA")["end"] + TF
    assert _json(c.get("/api/features/SVA"))["cached"] is True

    status = _json(c.get("/api/models/SVA/status"))
    lstm = status["models"]["lstm"]
    assert lstm["hasModel"] is True and lstm["production"]["version"] == served["v1"]
    assert lstm["modelInfo"]["totalParams"] > 0 and lstm["modelInfo"]["isTraining"] is False
    assert lstm["versions"] >= 2 and "allowed" in lstm["training"]
    assert "brier" in lstm["production"]["metrics"] and lstm["production"]["trainedAt"] > 0
    assert _json(c.get("/api/models/SVB/status"))["models"]["lstm"]["hasModel"] is False
    # the ensemble (two enabled types): none built yet, so its best member answers, as model=ensemble says
    ens = status["models"]["ensemble"]
    assert ens["hasModel"] is False and ens["production"] is None and ens["ensemble"]["newest"] is None
    answer = _json(c.get("/api/predictions/SVA", params={"model": "ensemble"}))["prediction"]["ensemble"]
    assert ens["ensemble"] == dict(answer, newest=None), (ens["ensemble"], answer)
    assert ens["ensemble"]["promoted"] is False and ens["ensemble"]["answeredBy"] in ("lstm", "lightgbm")
    assert "no ensemble built for SVA" in ens["ensemble"]["reason"]


# ============================================================================================ horizons, ensemble


def _top(p) -> dict:
    """The horizon fields at the top of a prediction, shaped like an entry of its `horizons` block."""
    return {k: p[k] for k in ("direction", "probability", "confidence", "signal", "volatility", "targetTime")}


def test_every_horizon_in_one_answer_each_classified_on_its_own(served):
    """One all-horizon answer per model version and candle: every `?horizon=` is a cache hit of the
    same record, its entry at the top; each horizon has its own signal and a positive volatility."""
    from deployments.schemas import PredictionResponse
    from ml.data.sources import synthetic_candles
    from ml.serving.signals import classify

    c, store = served["client"], served["store"]
    end = store.coverage("SVA")["end"]  # a new candle: keys no earlier test has seen
    assert store.append("SVA", synthetic_candles("SVA", bars=1, end_ts=end + TF)) == 1
    ingress_sees_candle(c, "SVA", end + TF)
    for model in ("lstm", "lightgbm"):
        first = _json(c.get("/api/predictions/SVA", params={"model": model, "bypassCache": "true"}))
        PredictionResponse.model_validate(first)
        p = first["prediction"]
        assert not p["fallback"] and p["modelType"] == model and p["horizon"] == DEFAULT_H, p
        assert list(p["horizons"]) == [str(h) for h in HORIZONS]
        assert _top(p) == p["horizons"][str(DEFAULT_H)]
        for h, e in p["horizons"].items():
            s = classify(e["probability"])
            assert (e["direction"], e["signal"]) == (s.direction, s.signal), (model, h, e)  # its own signal
            assert e["volatility"] > 0 and e["targetTime"] == p["asOf"] + int(h) * TF
        vols = [p["horizons"][str(h)]["volatility"] for h in HORIZONS]
        assert vols == sorted(vols)  # sqrt(h * per-bar variance): a longer horizon moves more
        for h in HORIZONS:
            r = _json(c.get("/api/predictions/SVA", params={"model": model, "horizon": h}))
            q = r["prediction"]
            assert r["cached"] is (h != HORIZONS[0]), (model, h, r["cached"])  # one compute for all horizons
            assert q["horizon"] == h and q["horizons"] == p["horizons"] and _top(q) == p["horizons"][str(h)]


def test_the_ensemble_answers_its_best_member_until_one_is_promoted_then_combines(served):
    """model=ensemble (= ?ensemble=true): without a production ensemble the member with the lowest test
    Brier answers and says so; with one (a registry document naming member versions, weights and
    biases) the members' forecasts are combined by ml.serving.ensemble.combine. SVA keeps that
    production ensemble for the rest of the module (the registry cannot unset production); the later
    tests ask the default model type."""
    import json
    import math

    import ray

    from deployments.schemas import AllPredictionsResponse, PredictionResponse

    c, storage, v1, g1 = served["client"], served["storage"], served["v1"], served["g1"]
    members = {"lstm": _json(c.get("/api/predictions/SVA", params={"model": "lstm"}))["prediction"],
               "lightgbm": _json(c.get("/api/predictions/SVA", params={"model": "lightgbm"}))["prediction"]}
    assert members["lstm"]["asOf"] == members["lightgbm"]["asOf"] and members["lstm"]["modelVersion"] == v1
    brier = {mt: ray.get(storage.get_version_meta.remote("SVA", mt, v))["metrics"]["model"]["brier"]
             for mt, v in (("lstm", v1), ("lightgbm", g1))}
    best = min(brier, key=lambda mt: (brier[mt], mt != "lstm"))

    one = _json(c.get("/api/predictions/SVA", params={"model": "ensemble"}))
    PredictionResponse.model_validate(one)
    p = one["prediction"]
    assert p["ensemble"]["promoted"] is False and p["ensemble"]["answeredBy"] == best, p["ensemble"]
    assert "no ensemble built for SVA" in p["ensemble"]["reason"] and best in p["ensemble"]["reason"]
    assert {k: v for k, v in p.items() if k != "ensemble"} == members[best]
    flag = _json(c.get("/api/predictions/SVA", params={"ensemble": "true"}))
    assert flag["prediction"] == p and flag["cached"] is True
    assert _json(c.get("/api/predictions/SVA", params={"ensemble": "true", "model": "ensemble"}))["prediction"] == p
    for bad in ({"ensemble": "true", "model": "lstm"}, {"ensemble": "true", "model": "lightgbm"}):
        r = c.get("/api/predictions/SVA", params=bad)
        assert r.status_code == 422 and _json(r)["error"] == "conflicting_parameters", r.text
        assert "ensemble=true" in _json(r)["message"]
    r = c.get("/api/predictions/SVA", params={"model": "ensemble", "horizon": 5})
    assert r.status_code == 422 and _json(r)["error"] == "invalid_horizon"
    none = _json(c.get("/api/predictions/SVB", params={"model": "ensemble"}))["prediction"]
    assert none["fallback"] is True and none["ensemble"]["answeredBy"] is None

    # an operator puts an ensemble document in production (the registry does so when one beats its members)
    weights = {str(h): {"lstm": 0.7, "lightgbm": 0.5} for h in HORIZONS}
    bias = {str(h): 0.02 for h in HORIZONS}
    doc = {"members": {"lstm": v1, "lightgbm": g1}, "horizons": HORIZONS, "weights": weights, "bias": bias,
           "volatility": "mean_log_variance"}
    meta = {**doc, "modelType": "ensemble", "trainedAt": int(time.time() * 1000), "bestMember": best,
            "model": {"type": "ensemble", "horizons": HORIZONS, "n_horizons": len(HORIZONS),
                      "members": ["lstm", "lightgbm"]}}
    version = "v20990101000001-e0e0e0e0"
    ray.get(storage.save_model_version.remote("SVA", "ensemble", version, meta,
                                              {"ensemble.json": json.dumps(doc).encode()}))

    def built():  # stored but not production: the answer names it as not promoted
        e = _json(c.get("/api/predictions/SVA", params={"model": "ensemble"}))["prediction"]["ensemble"]
        return e if version in e["reason"] else None

    seen = _wait_for(built, 30, interval=0.2, what="the ingress to see the new ensemble version")
    assert seen["promoted"] is False and seen["answeredBy"] == best and "was not promoted" in seen["reason"]
    status = _wait_for(lambda: (e := _json(c.get("/api/models/SVA/status"))["models"]["ensemble"])["ensemble"]["newest"]
                       and e, 30, interval=0.2, what="the models status to list the built ensemble")
    assert status["hasModel"] is False and status["ensemble"]["answeredBy"] == best
    assert status["ensemble"]["newest"]["version"] == version and status["ensemble"]["newest"]["production"] is False
    assert status["ensemble"]["newest"]["members"] == {"lstm": v1, "lightgbm": g1}
    ray.get(storage.set_production.remote("SVA", "ensemble", version, "test: an operator's ensemble"))

    def combined():
        body = _json(c.get("/api/predictions/SVA", params={"ensemble": "true"}))
        return body if body["prediction"]["ensemble"]["promoted"] else None

    ens = _wait_for(combined, 30, interval=0.2, what="the ingress to see the production ensemble")
    PredictionResponse.model_validate(ens)
    q = ens["prediction"]
    assert (q["modelType"], q["modelVersion"], q["fallback"], q["horizon"]) == ("ensemble", version, False, DEFAULT_H)
    assert q["ensemble"] == {"promoted": True, "version": version, "answeredBy": "ensemble",
                             "members": {"lstm": v1, "lightgbm": g1}, "reason": None}
    status = _wait_for(lambda: (e := _json(c.get("/api/models/SVA/status"))["models"]["ensemble"])["hasModel"]
                       and e, 30, interval=0.2, what="the models status to show the production ensemble")
    assert status["production"]["version"] == version and status["ensemble"]["promoted"] is True
    assert status["ensemble"]["answeredBy"] == "ensemble" and status["ensemble"]["newest"]["production"] is True

    def logit(x: float) -> float:
        return math.log(x / (1 - x))

    for h in HORIZONS:
        e, a, b = q["horizons"][str(h)], members["lstm"]["horizons"][str(h)], members["lightgbm"]["horizons"][str(h)]
        want = 1 / (1 + math.exp(-(0.02 + 0.7 * logit(a["probability"]) + 0.5 * logit(b["probability"]))))
        assert e["probability"] == pytest.approx(want, abs=1e-4), h
        assert e["volatility"] == pytest.approx(math.sqrt(a["volatility"] * b["volatility"]), rel=1e-4), h
    assert _top(q) == q["horizons"][str(DEFAULT_H)]
    again = _json(c.get("/api/predictions/SVA", params={"model": "ensemble", "horizon": 1}))
    assert again["cached"] is True and again["prediction"]["horizons"] == q["horizons"]
    every = AllPredictionsResponse.model_validate(_json(c.get("/api/predictions", params={"ensemble": "true"})))
    assert every.predictions["SVA"].modelType == "ensemble" and every.predictions["SVA"].ensemble.promoted is True
    assert every.predictions["SVB"].fallback is True


def test_a_candle_close_computes_every_model_type_and_the_ensemble_and_trades_on_the_served_volatility(served):
    """The events hub's call (`Ingress.on_candle_close`, through a deployment handle, as the hub makes
    it): the event is the GET body of the default model type at the default horizon; afterwards every
    model type and the ensemble answer from the cache for that candle, and the pair's simulated
    account saw that prediction's own volatility (source `model`)."""
    from ray import serve

    from deployments.schemas import PredictionEvent, SimulationResponse
    from ml.data.sources import synthetic_candles

    c, store = served["client"], served["store"]
    end = store.coverage("SVA")["end"]
    assert store.append("SVA", synthetic_candles("SVA", bars=1, end_ts=end + TF)) == 1
    first_id = now_plus(0)
    ingress = serve.get_deployment_handle("Ingress", APP)
    events = ingress.on_candle_close.remote({"SVA": end + TF}, first_id).result(timeout_s=120)
    assert [e["id"] for e in events] == [first_id] and events[0]["pair"] == "SVA"
    event = PredictionEvent.model_validate(events[0]["data"])
    p = event.prediction
    assert (p.modelType, p.horizon, p.fallback, p.asOf) == ("lstm", DEFAULT_H, False, end + 2 * TF)
    assert list(p.horizons) == [str(h) for h in HORIZONS] and p.volatility > 0
    got = _json(c.get("/api/predictions/SVA"))
    assert got["cached"] is True and got["prediction"] == events[0]["data"]["prediction"]
    for params in ({"model": "lightgbm"}, {"model": "ensemble"}, {"model": "lstm", "horizon": 1}):
        r = _json(c.get("/api/predictions/SVA", params=params))
        assert r["cached"] is True and r["prediction"]["asOf"] == end + 2 * TF, (params, r)
    account = SimulationResponse.model_validate(_json(c.get("/api/simulations/SVA")))
    last = account.lastForecast
    assert last["ts"] == end + TF and last["horizon"] == DEFAULT_H and last["signal"] == p.signal
    assert last["volatility"] == p.volatility and last["volatilitySource"] == "model", last
    assert account.volatilitySources.get("model", 0) >= 1 and "naive" not in account.volatilitySources


# ============================================================================================ bad input

BAD_REQUESTS = [
    # (method, path, kwargs, expected status, expected error code)
    ("GET", "/api/predictions/NOPE", {}, 404, "pair_not_found"),
    ("GET", "/api/predictions/..%2Fx", {}, 404, None),
    ("GET", "/api/predictions/%2E%2E%2Fetc%2Fpasswd", {}, 404, None),
    ("GET", "/api/predictions/", {}, 404, None),
    ("GET", "/api/predictions/" + "A" * 300, {}, 404, "pair_not_found"),
    ("GET", "/api/predictions/BT%C3%87", {}, 404, "pair_not_found"),
    ("GET", "/api/predictions/%F0%9F%9A%80", {}, 404, "pair_not_found"),
    ("GET", "/api/features/NOPE", {}, 404, "pair_not_found"),
    ("GET", "/api/models/NOPE/status", {}, 404, "pair_not_found"),
    ("GET", "/api/predictions/SVA?model=xgboost", {}, 422, "invalid_model"),
    ("GET", "/api/predictions/SVA?horizon=0", {}, 422, "validation_error"),
    ("GET", "/api/predictions/SVA?horizon=7", {}, 422, "invalid_horizon"),
    ("GET", "/api/predictions/SVA?bypassCache=maybe", {}, 422, "validation_error"),
    ("GET", "/api/predictions/SVA/history?limit=0", {}, 422, "validation_error"),
    ("GET", "/api/predictions/SVA/history?limit=abc", {}, 422, "validation_error"),
    ("GET", "/api/predictions/SVA/history?since=-5", {}, 422, "validation_error"),
    ("GET", "/api/training/job/NOPE_lstm_1", {}, 404, "job_not_found"),
    ("POST", "/api/train/SVT/xgboost", {"json": {}}, 404, "model_not_found"),
    ("POST", "/api/train/NOPE/lstm", {"json": {}}, 404, "pair_not_found"),
    ("POST", "/api/train/SVT/lstm", {"json": {"epochs": 0}}, 422, "validation_error"),
    ("POST", "/api/train/SVT/lstm", {"json": {"epochs": 10_000}}, 422, "validation_error"),
    ("POST", "/api/train/SVT/lstm", {"json": {"priority": 11}}, 422, "validation_error"),
    ("POST", "/api/train/SVT/lstm", {"json": {"epochs": "many"}}, 422, "validation_error"),
    ("POST", "/api/train/SVT/lstm", {"json": {"nonsense": 1}}, 422, "validation_error"),
    ("POST", "/api/train/SVT/lstm", {"json": [1, 2]}, 422, "validation_error"),
    ("POST", "/api/train/SVT/lstm", {"content": b"{not json", "headers": {"content-type": "application/json"}},
     400, "invalid_json"),
    ("POST", "/api/storage/cleanup", {"json": {"maxAgeHours": -1}}, 422, "validation_error"),
    ("POST", "/api/storage/cleanup", {"json": {"maxAgeHours": "soon"}}, 422, "validation_error"),
    # no coercion on the destructive cleanup (that they delete nothing: tests/ray/test_api_fuzz.py)
    ("POST", "/api/storage/cleanup", {"json": {"maxAgeHours": False}}, 422, "validation_error"),
    ("POST", "/api/storage/cleanup", {"json": {"maxAgeHours": "0"}}, 422, "validation_error"),
    ("POST", "/api/storage/cleanup", {"json": {"maxAgeHours": None}}, 422, "validation_error"),
    ("POST", "/api/storage/cleanup", {"json": {"maxAgeHours": 0}}, 422, "validation_error"),
    ("POST", "/api/storage/cleanup", {"content": b"maxAgeHours=0"}, 400, "invalid_json"),
    ("GET", "/api/predictions/SVA", {"params": {"model": "LSTM"}}, 422, "invalid_model"),
    ("POST", "/api/train/SVT/nosuchmodel", {"json": {}}, 404, "model_not_found"),
    ("POST", "/api/train/SVT/ensemble", {"json": {"epochs": 3}}, 422, "validation_error"),  # built, not trained
    ("GET", "/api/predictions/SVA?model=lstm&ensemble=true", {}, 422, "conflicting_parameters"),
    ("POST", "/api/models/SVA/lstm/promote", {"json": {"version": "../../etc"}}, 422, "validation_error"),
    ("POST", "/api/models/SVA/lstm/promote", {"json": {"version": "v19700101000000-deadbeef"}}, 404,
     "version_not_found"),
    ("POST", "/api/models/SVA/lstm/promote", {"json": {}}, 422, "validation_error"),
    ("POST", "/api/training/clear-cooldowns", {"json": {"pair": "../x"}}, 404, "pair_not_found"),
    ("DELETE", "/api/training/job/NOPE_lstm_1", {}, 404, "job_not_found"),
    ("PUT", "/api/predictions/SVA", {}, 405, "method_not_allowed"),
    ("POST", "/api/storage/save", {"content": b"x" * 70_000}, 413, "payload_too_large"),
]


@pytest.mark.parametrize("method,path,kwargs,status,code", BAD_REQUESTS,
                         ids=[f"{m} {p[:40]} {k.get('json', '')}"[:70] for m, p, k, _, _ in BAD_REQUESTS])
def test_bad_input_is_a_json_4xx_never_a_500(served, method, path, kwargs, status, code):
    import httpx

    headers = {**AUTH, **kwargs.pop("headers", {})} if kwargs else dict(AUTH)
    kwargs = dict(kwargs)
    # raw path: keep percent-escapes as sent (httpx would otherwise normalise them)
    url = httpx.URL(served["base"] + path) if "%" not in path else httpx.URL(served["base"]).copy_with(
        raw_path=path.encode())
    r = served["client"].request(method, url, headers=headers, **kwargs)
    body = _json(r)
    assert r.status_code == status, (r.status_code, body)
    assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), body
    if code:
        assert body["error"] == code, body
    if body["error"] == "pair_not_found":
        assert set(body["availablePairs"]) >= set(PAIRS)


def test_mutating_endpoints_need_the_token(served):
    c = served["client"]
    mutating = [("POST", "/api/train/SVT/lstm", {"json": {}}), ("POST", "/api/train/SVT", {}),
                ("POST", "/api/models/SVA/lstm/promote", {"json": {"version": served["v1"]}}),
                ("POST", "/api/models/SVA/lstm/rollback", {}), ("DELETE", "/api/training/job/X_lstm_1", {}),
                ("POST", "/api/training/emergency-stop", {}), ("POST", "/api/training/resume", {}),
                ("POST", "/api/training/clear-cooldowns", {}), ("POST", "/api/storage/save", {}),
                ("POST", "/api/storage/cleanup", {"json": {"maxAgeHours": 1e6}})]
    for method, path, kw in mutating:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = c.request(method, path, headers=headers, **kw)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert _json(r)["error"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
    # reads stay open
    assert c.get("/api/training/queue").status_code == 200


# ============================================================================================ training


def test_training_over_http_queue_duplicate_cooldown_cancel_emergency_stop(served):
    from deployments.schemas import JobResponse, QueueResponse, TrainAccepted

    c = served["client"]
    r = c.post("/api/train/SVT/lstm", json={"epochs": 1, "priority": 3}, headers=AUTH)
    assert r.status_code == 202, r.text
    accepted = TrainAccepted.model_validate(_json(r))
    job_id = accepted.jobId
    assert job_id.startswith("SVT_lstm_") and accepted.status == "queued" and accepted.queuePosition >= 1

    dup = c.post("/api/train/SVT/lstm", json={"epochs": 1}, headers=AUTH)
    assert dup.status_code == 409 and _json(dup)["error"] == "duplicate" and _json(dup)["jobId"] == job_id

    job = JobResponse.model_validate(_json(c.get(f"/api/training/job/{job_id}"))).job
    assert job["jobId"] == job_id and job["status"] in ("queued", "training", "completed")

    def finished():
        j = _json(c.get(f"/api/training/job/{job_id}"))["job"]
        return j if j["status"] in ("completed", "failed", "cancelled") else None

    done = _wait_for(finished, 240, interval=1.0, what=f"training job {job_id}")
    assert done["status"] == "completed", done
    assert done["progress"]["epoch"] == done["progress"]["totalEpochs"] == 1

    cool = c.post("/api/train/SVT/lstm", json={"epochs": 1}, headers=AUTH)
    assert cool.status_code == 429, cool.text
    assert _json(cool)["error"] == "cooldown" and int(cool.headers["retry-after"]) > 0

    # cancel a queued/running job
    r = c.post("/api/train/SVB/lstm", json={"epochs": 200}, headers=AUTH)
    assert r.status_code == 202, r.text
    jid = _json(r)["jobId"]
    r = c.request("DELETE", f"/api/training/job/{jid}", json={"reason": "test"}, headers=AUTH)
    assert r.status_code == 200 and _json(r)["success"] is True, r.text
    assert _json(c.get(f"/api/training/job/{jid}"))["job"]["status"] == "cancelled"
    again = c.request("DELETE", f"/api/training/job/{jid}", headers=AUTH)
    assert again.status_code == 409 and _json(again)["error"] == "not_cancellable"

    # emergency stop -> 503 until resume
    r = c.post("/api/train/SVB/lstm", json={"epochs": 200}, headers=AUTH)
    assert r.status_code == 202
    r = c.post("/api/training/emergency-stop", headers=AUTH)
    assert r.status_code == 200 and _json(r)["paused"] is True
    queue = QueueResponse.model_validate(_json(c.get("/api/training/queue"))).queue
    assert queue["paused"] is True and queue["queued"]["count"] == 0 and queue["active"]["count"] == 0
    paused = c.post("/api/train/SVB/lstm", json={"epochs": 1}, headers=AUTH)
    assert paused.status_code == 503 and _json(paused)["error"] == "paused"
    assert c.post("/api/training/resume", headers=AUTH).status_code == 200
    r = c.post("/api/train/SVB/lstm", json={"epochs": 200, "priority": 10}, headers=AUTH)
    assert r.status_code == 202, r.text
    assert c.request("DELETE", f"/api/training/job/{_json(r)['jobId']}", headers=AUTH).status_code == 200

    # clear cooldowns -> SVT can be queued again (then cancelled)
    r = c.post("/api/training/clear-cooldowns", json={"pair": "SVT", "modelType": "lstm"}, headers=AUTH)
    assert r.status_code == 200 and _json(r)["cleared"] == 1
    r = c.post("/api/train/SVT", headers=AUTH)  # no model type: every enabled type
    assert r.status_code == 202 and _json(r)["jobs"], r.text
    for jid in _json(r)["jobs"]:
        c.request("DELETE", f"/api/training/job/{jid}", headers=AUTH)
    history = _json(c.get("/api/training/queue"))["queue"]["history"]
    assert history["total"] >= 4


# ============================================================================================ storage


def test_storage_endpoints(served):
    from deployments.schemas import CleanupResponse, SaveResponse, StorageStatsResponse

    c = served["client"]
    stats = StorageStatsResponse.model_validate(_json(c.get("/api/storage/stats")))
    for cat in ("models", "weights", "training", "predictions", "features", "candles"):
        assert {"count", "sizeBytes"} <= set(stats.storage[cat]), cat
    assert stats.storage["models"]["count"] >= 2 and stats.storage["totalSizeBytes"] > 0
    assert "cacheHits" in stats.performance
    # A save writes what is buffered: first everything (the ingress's history and the Storage actor's
    # buffer), then exactly the records of the predictions served since. The actor also flushes on
    # its own once its oldest buffered record is prediction_flush_seconds old, so an attempt slower
    # than that is repeated.
    from ml.config import get_settings

    flush_s = get_settings().storage.prediction_flush_seconds
    served_n = 3
    for _attempt in range(3):
        drained = SaveResponse.model_validate(_json(c.post("/api/storage/save", headers=AUTH)))
        assert drained.success is True and drained.savedCount >= 0
        t0 = time.monotonic()
        for _ in range(served_n):
            assert c.get("/api/predictions/SVA").status_code == 200
        save = SaveResponse.model_validate(_json(c.post("/api/storage/save", headers=AUTH)))
        if time.monotonic() - t0 < flush_s * 0.75:
            break
    else:
        pytest.fail(f"serving {served_n} predictions and saving never took less than {flush_s * 0.75:.2f} s")
    assert save.success is True and save.savedCount == served_n, save
    r = c.post("/api/storage/cleanup", json={"maxAgeHours": 1_000_000}, headers=AUTH)
    cleanup = CleanupResponse.model_validate(_json(r))
    assert cleanup.success is True and cleanup.maxAgeHours == 1_000_000


# ============================================================================================ replicas


def test_two_predictor_replicas_share_the_redis_cache(served):
    """A second application: predictor + features only, exactly 2 predictor replicas. A feature window
    computed after a miss on one replica is a hit on the other."""
    from ray import serve

    from deployments.app import build_predictor_app

    tiny = {"num_cpus": 0.05}
    app = build_predictor_app({
        "data_dir": str(served["data_dir"]), "namespace": served["namespace"], "redis_url": served["redis"].url,
        "pairs": PAIRS,
        "deployments": {"Predictor": {"num_replicas": 2, "autoscaling_config": None, "ray_actor_options": tiny},
                        "Features": {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": tiny}},
    })
    handle = serve.run(app, name="tbml-serve-test-pred2", route_prefix=None)
    try:
        # a candle ts deep in the history that no other test used: the features key is new everywhere
        ts = served["store"].coverage("SVA")["start"] + 1000 * TF
        req = {"pair": "SVA", "modelType": "lstm", "version": served["v1"], "candleTs": ts}
        first = handle.predict.remote(req).result(timeout_s=120)
        assert first["featuresCached"] is False and not first["prediction"]["fallback"], first
        assert first["prediction"]["asOf"] == ts + TF and list(first["prediction"]["horizons"]) == \
            [str(h) for h in HORIZONS]
        seen = {first["replica"]: first}
        deadline = time.monotonic() + 60
        other = None
        while other is None and time.monotonic() < deadline:
            out = handle.predict.remote(req).result(timeout_s=60)
            assert out["featuresCached"] is True, out  # never computed twice
            assert out["prediction"]["horizons"] == first["prediction"]["horizons"]
            if out["replica"] != first["replica"] and other is None:
                other = out
                assert out["featuresSource"] == "redis", out  # the other replica's window, via Redis
            seen[out["replica"]] = out
        assert other is not None, f"requests reached only {list(seen)}"
    finally:
        serve.delete("tbml-serve-test-pred2")


def _replicas(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def test_predictor_autoscales_up_under_load_and_back_down(served):
    """Uncached predictions from 24 concurrent clients through the proxy: the predictor grows above
    one replica (target 1 ongoing request per replica), then shrinks back once the load stops."""
    import httpx
    from ray import serve

    assert _wait_for(lambda: _replicas(APP, "Predictor") == 1, 60, what="1 predictor replica at rest")
    stop = False
    errors: list[str] = []
    peak = 0

    async def client_loop(ac: httpx.AsyncClient) -> int:
        n = 0
        while not stop:
            r = await ac.get("/api/predictions/SVA", params={"bypassCache": "true"})
            if r.status_code != 200 or r.json()["prediction"]["fallback"]:
                errors.append(r.text[:200])
            n += 1
        return n

    async def load() -> int:
        nonlocal stop, peak
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=served["base"], timeout=60, limits=limits) as ac:
            tasks = [asyncio.create_task(client_loop(ac)) for _ in range(24)]
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                peak = max(peak, await asyncio.to_thread(_replicas, APP, "Predictor"))
                if peak >= 2:
                    await asyncio.sleep(1.0)  # a little traffic on two replicas
                    break
            stop = True
            return sum(await asyncio.gather(*tasks))

    total = asyncio.run(load())
    assert peak >= 2, f"the predictor never scaled up ({total} requests)"
    assert not errors, errors[:3]
    stats = [serve.get_deployment_handle("Predictor", APP).stats.remote().result(timeout_s=30) for _ in range(6)]
    assert max(s["maxBatch"] for s in stats) > 1, stats  # concurrent requests were batched
    assert _wait_for(lambda: _replicas(APP, "Predictor") == 1, 90, interval=0.5,
                    what="the predictor to scale back to 1 replica")


# ============================================================================================ redis outage


def test_redis_down_keeps_answering_degraded_then_healthy_again(served):
    c, redis = served["client"], served["redis"]
    assert _json(c.get("/api/health"))["status"] == "healthy"
    redis.stop()
    try:
        for _ in range(3):
            for path in ("/api/predictions/SVA", "/api/predictions/SVB", "/api/features/SVA", "/api/predictions",
                         "/api/models/SVA/status", "/api/pairs"):
                r = c.get(path)
                assert r.status_code == 200, (path, r.text)
        p = _json(c.get("/api/predictions/SVA"))
        assert p["prediction"]["fallback"] is False and p["prediction"]["modelVersion"] == served["v1"]
        h = c.get("/api/health")
        assert h.status_code == 200 and _json(h)["status"] == "degraded"
        assert _json(h)["components"]["redis"]["status"] == "degraded"
    finally:
        redis.start()
    _wait_for(lambda: _json(c.get("/api/health"))["status"] == "healthy", 30, interval=0.5,
             what="health to be healthy again")
    assert c.get("/api/predictions/SVA").status_code == 200


# ============================================================================================ live accuracy


def test_served_predictions_resolve_after_the_horizon_and_the_accuracy_endpoint_counts_them(served):
    """SVL: candles that end 12 bars before the clock (the feed is behind), a production model (SVA's
    v1, real weights). Predictions served over HTTP on two successive bars stay unresolved until the
    streaming feed has appended their target bars; then one pass of the accuracy monitor (created
    by the ingress) writes the outcomes into the stored records, and the accuracy endpoint and the
    model status count them."""
    import ray

    from deployments.schemas import AccuracyResponse, HistoryResponse, ModelStatusResponse, PredictionResponse
    from ml.clock import last_closed_bar_ts
    from ml.data.feed import CandleFeed
    from ml.data.sources import synthetic_candles

    c, store, storage, v1 = served["client"], served["store"], served["storage"], served["v1"]
    end = last_closed_bar_ts(TF) - 12 * TF
    store.write(LIVE, synthetic_candles(LIVE, bars=BARS, end_ts=end))
    meta = ray.get(storage.get_version_meta.remote("SVA", "lstm", v1))
    files = {name: ray.get(storage.read_model_file.remote("SVA", "lstm", v1, name)) for name in meta["files"]}
    meta = {k: v for k, v in meta.items() if k not in ("files", "version", "pair", "modelType", "savedAt")}
    ray.get(storage.save_model_version.remote(LIVE, "lstm", v1, meta, files))
    ray.get(storage.set_production.remote(LIVE, "lstm", v1, "test: live accuracy"))

    def predict() -> dict | None:
        r = c.get(f"/api/predictions/{LIVE}")
        return _json(r) if r.status_code == 200 else None

    # not configured: the ingress finds the pair in the candle store (it re-lists it every few seconds)
    first = PredictionResponse.model_validate(_wait_for(predict, 30, what=f"{LIVE} to be served")).prediction
    assert not first.fallback and first.modelVersion == v1, first
    assert first.asOf == end + TF and first.targetTime == end + (1 + DEFAULT_H) * TF
    assert _json(c.get(f"/api/predictions/{LIVE}"))["cached"] is True  # the same prediction, served again

    # the streaming feed, one bar on (its clock set to the next bar's close): a new prediction
    feed = CandleFeed(served["data_dir"], pairs=[LIVE])
    assert feed.tick(now_ms=end + 2 * TF) == {LIVE: 1}
    ingress_sees_candle(c, LIVE, end + TF)
    second = PredictionResponse.model_validate(predict()).prediction
    assert not second.fallback and second.asOf == end + 2 * TF, second
    served_n = 3

    # their target bars are not in the store yet: nothing resolves, the endpoint says what waits
    acc = AccuracyResponse.model_validate(_json(c.get(f"/api/predictions/{LIVE}/accuracy")))
    assert (acc.n, acc.pending, acc.brier) == (0, 2, None), acc

    # the feed catches up with the clock; one pass of the monitor the ingress created
    assert feed.tick()[LIVE] >= 10
    monitor = _wait_for(lambda: ray.get_actor(served["monitor_name"], namespace=served["namespace"]), 30,
                       what="the accuracy monitor (created by the ingress)")
    hist = HistoryResponse.model_validate(_json(c.get(f"/api/predictions/{LIVE}/history")))  # flushes history
    assert hist.count == served_n
    summary = ray.get(monitor.tick.remote(), timeout=120)
    assert summary["errors"] == {} and summary["resolved"].get(LIVE) == served_n, summary

    close = dict(zip(*(store.read(LIVE)[col].tolist() for col in ("ts", "close")), strict=True))
    stored = ray.get(storage.query_predictions.remote(LIVE, None))
    hist = HistoryResponse.model_validate(_json(c.get(f"/api/predictions/{LIVE}/history")))
    for records in (stored, [r.model_dump() for r in hist.predictions]):
        assert len(records) == served_n
        for r in records:
            base, target = close[r["asOf"] - TF], close[r["targetTime"] - TF]
            assert r["realizedClose"] == target, r
            assert r["realizedDirection"] == ("up" if target > base else "down")
            assert r["correct"] == (r["direction"] == r["realizedDirection"] if r["direction"] != "neutral" else None)
            assert r["resolvedAt"] >= r["targetTime"]
    assert all(r.outcome == r.realizedDirection for r in hist.predictions)

    acc = AccuracyResponse.model_validate(_json(c.get(f"/api/predictions/{LIVE}/accuracy")))
    assert (acc.n, acc.pending) == (2, 0), acc  # three served records, two predictions
    assert acc.brier is not None and 0.0 <= acc.brier <= 1.0 and acc.baselineBrier is not None
    assert acc.models["lstm"].version == v1 and acc.models["lstm"].n == 2 and acc.degraded is False
    status = ModelStatusResponse.model_validate(_json(c.get(f"/api/models/{LIVE}/status")))
    live = status.models["lstm"].live
    assert live.available is True and live.version == v1 and live.n == 2 and live.degraded is False, live
    assert live.brier == pytest.approx(acc.models["lstm"].brier)
    tested = status.models["lstm"].production["metrics"]["accuracy"]
    assert tested is not None and live.testAccuracy == tested


# ======================================================================================= status page


class _PageDom:
    """The rendered DOM as Chromium dumped it: attributes of the elements the test reads."""

    def __init__(self, html: str) -> None:
        from html.parser import HTMLParser

        self.body: dict[str, str] = {}
        self.signals: dict[str, str] = {}
        self.cards: set[str] = set()
        self.polylines: list[dict[str, str]] = []
        self.horizons: dict[str, dict[str, dict[str, str]]] = {}  # pair -> horizon -> attributes + text
        self.volatility: dict[str, str] = {}
        dom = self

        class Parser(HTMLParser):
            row: str | None = None
            into: dict | None = None  # the element whose text is read next

            def handle_starttag(self, tag, attrs):
                a = {k: v or "" for k, v in attrs}
                self.into = None
                if tag == "body":
                    dom.body = a
                elif tag == "tr" and "data-pair" in a:
                    self.row = a["data-pair"]
                elif tag == "td" and "data-signal" in a and self.row:
                    dom.signals[self.row] = a["data-signal"]
                elif tag == "td" and "volatility" in a.get("class", "").split() and self.row:
                    self.into = dom.volatility
                elif tag == "span" and "data-h" in a and self.row:
                    self.into = dom.horizons.setdefault(self.row, {}).setdefault(a["data-h"], dict(a, text=""))
                elif tag == "section" and "pair" in a.get("class", "").split():
                    dom.cards.add(a.get("data-pair", ""))
                elif tag == "polyline":
                    dom.polylines.append(a)

            def handle_data(self, data):
                if self.into is dom.volatility:
                    dom.volatility[self.row] = data.strip()
                elif self.into is not None:
                    self.into["text"] += data
                self.into = None

        Parser().feed(html)


def test_status_page_in_headless_chromium(served):
    """GET / rendered by a real browser: every configured pair with the signal GET /api/predictions
    gives, a card per pair with its chart drawn from the served history, and no request to anything
    but this origin. The screenshot is kept at tests/artifacts/status-page.png for people to look at."""
    from pathlib import Path

    c = served["client"]
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in r.text
    for pair in PAIRS:  # every pair has been served at least once by now: its chart has points
        assert c.get(f"/api/predictions/{pair}").status_code == 200
    c.get(f"/api/predictions/{PAIRS[0]}/history")  # flushes the buffered history
    served_now = _json(c.get("/api/predictions"))["predictions"]
    want = {p: v["signal"] for p, v in served_now.items()}

    from headless import Browser

    artifacts = Path(__file__).resolve().parents[1] / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with Browser() as browser:
        browser.open(served["base"] + "/")
        browser.wait_for("document.body && document.body.dataset.ready === 'true'")
        dom = _PageDom(browser.html())
        shot = browser.screenshot(artifacts / "status-page.png")
        requests = list(browser.requests)
    assert dom.signals == want
    for pair, pred in served_now.items():  # every horizon's signal and P(up), the default's volatility
        row = dom.horizons.get(pair, {})
        assert list(row) == [str(h) for h in sorted(int(h) for h in pred["horizons"])], (pair, row)
        for h, f in pred["horizons"].items():
            got = row[h]
            assert (got["data-signal"], float(got["data-probability"])) == (f["signal"], f["probability"]), got
            head, p_text = got["text"].rsplit(" ", 1)
            assert head == f"{h}: {f['signal']}" and float(p_text) == pytest.approx(f["probability"], abs=0.0051)
        vol = dom.volatility[pair]
        if pred["volatility"] is None:
            assert vol == "–", (pair, vol)
        else:
            assert vol.endswith("%") and float(vol[:-1]) == pytest.approx(100 * pred["volatility"], abs=0.0051)
    assert dom.horizons["SVA"] and served_now["SVA"]["fallback"] is False  # a model's horizons are shown
    assert dom.cards == set(PAIRS)
    drawn = {p.get("data-pair") for p in dom.polylines
             if "probability" in p.get("class", "") and len(p.get("points", "").split()) >= 1}
    assert "SVA" in drawn, dom.polylines  # a production model answered: its P(up) is drawn
    assert f"{served['base']}/api/predictions" in requests, requests
    assert all(u.startswith(served["base"]) for u in requests), requests  # nothing leaves the machine
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one


# ============================================================================================ metrics


def _scrape(port: int) -> dict[str, list]:
    """Ray's Prometheus export of the session cluster, parsed by prometheus_client: sample name ->
    samples (tbml_* only)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_tbml_"):
                out.setdefault(s.name, []).append(s)
    return out


def _values(samples: dict[str, list], name: str, **labels: str) -> list[float]:
    return [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]


def test_the_metrics_export_has_the_service_numbers(served, ray_cluster):
    """After the predictions, the training run and the resolved outcomes above, Ray's metrics export
    (the port `ray.init(_metrics_export_port=...)` fixed, as `tbml up` does) has every counter and
    gauge of actors.metrics.CATALOG with its labels, and values that moved. The feed and the
    supervisor document are the real actor paths: a market-feed actor ticks once and the supervisor's
    document is published through the Storage actor as `tbml up` does."""
    import ray

    from actors.feed import get_or_create_feed
    from actors.metrics import CATALOG, exported_names
    from ml.serving.views import SUPERVISOR_DOCUMENT

    c, storage, ns = served["client"], served["storage"], served["namespace"]
    assert c.get("/api/predictions/SVA").status_code == 200  # cached by now
    assert c.get("/api/predictions/SVA?bypassCache=true").status_code == 200  # not a lookup
    assert c.get("/api/features/SVA").status_code == 200
    assert c.get("/api/storage/stats").status_code == 200  # the Storage actor measures the data dir
    doc = {"active": True, "mode": "foreground", "restarts": {"redis": 0, "feed": 2}, "down": ["feed"],
           "gaveUp": [], "lastFailure": None}
    ray.get(storage.put_document.remote(*SUPERVISOR_DOCUMENT, doc), timeout=60)
    feed = get_or_create_feed(ns, str(served["data_dir"]), pairs=[LIVE], interval_s=3600,
                              name=f"feed-metrics-{uuid.uuid4().hex[:8]}")
    try:
        ray.get(feed.tick.remote(), timeout=120)
        # live accuracy is over the directional resolved predictions: absent (never set) while there are none
        wanted = set().union(*(exported_names(m) for m in CATALOG if m.name != "tbml_live_accuracy"))

        deadline = time.monotonic() + 60  # Ray reports every 2 s here (tests/conftest.py); a limit only
        m = _scrape(ray_cluster["metrics_port"])
        while not wanted <= set(m) and time.monotonic() < deadline:
            time.sleep(1.0)
            m = _scrape(ray_cluster["metrics_port"])
        assert wanted <= set(m), f"missing from Ray's export: {sorted(wanted - set(m))}"
    finally:
        with contextlib.suppress(Exception):
            ray.kill(feed, no_restart=True)
        with contextlib.suppress(Exception):
            ray.get(storage.delete_document.remote(*SUPERVISOR_DOCUMENT), timeout=60)

    served_sva = m["ray_tbml_predictions_total"]
    sva = [s for s in served_sva if s.labels.get("pair") == "SVA" and s.labels.get("model") == "lstm"]
    assert sva and {"signal", "fallback", "cached", "deployment", "replica", "application"} <= set(sva[0].labels)
    assert sum(_values(m, "ray_tbml_predictions_total", pair="SVA", fallback="false", cached="true")) >= 1
    assert sum(_values(m, "ray_tbml_predictions_total", pair="SVB", fallback="true")) >= 1  # no model
    assert sum(_values(m, "ray_tbml_prediction_latency_seconds_count", endpoint="one")) >= 3
    assert sum(_values(m, "ray_tbml_prediction_latency_seconds_count", endpoint="all")) >= 1
    assert sum(_values(m, "ray_tbml_cache_hits_total", kind="predictions")) >= 1
    assert sum(_values(m, "ray_tbml_cache_misses_total", kind="predictions")) >= 1
    assert sum(_values(m, "ray_tbml_cache_hits_total", kind="features")) \
        + sum(_values(m, "ray_tbml_cache_misses_total", kind="features")) >= 1
    assert 0.0 in _values(m, "ray_tbml_redis_degraded")  # Redis is back (it was down in a test above)
    assert all(0.0 <= v <= 1.0 for v in _values(m, "ray_tbml_prediction_probability", pair="SVA", model="lstm"))
    assert set(_values(m, "ray_tbml_prediction_signal", pair="SVA", model="lstm")) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert _values(m, "ray_tbml_prediction_signal", pair="SVA", model="lstm")
    assert not _values(m, "ray_tbml_prediction_signal", pair="SVB")  # a fallback sets no signal

    assert _values(m, "ray_tbml_live_resolved", pair=LIVE, model="lstm") == [2.0]
    assert all(0.0 <= v <= 1.0 for v in _values(m, "ray_tbml_live_accuracy", pair=LIVE, model="lstm"))
    assert _values(m, "ray_tbml_live_brier", pair=LIVE, model="lstm")
    assert _values(m, "ray_tbml_live_baseline_brier", pair=LIVE, model="lstm")
    assert _values(m, "ray_tbml_live_degraded", pair=LIVE, model="lstm") == [0.0]
    assert max(_values(m, "ray_tbml_model_age_seconds", pair="SVA", model="lstm")) > 0

    assert sum(_values(m, "ray_tbml_training_runs_total", model="lstm", outcome="completed")) >= 1
    assert sum(_values(m, "ray_tbml_training_runs_total", model="lstm", outcome="cancelled")) >= 1
    assert sum(_values(m, "ray_tbml_training_run_duration_seconds_count", model="lstm", outcome="completed")) >= 1
    assert 0.0 in _values(m, "ray_tbml_training_queue_paused")  # resumed after the emergency stop
    assert _values(m, "ray_tbml_training_queue_depth") and _values(m, "ray_tbml_training_queue_active")

    end = int(served["store"].read(LIVE)["ts"].max())
    assert end / 1000 in _values(m, "ray_tbml_feed_last_candle_timestamp_seconds", pair=LIVE)
    assert 0.0 in _values(m, "ray_tbml_feed_lag_bars", pair=LIVE)
    assert all(v >= 0 for v in _values(m, "ray_tbml_feed_lag_seconds", pair=LIVE))
    assert max(_values(m, "ray_tbml_storage_bytes", category="candles")) > 0
    assert 2.0 in _values(m, "ray_tbml_supervisor_restarts", piece="feed")
    assert 1.0 in _values(m, "ray_tbml_supervisor_down", piece="feed")
