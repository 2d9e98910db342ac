"""Calibration per horizon (ml.training.calibration, ml.training.evaluate): a horizon without an edge
answers 0.5 / HOLD on its own while a horizon with one keeps it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ml.serving.signals import HOLD, classify
from ml.training.calibration import Calibrator, fit_calibrator


def test_temperature_without_ranking_answers_exactly_one_half():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 2))
    y = np.column_stack([(z[:, 0] + rng.normal(size=2000) > 0), (-z[:, 1] > 0)]).astype(float)
    cal = fit_calibrator(z, y, "temperature")
    assert cal.scale[0] > 0 and cal.scale[1] == 0.0  # horizon 2 ranks backwards: no usable ranking
    p = cal.apply(z)
    assert np.all(p[:, 1] == 0.5) and p[:, 0].std() > 0.1
    assert Calibrator.from_dict(cal.to_dict()).apply(z[:3]).tolist() == p[:3].tolist()


def alternating_series(n: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    """Closes whose bar returns alternate small (|r| ~ 0.001) and large (|r| ~ 0.01) with random signs,
    and features where `next_small` is the sign of the next return when that one is small (else 0).

    direction_1 is then known on every other row; direction_2 = close[t+2] > close[t] is always the sign
    of the one large return among the next two, which nothing in the features tells: pure noise.
    """
    rng = np.random.default_rng(seed)
    k = np.arange(n)
    sign = rng.choice([-1.0, 1.0], size=n)
    size = np.where(k % 2 == 1, 0.001, 0.01) * (1 + 0.1 * rng.random(n))
    r = sign * size
    r[0] = 0.0
    close = 100 * np.exp(np.cumsum(r))
    ts = 1_735_689_600_000 + k.astype(np.int64) * 300_000
    nxt = np.append(r[1:], 0.0)
    small_next = (np.append(k[1:], n) % 2) == 1
    feats = pd.DataFrame({
        "next_small": np.where(small_next, np.sign(nxt), 0.0),
        "ret_log_1": np.append(0.0, np.diff(np.log(close))),
        "noise_a": rng.normal(size=n), "noise_b": rng.normal(size=n),
    }, index=ts)
    return feats.iloc[1:], pd.Series(close, index=ts)


def test_a_noise_horizon_answers_hold_while_the_signal_horizon_does_not():
    from ml.training.config import TrainConfig
    from ml.training.dataset import build_dataset
    from ml.training.evaluate import calibrate_and_evaluate
    from ml.training.loop import fit, new_model

    # 6,000 bars (~900 validation rows): on data seeds 1-6 the noise horizon's fitted scale was 0 twice
    # and 0.26-1.28 otherwise (a chance ranking on validation), every test row HOLD, |p - 0.5| <= 0.043
    feats, close = alternating_series(6000, seed=3)
    ds = build_dataset(feats, close, horizons=[1, 2], seq_len=20, vol_window=20)
    # the labels came from the dataset API: check the construction did what it says
    small_rows = feats["next_small"].to_numpy()[np.searchsorted(feats.index, ds.ts_train)] != 0
    assert np.mean(ds.y_train[small_rows, 0] == (feats["next_small"].to_numpy()[
        np.searchsorted(feats.index, ds.ts_train)][small_rows] > 0)) == 1.0
    cfg = TrainConfig(pair="BTC", epochs=8, patience=3, batch_size=128, seq_len=20, hidden=16, seed=7,
                      threads=1, horizons=[1, 2], learning_rate=3e-3, calibration="temperature")
    model = new_model(cfg, ds.n_inputs)
    fit(model, ds, cfg)
    cal, metrics, p = calibrate_and_evaluate(model, ds, cfg)
    signals = [[classify(float(x)).signal for x in p[:, j]] for j in range(2)]
    hold_share = [np.mean([s == HOLD for s in col]) for col in signals]
    acc = [metrics["horizons"][h]["model"]["accuracy"] for h in ("1", "2")]
    print(f"\nscale {cal.scale}; HOLD share h1 {hold_share[0]:.3f} h2 {hold_share[1]:.3f}; "
          f"accuracy h1 {acc[0]:.3f} h2 {acc[1]:.3f}; |p - 0.5| max h2 {np.abs(p[:, 1] - 0.5).max():.4f}")
    assert hold_share[1] == 1.0 and np.abs(p[:, 1] - 0.5).mean() < 0.03
    assert hold_share[0] < 0.6 and acc[0] > 0.7
    assert metrics["horizons"]["1"]["model"]["brier"] < metrics["horizons"]["1"]["baseline"]["brier"] - 0.05
    assert metrics["horizons"]["2"]["model"]["brier"] == pytest.approx(
        metrics["horizons"]["2"]["baseline"]["brier"], abs=0.01)
