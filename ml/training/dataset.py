"""Labels, windows, chronological splits, the scaler, and the Dataset a run trains on. numpy/pandas only.

Conventions
* Rows are positions in the feature matrix (one row per candle after the warm-up), in time order.
* A window of `seq_len` rows ending at row e predicts the labels of row e: direction_h[e] =
  close[e+h] > close[e]. So "a split's positions" are window END positions.
* Splits are chronological: train, then validation, then test. Between two splits `purge` rows are
  left out: the first validation end is > the last training end + purge (same for test after
  validation). With purge >= h no training label (close[e..e+h]) overlaps a validation label.
* The scaler is fitted on the feature rows up to the last training window end (every row a
  training window can see, nothing later) and saved with the model; serving uses the saved one.
* Volatility targets (ml.training.volatility) per end row: q_h = RV_h / NV with NV the trailing
  per-bar variance over `vol_window` rows; rows where RV or NV is undefined are not usable ends.
* Feature selection (ml.features.selection) is fitted on the training ends only; X_* keep every
  column in serving order and `input_idx` names the columns the network reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from ml.training.config import TrainConfig

SPLITS = ("train", "val", "test")


def label_name(h: int) -> str:
    return f"direction_{h}"


def _check_horizons(horizons: Sequence[int]) -> list[int]:
    hs = [int(h) for h in horizons]
    if not hs:
        raise ValueError("at least one horizon is needed")
    if any(h < 1 for h in hs):
        raise ValueError(f"horizons must be >= 1, got {hs}")
    if len(set(hs)) != len(hs):
        raise ValueError(f"duplicate horizons: {hs}")
    return hs


def make_labels(close: pd.Series, horizons: Sequence[int]) -> pd.DataFrame:
    """direction_{h} = 1.0 if close[t+h] > close[t] else 0.0; NaN where t+h is beyond the data.

    Positional: t+h is h rows later in `close` (candles without gaps make that h bars later).
    The result has the index of `close`.
    """
    hs = _check_horizons(horizons)
    c = np.asarray(close, dtype=np.float64)
    out = {}
    for h in hs:
        lab = np.full(len(c), np.nan)
        if len(c) > h:
            lab[:-h] = (c[h:] > c[:-h]).astype(np.float64)
        out[label_name(h)] = lab
    return pd.DataFrame(out, index=close.index)


def make_windows(X: np.ndarray, end_positions: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows (N, seq_len, F) float32: window n is X[end_n - seq_len + 1 : end_n + 1].

    Its last row is the feature row at the end position. Returns a new contiguous array.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows, features), got shape {X.shape}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ends = np.asarray(end_positions, dtype=np.int64)
    if ends.ndim != 1:
        raise ValueError("end_positions must be 1-D")
    if len(ends) and (ends.min() < seq_len - 1 or ends.max() >= len(X)):
        raise ValueError(f"end positions must lie in [{seq_len - 1}, {len(X) - 1}]")
    if not len(ends):
        return np.empty((0, seq_len, X.shape[1]), dtype=np.float32)
    view = _window_view(np.asarray(X, dtype=np.float32), seq_len)
    return np.ascontiguousarray(view[ends - (seq_len - 1)])


def _window_view(X: np.ndarray, seq_len: int) -> np.ndarray:
    """A read-only (T - seq_len + 1, seq_len, F) view of X: entry i is the window starting at row i."""
    return sliding_window_view(X, seq_len, axis=0).transpose(0, 2, 1)


@dataclass
class SplitIndices:
    """Window end positions of each split (int64, increasing)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    purge: int = 0

    def __iter__(self):
        return iter((self.train, self.val, self.test))

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {fractions}")
    f = tuple(float(x) for x in fractions)
    if f[0] <= 0 or f[1] <= 0 or f[2] < 0:
        raise ValueError(f"fractions must be train > 0, val > 0, test >= 0; got {f}")
    if abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"fractions must add up to 1, got {f} (sum {sum(f)})")
    return f  # type: ignore[return-value]


