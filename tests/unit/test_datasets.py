"""Labels, windows, chronological splits with purge, and the training-only scaler."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ml.training.dataset import (
    StandardScaler,
    build_dataset,
    chronological_split,
    latest_window,
    make_labels,
    make_windows,
)

TF = 300_000
T0 = 1_735_689_600_000


def frames(n: int = 400, n_features: int = 4, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """A small feature frame (index ts) and a close series covering it plus 10 bars on each side."""
    rng = np.random.default_rng(seed)
    ts_all = T0 + np.arange(n + 20, dtype=np.int64) * TF
    close = pd.Series(100 * np.exp(np.cumsum(rng.normal(0, 0.01, n + 20))), index=ts_all)
    feats = pd.DataFrame(rng.normal(size=(n, n_features)), index=ts_all[10:n + 10],
                         columns=[f"f{i}" for i in range(n_features)])
    feats["const"] = 3.0
    return feats, close


def test_labels_hand_example():
    close = pd.Series([1.0, 2.0, 2.0, 1.5, 3.0], index=[10, 20, 30, 40, 50])
    lab = make_labels(close, [1, 2])
    assert list(lab.columns) == ["direction_1", "direction_2"]
    assert list(lab.index) == [10, 20, 30, 40, 50]
    np.testing.assert_array_equal(lab["direction_1"], [1.0, 0.0, 0.0, 1.0, np.nan])  # 2=2 is not up
    np.testing.assert_array_equal(lab["direction_2"], [1.0, 0.0, 1.0, np.nan, np.nan])


def test_labels_reject_bad_horizons():
    with pytest.raises(ValueError):
        make_labels(pd.Series([1.0, 2.0]), [0])


def test_windows_last_row_is_end_row():
    X = np.arange(60, dtype=np.float64).reshape(20, 3)
    ends = np.array([4, 9, 19])
    w = make_windows(X, ends, seq_len=5)
    assert w.shape == (3, 5, 3) and w.dtype == np.float32 and w.flags.c_contiguous
    for k, e in enumerate(ends):
        np.testing.assert_array_equal(w[k, -1], X[e])
        np.testing.assert_array_equal(w[k], X[e - 4:e + 1])
    with pytest.raises(ValueError):
        make_windows(X, np.array([3]), seq_len=5)  # would start before row 0
    with pytest.raises(ValueError):
        make_windows(X, np.array([20]), seq_len=5)


def test_split_is_chronological_with_purge():
    s = chronological_split(1_000, 30, (0.7, 0.15, 0.15), purge=7, horizon=5)
    assert s.train[0] == 29  # the first full window
    for part in s:
        assert len(part) and (np.diff(part) == 1).all()
    assert s.val[0] > s.train[-1] + 7
    assert s.test[0] > s.val[-1] + 7
    assert s.test[-1] == 1_000 - 1 - 5  # the last rows have no label
    assert len(s.train) == int((1_000 - 29 - 5) * 0.7)


def test_split_default_purge_is_horizon_and_smaller_purge_raises():
    s = chronological_split(500, 10, horizon=5)
    assert s.purge == 5 and s.val[0] - s.train[-1] > 5
    with pytest.raises(ValueError, match="purge"):
        chronological_split(500, 10, purge=4, horizon=5)


def test_split_excludes_invalid_rows_and_too_small_data():
    valid = np.ones(300, dtype=bool)
    valid[[50, 51, 250]] = False
    s = chronological_split(300, 10, purge=3, horizon=3, valid=valid)
    used = np.concatenate(list(s))
    assert not np.isin([50, 51, 250], used).any()
    with pytest.raises(ValueError):
        chronological_split(20, 10, horizon=5)
    with pytest.raises(ValueError):
        chronological_split(500, 10, (0.5, 0.2, 0.2), horizon=5)


def test_scaler_zero_variance_and_round_trip():
    rng = np.random.default_rng(1)
    X = np.column_stack([rng.normal(5, 2, 100), np.full(100, 7.0), rng.normal(size=100) * 1e-3 + 1 / 3])
    sc = StandardScaler(["a", "b", "c"]).fit(X)
    assert sc.fit_rows == 100 and sc.std_[1] == 1.0
    Z = sc.transform(X)
    np.testing.assert_allclose(Z[:, [0, 2]].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Z[:, [0, 2]].std(axis=0), 1, atol=1e-12)
    np.testing.assert_array_equal(Z[:, 1], 0.0)
    doc = json.loads(json.dumps(sc.to_json()))
    back = StandardScaler.from_json(doc)
    assert back.mean_.tobytes() == sc.mean_.tobytes() and back.std_.tobytes() == sc.std_.tobytes()
    assert back.fit_rows == 100 and back.feature_names == ["a", "b", "c"] and back.n_features == 3
    assert back.to_json() == sc.to_json()
    np.testing.assert_array_equal(back.transform(X), Z)
    assert sc.transform(X.astype(np.float32)).dtype == np.float32


def test_scaler_rejects_non_finite_and_wrong_width():
    with pytest.raises(ValueError, match="b"):
        StandardScaler(["a", "b"]).fit(np.array([[1.0, np.nan], [2.0, 1.0]]))
    sc = StandardScaler().fit(np.ones((3, 2)))
    with pytest.raises(ValueError):
        sc.transform(np.ones((3, 3)))


def test_build_dataset_shapes_labels_and_ranges():
    feats, close = frames()
    ds = build_dataset(feats, close, horizons=[1, 5], seq_len=20)
    assert ds.purge == 5 and ds.feature_names == list(feats.columns)
    assert ds.label_names == ["direction_1", "direction_5"]
    labels = make_labels(close, [1, 5]).reindex(feats.index).to_numpy()
    for split in ("train", "val", "test"):
        X, y = ds.arrays(split)
        ends = getattr(ds.split, split)
        ts = getattr(ds, f"ts_{split}")
        assert X.shape == (len(ends), 20, feats.shape[1]) and X.dtype == np.float32
        assert y.shape == (len(ends), 2) and not np.isnan(y).any()
        np.testing.assert_array_equal(y, labels[ends].astype(np.float32))
        np.testing.assert_array_equal(ts, feats.index.to_numpy()[ends])
        assert ds.ranges[split] == [int(ts[0]), int(ts[-1])]
        # the last window row is the scaled feature row at the end position
        np.testing.assert_allclose(X[:, -1], ds.scaler.transform(feats.to_numpy()[ends]), rtol=1e-6, atol=1e-6)
    # close extends 10 bars past the features, so the last feature rows still have labels
    assert ds.split.test[-1] == len(feats) - 1
    assert ds.ranges["train"][1] < ds.ranges["val"][0] < ds.ranges["test"][0]
    assert ds.summary()["counts"]["train"] == len(ds.y_train)


def test_scaler_fitted_on_training_rows_only():
    feats, close = frames()
    base = build_dataset(feats, close, [5], 20)
    last_train = int(base.split.train[-1])
    assert base.scaler.fit_rows == last_train + 1

    changed = feats.copy()
    changed.iloc[last_train + 1:] *= 1_000.0  # every validation and test row (and the purge gap)
    other = build_dataset(changed, close, [5], 20)
    np.testing.assert_array_equal(other.scaler.mean_, base.scaler.mean_)
    np.testing.assert_array_equal(other.scaler.std_, base.scaler.std_)
    np.testing.assert_array_equal(other.X_train, base.X_train)

    changed = feats.copy()
    changed.iloc[last_train, 0] += 50.0  # one training row
    assert build_dataset(changed, close, [5], 20).scaler.mean_[0] != base.scaler.mean_[0]


def test_build_dataset_purge_and_errors():
    feats, close = frames()
    ds = build_dataset(feats, close, [3], 20, purge=12)
    assert ds.split.val[0] - ds.split.train[-1] > 12 and ds.split.test[0] - ds.split.val[-1] > 12
    with pytest.raises(ValueError, match="purge"):
        build_dataset(feats, close, [5], 20, purge=2)
    with pytest.raises(ValueError, match="close lacks"):
        build_dataset(feats, close.iloc[20:], [5], 20)
    bad = feats.copy()
    bad.iloc[3, 1] = np.inf
    with pytest.raises(ValueError, match="f1"):
        build_dataset(bad, close, [5], 20)


def test_views_equal_copies():
    feats, close = frames()
    a = build_dataset(feats, close, [5], 20)
    b = build_dataset(feats, close, [5], 20, materialize=False)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.arrays(split)[0], b.arrays(split)[0])


def test_latest_window_uses_scaler_column_order():
    feats, close = frames()
    ds = build_dataset(feats, close, [5], 20)
    w = latest_window(feats[feats.columns[::-1]], ds.scaler, 20)
    assert w.shape == (1, 20, feats.shape[1]) and w.dtype == np.float32
    np.testing.assert_allclose(w[0], ds.scaler.transform(feats.to_numpy()[-20:]), rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError):
        latest_window(feats.drop(columns="f0"), ds.scaler, 20)


def test_volatility_targets_per_split_and_usable_ends():
    from ml.training.volatility import log_returns, realized_variance, trailing_variance

    feats, close = frames()
    ds = build_dataset(feats, close, horizons=[1, 5], seq_len=20, vol_window=30)
    r = log_returns(close.to_numpy())
    rv_all = realized_variance(r, [1, 5])
    nv_all = trailing_variance(r, 30)
    at = close.index.get_indexer(feats.index)
    for split in ("train", "val", "test"):
        q, rv, nv = ds.vol_arrays(split)
        ends = getattr(ds.split, split)
        assert q.shape == (len(ends), 2) and np.isfinite(q).all() and (q > 0).all()
        np.testing.assert_allclose(rv, rv_all[at[ends]])
        np.testing.assert_allclose(nv, nv_all[at[ends]])
        np.testing.assert_allclose(q, rv / nv[:, None])
    # the close starts 10 bars before the features: NV over 30 returns needs 30 closes -> 20 feature rows
    # (the first window end is at seq_len - 1 = 19, the first defined NV at feature row 20)
    assert ds.split.train[0] == 20
    plain = build_dataset(feats, close, horizons=[1, 5], seq_len=20)
    assert plain.vol_arrays("train") is None and not plain.has_vol_targets and plain.split.train[0] == 19
