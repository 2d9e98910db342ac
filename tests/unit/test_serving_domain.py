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


def test_the_snapshot_knows_the_newest_ensemble_version_promoted_or_not(tmp_path):
    from ml.storage.store import Storage

    storage = Storage(tmp_path)
    snaps = Snapshots(_Store(), Storage.reader(tmp_path), ["lstm", "lightgbm", "ensemble"], TF, live_source=False,
                      interval_s=60.0, default_horizons=[6])
    assert snaps.read("BTC").newest_ensemble is None
    for version, brier in (("v20260101000000-aaaaaaaa", 0.25), ("v20260102000000-bbbbbbbb", 0.24)):
        storage.save_model_version("BTC", "ensemble", version, {"members": {"lstm": "v1"}, "brier": brier},
                                   {"ensemble.json": b"{}"})
    snap = snaps.read("BTC")
    assert snap.newest_ensemble["version"] == "v20260102000000-bbbbbbbb" and snap.newest_ensemble["brier"] == 0.24
    assert snap.production["ensemble"] is None  # built, not promoted
    assert Snapshots(_Store(), Storage.reader(tmp_path), ["lstm"], TF, live_source=False, interval_s=60.0,
                     default_horizons=[6]).read("BTC").newest_ensemble is None  # no ensemble type: not read


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


# ------------------------------------------------------------------------------------------ all horizons

SIG = {"strong": 0.7, "weak": 0.55}


def _record(p_up, vol, horizons=(1, 3, 6, 12), **kw):
    from ml.serving.forecast import forecast_record

    args = {"model_type": "lstm", "version": "v1", "as_of": 2000, "timeframe_ms": TF, "stale": False,
            "features": {"count": 0, "sample": {}}, **SIG, **kw}
    return forecast_record([*p_up, *vol], list(horizons), **args)


def test_one_record_answers_every_horizon_each_with_its_own_signal():
    from ml.serving.forecast import outputs_of, pick, record_horizons

    rec = _record([0.81, 0.5, 0.4, 0.5600004], [0.001, 0.0017320508, 0.00244949, 0.0034641016])
    assert record_horizons(rec) == [1, 3, 6, 12]
    signals = {h: e["signal"] for h, e in rec["horizons"].items()}
    assert signals == {"1": "STRONG_BUY", "3": "HOLD", "6": "SELL", "12": "BUY"}  # each classified alone
    assert rec["horizons"]["3"]["direction"] == "neutral" and rec["horizons"]["3"]["confidence"] == 0.0
    for h, e in rec["horizons"].items():
        assert e["targetTime"] == 2000 + int(h) * TF and e["volatility"] > 0
        assert e["confidence"] == pytest.approx(abs(e["probability"] - 0.5) * 2, abs=1e-9)
    assert rec["horizons"]["12"]["probability"] == 0.56 and rec["horizons"]["6"]["volatility"] == 0.00244949
    for h in (1, 3, 6, 12):
        p = pick(rec, h)
        top = {k: p[k] for k in ("direction", "probability", "confidence", "signal", "volatility", "targetTime")}
        assert top == rec["horizons"][str(h)] and p["horizon"] == h and p["horizons"] is rec["horizons"]
        assert "forecast" not in p and p["fallback"] is False
    with pytest.raises(KeyError):
        pick(rec, 5)
    # the unrounded outputs stay in the record (what an ensemble combines), in the loader's layout
    assert outputs_of(rec).tolist() == [0.81, 0.5, 0.4, 0.5600004, 0.001, 0.0017320508, 0.00244949, 0.0034641016]
    with pytest.raises(ValueError):
        _record([0.5, 0.5], [0.1, 0.1])  # 2 horizons' values for 4 horizons


def test_a_fallback_record_is_neutral_at_every_horizon_without_volatility():
    from ml.serving.forecast import fallback_record, outputs_of, pick

    fb = fallback_record(model_type="lstm", version=None, horizons=[1, 6], reason="no model", as_of=1000,
                         timeframe_ms=TF)
    assert outputs_of(fb) is None
    for h in (1, 6):
        p = pick(fb, h)
        assert (p["probability"], p["signal"], p["volatility"], p["fallback"]) == (0.5, "HOLD", None, True)
        assert p["reason"] == "no model" and p["targetTime"] == 1000 + h * TF
    assert fallback_prediction(model_type="lstm", version=None, horizon=6, horizons=[1, 3, 6], reason="x")[
        "horizons"].keys() == {"1", "3", "6"}