def chronological_split(
    n_rows: int,
    seq_len: int,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    purge: int | None = None,
    *,
    horizon: int = 1,
    valid: np.ndarray | None = None,
) -> SplitIndices:
    """Chronological train/val/test window end positions with a purge gap between splits.

    Candidate ends are rows seq_len-1 .. n_rows-1 that are `valid` (default: all rows whose
    labels exist, i.e. all but the last `horizon`). They are cut by count at the fractions; then
    the first `purge` rows after each cut are dropped, so val starts after last train end + purge
    and test after last val end + purge. `purge` defaults to `horizon` and must be >= it.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    purge = horizon if purge is None else int(purge)
    if purge < horizon:
        raise ValueError(
            f"purge ({purge}) must be >= the largest horizon ({horizon}), or training labels "
            f"overlap validation labels"
        )
    f_train, f_val, f_test = _check_fractions(fractions)
    if valid is None:
        valid = np.arange(n_rows) < n_rows - horizon
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (n_rows,):
        raise ValueError(f"valid must have shape ({n_rows},), got {valid.shape}")
    ends = np.flatnonzero(valid)
    ends = ends[ends >= seq_len - 1].astype(np.int64)
    m = len(ends)
    n_train = int(m * f_train)
    n_val = int(m * f_val) if f_test > 0 else m - n_train
    need = "training and validation" + (" and test" if f_test > 0 else "")
    if n_train < 1 or n_val < 1:
        raise ValueError(f"too few rows ({n_rows}, {m} usable window ends) for {need} splits")
    cut1 = ends[n_train - 1]
    cut2 = ends[n_train + n_val - 1]
    train = ends[:n_train]
    val = ends[(ends > cut1 + purge) & (ends <= cut2)]
    test = ends[ends > cut2 + purge] if f_test > 0 else ends[:0]
    if not len(val) or (f_test > 0 and not len(test)):
        raise ValueError(
            f"too few rows ({n_rows}, {m} usable window ends) for {need} splits with purge {purge}"
        )
    return SplitIndices(train=train, val=val, test=test, purge=purge)


class StandardScaler:
    """Per-feature standardisation (x - mean) / std, population std; zero-variance columns get std 1."""

    def __init__(self, feature_names: Sequence[str] | None = None):
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None
        self.fit_rows = 0

    @property
    def n_features(self) -> int | None:
        return None if self.mean_ is None else len(self.mean_)

    def fit(self, X_rows: np.ndarray) -> StandardScaler:
        X = np.asarray(X_rows, dtype=np.float64)
        if X.ndim != 2 or len(X) == 0:
            raise ValueError(f"fit needs a non-empty 2-D array (rows, features), got shape {X.shape}")
        if self.feature_names is not None and len(self.feature_names) != X.shape[1]:
            raise ValueError(f"{X.shape[1]} columns but {len(self.feature_names)} feature names")
        bad = ~np.isfinite(X).all(axis=0)
        if bad.any():
            raise ValueError(f"non-finite values in feature(s): {', '.join(self._names(bad))}")
        mean = X.mean(axis=0)
        std = X.std(axis=0)
        std[~(std > 0.0)] = 1.0
        self.mean_, self.std_, self.fit_rows = mean, std, int(len(X))
        return self

    def _names(self, mask: np.ndarray) -> list[str]:
        idx = np.flatnonzero(mask)
        names = self.feature_names or [f"#{i}" for i in range(len(mask))]
        return [names[i] for i in idx]

    def _check(self, X: np.ndarray) -> None:
        if self.mean_ is None:
            raise RuntimeError("StandardScaler is not fitted")
        if X.shape[-1] != len(self.mean_):
            raise ValueError(f"expected {len(self.mean_)} features, got {X.shape[-1]}")

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Scale an array whose last axis is the features ((F,), (T, F) or (N, L, F)).

        float32 input gives float32 output, anything else float64.
        """
        X = np.asarray(X)
        self._check(X)
        dtype = np.float32 if X.dtype == np.float32 else np.float64
        return ((X - self.mean_) / self.std_).astype(dtype, copy=False)

    def to_json(self) -> dict:
        if self.mean_ is None:
            raise RuntimeError("StandardScaler is not fitted")
        return {
            "type": "standard",
            "n_features": len(self.mean_),
            "fit_rows": self.fit_rows,
            "mean": [float(x) for x in self.mean_],
            "std": [float(x) for x in self.std_],
            "feature_names": self.feature_names,
        }

    @classmethod
    def from_json(cls, doc: dict) -> StandardScaler:
        if doc.get("type", "standard") != "standard":
            raise ValueError(f"not a standard scaler: {doc.get('type')!r}")
        mean = np.asarray(doc["mean"], dtype=np.float64)
        std = np.asarray(doc["std"], dtype=np.float64)
        n = int(doc.get("n_features", len(mean)))
        if mean.shape != (n,) or std.shape != (n,):
            raise ValueError(f"scaler document: mean/std lengths {len(mean)}/{len(std)} != n_features {n}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("scaler document: mean/std must be finite and std > 0")
        names = doc.get("feature_names")
        if names is not None and len(names) != n:
            raise ValueError(f"scaler document: {len(names)} feature names for {n} features")
        sc = cls(names)
        sc.mean_, sc.std_, sc.fit_rows = mean, std, int(doc.get("fit_rows", 0))
        return sc


@dataclass
class Dataset:
    """Windows and labels of the three splits, plus what is needed to reproduce and serve them.

    X_* are (N, seq_len, F) float32 (scaled), y_* (N, n_horizons) float32 with columns in the
    order of `horizons`. ts_* are the timestamps of the window end rows (the prediction times).
    ranges[split] = [first, last] end-row timestamp of the split.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    scaler: StandardScaler
    feature_names: list[str]
    horizons: list[int]
    seq_len: int
    purge: int
    split: SplitIndices
    ts_train: np.ndarray
    ts_val: np.ndarray
    ts_test: np.ndarray
    ranges: dict[str, list[int]] = field(default_factory=dict)
    data_range: list[int] = field(default_factory=list)
    # volatility targets per split (None: a Dataset built without them): q = RV / NV (N, H), RV (N, H), NV (N,)
    q_train: np.ndarray | None = None
    q_val: np.ndarray | None = None
    q_test: np.ndarray | None = None
    rv_train: np.ndarray | None = None
    rv_val: np.ndarray | None = None
    rv_test: np.ndarray | None = None
    nv_train: np.ndarray | None = None
    nv_val: np.ndarray | None = None
    nv_test: np.ndarray | None = None
    vol_window: int | None = None
    # the columns a model reads (names in serving order; None: all of feature_names) and the selection's record
    input_features: list[str] | None = None
    selection: dict | None = None

    @property
    def label_names(self) -> list[str]:
        return [label_name(h) for h in self.horizons]

    @property
    def has_vol_targets(self) -> bool:
        return self.q_train is not None and self.q_val is not None

    @property
    def inputs(self) -> list[str]:
        """The feature names the model reads (the selected ones, or all)."""
        return list(self.input_features) if self.input_features else list(self.feature_names)

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def input_idx(self) -> np.ndarray | None:
        """Column indices into X_* of the model's inputs; None when it reads every column."""
        if not self.input_features or list(self.input_features) == list(self.feature_names):
            return None
        pos = {n: i for i, n in enumerate(self.feature_names)}
        return np.asarray([pos[n] for n in self.input_features], dtype=np.int64)

    def vol_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(q, RV, NV) of a split, or None without volatility targets."""
        if split not in SPLITS:
            raise KeyError(split)
        q = getattr(self, f"q_{split}")
        if q is None:
            return None
        return q, getattr(self, f"rv_{split}"), getattr(self, f"nv_{split}")

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in SPLITS:
            raise KeyError(split)
        return getattr(self, f"X_{split}"), getattr(self, f"y_{split}")

    def summary(self) -> dict:
        """JSON-ready description (for a model version's data range and config)."""
        return {
            "features": len(self.feature_names),
            "horizons": self.horizons,
            "seq_len": self.seq_len,
            "purge": self.purge,
            "counts": {s: int(len(self.arrays(s)[1])) for s in SPLITS},
            "ranges": self.ranges,
            "dataRange": self.data_range,
            "scalerFitRows": self.scaler.fit_rows,
            "inputFeatures": self.n_inputs,
            "volWindow": self.vol_window,
            "baseRate": {s: [float(x) for x in np.nanmean(self.arrays(s)[1], axis=0)]
                         if len(self.arrays(s)[1]) else None for s in SPLITS},
        }


def windows_at(Xs: np.ndarray, ends: np.ndarray, seq_len: int, materialize: bool = False) -> np.ndarray:
    """(N, seq_len, F) windows ending at rows `ends`: a read-only strided view when the ends are
    contiguous and materialize is False, else a copy. Every end needs seq_len - 1 rows before it."""
    if len(ends) and (int(np.min(ends)) < seq_len - 1 or int(np.max(ends)) >= len(Xs)):
        raise ValueError(f"window ends must lie in [{seq_len - 1}, {len(Xs) - 1}] for seq_len {seq_len}")
    if not materialize and len(ends) and np.all(np.diff(ends) == 1):
        start = int(ends[0]) - (seq_len - 1)
        return _window_view(Xs, seq_len)[start:start + len(ends)]
    return make_windows(Xs, ends, seq_len)


def build_dataset(
    features: pd.DataFrame,
    close: pd.Series,
    horizons: Sequence[int],
    seq_len: int,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    purge: int | None = None,
    *,
    materialize: bool = True,
    vol_window: int | None = None,
    select_k: int | None = None,
) -> Dataset:
    """Scaled windows and labels of a chronological train/val/test split.

    `features`: index = ts (strictly increasing), columns = feature names, no NaN/inf (warm-up rows
    already dropped). `close`: close prices indexed by ts covering every feature row (it may extend
    before and after; labels use the rows after the last feature row too). Default purge =
    max(horizons). The scaler is fitted only on feature rows <= the last training window end.

    materialize=False returns the X_* arrays as read-only strided views over one scaled matrix
    where a split's ends are contiguous (N * seq_len * F float32 copies are the memory cost
    otherwise, e.g. 20k rows x 60 x 90 features = 430 MB).

    vol_window: also the volatility targets (q, RV, NV per split; ends need them defined).
    select_k: choose that many input features on the training ends (ml.features.selection).
    """
    hs = _check_horizons(horizons)
    if not isinstance(features, pd.DataFrame) or features.shape[1] == 0:
        raise ValueError("features must be a DataFrame with at least one column")
    fts = np.asarray(features.index, dtype=np.int64)
    if len(fts) > 1 and not np.all(np.diff(fts) > 0):
        raise ValueError("feature index (ts) must be strictly increasing")
    close = close.sort_index()
    if not close.index.is_unique:
        raise ValueError("close index (ts) has duplicates")
    missing = ~np.isin(fts, np.asarray(close.index, dtype=np.int64))
    if missing.any():
        raise ValueError(f"close lacks {int(missing.sum())} feature timestamp(s), e.g. {int(fts[missing][0])}")
    labels = make_labels(close, hs).reindex(features.index)
    y_all = labels.to_numpy(dtype=np.float64)
    X = features.to_numpy(dtype=np.float64)
    names = [str(c) for c in features.columns]
    bad = ~np.isfinite(X).all(axis=0)
    if bad.any():
        cols = [n for n, b in zip(names, bad, strict=True) if b]
        raise ValueError(f"non-finite feature values in: {', '.join(cols[:10])}")

    max_h = max(hs)
    valid = ~np.isnan(y_all).any(axis=1)
    vol: dict[str, np.ndarray] = {}
    if vol_window is not None:
        from ml.training.volatility import vol_targets

        q, rv, nv = vol_targets(close.to_numpy(dtype=np.float64), hs, int(vol_window))
        at = np.asarray(close.index.get_indexer(fts))
        vol = {"q": q[at], "rv": rv[at], "nv": nv[at]}
        valid &= np.isfinite(vol["q"]).all(axis=1)
    split = chronological_split(len(X), seq_len, fractions, purge, horizon=max_h, valid=valid)
    scaler = StandardScaler(names).fit(X[: int(split.train[-1]) + 1])
    Xs = scaler.transform(X.astype(np.float32))
    selection = None
    if select_k is not None and select_k < len(names):
        from ml.features.selection import select_features

        tr = split.train
        selection = select_features(X[tr], names, select_k, y_all[tr], vol["q"][tr] if vol else None)

    out: dict[str, np.ndarray] = {}
    ranges: dict[str, list[int]] = {}
    for name, ends in split.as_dict().items():
        out[f"X_{name}"] = windows_at(Xs, ends, seq_len, materialize)
        out[f"y_{name}"] = y_all[ends].astype(np.float32)
        out[f"ts_{name}"] = fts[ends]
        for key, arr in vol.items():
            out[f"{key}_{name}"] = arr[ends].astype(np.float64)
        ranges[name] = [int(fts[ends[0]]), int(fts[ends[-1]])] if len(ends) else []
    return Dataset(
        scaler=scaler, feature_names=names, horizons=hs, seq_len=int(seq_len), purge=split.purge,
        split=split, ranges=ranges, data_range=[int(fts[0]), int(fts[-1])],
        vol_window=int(vol_window) if vol_window is not None else None,
        input_features=selection.names if selection else None,
        selection=selection.to_dict() if selection else None, **out,
    )


def latest_window(features: pd.DataFrame, scaler: StandardScaler, seq_len: int) -> np.ndarray:
    """The scaled (1, seq_len, F) float32 window ending at the last feature row, for serving.

    Columns are taken in the scaler's feature order (by name when it has names), so a model is
    always fed what it was trained on; a missing feature raises KeyError.
    """
    if len(features) < seq_len:
        raise ValueError(f"need {seq_len} feature rows, got {len(features)}")
    tail = features.iloc[-seq_len:]
    if scaler.feature_names is not None:
        absent = [n for n in scaler.feature_names if n not in tail.columns]
        if absent:
            raise KeyError(f"features missing for this model: {', '.join(absent[:10])}")
        tail = tail[scaler.feature_names]
    return scaler.transform(tail.to_numpy(dtype=np.float32))[None, :, :]


# ----------------------------------------------------------------------------- a run's dataset


def prepare_dataset(candles: pd.DataFrame, cfg: TrainConfig) -> Dataset:
    """Features -> labels -> purged chronological split -> scaler on train rows -> windows."""
    from ml.features import feature_matrix

    if candles is None or len(candles) == 0:
        raise ValueError(f"no candles for {cfg.pair}")
    features = feature_matrix(candles)
    close = pd.Series(np.asarray(candles["close"], dtype=np.float64),
                      index=np.asarray(candles["ts"], dtype=np.int64))
    return build_dataset(features, close, cfg.horizons, cfg.seq_len, cfg.fractions, cfg.purge,
                         materialize=False, vol_window=cfg.model_vol_window, select_k=cfg.select_k)


def load_training_candles(cfg: TrainConfig, settings=None, store=None, *, refresh: bool = True) -> pd.DataFrame:
    """The candles a run trains on: the newest `cfg.bars` of the configured source (`refresh=False`: the
    store as the market feed keeps it, `ml.data.sources.load_candles`)."""
    from ml.data.sources import load_candles

    return load_candles(cfg.pair, settings, bars=cfg.bars, store=store, refresh=refresh)


def pack_dataset(dataset: Dataset, splits: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """A compact, picklable form of a Dataset (e.g. for the Ray object store).

    Windows of consecutive end rows overlap in all but one row, so a split is shipped as its block
    of seq_len - 1 + N scaled feature rows instead of N x seq_len rows; unpack_dataset rebuilds the
    windows as views. Splits not listed are shipped empty.
    """
    out: dict[str, Any] = {"seq_len": dataset.seq_len, "splits": {}}
    for name in ("train", "val", "test"):
        X, y = dataset.arrays(name)
        ends = getattr(dataset.split, name)
        ts = getattr(dataset, f"ts_{name}")
        if name not in splits:
            X, y, ends, ts = X[:0], y[:0], ends[:0], ts[:0]
        if len(y) > 1 and np.all(np.diff(ends) == 1):
            block = np.concatenate([X[0], X[1:, -1, :]]).astype(np.float32, copy=False)
            entry = {"block": np.ascontiguousarray(block)}
        else:
            entry = {"X": np.ascontiguousarray(X, dtype=np.float32)}
        entry.update(y=np.ascontiguousarray(y), ends=np.asarray(ends), ts=np.asarray(ts))
        va = dataset.vol_arrays(name)
        if va is not None:
            keep = slice(None) if name in splits else slice(0, 0)
            entry.update(q=va[0][keep], rv=va[1][keep], nv=va[2][keep])
        out["splits"][name] = entry
    out.update(scaler=dataset.scaler.to_json(), feature_names=list(dataset.feature_names),
               horizons=list(dataset.horizons), purge=dataset.purge, ranges=dict(dataset.ranges),
               data_range=list(dataset.data_range), vol_window=dataset.vol_window,
               input_features=dataset.input_features, selection=dataset.selection)
    return out


def unpack_dataset(packed: dict) -> Dataset:
    """The Dataset of pack_dataset (windows as read-only views over the shipped row blocks)."""
    seq_len = int(packed["seq_len"])
    arrays: dict[str, np.ndarray] = {}
    ends: dict[str, np.ndarray] = {}
    for name, entry in packed["splits"].items():
        arrays[f"X_{name}"] = _window_view(entry["block"], seq_len) if "block" in entry else entry["X"]
        arrays[f"y_{name}"] = entry["y"]
        arrays[f"ts_{name}"] = entry["ts"]
        for key in ("q", "rv", "nv"):
            if key in entry:
                arrays[f"{key}_{name}"] = entry[key]
        ends[name] = entry["ends"]
    return Dataset(
        scaler=StandardScaler.from_json(packed["scaler"]), feature_names=list(packed["feature_names"]),
        horizons=list(packed["horizons"]), seq_len=seq_len, purge=int(packed["purge"]),
        split=SplitIndices(train=ends["train"], val=ends["val"], test=ends["test"], purge=int(packed["purge"])),
        ranges=dict(packed["ranges"]), data_range=list(packed["data_range"]),
        vol_window=packed.get("vol_window"), input_features=packed.get("input_features"),
        selection=packed.get("selection"), **arrays,
    )


def train_arrays(dataset: Dataset, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Training windows and labels, cut to the newest `max_train_samples` if set."""
    X, y = dataset.X_train, dataset.y_train
    if cfg.max_train_samples and len(y) > cfg.max_train_samples:
        X, y = X[-cfg.max_train_samples:], y[-cfg.max_train_samples:]
    return X, y


def train_vol_targets(dataset: Dataset, cfg: TrainConfig) -> np.ndarray | None:
    """The training rows' q = RV / NV (cut like train_arrays), or None without volatility targets."""
    q = dataset.q_train
    if q is None:
        return None
    if cfg.max_train_samples and len(q) > cfg.max_train_samples:
        q = q[-cfg.max_train_samples:]
    return q
