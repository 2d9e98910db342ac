"""Walk-forward backtest (ml.evaluation.backtest): fold layout, no leakage, honest verdicts, metrics.

The synthetic series end at a fixed timestamp, so every number here is reproducible. The planted
and random-walk runs use the embedded generator's defaults apart from the signal knob.
"""

from __future__ import annotations

import numpy as np
import pytest

from ml.data.synthetic import ORIGIN_TS, generate_candles
from ml.evaluation.backtest import NAMES, BacktestConfig, BacktestResult, plan_folds, run_backtest, score

TF = 300_000
END = ORIGIN_TS + TF * 40_000
LEARNED = ("model", "logistic", "lightgbm")


def candles(bars: int, strength: float, pair: str = "BTC", seed: int = 42):
    return generate_candles(pair, bars, seed=seed, signal_strength=strength, end_ts=END)


def small_cfg(**kw) -> BacktestConfig:
    base = {"folds": 2, "epochs": 2, "hidden": 8, "seq_len": 10, "vol_window": 10, "check_causality": False}
    return BacktestConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------- fold plan


def test_folds_are_chronological_purged_and_tile_the_end():
    ends = np.arange(29, 5000)
    cfg = BacktestConfig(folds=3, horizon=5, purge=12, seq_len=30)
    plans = plan_folds(ends, cfg)
    assert len(plans) == 3
    assert plans[-1].test[-1] == ends[-1]  # the last test block ends with the data
    for a, b in zip(plans, plans[1:], strict=False):
        assert b.test[0] == a.test[-1] + 1  # consecutive test blocks, no overlap, no hole
    for p in plans:
        assert len(p.test) == len(plans[0].test)
        assert p.fit[-1] + 12 < p.val[0] and p.val[-1] + 12 < p.test[0]  # purge gaps (>= horizon)
        assert np.all(np.diff(p.fit) == 1) and np.all(np.diff(p.val) == 1)
        assert p.fit[0] == ends[0]  # expanding window by default


def test_rolling_training_window_and_clear_errors():
    ends = np.arange(29, 5000)
    plans = plan_folds(ends, BacktestConfig(folds=2, train_bars=1000))
    assert all(p.val[-1] - p.fit[0] + 1 == 1000 for p in plans)  # the newest 1,000 rows before the purge
    with pytest.raises(ValueError, match="too few"):
        plan_folds(np.arange(29, 120), BacktestConfig(folds=4))
    with pytest.raises(ValueError, match="fold 1"):
        plan_folds(ends, BacktestConfig(folds=4, test_bars=1200))
    with pytest.raises(ValueError, match="purge"):
        _ = BacktestConfig(horizon=10, purge=5).effective_purge


def test_horizons_and_the_default_come_from_the_settings_or_the_options():
    from pydantic import ValidationError

    from ml.config import get_settings

    settings = get_settings()
    labels = settings.labels
    cfg = BacktestConfig.from_settings(settings)
    assert cfg.horizons == list(labels.horizons) and cfg.horizon == labels.default_horizon
    assert cfg.effective_purge == cfg.seq_len + max(labels.horizons)
    assert cfg.vol_window == labels.vol_window and cfg.select_k == settings.features.select_k
    one = BacktestConfig.from_settings(settings, horizon=3)  # --horizon alone: that horizon only
    assert one.horizons == [3] and one.horizon == 3 and one.effective_purge == one.seq_len + 3
    assert BacktestConfig.from_settings(settings, horizons=[2, 4]).horizon == 2  # the default is not among them
    assert BacktestConfig.from_settings(settings, horizons=[2, 4], horizon=4).horizon == 4
    with pytest.raises(ValidationError, match="not one of the horizons"):
        BacktestConfig.from_settings(settings, horizons=[2, 4], horizon=3)
    with pytest.raises(ValidationError, match="vol_window"):
        BacktestConfig(seq_len=10, vol_window=20)


# ------------------------------------------------------------------------------------- leakage


@pytest.fixture(scope="module")
def leak_series():
    return candles(3000, 0.12, pair="ETH")


def leak_cfg() -> BacktestConfig:
    """Two horizons from one network and a feature selection per fold: everything that learns."""
    return small_cfg(horizons=[2, 5], horizon=5, select_k=8)


