"""Response views of the HTTP API: plain dicts shaped from what storage, the cache, the training queue
and the accuracy monitor return (camelCase keys, times in epoch ms). Ray-free; the routes in
`deployments.ingress` call these and shape nothing by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ml.registry.production import Production
from ml.serving.signals import is_stale

FILES_LISTED = 200  # files of the storage stats shown in one answer


def uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------ cache, storage


def performance(counters: dict) -> dict:
    """The shared cache hit/miss counters per kind and the hit rate."""
    hits = counters.get("hits", {})
    misses = counters.get("misses", {})
    return {"cacheHits": {"predictions": hits.get("predictions", 0), "features": hits.get("features", 0),
                          "modelStatus": hits.get("modelStatus", 0), "health": hits.get("health", 0)},
            "cacheMisses": {"predictions": misses.get("predictions", 0), "features": misses.get("features", 0),
                            "modelStatus": misses.get("modelStatus", 0), "health": misses.get("health", 0)},
            "hitRate": round(float(counters.get("hitRate", 0.0)), 4), "source": counters.get("source")}


def storage_summary(st: dict) -> dict:
    """Count and size per category of the Storage actor's stats."""
    cats = st.get("categories") or {}
    out: dict[str, Any] = {cat: {"count": c.get("count", 0), "sizeBytes": c.get("bytes", 0),
                                 "files": c.get("files", 0)} for cat, c in cats.items()}
    out.update(totalSizeBytes=st.get("totalBytes", 0), dataDir=st.get("dataDir"),
               tempFiles=st.get("tempFiles", 0), quarantine=st.get("quarantine"),
               bufferedPredictions=st.get("bufferedPredictions", 0), timestamp=st.get("timestamp"))
    return out


def storage_with_files(st: dict) -> dict:
    """storage_summary plus the first FILES_LISTED files (`GET /api/storage/stats`)."""
    storage = storage_summary(st)
    files = st.get("files") or []
    storage["files"] = files[:FILES_LISTED]
    storage["filesTruncated"] = bool(st.get("filesTruncated")) or len(files) > FILES_LISTED
    storage["retention"] = st.get("retention")
    return storage


# ------------------------------------------------------------------------------------ model versions


def metrics_summary(metrics: dict | None) -> dict:
    m = (metrics or {}).get("model") or {}
    b = (metrics or {}).get("baseline") or {}
    return {"accuracy": m.get("accuracy"), "balancedAccuracy": m.get("balanced_accuracy"),
            "brier": m.get("brier"), "logLoss": m.get("log_loss"), "n": m.get("n"),
            "baselineBrier": b.get("brier"), "baselineLogLoss": b.get("log_loss"),
            "baseRate": b.get("base_rate")}


def data_range(dr: dict | None) -> dict | None:
    if not isinstance(dr, dict):
        return None
    return {"start": dr.get("start"), "end": dr.get("end"), "counts": dr.get("counts")}


def version_summary(meta: dict) -> dict:
    return {"version": meta.get("version"), "isProduction": bool(meta.get("isProduction")),
            "savedAt": meta.get("savedAt"), "trainedAt": meta.get("trainedAt"), "jobId": meta.get("jobId"),
            "epochsRun": meta.get("epochsRun"), "metrics": metrics_summary(meta.get("metrics")),
            "promotion": meta.get("promotion"), "model": {k: (meta.get("model") or {}).get(k)
                                                          for k in ("layers", "hidden", "seq_len", "params",
                                                                    "horizons")}}


def versions_view(metas: list[dict]) -> dict:
    """One model type's stored versions (newest first) and which one is production."""
    prod = next((m.get("version") for m in metas if m.get("isProduction")), None)
    return {"production": prod, "count": len(metas), "versions": [version_summary(m) for m in metas]}


