"""The Ray-free serving domain the ingress is built from: prediction shapes, history records, response
views, the per-pair snapshot, the replica memo, the history buffer, parameter parsing, and the live
accuracy rules the ingress applies (`with_outcomes`, `accuracy_summary`). No cluster, no Ray.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from deployments.errors import ApiError
from deployments.history import HistoryBuffer
from deployments.params import Params
from ml.evaluation.live import accuracy_summary, rolling_stats, with_outcomes
from ml.registry.production import production_from
from ml.serving import views
from ml.serving.history import history_record
from ml.serving.memo import ReplicaMemo
from ml.serving.prediction import (
    failure_cause,
    fallback_prediction,
    model_prediction,
    prediction_body,
)
from ml.serving.signals import classify
from ml.serving.snapshot import Snapshots

TF = 300_000


# ------------------------------------------------------------------------------------------ predictions


def test_fallback_and_model_prediction_shapes():
    fb = fallback_prediction(model_type="lstm", version=None, horizon=5, reason="no model", as_of=1000,
                             timeframe_ms=TF)
    assert fb["fallback"] is True and fb["signal"] == "HOLD" and fb["direction"] == "neutral"
    assert fb["targetTime"] == 1000 + 5 * TF and fb["reason"] == "no model"
    assert fallback_prediction(model_type="lstm", version="v", horizon=5, reason="x")["targetTime"] is None

    from ml.features import FEATURE_NAMES

    last = np.arange(len(FEATURE_NAMES), dtype=np.float32)
    last[FEATURE_NAMES.index("rsi_14")] = np.nan
    p = model_prediction(classify(0.8), model_type="lstm", version="v1", horizon=5, as_of=2000,
                         timeframe_ms=TF, stale=False, last=last)
    assert (p["direction"], p["signal"], p["fallback"]) == ("up", "STRONG_BUY", False)
    assert p["targetTime"] == 2000 + 5 * TF and p["features"]["count"] == len(FEATURE_NAMES)
    assert p["features"]["sample"]["rsi_14"] is None  # NaN is not JSON
    assert p["features"]["sample"]["macd_hist"] == float(FEATURE_NAMES.index("macd_hist"))

    body = prediction_body("BTC", p, SimpleNamespace(age_s=1.5), 0.0021, 123)
    assert body["cached"] is True and body["cacheAge"] == 1500 and body["responseTime"] == 2.1
    assert "cacheAge" not in prediction_body("BTC", p, None, 0.0, 123)


def test_failure_cause_names_the_cause_and_its_last_line():
    class RayLike(Exception):
        cause = ValueError("first\nthe real reason")

    assert failure_cause(RayLike("traceback...")) == "ValueError: the real reason"
    assert failure_cause(RuntimeError()) == "RuntimeError: "


def test_history_record_keeps_the_prediction_and_whether_it_was_cached():
    pred = fallback_prediction(model_type="lstm", version=None, horizon=5, reason="no data")
    rec = history_record("BTC", pred, True, 42)
    assert rec["pair"] == "BTC" and rec["timestamp"] == 42 and rec["cached"] is True
    assert rec["requestId"] == "BTC_42" and rec["reason"] == "no data" and len(rec["id"]) == 32
    assert history_record("BTC", pred, True, 42)["id"] != rec["id"]


# ------------------------------------------------------------------------------------------ views


META = {"trainedAt": 10, "epochsRun": 3, "model": {"layers": 1, "hidden": 8, "seq_len": 30, "params": 99,
                                                    "horizons": [5, 10]},
        "metrics": {"model": {"accuracy": 0.6, "brier": 0.2}, "baseline": {"brier": 0.25, "base_rate": 0.52}}}
POINTER = {"version": "v1", "promotedAt": 20, "reason": "test", "previous": "v0"}


def test_model_storage_status_and_live_block():
    prod = production_from(POINTER, META)
    st = views.model_storage_status("lstm", prod, 2)
    assert st["hasModel"] and st["versions"] == 2 and st["modelInfo"]["seqLen"] == 30
    assert st["production"]["version"] == "v1" and st["production"]["trainedAt"] == 10
    assert st["production"]["metrics"]["baselineBrier"] == 0.25 and st["production"]["promotedAt"] == 20
    assert views.model_storage_status("lstm", None, 0) == {"hasModel": False, "modelInfo": {}, "production": None,
                                                           "versions": 0}
    missing = views.live_block({"models": {}}, "lstm", st["production"])
    assert missing["available"] is False and missing["n"] == 0 and missing["testAccuracy"] == 0.6
    doc = {"models": {"lstm": {"version": "v1", "n": 7, "brier": 0.24, "degraded": 0}}, "window": 100,
           "minN": 5, "margin": 0.01, "updatedAt": 99}
    live = views.live_block(doc, "lstm", st["production"])
    assert live["available"] is True and live["n"] == 7 and live["degraded"] is False and live["window"] == 100
    assert views.live_block(doc, "lstm", None) is None


def test_train_outcomes_map_to_http_statuses():
    ok = views.train_outcome("BTC", "lstm", {"status": "queued", "jobId": "j1", "queuePosition": 1}, 5)
    assert ok[0] == 202 and ok[1]["jobId"] == "j1" and ok[1]["timestamp"] == 5
    assert views.train_outcome("BTC", "lstm", {"status": "duplicate"}, 5)[0] == 409
    cool = views.train_outcome("BTC", "lstm", {"status": "cooldown", "retryAfterSeconds": 0.2}, 5)
    assert cool[0] == 429 and cool[2] == {"Retry-After": "1"}
    assert views.train_outcome("BTC", "lstm", {"status": "paused"}, 5)[0] == 503
    assert views.train_outcome("BTC", "lstm", {"error": "bad", "httpStatus": 400}, 5)[0] == 400
    both = views.train_all_outcome("BTC", [views.train_outcome("BTC", "a", {"status": "duplicate"}, 5), ok])
    assert both[0] == 202 and both[1]["jobs"] == ["j1"] and len(both[1]["results"]) == 2


def test_health_status_and_storage_views():
    healthy = {"status": "healthy"}
    assert views.health_status(healthy, True, {}, []) == "healthy"
    assert views.health_status(healthy, False, {}, []) == "degraded"
    assert views.health_status(healthy, True, None, []) == "degraded"
    assert views.health_status(healthy, True, {}, ["BTC"]) == "degraded"
    assert views.health_status({"status": "unhealthy"}, True, {}, []) == "unhealthy"
    st = {"categories": {"models": {"count": 2, "bytes": 10}}, "totalBytes": 10, "files": list(range(250))}
    out = views.storage_with_files(st)
    assert out["models"] == {"count": 2, "sizeBytes": 10, "files": 0} and len(out["files"]) == 200
    assert out["filesTruncated"] is True
    assert views.uptime(3723) == "01:02:03"


def test_features_block_rounds_names_and_times():
    payload = {"ts": [1000, 2000], "bars": 300, "extractedAt": 5, "featureHash": "h"}
    block = views.features_block(payload, [1.23456789, float("nan")], ["a", "b"], timeframe_ms=TF,
                                 timeframe="5m")
    assert block["values"] == [1.234568, None] and block["names"] == ["a", "b"]
    assert block["metadata"]["asOf"] == 2000 + TF and block["metadata"]["timeframe"] == "5m"
    assert views.features_block(payload, [1.0], ["a", "b"], timeframe_ms=TF, timeframe="5m")["names"] == ["f0"]


# ------------------------------------------------------------------------------------------ snapshot


class _Reader:
    def __init__(self) -> None:
        self.meta_reads = 0
        self.pointer: dict | None = dict(POINTER)

    def get_production(self, pair, mt):
        if pair == "BAD":
            raise OSError("damaged pointer")
        return self.pointer

    def get_version_meta(self, pair, mt, version):
        self.meta_reads += 1
        return dict(META)


class _Store:
    def coverage(self, pair):
        return {"bars": 500, "start": 0, "end": 7 * TF}


def test_snapshot_reads_production_through_the_registry_reader_and_caches_meta():
    reader = _Reader()
    snaps = Snapshots(_Store(), reader, ["lstm"], TF, live_source=False, interval_s=60.0, default_horizons=[5])
    snap = snaps.read("BTC")
    prod = snap.production["lstm"]
    assert snap.candle_ts == 7 * TF and prod.version == "v1" and prod.trained_at == 10 and prod.previous == "v0"
    assert snaps.horizons(prod) == [5, 10] and snaps.horizons(None) == [5]
    snaps.read("BTC")
    assert reader.meta_reads == 1  # version metadata never changes: read once
    assert snaps.read("BAD").production["lstm"] is None
    reader.pointer = None
    assert snaps.read("BTC").production["lstm"] is None

    live = Snapshots(_Store(), reader, ["lstm"], TF, live_source=True, interval_s=60.0, default_horizons=[5])
    assert live.read("BTC").coverage["live"] is True

    async def twice():
        a = await snaps.get("ETH")
        b = await snaps.get("ETH")
        c = await snaps.get("ETH", force=True)
        return a, b, c

    a, b, c = asyncio.run(twice())
    assert a is b and c is not a


def test_a_close_being_computed_stays_invisible_to_requests_until_the_block_ends(tmp_path):
    """`Snapshots.holding`: requests keep the pair's current candle while its new close is computed on
    a forced snapshot; after the block they see the new one (so their first answer is cached)."""
    from ml.data.store import CandleStore
    from ml.data.synthetic import generate_candles

    store = CandleStore(tmp_path, "5m")
    from ml.data.synthetic import ORIGIN_TS

    end = ORIGIN_TS + 400 * TF
    candles = generate_candles("BTC", 300, seed=1, end_ts=end, timeframe_ms=TF)
    store.write("BTC", candles.iloc[:-1])
    snaps = Snapshots(store, _Reader(), ["lstm"], TF, live_source=False, interval_s=0.0, default_horizons=[5])

    async def scenario():
        before = await snaps.get("BTC")
        store.append("BTC", candles.iloc[-1:])
        async with snaps.holding("BTC"):
            new = await snaps.get("BTC", force=True)
            seen = await snaps.get("BTC")
        after = await snaps.get("BTC")
        return before, new, seen, after

    before, new, seen, after = asyncio.run(scenario())
    assert before.candle_ts == end - TF and new.candle_ts == end
    assert seen is before and after.candle_ts == end


def test_pair_view_shows_production_and_coverage():
    reader = _Reader()
    snaps = Snapshots(_Store(), reader, ["lstm"], TF, live_source=False, interval_s=60.0, default_horizons=[5])
    view = views.pair_view("BTC", snaps.read("BTC"), configured=True, timeframe_ms=TF, now=10 + 3_600_000,
                           expire_hours=48, horizons=snaps.horizons)
    lstm = view["models"]["lstm"]
    assert lstm == {"hasModel": True, "version": "v1", "trainedAt": 10, "promotedAt": 20, "horizons": [5, 10],
                    "stale": False}
    assert view["coverage"]["lastClose"] == 8 * TF and view["hasData"] is True


# ------------------------------------------------------------------------------------------ memo, buffer


class _Cache:
    def __init__(self) -> None:
        self.counted: list[tuple[str, bool, int]] = []

    def ttl_for(self, kind):
        return 30.0

    async def _count(self, kind, hit, n):
        self.counted.append((str(kind), hit, n))


def test_replica_memo_keeps_values_until_their_ttl_and_counts_hits():
    cache = _Cache()

    async def run():
        memo = ReplicaMemo(cache, max_items=2)
        assert memo.get("predictions", "k") is None
        memo.put("predictions", "k", {"v": 1}, None)
        memo.put("predictions", "old", {"v": 0}, SimpleNamespace(age_s=31.0))  # already expired in Redis
        value, hit = memo.get("predictions", "k")
        assert value == {"v": 1} and hit.source == "replica" and hit.age_s >= 0
        memo.put("features", "a", 1, None)
        memo.put("features", "b", 2, None)
        assert len(memo) == 2 and memo.get("predictions", "k") is None  # the oldest went
        deadline = time.monotonic() + 5
        while not cache.counted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return memo

    memo = asyncio.run(run())
    assert memo.hits == {"predictions": 1} and cache.counted == [("predictions", True, 1)]


def test_history_buffer_sends_batches_and_keeps_failed_ones():
    sent: list[list[dict]] = []
    fail = {"on": True}

    async def send(batch):
        if fail["on"]:
            raise RuntimeError("storage down")
        sent.append(batch)

    async def run():
        buf = HistoryBuffer(send, flush_s=0.01, max_batch=2, max_buffer=4)
        for i in range(5):
            buf.add({"i": i})
        assert len(buf) == 4 and buf.dropped == 1
        with pytest.raises(RuntimeError):
            await buf.flush()
        assert len(buf) == 4  # put back
        fail["on"] = False
        assert await buf.flush() == 4
        return buf

    buf = asyncio.run(run())
    assert [r["i"] for b in sent for r in b] == [1, 2, 3, 4] and [len(b) for b in sent] == [2, 2]
    assert buf.stats() == {"buffered": 0, "sent": 4, "dropped": 1}


def test_params_canonical_pair_and_model_types():
    settings = SimpleNamespace(pairs=["BTC", "ETH"], data=SimpleNamespace(source="candles"))
    store = SimpleNamespace(pairs=lambda: ["ETH", "SOL"])
    params = Params(settings, store, ["lstm", "gru"], "lstm")
    assert params.pair(" btc ") == "BTC" and params.pair("sol") == "SOL"
    assert params.known_pairs() == ["BTC", "ETH", "SOL"]
    with pytest.raises(ApiError) as err:
        params.pair("../x")
    assert err.value.status == 404 and err.value.extra["availablePairs"] == ["BTC", "ETH", "SOL"]
    assert params.model_query(None) == "lstm" and params.model_query("gru") == "gru"
    for bad in ("xgb", "GRU", ""):  # exactly an enabled type: the enum the OpenAPI document lists
        with pytest.raises(ApiError) as err:
            params.model_query(bad)
        assert err.value.status == 422
    with pytest.raises(ApiError) as err:
        params.model_path("xgb" * 20)
    assert err.value.status == 404 and "..." in err.value.message


# ------------------------------------------------------------------------------------------ live rules


def _rec(i: int, *, version="v1", direction="up", p=0.7, as_of=None) -> dict:
    as_of = as_of if as_of is not None else (10 + i) * TF
    return {"id": f"r{i}", "modelType": "lstm", "modelVersion": version, "asOf": as_of,
            "targetTime": as_of + TF, "horizon": 1, "direction": direction, "probability": p,
            "fallback": False, "timestamp": as_of}


def test_with_outcomes_resolves_on_the_fly_and_names_the_outcome():
    candles = pd.DataFrame({"ts": [t * TF for t in range(8, 20)], "close": [float(t % 3) for t in range(8, 20)]})
    records = [_rec(0), _rec(1)]
    spans = []

    def read(first, last):
        spans.append((first, last))
        return candles

    out = with_outcomes(records, TF, 10**15, read)
    assert spans == [(9 * TF, 11 * TF)]
    assert all(r["outcome"] == r["realizedDirection"] for r in out)
    untouched = with_outcomes([_rec(3)], TF, 10**15, None)
    assert "outcome" not in untouched[0] and "realizedDirection" not in untouched[0]
    broken = with_outcomes([_rec(4)], TF, 10**15, lambda a, b: (_ for _ in ()).throw(OSError("gone")))
    assert "outcome" not in broken[0]


def test_accuracy_summary_judges_overall_and_per_production_version():
    records = [dict(_rec(i), realizedDirection="up", resolvedAt=1, correct=True) for i in range(6)]
    records.append(dict(_rec(9, version="v0", direction="down", p=0.2), realizedDirection="up", resolvedAt=1))
    out = accuracy_summary(records, 100, {"lstm": ("v1", 0.5), "gru": None}, model_type=None, reference=0.5,
                           min_n=5, margin=0.01)
    assert out["models"]["gru"] == {"version": None}
    v1 = out["models"]["lstm"]
    assert v1["version"] == "v1" and v1["n"] == 6 and v1["degraded"] is False and "degradedReason" in v1
    assert out["n"] == 7 and out["window"] == 100 and out["minN"] == 5 and out["pending"] == 0
    assert out["brier"] == pytest.approx(rolling_stats(records, 100, reference=0.5)["brier"])