@pytest.fixture(scope="module")
def leak_base(leak_series):
    return run_backtest(leak_series, leak_cfg())


def test_scrambled_test_labels_leave_every_fold_s_training_untouched(leak_series, leak_base):
    """Shuffle the labels (every horizon) of the last fold's test rows: all folds learn exactly the
    same things (scaler, feature selection, network weights and calibration, every baseline of every
    horizon); only the scores of that fold move."""
    import pandas as pd

    from ml.training.dataset import make_labels

    cfg = leak_cfg()
    close = pd.Series(leak_series["close"].to_numpy(), index=leak_series["ts"].to_numpy())
    labels = make_labels(close, cfg.horizons).to_numpy()
    last = leak_base.folds[-1]
    ts = leak_series["ts"].to_numpy()
    in_test = (ts >= last["test"][0]) & (ts <= last["test"][1])
    rng = np.random.default_rng(0)
    scrambled = labels.copy()
    for j in range(labels.shape[1]):
        scrambled[in_test, j] = rng.permutation(1.0 - scrambled[in_test, j])  # flipped and shuffled
    other = run_backtest(leak_series, cfg, labels=scrambled)
    for a, b in zip(leak_base.folds, other.folds, strict=True):
        assert a["fingerprints"] == b["fingerprints"]
        assert a["selection"] == b["selection"] and a["selection"]["network"]["k"] == 8
        assert a["train"] == b["train"] and a["test"] == b["test"]
    for h in ("2", "5"):
        assert other.folds[-1]["horizons"][h]["model"]["accuracy"] != last["horizons"][h]["model"]["accuracy"]
        assert other.folds[0]["horizons"][h] == leak_base.folds[0]["horizons"][h]


def test_rewriting_the_future_of_a_fold_does_not_change_what_it_learned(leak_series, leak_base):
    """Replace every candle from fold 1's test start on by another market's: fold 1 (whose
    training ends a purge gap before) learns bit-identical models and selects the same features;
    fold 2 (which trains on the rewritten bars) does not."""
    cut = leak_base.folds[0]["test"][0]
    other_market = candles(3000, 0.0, pair="XMR")
    future = leak_series["ts"].to_numpy() >= cut
    mixed = leak_series.copy()
    scale = mixed.loc[~future, "close"].iloc[-1] / other_market.loc[future, "open"].iloc[0]
    for col in ("open", "high", "low", "close"):
        mixed.loc[future, col] = other_market.loc[future, col].to_numpy() * scale
    other = run_backtest(mixed, leak_cfg())
    assert other.folds[0]["fingerprints"] == leak_base.folds[0]["fingerprints"]
    assert other.folds[1]["fingerprints"]["model"] != leak_base.folds[1]["fingerprints"]["model"]


def test_every_horizon_is_scored_on_its_own_labels_from_one_network(leak_series, leak_base):
    """The JSON's horizons block: each horizon's rows carry its own label and forward return, the
    purge covers the largest horizon, the top level is the default horizon's, and one network (one
    fingerprint per fold) answered every horizon."""
    from ml.training.dataset import make_labels

    doc = leak_base.to_json()
    assert leak_base.config["horizons"] == [2, 5] and leak_base.config["horizon"] == 5
    assert leak_base.config["purge"] == 10 + 5  # seq_len + the largest horizon
    assert set(doc["horizons"]) == {"2", "5"}
    assert doc["horizons"]["5"]["overall"] == doc["overall"] and doc["horizons"]["5"]["trading"] == doc["trading"]
    close = leak_series.set_index("ts")["close"]
    for h in (2, 5):
        v = leak_base.at(h)
        assert v.horizon == h and np.array_equal(v.ts, leak_base.ts)  # the same test rows for every horizon
        want = make_labels(close, [h]).to_numpy()[:, 0][np.searchsorted(close.index.to_numpy(), v.ts)]
        assert np.array_equal(v.y, want)
        at = np.searchsorted(close.index.to_numpy(), v.ts)
        assert np.allclose(v.forward_return, close.to_numpy()[at + h] / close.to_numpy()[at] - 1.0)
        assert set(doc["horizons"][str(h)]["overall"]) == set(NAMES)
        assert doc["horizons"][str(h)]["volatility"]["n"] == len(v.ts)
        for f, fv in zip(doc["folds"], v.folds, strict=True):
            assert f["horizons"][str(h)]["model"] == fv["model"]
    assert not np.array_equal(leak_base.at(2).probs["model"], leak_base.at(5).probs["model"])
    for f in doc["folds"]:
        assert isinstance(f["fingerprints"]["model"], str)  # one network per fold
        assert set(f["fingerprints"]["lightgbm"]) == {"2", "5"}  # a baseline per horizon


