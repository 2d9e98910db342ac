"""The model loader used by serving: a stored version -> LoadedModel (weights, saved scaler, calibration).

`storage` is anything with the Storage read methods (`ml.storage.store.Storage`, its reader, or the
Storage actor's client).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import numpy as np

from ml.training.calibration import Calibrator
from ml.training.dataset import StandardScaler
from ml.training.volatility import naive_variance, predicted_variance, served_volatility

WEIGHTS_FILE = "weights.pt"
SCALER_FILE = "scaler.json"


class NoModelError(LookupError):
    """No such version, or no production version for the pair/model type."""


class FeatureMismatchError(ValueError):
    """The features given to a model are not the ones it was trained on."""


def _default_vol_window() -> int:
    from ml.config import get_settings

    return int(get_settings().labels.vol_window)


class ForecastModel:
    """What serving sees of any stored version (network, LightGBM, ...): direction and volatility.

    x is RAW (unscaled) feature rows, in the order of `feature_names`:
      * a DataFrame whose columns are exactly the saved feature names (any order; the last
        seq_len rows are used),
      * an array (T >= seq_len, F): the last seq_len rows, or (N, seq_len, F): a batch.
    predict_proba -> calibrated P(up) per horizon, (H,) for one window, (N, H) for a batch.
    predict_volatility -> sqrt(h * predicted per-bar variance) per horizon, same shapes.
    forecast -> both concatenated on the last axis: (2H,) or (N, 2H).

    The volatility is the naive trailing forecast (ml.training.volatility, from the window's
    `ret_log_1` column over the last `vol_window` rows) times exp(o) for the model's log-variance
    ratio o; a model without a volatility head (older versions) has o = 0, i.e. answers the naive
    forecast. Subclasses implement `_outputs(raw_windows) -> (logits (N, H), o (N, H) | None)`.
    `meta["inputFeatures"]` (the selected features, ml.features.selection) names the columns the
    model itself reads; `feature_names` stays the full serving list.
    """

    def __init__(self, meta: dict, calibrator: Calibrator) -> None:
        self.meta = meta
        self.calibrator = calibrator
        spec = meta.get("model", {})
        self.version: str = meta["version"]
        self.pair: str = meta.get("pair", "")
        self.model_type: str = meta.get("modelType", spec.get("type", ""))
        self.feature_names: list[str] = list(meta["featureNames"])
        self.feature_hash: str = meta.get("featureHash", "")
        self.seq_len: int = int(spec["seq_len"])
        self.horizons: list[int] = list(spec.get("horizons", []))
        self.has_volatility: bool = bool(spec.get("volatility", False))
        self.vol_window: int = int(spec.get("vol_window") or _default_vol_window())
        inputs = meta.get("inputFeatures")
        index = {n: i for i, n in enumerate(self.feature_names)}
        if inputs:
            unknown = [n for n in inputs if n not in index]
            if unknown:
                raise FeatureMismatchError(f"{self.pair}/{self.model_type} {self.version}: input features not "
                                           f"in featureNames: {', '.join(unknown[:8])}")
        self.input_features: list[str] = list(inputs) if inputs else list(self.feature_names)
        self.input_idx: np.ndarray = np.asarray([index[n] for n in self.input_features], dtype=np.int64)
        self._ret_idx: int | None = index.get("ret_log_1")

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def check_feature_names(self, names: Sequence[str]) -> None:
        names = [str(n) for n in names]
        if names == self.feature_names:
            return
        missing = [n for n in self.feature_names if n not in set(names)]
        extra = [n for n in names if n not in set(self.feature_names)]
        detail = []
        if missing:
            detail.append(f"missing {len(missing)}: {', '.join(missing[:8])}")
        if extra:
            detail.append(f"unexpected {len(extra)}: {', '.join(extra[:8])}")
        if not detail:
            detail.append("same names in another order")
        raise FeatureMismatchError(
            f"model {self.pair}/{self.model_type} {self.version} was trained on {self.n_features} features "
            f"(hash {self.feature_hash[:12]}); got {len(names)} ({'; '.join(detail)})")

    def _as_windows(self, x, feature_names: Sequence[str] | None) -> tuple[np.ndarray, bool]:
        import pandas as pd

        if isinstance(x, pd.DataFrame):
            cols = [str(c) for c in x.columns]
            if cols != self.feature_names:
                if sorted(cols) != sorted(self.feature_names):
                    self.check_feature_names(cols)  # raises with the details
                x = x[self.feature_names]
            arr = x.to_numpy(dtype=np.float64)
        else:
            if feature_names is not None:
                self.check_feature_names(feature_names)
            arr = np.asarray(x, dtype=np.float64)
        if arr.shape[-1] != self.n_features:
            raise FeatureMismatchError(f"expected {self.n_features} features per row, got {arr.shape[-1]}")
        if arr.ndim == 2:
            if len(arr) < self.seq_len:
                raise ValueError(f"need {self.seq_len} feature rows, got {len(arr)}")
            windows, single = arr[-self.seq_len:][None], True
        elif arr.ndim == 3:
            if arr.shape[1] != self.seq_len:
                raise ValueError(f"windows must have {self.seq_len} rows, got {arr.shape[1]}")
            windows, single = arr, False
        else:
            raise ValueError(f"expected (rows, features) or (batch, seq_len, features), got shape {arr.shape}")
        if not np.isfinite(windows).all():
            raise ValueError("feature window contains NaN or infinite values")
        return windows, single

    def _outputs(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(direction logits (N, H), log-variance ratios (N, H) or None) of RAW windows (N, seq_len, F)."""
        raise NotImplementedError

    def naive_variance(self, windows: np.ndarray) -> np.ndarray:
        """(N,) trailing per-bar variance from the raw windows' ret_log_1 column."""
        if self._ret_idx is None:
            raise FeatureMismatchError(f"{self.pair}/{self.model_type} {self.version}: no ret_log_1 feature, "
                                       "so no volatility forecast")
        return naive_variance(windows[:, :, self._ret_idx], self.vol_window)

    def _volatility(self, windows: np.ndarray, o: np.ndarray | None) -> np.ndarray:
        nv = self.naive_variance(windows)
        if o is None:
            o = np.zeros((len(windows), len(self.horizons)))
        return served_volatility(predicted_variance(o, nv), self.horizons)

    def predict_logits(self, x, feature_names: Sequence[str] | None = None) -> np.ndarray:
        windows, single = self._as_windows(x, feature_names)
        logits, _ = self._outputs(windows)
        return logits[0] if single else logits

    def predict_proba(self, x, feature_names: Sequence[str] | None = None) -> np.ndarray:
        return self.calibrator.apply(self.predict_logits(x, feature_names))

    def predict_volatility(self, x, feature_names: Sequence[str] | None = None) -> np.ndarray:
        windows, single = self._as_windows(x, feature_names)
        o = self._outputs(windows)[1] if self.has_volatility else None
        vol = self._volatility(windows, o)
        return vol[0] if single else vol

    def forecast(self, x, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """[P(up) per horizon, volatility per horizon]: (2H,) or (N, 2H), from one pass of the model."""
        windows, single = self._as_windows(x, feature_names)
        logits, o = self._outputs(windows)
        out = np.concatenate([self.calibrator.apply(logits), self._volatility(windows, o)], axis=-1)
        return out[0] if single else out

    def info(self) -> dict:
        """A short JSON summary for status endpoints."""
        m = self.meta.get("model", {})
        return {"pair": self.pair, "modelType": self.model_type, "version": self.version,
                "layers": m.get("layers"), "hidden": m.get("hidden"), "seqLen": self.seq_len,
                "totalParams": m.get("params"), "horizons": self.horizons,
                "volatility": self.has_volatility, "inputFeatures": len(self.input_features),
                "trainedAt": self.meta.get("trainedAt"), "featureHash": self.feature_hash}


class _ScaledModel(ForecastModel):
    """A stored model with its saved scaler, called under a lock (one inference at a time per object)."""

    def __init__(self, meta: dict, model, scaler: StandardScaler, calibrator: Calibrator) -> None:
        super().__init__(meta, calibrator)
        self.model = model
        self.scaler = scaler
        self._lock = threading.Lock()


class LoadedModel(_ScaledModel):
    """A stored network version ready for inference: weights + saved scaler + calibration.

    The scaler covers the full feature list; the network reads the selected input columns of the
    scaled window.
    """

    def _outputs(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        scaled = self.scaler.transform(windows.astype(np.float32))
        if len(self.input_idx) != self.n_features:
            scaled = scaled[:, :, self.input_idx]
        with self._lock, torch.no_grad():
            out = self.model(torch.from_numpy(np.ascontiguousarray(scaled))).double().numpy()
        h = len(self.horizons) or out.shape[1]
        return out[:, :h], (out[:, h:2 * h] if self.has_volatility else None)


def load_model(storage, pair: str, model_type: str, version: str | None = None) -> ForecastModel:
    """Load `version` (default: the production version) of pair/model_type for inference.

    Dispatches on the stored meta's model type; networks are loaded here.
    """
    if version is None:
        prod = storage.get_production(pair, model_type)
        if not prod:
            raise NoModelError(f"no production model for {pair}/{model_type}")
        version = prod["version"]
    meta = storage.get_version_meta(pair, model_type, version)
    if meta is None:
        raise NoModelError(f"no version {version!r} of {pair}/{model_type}")
    meta = dict(meta, version=version)
    if meta.get("modelType", model_type) == "lightgbm":
        return _load_gbm(storage, pair, model_type, version, meta)
    return _load_network(storage, pair, model_type, version, meta)


class LoadedGbm(_ScaledModel):
    """A stored lightgbm version (ml.training.gbm.GbmModel): per-horizon boosters on the scaled window's
    lagged rows; the volatility trees' raw score is the log-variance ratio o."""

    def _outputs(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            return self.model.outputs_raw(windows, self.scaler)


def _load_gbm(storage, pair: str, model_type: str, version: str, meta: dict) -> LoadedGbm:
    from ml.training.gbm import GBM_FILE, GbmModel

    scaler = StandardScaler.from_json(json.loads(storage.read_model_file(pair, model_type, version, SCALER_FILE)))
    model = GbmModel.from_bytes(storage.read_model_file(pair, model_type, version, GBM_FILE))
    if list(model.feature_names) != list(meta["featureNames"]) or (
            scaler.feature_names is not None and list(scaler.feature_names) != list(meta["featureNames"])):
        raise FeatureMismatchError(f"{pair}/{model_type} {version}: boosters, scaler and meta list different features")
    return LoadedGbm(meta, model, scaler, Calibrator.from_dict(meta["calibration"]))


def _load_network(storage, pair: str, model_type: str, version: str, meta: dict) -> LoadedModel:
    from ml.training.nets import build_model, state_from_bytes

    spec = meta["model"]
    weights = storage.read_model_file(pair, model_type, version, WEIGHTS_FILE)
    scaler = StandardScaler.from_json(json.loads(storage.read_model_file(pair, model_type, version, SCALER_FILE)))
    if scaler.feature_names is not None and list(scaler.feature_names) != list(meta["featureNames"]):
        raise FeatureMismatchError(f"{pair}/{model_type} {version}: scaler and meta list different features")
    model = build_model(spec["type"], int(spec["n_features"]), int(spec["n_horizons"]), layers=int(spec["layers"]),
                        hidden=int(spec["hidden"]), dropout=float(spec.get("dropout", 0.0)),
                        seq_len=int(spec["seq_len"]),
                        volatility=bool(spec.get("vol_head", spec.get("volatility", False))))
    model.load_state_dict(state_from_bytes(weights))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    calibrator = Calibrator.from_dict(meta["calibration"])
    return LoadedModel(meta, model, scaler, calibrator)
