"""The model registry and the model loader used by serving (SPEC §5). Ray-free.

`Registry(storage)` works on anything with the Storage model methods: `ml.storage.store.Storage`
in-process, or `actors.storage_client.RemoteStorage`, which forwards the same calls to the Storage
actor (the single writer of the shared volume).

A version (`v{UTC yyyymmddHHMMSS}-{8 hex of the weights' sha256}`) holds:
  * weights.pt   - torch.save of the model's state_dict,
  * scaler.json  - the StandardScaler fitted on the training rows,
  * meta.json    - written by Storage: model spec, feature names + hash, TrainConfig, data range,
                   metrics (test, baseline, validation), calibration, trainedAt, promotion decision.

Promotion rule (applied by `register`): the new version becomes production iff its calibrated test
Brier score <= the base-rate baseline's test Brier (+1e-12 tie tolerance). Otherwise the previous
production version (if any) stays and the version's meta records
`promotion: {promoted: false, reason: ...}`. `promote` (an operator's explicit choice) and
`rollback` move the production pointer to any existing version, with the reason recorded.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ml.training.calibration import Calibrator
from ml.training.dataset import StandardScaler

WEIGHTS_FILE = "weights.pt"
SCALER_FILE = "scaler.json"
BRIER_TIE_TOLERANCE = 1e-12


class NoModelError(LookupError):
    """No such version, or no production version for the pair/model type."""


class FeatureMismatchError(ValueError):
    """The features given to a model are not the ones it was trained on."""


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars/arrays -> Python, recursively (meta must be strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def promotion_decision(metrics: dict, tolerance: float = BRIER_TIE_TOLERANCE) -> dict:
    """{promoted, reason, modelBrier, baselineBrier} of the rule "test Brier <= base-rate Brier"."""
    try:
        model_brier = float(metrics["model"]["brier"])
        base_brier = float(metrics["baseline"]["brier"])
    except (KeyError, TypeError, ValueError):
        return {"promoted": False, "reason": "metrics lack the test Brier of the model or the baseline",
                "modelBrier": None, "baselineBrier": None}
    if not (math.isfinite(model_brier) and math.isfinite(base_brier)):
        return {"promoted": False, "reason": "test Brier is not a finite number",
                "modelBrier": None, "baselineBrier": None}
    ok = model_brier <= base_brier + tolerance
    rel = "<=" if ok else ">"
    reason = (f"test Brier {model_brier:.6f} {rel} base-rate Brier {base_brier:.6f}"
              + ("" if ok else ": the model does not beat predicting the base rate"))
    return {"promoted": ok, "reason": reason, "modelBrier": model_brier, "baselineBrier": base_brier}


class Registry:
    """Versions, production pointer and promotion rule of the models, on top of a storage."""

    def __init__(self, storage) -> None:
        self.storage = storage
        self._lock = threading.Lock()

    # ---- ids ------------------------------------------------------------------------------------
    def new_version_id(self, pair: str, model_type: str, weights: bytes, trained_at_ms: int | None = None) -> str:
        ts = datetime.fromtimestamp((trained_at_ms or time.time() * 1000) / 1000.0, tz=UTC)
        base = f"v{ts:%Y%m%d%H%M%S}-{hashlib.sha256(weights).hexdigest()[:8]}"
        taken = {m.get("version") for m in self.storage.list_versions(pair, model_type)}
        version, k = base, 2
        while version in taken:
            version, k = f"{base}-{k}", k + 1
        return version

    # ---- write ----------------------------------------------------------------------------------
    def register(self, pair: str, result, job_id: str | None = None) -> dict:
        """Store a finished run (a TrainResult) as a new version and apply the promotion rule.

        Returns the stored meta (with `version` and `promotion`).
        """
        payload = result.to_registry_payload()
        model_type = result.model_type
        files = payload["files"]
        with self._lock:
            version = self.new_version_id(pair, model_type, files[WEIGHTS_FILE], result.trained_at)
            previous = self.storage.get_production(pair, model_type)
            prev_version = previous.get("version") if previous else None
            decision = promotion_decision(payload["meta"].get("metrics", {}))
            if not decision["promoted"]:
                decision["reason"] += (f"; production stays {prev_version}" if prev_version
                                       else "; there is no production version")
            decision.update(previousProduction=prev_version, decidedAt=int(time.time() * 1000))
            meta = dict(payload["meta"], pair=pair, jobId=job_id, promotion=decision)
            meta = _json_safe(meta)
            stored = self.storage.save_model_version(pair, model_type, version, meta, files)
            if decision["promoted"]:
                self.storage.set_production(pair, model_type, version, f"auto: {decision['reason']}")
        return dict(stored, version=version, promotion=decision)

    def promote(self, pair: str, model_type: str, version: str, reason: str = "manual promotion") -> dict:
        """Make an existing version production (an operator's choice: the Brier rule is not applied)."""
        if self.storage.get_version_meta(pair, model_type, version) is None:
            raise NoModelError(f"no version {version!r} of {pair}/{model_type}")
        return self.storage.set_production(pair, model_type, version, reason)

    def rollback(self, pair: str, model_type: str, version: str, reason: str | None = None) -> dict:
        """Point production back (or forward) to any existing version."""
        current = self.storage.get_production(pair, model_type)
        cur = current.get("version") if current else None
        return self.promote(pair, model_type, version, reason or f"rollback from {cur} to {version}")

    # ---- read -----------------------------------------------------------------------------------
    def versions(self, pair: str, model_type: str) -> list[dict]:
        """Every version's meta, newest first."""
        return self.storage.list_versions(pair, model_type)

    def production(self, pair: str, model_type: str) -> dict | None:
        """The production pointer {version, promotedAt, reason, previous, history} or None."""
        return self.storage.get_production(pair, model_type)

    def production_meta(self, pair: str, model_type: str) -> dict | None:
        prod = self.production(pair, model_type)
        return self.storage.get_version_meta(pair, model_type, prod["version"]) if prod else None

    def load(self, pair: str, model_type: str, version: str | None = None) -> LoadedModel:
        return load_model(self.storage, pair, model_type, version)


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

    from ml.training.nets import build_model
    from ml.training.train import state_from_bytes

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