def model_storage_status(mt: str, prod: Production | None, versions: int) -> dict:
    """What the shared volume says about one model type of a pair (cached per production version)."""
    if prod is None:
        return {"hasModel": False, "modelInfo": {}, "production": None, "versions": versions}
    meta = prod.meta
    spec = meta.get("model") or {}
    return {
        "hasModel": True,
        "modelInfo": {"type": mt, "layers": spec.get("layers"), "hidden": spec.get("hidden"),
                      "seqLen": spec.get("seq_len"), "totalParams": spec.get("params"),
                      "features": spec.get("n_features"), "horizons": spec.get("horizons")},
        "production": {"version": prod.version, "trainedAt": meta.get("trainedAt"),
                       "promotedAt": prod.promoted_at, "reason": prod.reason,
                       "metrics": metrics_summary(meta.get("metrics")),
                       "epochsRun": meta.get("epochsRun"), "dataRange": data_range(meta.get("dataRange"))},
        "versions": versions,
    }


LIVE_FIELDS = ("n", "accuracy", "brier", "baseRate", "baselineBrier", "referenceRate", "nDirectional", "since",
               "until", "degraded", "reason", "flagged", "flaggedAt", "retrain")


def live_block(doc: dict | None, mt: str, production: dict | None) -> dict | None:
    """The monitor's live numbers of the production version, next to the test numbers it was promoted
    with. None without a production version; `available: false` until the monitor has scored it."""
    if not production:
        return None
    test = production.get("metrics") or {}
    out: dict[str, Any] = {"version": production.get("version"), "testAccuracy": test.get("accuracy"),
                           "testBrier": test.get("brier"), "testBaselineBrier": test.get("baselineBrier")}
    entry = ((doc or {}).get("models") or {}).get(mt)
    if not isinstance(entry, dict) or entry.get("version") != production.get("version"):
        out.update({k: None for k in LIVE_FIELDS}, n=0, degraded=False, flagged=False, available=False,
                   reason="no live numbers for this version yet (the accuracy monitor publishes them)",
                   updatedAt=None)
        return out
    out.update({k: entry.get(k) for k in LIVE_FIELDS}, degraded=bool(entry.get("degraded")), available=True,
               window=doc.get("window"), minN=doc.get("minN"), margin=doc.get("margin"),
               updatedAt=doc.get("updatedAt"))
    return out


def model_status_models(pair: str, model_types: Sequence[str], parts: Sequence[dict], view: dict | None,
                        gates: dict[str, dict], live_doc: dict | None) -> dict[str, dict]:
    """Per model type: the storage part, whether it is training now, its training gate, live numbers."""
    active = {(j.get("pair"), j.get("modelType")): j for j in ((view or {}).get("active") or {}).get("jobs", [])}
    models = {}
    for mt, part in zip(model_types, parts, strict=True):
        entry = dict(part)
        job = active.get((pair, mt))
        entry["modelInfo"] = dict(entry.get("modelInfo") or {}, isTraining=job is not None)
        if job is not None:
            entry["activeJob"] = job
        entry["training"] = gates.get(mt)
        entry["live"] = live_block(live_doc, mt, entry.get("production"))
        models[mt] = entry
    return models


def ensemble_status(block: dict, newest: dict | None) -> dict:
    """The `ensemble` part of the ensemble's status: what `model=ensemble` answers now (`block`, the
    answer's own `ensemble` block from `ml.serving.ensemble_choice.choose`) and the newest built
    ensemble version (`newest`, its meta) with its promotion decision, so a version that did not beat
    its members is seen with the reason."""
    out = dict(block)
    if not newest:
        return dict(out, newest=None)
    promotion = newest.get("promotion")
    out["newest"] = {"version": newest.get("version"), "trainedAt": newest.get("trainedAt"),
                     "members": dict(newest.get("members") or {}),
                     "production": bool(block.get("promoted")) and block.get("version") == newest.get("version"),
                     "promotion": ({"promoted": bool(promotion.get("promoted")), "reason": promotion.get("reason")}
                                   if isinstance(promotion, dict) else None),
                     "metrics": metrics_summary(newest.get("metrics"))}
    return out


def queue_summary(view: dict | None) -> dict | None:
    """The training queue in a few numbers (None when the queue did not answer)."""
    if view is None:
        return None
    return {"active": view["active"]["count"], "queued": view["queued"]["count"], "paused": view.get("paused"),
            "maxConcurrent": view["active"].get("maxConcurrent"), "cooldowns": view.get("cooldowns")}


