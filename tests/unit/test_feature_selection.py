"""Feature selection (ml.features.selection): fitted on training rows only, keeps the signal's columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ml.data.synthetic import ORIGIN_TS, generate_candles
from ml.features import feature_matrix
from ml.features.selection import rank_correlation, select_features
from ml.training.dataset import build_dataset

N_BARS = 6000
HORIZONS = [1, 3, 6, 12]


def synthetic(strength: float, n: int = N_BARS):
    c = generate_candles("BTC", n, seed=42, signal_strength=strength, end_ts=ORIGIN_TS + (n + 100) * 300_000)
    return feature_matrix(c), pd.Series(c["close"].to_numpy(), index=c["ts"].to_numpy())


@pytest.fixture(scope="module")
def planted():
    return synthetic(0.12)


def test_rank_correlation_and_the_pick_rules():
    rng = np.random.default_rng(0)
    n = 2000
    signal = rng.normal(size=n)
    y = (signal + rng.normal(size=n) > 0).astype(float)[:, None]
    q = np.exp(rng.normal(size=n) * 0.5 + 0.8 * np.tanh(rng.normal(size=n)))[:, None]
    volish = np.log(q[:, 0]) + rng.normal(size=n) * 0.3
    X = np.column_stack([rng.normal(size=n), signal, signal * 3 + 1, volish, rng.normal(size=n)])
    names = ["noise1", "signal", "signal_copy", "volish", "noise2"]
    assert rank_correlation(X[:, 1], X[:, 2])[0, 0] == pytest.approx(1.0)
    sel = select_features(X, names, 2, y, q)
    assert sel.order == ["signal", "volish"]  # direction first, then volatility
    sel3 = select_features(X, names, 3, y, q)
    assert "signal_copy" not in sel3.names  # a duplicate of a chosen column is skipped
    assert sel3.names == [n for n in names if n in sel3.names]  # serving order kept
    assert select_features(X, names, None, y).names == names
    assert select_features(X, names, 1, y).names == ["signal"]


def test_selection_uses_training_rows_only(planted):
    feats, close = planted
    base = build_dataset(feats, close, HORIZONS, 30, vol_window=20, select_k=10)
    last_train = int(base.split.train[-1])
    # everything after the training rows (features and closes) replaced: the selection must not move
    rng = np.random.default_rng(1)
    changed = feats.copy()
    changed.iloc[last_train + 1:] = rng.normal(size=changed.iloc[last_train + 1:].shape)
    c2 = close.copy()
    cut = close.index.get_loc(feats.index[last_train]) + max(HORIZONS) + 1  # the last training label's close
    c2.iloc[cut:] = c2.iloc[cut:].to_numpy() * np.exp(np.cumsum(rng.normal(0, 0.01, len(c2) - cut)))
    other = build_dataset(changed, c2, HORIZONS, 30, vol_window=20, select_k=10)
    assert other.input_features == base.input_features and other.selection == base.selection
    assert not np.array_equal(other.y_test, base.y_test)  # the later labels did change
    # ... while a change in the training rows does move it: a column that leaks the training labels wins
    leak = feats.copy()
    y = base.y_train[:, 0]
    leak.iloc[base.split.train, leak.columns.get_loc("time_hour_sin")] = y + 0.01 * rng.normal(size=len(y))
    assert "time_hour_sin" in build_dataset(leak, close, HORIZONS, 30, vol_window=20, select_k=10).input_features


def test_on_the_planted_signal_it_keeps_the_columns_that_carry_it(planted):
    """The planted rule is mean reversion on the trailing 10-bar return (docs/data.md): the direction
    picks are that return and its close relatives; on a signal-free series nothing scores as high."""
    feats, close = planted
    ds = build_dataset(feats, close, HORIZONS, 30, vol_window=20, select_k=12)
    assert ds.n_inputs == 12 and ds.input_idx is not None and len(ds.feature_names) == feats.shape[1]
    direction_picks = ds.selection["order"][0::2]
    rows = feats.to_numpy()[ds.split.train]
    rho = rank_correlation(rows[:, [feats.columns.get_loc(n) for n in direction_picks]],
                           rows[:, feats.columns.get_loc("ret_log_10")]).ravel()
    scores = [ds.selection["scores"][n]["direction"] for n in direction_picks]
    print(f"\ndirection picks {direction_picks}\n|rho| with ret_log_10 {np.round(np.abs(rho), 3)}; "
          f"scores {np.round(scores, 3)}\nvolatility picks {ds.selection['order'][1::2]}")
    assert "ret_log_10" in ds.input_features
    assert np.all(np.abs(rho) > 0.7)
    vol_picks = ds.selection["order"][1::2]
    assert any(n.startswith("volat_") for n in vol_picks)
    noise_feats, noise_close = synthetic(0.0)
    noise = build_dataset(noise_feats, noise_close, HORIZONS, 30, vol_window=20, select_k=12)
    best_noise = max(s["direction"] for s in noise.selection["scores"].values())
    assert min(scores) > 2 * best_noise


def test_a_selected_model_keeps_the_serving_features_and_reads_its_columns(tmp_path):
    """featureNames (and the hash serving checks) stay the full list; the loaded model picks its columns
    and gives the probabilities of the in-memory network on the test windows."""
    import torch

    from ml.features import FEATURE_NAMES, feature_names_hash
    from ml.registry.loader import load_model
    from ml.registry.versions import Registry
    from ml.storage.store import Storage
    from ml.training.calibration import Calibrator
    from ml.training.config import TrainConfig
    from ml.training.dataset import prepare_dataset
    from ml.training.local import train_on_dataset
    from ml.training.nets import build_model, predict_logits, state_from_bytes

    n = 2000
    candles = generate_candles("BTC", n, seed=9, signal_strength=0.12, end_ts=ORIGIN_TS + (n + 10) * 300_000)
    cfg = TrainConfig(pair="BTC", epochs=1, batch_size=256, seq_len=24, hidden=8, seed=3, threads=1,
                      horizons=[1, 6], select_k=8)
    ds = prepare_dataset(candles, cfg)
    res = train_on_dataset(cfg, ds)
    meta = res.to_registry_payload()["meta"]
    assert meta["featureNames"] == list(FEATURE_NAMES) and meta["featureHash"] == feature_names_hash(FEATURE_NAMES)
    assert len(meta["inputFeatures"]) == 8 == meta["model"]["n_features"] and meta["featureSelection"]["k"] == 8
    storage = Storage(tmp_path / "data")
    try:
        version = Registry(storage).register("BTC", res)["version"]
        m = load_model(storage, "BTC", "lstm", version)
        assert m.input_features == meta["inputFeatures"] and m.n_features == len(FEATURE_NAMES)
        raw = feature_matrix(candles)[m.feature_names].to_numpy()
        ends = ds.split.test[-5:]
        windows = np.stack([raw[e - 23:e + 1] for e in ends])
        spec = res.model_spec
        net = build_model("lstm", spec["n_features"], 2, layers=1, hidden=8, seq_len=24, volatility=True)
        net.load_state_dict(state_from_bytes(res.state_dict))
        with torch.no_grad():
            expected = Calibrator.from_dict(res.calibration).apply(
                predict_logits(net, ds.X_test[-5:], cols=ds.input_idx)[:, :2])
        np.testing.assert_allclose(m.predict_proba(windows), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.test_probs[-5:], expected, rtol=1e-5, atol=1e-6)
    finally:
        storage.close()