def test_the_simulator_trades_on_the_network_s_volatility_scored_against_the_naive(leak_series, leak_base):
    """Per horizon: the volatility the trades were sized with is the network's sqrt(h x predicted
    per-bar variance), and the reported QLIKE is that forecast's (and the naive one's) on the test
    rows' realized variance, recomputed here from the closes."""
    from ml.training.volatility import log_returns, qlike, realized_variance, trailing_variance

    close = leak_series.set_index("ts")["close"]
    at = np.searchsorted(close.index.to_numpy(), leak_base.ts)
    r = log_returns(close.to_numpy())
    nv = np.maximum(trailing_variance(r, 10), 1e-12)[at]
    for h in (2, 5):
        v = leak_base.at(h)
        assert "network's predicted volatility" in v.trading["config"]["volatility"]
        assert v.vol_score["volatilityHead"] is True
        rv = realized_variance(r, [h])[at, 0]
        var_used = v.volatility ** 2 / h
        assert v.vol_score["model_qlike"] == pytest.approx(qlike(var_used, rv), rel=1e-9)
        assert v.vol_score["naive_qlike"] == pytest.approx(qlike(nv, rv), rel=1e-9)
        assert not np.allclose(var_used, nv)  # the head moved the forecast off the naive one


def test_a_feature_that_peeks_ahead_stops_the_backtest(leak_series):
    from ml.features import feature_matrix
    from ml.features.causality import LookAheadError

    def peeking(c):
        f = feature_matrix(c)
        close = c.set_index("ts")["close"]
        f["next_return"] = (close.shift(-1) / close - 1.0).reindex(f.index).fillna(0.0)
        return f

    with pytest.raises(LookAheadError, match="next_return"):
        run_backtest(leak_series, small_cfg(check_causality=True), feature_fn=peeking)

    def peeking_sometimes(c):  # looks 5 bars ahead, but only during one hour of the day
        f = feature_matrix(c)
        close = c.set_index("ts")["close"]
        ahead = np.log(close.shift(-5) / close).reindex(f.index).fillna(0.0)
        hour = (f.index.to_numpy() // 3_600_000) % 24
        f["afternoon_peek"] = np.where(hour == 13, ahead.to_numpy(), 0.0)
        return f

    with pytest.raises(LookAheadError, match="afternoon_peek"):
        run_backtest(leak_series, small_cfg(check_causality=True), feature_fn=peeking_sometimes)
    ok = run_backtest(leak_series.iloc[:1500].reset_index(drop=True),
                      small_cfg(check_causality=True, folds=1, epochs=1))
    assert ok.checks["causality"]["passed"] is True


# ------------------------------------------------------------------------------ honest verdicts


@pytest.fixture(scope="module")
def planted():
    return run_backtest(candles(8000, 0.12), BacktestConfig(folds=4, epochs=10, check_causality=False))


@pytest.fixture(scope="module")
def random_walk():
    return run_backtest(candles(8000, 0.0), BacktestConfig(folds=4, epochs=10, check_causality=False))


def test_on_a_planted_signal_every_learned_model_beats_majority_and_persistence(planted):
    o = planted.overall
    simple = max(o["majority"]["accuracy"], o["persistence"]["accuracy"])
    for name in LEARNED:
        m = o[name]
        assert m["accuracy"] > simple + 0.02, (name, m["accuracy"], simple)
        assert m["accuracy_ci95"][0] > simple, (name, m["accuracy_ci95"], simple)  # beyond noise
        assert m["mcc"] > max(o["majority"]["mcc"], o["persistence"]["mcc"])
        assert m["balanced_accuracy"] > 0.5


def test_on_a_random_walk_no_model_has_an_edge_beyond_noise(random_walk):
    o = random_walk.overall
    for name in NAMES:
        lo, hi = o[name]["accuracy_ci95"]
        assert lo <= 0.5 <= hi, (name, o[name]["accuracy"], lo, hi)
    # the calibrated learners mostly stay near 0.5 instead of pretending
    assert o["logistic"]["signal_rate"] < 0.5


def test_report_shape_and_pooled_rows(planted):
    doc = planted.to_json()
    assert set(doc) >= {"data", "config", "overall", "folds"}
    assert set(doc["data"]) >= {"rows", "start", "end"} and doc["data"]["rows"] == 8000
    assert set(doc["overall"]) == set(NAMES)
    keys = {"n", "accuracy", "balanced_accuracy", "mcc", "brier", "log_loss", "ece", "accuracy_ci95",
            "signal_rate", "signal_accuracy"}
    for fold in doc["folds"]:
        assert fold["train"][1] < fold["test"][0]
        for name in NAMES:
            assert set(fold[name]) >= keys
    n = sum(f["model"]["n"] for f in doc["folds"])
    assert doc["overall"]["model"]["n"] == n == len(planted.y) == len(planted.ts)
    assert np.all(np.diff(planted.ts) > 0)
    assert doc["overall"]["majority"]["mcc"] == 0.0 or doc["overall"]["majority"]["signal_rate"] == 0.0


# ----------------------------------------------------------------------------------- the numbers


def test_score_on_a_hand_checked_example():
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=float)
    p = np.array([0.9, 0.2, 0.6, 0.4, 0.52, 0.1, 0.8, 0.45])
    m = score(y, p, overlap=2)
    # calls: 1 0 1 0 1 0 1 0 -> correct: 1 1 1 0 0 1 1 1 = 6/8
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["n"] == 8 and m["n_effective"] == 4
    # Brier by hand: .01 .04 .16 .36 .2704 .01 .04 .2025 -> 1.0929 / 8
    assert m["brier"] == pytest.approx(1.0929 / 8)
    # TP=3 TN=3 FP=1 FN=1 -> MCC = (9 - 1) / sqrt(4*4*4*4) = 0.5
    assert m["mcc"] == pytest.approx(0.5)
    # signals: |p - .5| * 2 > .1 i.e. max(p, 1-p) > .55 -> all but .52 and .45 -> 6 of 8, 5 correct
    assert m["signal_rate"] == pytest.approx(6 / 8)
    assert m["signal_accuracy"] == pytest.approx(5 / 6)
    # the Wilson interval counts n / overlap observations: wider than with all 8
    assert m["accuracy_ci95"][0] < score(y, p)["accuracy_ci95"][0]
    # a forced call (persistence) overrides the probability's direction
    forced = score(y, np.full(8, 0.5), hard=y)
    assert forced["accuracy"] == 1.0 and forced["signal_rate"] == 0.0 and forced["signal_accuracy"] is None
    # coverage: rows with a directional call; p = 0.5 is the service's neutral HOLD, unless the rule always calls
    assert m["coverage"] == 1.0 and forced["coverage"] == 0.0
    assert score(y, np.full(8, 0.5), hard=y, always_calls=True)["coverage"] == 1.0


