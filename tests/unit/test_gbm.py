"""The lightgbm model type (ml.training.gbm): learning is real, fits see training and validation rows
only, runs are deterministic and resumable, and a stored version forecasts what the run evaluated."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ml.data.synthetic import ORIGIN_TS, generate_candles, rule_accuracy
from ml.features import feature_matrix
from ml.registry.loader import LoadedGbm, load_model
from ml.registry.versions import Registry, promotion_decision
from ml.storage.store import Storage
from ml.training.calibration import fit_calibrator
from ml.training.config import TrainConfig
from ml.training.dataset import build_dataset, prepare_dataset
from ml.training.gbm import GBM_FILE, GbmModel, dataset_outputs, fit_gbm, model_seq_len, train_gbm
from ml.training.local import train_local
from ml.training.loop import TrainingCancelled

BAR_MS = 300_000
BARS = 4000          # the shared run: every horizon, enough rows for every split
LEARN_BARS = 10_000  # the planted-signal run: ~1,400 test rows


def candles(n: int = BARS, strength: float = 0.12, seed: int = 42) -> pd.DataFrame:
    return generate_candles("BTC", n, seed=seed, signal_strength=strength, end_ts=ORIGIN_TS + (n + 100) * BAR_MS)


def gbm_cfg(**kw) -> TrainConfig:
    return TrainConfig.from_settings("BTC", "lightgbm", threads=1, seed=7, **kw)


@pytest.fixture(scope="module")
def run():
    """One run on the planted signal, two horizons: (cfg, candles, dataset, result)."""
    cfg, c = gbm_cfg(horizons=[1, 6]), candles()
    ds = prepare_dataset(c, cfg)
    return cfg, c, ds, train_gbm(cfg, ds)


def test_beats_the_base_rate_on_the_planted_signal():
    cfg, c = gbm_cfg(horizons=[3, 6]), candles(LEARN_BARS)
    res = train_local(cfg, c)
    m = res.metrics
    assert res.model_type == "lightgbm" and set(m["horizons"]) == {"3", "6"}
    h6 = m["horizons"]["6"]
    rule, n = rule_accuracy(c, horizon=6, lookback=10, ts=res.test_ts)
    acc, base = h6["model"]["accuracy"], h6["baseline"]["accuracy"]
    print(f"\nlightgbm h=6: accuracy {acc:.4f} base rate {base:.4f} rule {rule:.4f} "
          f"brier {h6['model']['brier']:.5f} vs {h6['baseline']['brier']:.5f} ({n} test rows)")
    assert n == m["n"]["test"] > 500
    assert acc >= base + 0.03 and acc >= rule - 0.03
    assert h6["model"]["brier"] < h6["baseline"]["brier"]
    assert m["model"]["brier"] < m["baseline"]["brier"] and promotion_decision(m)["promoted"]
    # volatility: the gamma trees beat the naive trailing forecast on the clustered synthetic volatility
    assert all(v["model_qlike"] < v["naive_qlike"] for v in m["volatility"].values()), m["volatility"]


def test_no_invented_edge_on_a_signal_free_series():
    cfg = gbm_cfg(horizons=[6])
    res = train_local(cfg, candles(strength=0.0))
    m = res.metrics
    edge = m["baseline"]["brier"] - m["model"]["brier"]
    print(f"\nno signal: accuracy {m['model']['accuracy']:.4f} base {m['baseline']['accuracy']:.4f} edge {edge:.5f}")
    assert edge < 2e-3


def test_same_config_same_boosters(run):
    cfg, _, ds, res = run
    again = train_gbm(cfg, ds)
    assert again.state_dict == res.state_dict and np.array_equal(again.test_probs, res.test_probs)
    assert again.metrics == res.metrics
    other = train_gbm(cfg.model_copy(update={"seed": 8}), ds)
    assert other.state_dict != res.state_dict


def test_fits_see_training_and_validation_rows_only(run):
    cfg, _, ds, res = run
    model = GbmModel.from_bytes(res.state_dict)
    # early stopping: each stored booster is cut at its best validation round
    for e in res.history:
        booster = (model.direction if e["kind"] == "direction" else model.volatility)[ds.horizons.index(e["horizon"])]
        assert booster.num_trees() == e["best_iteration"] <= e["rounds"] <= cfg.lightgbm.n_estimators
        assert e["rounds"] - e["best_iteration"] <= cfg.lightgbm.early_stopping_rounds
    # calibration: fitted on the validation logits
    logits_val, _, _ = dataset_outputs(model, ds, "val")
    assert fit_calibrator(logits_val, ds.y_val, cfg.calibration).to_dict() == res.calibration
    # other test rows (labels flipped, features noise): the same boosters and calibrator, other metrics
    rng = np.random.default_rng(0)
    ds2 = prepare_dataset(candles(), cfg)
    ds2.y_test = 1.0 - ds2.y_test
    ds2.X_test = np.ascontiguousarray(ds2.X_test) + rng.normal(0, 1, ds2.X_test.shape).astype(np.float32)
    moved = train_gbm(cfg, ds2)
    assert moved.state_dict == res.state_dict and moved.calibration == res.calibration
    assert moved.metrics["model"]["accuracy"] != res.metrics["model"]["accuracy"]
    # other validation labels: another early stop or calibration
    ds3 = prepare_dataset(candles(), cfg)
    ds3.y_val = 1.0 - ds3.y_val
    assert train_gbm(cfg, ds3).state_dict != res.state_dict


def test_stored_version_forecasts_what_the_run_evaluated(run, tmp_path):
    cfg, c, ds, res = run
    storage = Storage(tmp_path)
    meta = Registry(storage).register("BTC", res)
    assert sorted(meta["files"]) == [GBM_FILE, "scaler.json"]
    loaded = load_model(storage, "BTC", "lightgbm", meta["version"])
    assert isinstance(loaded, LoadedGbm) and loaded.seq_len == model_seq_len(cfg.lightgbm.lags, 20) == 20
    assert loaded.horizons == [1, 6] and loaded.feature_names == ds.feature_names
    assert loaded.info()["modelType"] == "lightgbm"
    # raw feature windows of the test rows, as serving holds them
    feats = feature_matrix(c)[ds.feature_names]
    pos = feats.index.get_indexer(ds.ts_test)
    raw = np.stack([feats.to_numpy()[p - loaded.seq_len + 1:p + 1] for p in pos])
    fc = loaded.forecast(raw)
    assert fc.shape == (len(pos), 4)
    np.testing.assert_allclose(fc[:, :2], res.test_probs, atol=1e-6)
    np.testing.assert_allclose(fc[:, 2:], np.sqrt(res.test_var * np.array([1, 6])), rtol=1e-4)
    # one window (T >= seq_len rows) and a DataFrame answer the same as the batch's row
    np.testing.assert_array_equal(loaded.forecast(raw[-1]), fc[-1])
    np.testing.assert_allclose(loaded.predict_proba(feats.loc[:ds.ts_test[-1]]), fc[-1, :2])
    np.testing.assert_allclose(loaded.predict_volatility(raw[-1]), fc[-1, 2:])
    # a second load gives identical forecasts
    again = load_model(storage, "BTC", "lightgbm", meta["version"])
    np.testing.assert_array_equal(again.forecast(raw), fc)


def test_resumed_run_fits_only_the_missing_boosters(run):
    cfg, _, ds, res = run
    finished: dict = {}

    def keep(info: dict, done: dict) -> None:  # what a checkpoint after each booster holds
        finished.clear()
        finished.update(done)

    with pytest.raises(TrainingCancelled):
        fit_gbm(cfg, ds, on_booster=keep, should_stop=lambda: len(finished) >= 3)
    assert len(finished) == 3
    json.dumps(finished)  # checkpointable as it is

    calls = {"n": 0}

    def count(info: dict, done: dict) -> None:
        calls["n"] += 0 if info.get("resumed") else 1

    model, history = fit_gbm(cfg, ds, done=finished, on_booster=count)
    assert calls["n"] == 1 and [e["index"] for e in history] == [1, 2, 3, 4]
    assert model.to_bytes() == GbmModel.from_bytes(res.state_dict).to_bytes()


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="lag 40 needs seq_len"):
        gbm_cfg(lightgbm={"lags": [0, 40]})
    with pytest.raises(ValueError, match="num_leave"):
        gbm_cfg(lightgbm={"num_leave": 7})
    with pytest.raises(ValueError, match="distinct integers >= 0"):
        gbm_cfg(lightgbm={"lags": [0, -1]})
    with pytest.raises(ValueError, match="unknown model type"):
        TrainConfig.from_settings("BTC", "xgboost")
    # the request's learning rate is the trees' shrinkage
    assert gbm_cfg(learning_rate=0.2).lightgbm.learning_rate == 0.2
    c = candles(1500)
    feats = feature_matrix(c)
    close = pd.Series(c["close"].to_numpy(), index=c["ts"].to_numpy())
    cfg = gbm_cfg(horizons=[6])
    no_vol = build_dataset(feats, close, [6], 30)
    with pytest.raises(ValueError, match="volatility targets"):
        fit_gbm(cfg, no_vol)
    no_ret = build_dataset(feats.drop(columns=["ret_log_1"]), close, [6], 30, vol_window=20)
    with pytest.raises(ValueError, match="ret_log_1"):
        fit_gbm(cfg, no_ret)
    with pytest.raises(ValueError, match="trains lightgbm"):
        fit_gbm(TrainConfig.from_settings("BTC", "lstm"), no_vol)