def test_default_horizon_and_volatility_rounding():
    from ml.serving.forecast import default_horizon, round_volatility

    assert default_horizon([1, 3, 6, 12], 6) == 6 and default_horizon([5], 6) == 5  # an older version
    assert round_volatility(0.0012345678) == 0.00123457
    assert round_volatility(float("nan")) is None and round_volatility(-1.0) is None and round_volatility(None) is None


def test_the_prediction_schema_documents_the_new_fields():
    from deployments.schemas import Prediction, PredictionResponse
    from ml.serving.forecast import pick

    rec = _record([0.6, 0.52, 0.45, 0.25], [0.001, 0.002, 0.003, 0.004])
    p = Prediction.model_validate(pick(rec, 6))
    assert p.volatility == 0.003 and set(p.horizons) == {"1", "3", "6", "12"} and p.ensemble is None
    assert p.horizons["12"].signal == "STRONG_SELL"
    fb = Prediction.model_validate(fallback_prediction(model_type="lstm", version=None, horizon=6,
                                                       horizons=[1, 6], reason="no model"))
    assert fb.volatility is None and fb.horizons["1"].volatility is None
    schema = PredictionResponse.model_json_schema()
    assert {"volatility", "horizons", "ensemble"} <= set(schema["$defs"]["Prediction"]["properties"])


# ------------------------------------------------------------------------------------------ ensemble


def _prod(version, brier, horizons=(1, 3, 6, 12), **meta):
    return production_from({"version": version}, {"model": {"horizons": list(horizons)},
                                                   "metrics": {"model": {"brier": brier}}, **meta})


def test_without_a_promoted_ensemble_the_best_member_answers_and_says_why():
    from ml.serving.ensemble_choice import choose

    prods = {"lstm": _prod("v1", 0.249), "lightgbm": _prod("g1", 0.2471)}
    c = choose("BTC", ["lstm", "lightgbm"], prods, None, [1, 3, 6, 12])
    assert not c.combine and c.answered_by == "lightgbm" and c.horizons == [1, 3, 6, 12]
    block = c.block()
    assert block["promoted"] is False and block["answeredBy"] == "lightgbm"
    assert "no ensemble built for BTC" in block["reason"] and "0.2471" in block["reason"]
    # a built ensemble that was not promoted: its test rows pick the member, its reason is quoted
    newest = {"version": "e1", "members": {"lstm": "v1", "lightgbm": "g1"},
              "metrics": {"members": {"lstm": {"brier": 0.240}, "lightgbm": {"brier": 0.242}}},
              "promotion": {"promoted": False, "reason": "ensemble test Brier 0.2405 >= best member lstm's"}}
    built = choose("BTC", ["lstm", "lightgbm"], prods, None, [6], newest)
    assert built.answered_by == "lstm" and "e1 was not promoted (ensemble test Brier 0.2405" in built.reason
    assert "0.2400 on the ensemble's test rows" in built.reason
    # ... unless production has moved on since it was built: then each version's own numbers
    moved = choose("BTC", ["lstm", "lightgbm"], {**prods, "lstm": _prod("v2", 0.249)}, None, [6], newest)
    assert moved.answered_by == "lightgbm" and "other member versions" in moved.reason
    # only the members that have a model; ties and missing numbers: model.enabled_types order
    assert choose("BTC", ["lstm", "lightgbm"], {"lstm": None, "lightgbm": prods["lightgbm"]}, None,
                  [6]).answered_by == "lightgbm"
    tie = {"lstm": _prod("v1", 0.25), "lightgbm": _prod("g1", 0.25)}
    assert choose("BTC", ["lstm", "lightgbm"], tie, None, [6]).answered_by == "lstm"
    none = choose("BTC", ["lstm", "lightgbm"], {"lstm": None, "lightgbm": None}, None, [1, 6])
    assert none.answered_by is None and none.horizons == [1, 6] and "no member type" in none.reason