def test_calls_follow_the_service_neutral_rule():
    from ml.evaluation.backtest import calls

    p = np.array([0.7, 0.3, 0.5, 0.5000004, 0.4999996, 0.5000006])
    # 6-decimal rounding as served: the 2nd-to-4th middle values are exactly 0.5 there -> the majority call
    assert calls(p, neutral_call=0.0).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert calls(p, neutral_call=1.0).tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def test_equity_curves_follow_the_signals_net_of_cost():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    fwd = np.array([0.02, -0.01, 0.03, -0.02])
    p = np.array([0.8, 0.3, 0.5, 0.6])  # BUY, SELL, HOLD, BUY (wrong)
    r = BacktestResult(data={}, config={"horizon": 2, "cost_bps": 10.0, "weak": 0.55}, overall={}, folds=[],
                       ts=np.arange(4), y=y, fold=np.zeros(4), forward_return=fwd,
                       probs={"model": p}, hard={"model": (p >= 0.5).astype(float)})
    curves = r.equity_curves()
    cost = 0.001
    steps = np.array([0.02 - cost, 0.01 - cost, 0.0, -0.02 - cost]) / 2
    assert np.allclose(curves["model"], np.cumsum(steps))
    assert np.allclose(curves["buy_and_hold"], np.cumsum(fwd / 2))
    assert r.strategy_summary()["model"]["trades"] == 3
