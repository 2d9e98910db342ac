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

WEIGHTS_FILE = "weights.pt"
SCALER_FILE = "scaler.json"


class NoModelError(LookupError):
    """No such version, or no production version for the pair/model type."""


class FeatureMismatchError(ValueError):
    """The features given to a model are not the ones it was trained on."""


class LoadedModel:
    """A stored version ready for inference: weights + saved scaler + calibration.

    predict_proba takes RAW (unscaled) feature rows, in the order of `feature_names`:
      * a DataFrame whose columns are exactly the saved feature names (any order; the last
        seq_len rows are used),
      * an array (T >= seq_len, F): the last seq_len rows, or (N, seq_len, F): a batch.
    It returns calibrated P(up) per horizon: shape (n_horizons,) for one window, (N, n_horizons)
    for a batch.
    """

    def __init__(self, meta: dict, model, scaler: StandardScaler, calibrator: Calibrator) -> None:
        self.meta = meta
        self.model = model
        self.scaler = scaler
        self.calibrator = calibrator
        self.version: str = meta["version"]
        self.pair: str = meta.get("pair", "")
        self.model_type: str = meta.get("modelType", meta.get("model", {}).get("type", ""))
        self.feature_names: list[str] = list(meta["featureNames"])
        self.feature_hash: str = meta.get("featureHash", "")
        self.seq_len: int = int(meta["model"]["seq_len"])
        self.horizons: list[int] = list(meta["model"].get("horizons", []))
        self._lock = threading.Lock()

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
            return arr[-self.seq_len:][None], True
        if arr.ndim == 3:
            if arr.shape[1] != self.seq_len:
                raise ValueError(f"windows must have {self.seq_len} rows, got {arr.shape[1]}")
            return arr, False
        raise ValueError(f"expected (rows, features) or (batch, seq_len, features), got shape {arr.shape}")

    def predict_logits(self, x, feature_names: Sequence[str] | None = None) -> np.ndarray:
        import torch

        windows, single = self._as_windows(x, feature_names)
        if not np.isfinite(windows).all():
            raise ValueError("feature window contains NaN or infinite values")
        scaled = self.scaler.transform(windows.astype(np.float32))
        with self._lock, torch.no_grad():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(scaled))).double().numpy()
        return logits[0] if single else logits

    def predict_proba(self, x, feature_names: Sequence[str] | None = None) -> np.ndarray:
        return self.calibrator.apply(self.predict_logits(x, feature_names))

    def info(self) -> dict:
        """A short JSON summary for status endpoints."""
        m = self.meta.get("model", {})
        return {"pair": self.pair, "modelType": self.model_type, "version": self.version,
                "layers": m.get("layers"), "hidden": m.get("hidden"), "seqLen": self.seq_len,
                "totalParams": m.get("params"), "horizons": self.horizons,
                "trainedAt": self.meta.get("trainedAt"), "featureHash": self.feature_hash}


def load_model(storage, pair: str, model_type: str, version: str | None = None) -> LoadedModel:
    """Load `version` (default: the production version) of pair/model_type for inference."""
    import torch

    from ml.training.nets import build_model, state_from_bytes

    if version is None:
        prod = storage.get_production(pair, model_type)
        if not prod:
            raise NoModelError(f"no production model for {pair}/{model_type}")
        version = prod["version"]
    meta = storage.get_version_meta(pair, model_type, version)
    if meta is None:
        raise NoModelError(f"no version {version!r} of {pair}/{model_type}")
    meta = dict(meta, version=version)
    spec = meta["model"]
    weights = storage.read_model_file(pair, model_type, version, WEIGHTS_FILE)
    scaler = StandardScaler.from_json(json.loads(storage.read_model_file(pair, model_type, version, SCALER_FILE)))
    if scaler.feature_names is not None and list(scaler.feature_names) != list(meta["featureNames"]):
        raise FeatureMismatchError(f"{pair}/{model_type} {version}: scaler and meta list different features")
    model = build_model(spec["type"], int(spec["n_features"]), int(spec["n_horizons"]), layers=int(spec["layers"]),
                        hidden=int(spec["hidden"]), dropout=float(spec.get("dropout", 0.0)),
                        seq_len=int(spec["seq_len"]))
    model.load_state_dict(state_from_bytes(weights))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    del torch
    calibrator = Calibrator.from_dict(meta["calibration"])
    return LoadedModel(meta, model, scaler, calibrator)