def promotion_view(pair: str, mt: str, version: str, previous: str | None, pointer: Any, reason: str,
                   ts: int) -> dict:
    return {"success": True, "message": f"{pair}/{mt} production is now {version}", "pair": pair,
            "modelType": mt, "version": version, "previousVersion": previous,
            "promotedAt": pointer.get("promotedAt") if isinstance(pointer, dict) else None,
            "reason": reason, "timestamp": ts}


# ------------------------------------------------------------------------------------ pairs, features


def pair_view(pair: str, snap: Any, *, configured: bool, timeframe_ms: int, now: int, expire_hours: float,
              horizons: Any) -> dict:
    """One pair of `GET /api/pairs`: coverage and the production model per type (`snap` is an
    `ml.serving.snapshot.PairSnapshot`; `horizons(prod)` the horizons a version predicts)."""
    models = {}
    for mt, prod in snap.production.items():
        models[mt] = {"hasModel": prod is not None,
                      "version": prod.version if prod else None,
                      "trainedAt": prod.trained_at if prod else None,
                      "promotedAt": prod.promoted_at if prod else None,
                      "horizons": horizons(prod) if prod else None,
                      "stale": is_stale(prod.trained_at, now, expire_hours) if prod else None}
    cov = dict(snap.coverage) if snap.coverage else None
    if cov and cov.get("end") is not None:
        cov["lastClose"] = int(cov["end"]) + timeframe_ms
    return {"pair": pair, "configured": configured, "coverage": cov, "hasData": snap.candle_ts is not None,
            "models": models}


def features_block(payload: dict, last: Sequence[float], names: Sequence[str], *, timeframe_ms: int,
                   timeframe: str) -> dict:
    """`features` of `GET /api/features/{pair}`: the newest row of an encoded window, 7 significant
    digits, named (f0.. when the window's width differs from the serving features)."""
    values = [None if not math.isfinite(v) else float(f"{v:.7g}") for v in last]
    return {
        "count": len(values),
        "names": list(names) if len(names) == len(values) else [f"f{i}" for i in range(len(values))],
        "values": values,
        "metadata": {"asOf": int(payload["ts"][-1]) + timeframe_ms, "bars": int(payload.get("bars", 0)),
                     "extractedAt": int(payload.get("extractedAt", 0)),
                     "featureHash": payload.get("featureHash"), "timeframe": timeframe},
    }


# ------------------------------------------------------------------------------------ health