def test_a_production_ensemble_combines_the_member_versions_it_lists():
    from ml.serving.ensemble_choice import choose, member_briers

    doc = {"members": {"lstm": "v0", "lightgbm": "g1"}, "horizons": [1, 6], "weights": {}, "bias": {},
           "metrics": {"members": {"lstm": {"brier": 0.24}, "lightgbm": {"brier": 0.26}}}}
    ens = production_from({"version": "e1"}, {"model": {"horizons": [1, 6]}, **doc})
    prods = {"lstm": _prod("v1", 0.2), "lightgbm": _prod("g1", 0.3)}
    c = choose("BTC", ["lstm", "lightgbm"], prods, ens, [1, 3, 6, 12])
    assert c.combine and c.version == "e1" and c.horizons == [1, 6]
    assert c.members == {"lstm": "v0", "lightgbm": "g1"}  # the versions it was fitted on, not production's
    assert c.block() == {"promoted": True, "version": "e1", "answeredBy": "ensemble",
                         "members": {"lstm": "v0", "lightgbm": "g1"}, "reason": None}
    assert member_briers(doc) == {"lstm": 0.24, "lightgbm": 0.26}
    lonely = production_from({"version": "e2"}, {"model": {"horizons": [6]}, "members": {"lstm": "v1"}})
    one = choose("BTC", ["lstm", "lightgbm"], prods, lonely, [6])
    assert not one.combine and one.answered_by == "lstm" and "fewer than two members" in one.reason


def test_ensemble_parameters_and_their_conflicts():
    from ml.serving.model_ids import accepted_types

    assert accepted_types(["lstm"]) == ["lstm"]
    assert accepted_types(["lstm", "lightgbm"]) == ["lstm", "lightgbm", "ensemble"]
    settings = SimpleNamespace(pairs=["BTC"], data=SimpleNamespace(source="candles"))
    store = SimpleNamespace(pairs=lambda: [])
    params = Params(settings, store, accepted_types(["lstm", "lightgbm"]), "lstm")
    assert params.model_query(None, True) == params.model_query("ensemble") == "ensemble"
    assert params.model_query("ensemble", True) == "ensemble" and params.model_query("lightgbm", False) == "lightgbm"
    with pytest.raises(ApiError) as err:
        params.model_query("lstm", True)
    assert err.value.status == 422 and err.value.code == "conflicting_parameters"
    assert "ensemble=true" in err.value.message and "'lstm'" in err.value.message
    single = Params(settings, store, accepted_types(["lstm"]), "lstm")
    for model, ens in (("ensemble", False), (None, True)):
        with pytest.raises(ApiError) as err:
            single.model_query(model, ens)
        assert err.value.status == 422 and err.value.code == "invalid_model" and "two" in err.value.message


# ------------------------------------------------------------------------------------------ live account


def test_the_live_account_trades_on_the_served_volatility_and_says_which_it_used():
    from ml.simulation.live import MODEL, NAIVE, advance, served_volatility, view
    from ml.simulation.trades import Bar, SimConfig

    cfg = SimConfig(tp_mult=1.5, sl_mult=1.0, fee_bps=0.0, slippage_bps=0.0)
    pred = {"signal": "BUY", "horizon": 6, "probability": 0.6, "volatility": 0.02, "fallback": False}
    assert served_volatility(pred) == (0.02, MODEL)
    for bad in ({**pred, "volatility": None}, {**pred, "volatility": 0.0}, {**pred, "fallback": True}, None):
        assert served_volatility(bad) == (None, None)
    doc, did = advance(None, "BTC", [Bar(0, 100, 100.5, 99.5, 100)], pred, 0.02, cfg, 0, volatility_source=MODEL)
    assert did["opened"]["take_profit"] == pytest.approx(103.0) and did["opened"]["volatilitySource"] == MODEL
    body = view(doc, "BTC", TF, cfg)
    assert body["lastForecast"]["volatilitySource"] == MODEL and body["volatilitySources"] == {MODEL: 1}
    doc, did = advance(doc, "BTC", [Bar(TF, 100, 100.2, 99.9, 100.1)], {**pred, "volatility": None}, 0.01, cfg, 1,
                       volatility_source=NAIVE)
    assert view(doc, "BTC", TF, cfg)["volatilitySources"] == {MODEL: 1, NAIVE: 1}