def data_source_view(pairs: Sequence[str], snaps: Sequence[Any], *, source: str, timeframe: str,
                     timeframe_ms: int, now: int | None = None, max_lag_bars: int = 0,
                     feed: dict | None = None, feed_error: str | None = None) -> dict:
    """`components.dataSource` of the health answer, per configured pair: source, bars, lastCandle (open
    ts of the newest stored candle), lastClose, lagBars (bars closed since, at `now`), stale (lagBars >
    max_lag_bars) and the market feed's last error. `feed` is the feed actor's status (None: not
    reachable, `feed_error` says why; the lag then comes from the snapshots). `degraded` when a pair
    has no candles, lags beyond max_lag_bars or its last fetch failed (with `core` or `exchange`: the
    source's own reachability, as the feed saw it)."""
    by_feed = (feed or {}).get("byPair") or {}
    data_pairs: dict[str, dict] = {}
    for p, sn in zip(pairs, snaps, strict=True):
        last = sn.candle_ts
        lag = None
        if last is not None and now is not None:
            lag = max(0, ((int(now) // timeframe_ms) * timeframe_ms - timeframe_ms - int(last)) // timeframe_ms)
        entry = {"source": source, "bars": sn.coverage.get("bars") if sn.coverage else 0, "lastCandle": last,
                 "lastClose": last + timeframe_ms if last is not None else None, "lagBars": lag,
                 "stale": last is None or (max_lag_bars > 0 and lag is not None and lag > max_lag_bars),
                 "lastError": None, "lastErrorAt": None, "lastSuccessAt": None, "failures": None}
        fed = by_feed.get(p)
        if fed:  # the feed's view: it is the store's writer and knows its last attempts
            entry.update({k: fed.get(k) for k in ("lastError", "lastErrorAt", "lastSuccessAt", "failures")})
        data_pairs[p] = entry
    missing = [p for p, e in data_pairs.items() if e["lastCandle"] is None]
    stale = [p for p, e in data_pairs.items() if e["stale"] and e["lastCandle"] is not None]
    failing = [p for p, e in data_pairs.items() if e["failures"]]
    feed_block = {"reachable": feed is not None, "error": None if feed is not None else feed_error}
    if feed is not None:
        feed_block.update({k: feed.get(k) for k in ("active", "ticks", "lastTick", "nextDueAt", "closeDelayS",
                                                     "retryS")})
    reachable = None  # core / exchange: what the feed's last attempts say
    if source in ("core", "exchange") and feed is not None and by_feed:
        reachable = not failing
    return {"status": "healthy" if not (missing or stale or failing) else "degraded", "type": source,
            "timeframe": timeframe, "maxLagBars": max_lag_bars, "pairs": data_pairs, "pairsWithoutData": missing,
            "stalePairs": stale, "failingPairs": failing, "sourceReachable": reachable, "feed": feed_block}


def models_loaded(pairs: Sequence[str], snaps: Sequence[Any], model_types: Sequence[str]) -> dict:
    """`models` of the health answer: how many production versions, of which pairs."""
    loaded = sorted({p for p, sn in zip(pairs, snaps, strict=True) if any(sn.production.values())})
    n_models = sum(1 for sn in snaps for v in sn.production.values() if v)
    return {"loaded": n_models, "pairs": loaded, "types": list(model_types)}


# The document a foreground `tbml up` (cluster.ops.supervisor) writes through the Storage actor: restarts
# per piece and the last failure. (category, name) of `Storage.get_document`.
SUPERVISOR_DOCUMENT = ("training", "supervisor")


def supervisor_view(doc: dict | None) -> dict:
    """`supervisor` of the health answer: what the supervisor of `tbml up` restarted and the last failure
    (`active: false` when nothing supervises this service, e.g. `tbml up --detach` or `serve deploy`)."""
    if not isinstance(doc, dict):
        return {"active": False, "restarts": {}, "lastFailure": None, "gaveUp": [], "down": [], "updatedAt": None}
    return {"active": bool(doc.get("active")), "restarts": dict(doc.get("restarts") or {}),
            "lastFailure": doc.get("lastFailure"), "gaveUp": list(doc.get("gaveUp") or []),
            "down": list(doc.get("down") or []), "updatedAt": doc.get("updatedAt")}


def health_status(storage: dict, redis_ok: bool, queue: dict | None, pairs_without_data: Sequence[str],
                  data_degraded: bool = False) -> str:
    """unhealthy without storage; degraded without Redis, the training queue, or a pair's data, or when
    the data source is degraded (a pair lags beyond data.max_lag_bars or its last fetch failed)."""
    if storage["status"] != "healthy":
        return "unhealthy"
    if not redis_ok or queue is None or pairs_without_data or data_degraded:
        return "degraded"
    return "healthy"


# ------------------------------------------------------------------------------------ training


def train_outcome(pair: str, mt: str, out: dict, ts: int) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, body, headers) of the training queue's answer to a submit."""
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


def train_all_outcome(pair: str, results: list[tuple[int, dict, dict[str, str]]]
                      ) -> tuple[int, dict, dict[str, str]]:
    """One answer for the submits of every model type: the first accepted one (else the first), with
    every result listed."""
    accepted = [r for r in results if r[0] == 202]
    chosen = accepted[0] if accepted else results[0]
    payload = dict(chosen[1])
    payload["results"] = [dict(r[1], httpStatus=r[0]) for r in results]
    if accepted:
        payload["jobs"] = [r[1]["jobId"] for r in accepted]
        payload["message"] = f"{len(accepted)} of {len(results)} training job(s) queued for {pair}"
    return chosen[0], payload, chosen[2]


def health_body(*, status: str, service: str, version: str, now: int, uptime_s: float, components: dict,
                models: dict, predictions: dict, training: dict, performance_: dict, storage_stats: dict,
                elapsed_s: float) -> dict:
    """The body of `GET /api/health`."""
    return {
        "status": status,
        "service": service,
        "version": version,
        "timestamp": now,
        "uptime": uptime(uptime_s),
        "components": components,
        "models": models,
        "predictions": predictions,
        "training": training,
        "performance": performance_,
        "storage": {"enabled": True, "stats": storage_stats},
        "responseTime": round(elapsed_s * 1000, 3),
    }
