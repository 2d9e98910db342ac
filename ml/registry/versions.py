"""The model registry: versions, the production pointer and the promotion rule. Ray-free.

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
`promotion: {promoted: false, reason: ...}`.

An `ensemble` version (ml.training.ensemble: no weights.pt, its stacking document in ensemble.json
and its meta) has its own rule, `ensemble_promotion_decision`: promoted only if its test Brier
beats EVERY member's on the same test rows (strictly) and is no worse than the base rate's; beating
the base rate alone is not enough for a combination of models that already do. `promote` (an operator's explicit choice) and
`rollback` move the production pointer to any existing version, with the reason recorded.
"""

from __future__ import annotations

import hashlib
import math
import threading
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ml.clock import now_ms
from ml.registry.loader import WEIGHTS_FILE, LoadedModel, NoModelError, load_model
from ml.registry.production import read_production
from ml.training.ensemble import ENSEMBLE_TYPE

BRIER_TIE_TOLERANCE = 1e-12


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


def ensemble_promotion_decision(metrics: dict, tolerance: float = BRIER_TIE_TOLERANCE) -> dict:
    """{promoted, reason, modelBrier, baselineBrier, memberBriers} of the ensemble's rule: its test Brier
    (mean over horizons) < every member's on the same rows, and <= the base rate's."""
    base = promotion_decision(metrics, tolerance)
    members = metrics.get("members") if isinstance(metrics, dict) else None
    briers: dict[str, float] = {}
    for t, m in (members or {}).items():
        try:
            briers[str(t)] = float(m["brier"])
        except (KeyError, TypeError, ValueError):
            briers[str(t)] = float("nan")
    out = dict(base, memberBriers=briers)
    if base["modelBrier"] is None:
        return out
    if len(briers) < 2 or not all(math.isfinite(b) for b in briers.values()):
        return dict(out, promoted=False, reason="metrics lack the test Brier of every member")
    ens = base["modelBrier"]
    best_type = min(briers, key=briers.get)
    best = briers[best_type]
    if not ens < best:
        return dict(out, promoted=False,
                    reason=f"ensemble test Brier {ens:.6f} >= best member {best_type}'s {best:.6f} on the same "
                           "rows: the ensemble does not beat every member")
    if not base["promoted"]:
        return out
    return dict(out, promoted=True,
                reason=f"ensemble test Brier {ens:.6f} < every member's (best {best_type} {best:.6f}) and <= "
                       f"base-rate Brier {base['baselineBrier']:.6f}")


def decide_promotion(model_type: str, metrics: dict) -> dict:
    """The promotion rule of a model type: the ensemble's own, the base-rate rule for the rest."""
    if model_type == ENSEMBLE_TYPE:
        return ensemble_promotion_decision(metrics)
    return promotion_decision(metrics)


class Registry:
    """Versions, production pointer and promotion rule of the models, on top of a storage."""

    def __init__(self, storage) -> None:
        self.storage = storage
        self._lock = threading.Lock()

    # ---- ids ------------------------------------------------------------------------------------
    def new_version_id(self, pair: str, model_type: str, weights: bytes, trained_at_ms: int | None = None) -> str:
        ts = datetime.fromtimestamp((trained_at_ms or now_ms()) / 1000.0, tz=UTC)
        base = f"v{ts:%Y%m%d%H%M%S}-{hashlib.sha256(weights).hexdigest()[:8]}"
        taken = {m.get("version") for m in self.storage.list_versions(pair, model_type)}
        version, k = base, 2
        while version in taken:
            version, k = f"{base}-{k}", k + 1
        return version

    # ---- write ----------------------------------------------------------------------------------
    def register(self, pair: str, result, job_id: str | None = None) -> dict:
        """Store a finished run (a TrainResult, or an ml.training.ensemble.EnsembleResult) as a new version
        and apply its model type's promotion rule (decide_promotion).

        Returns the stored meta (with `version` and `promotion`).
        """
        payload = result.to_registry_payload()
        model_type = result.model_type
        files = payload["files"]
        content = files[WEIGHTS_FILE] if WEIGHTS_FILE in files else b"".join(files[k] for k in sorted(files))
        with self._lock:
            version = self.new_version_id(pair, model_type, content, result.trained_at)
            previous = self.storage.get_production(pair, model_type)
            prev_version = previous.get("version") if previous else None
            decision = decide_promotion(model_type, payload["meta"].get("metrics", {}))
            if not decision["promoted"]:
                decision["reason"] += (f"; production stays {prev_version}" if prev_version
                                       else "; there is no production version")
            decision.update(previousProduction=prev_version, decidedAt=now_ms())
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
        """The production pointer {version, promotedAt, reason, previous}, or None (no version, or a
        damaged pointer: read by ml.registry.production like every other reader)."""
        prod = read_production(self.storage, pair, model_type)
        if prod is None:
            return None
        return {"version": prod.version, "promotedAt": prod.promoted_at, "reason": prod.reason,
                "previous": prod.previous}

    def production_meta(self, pair: str, model_type: str) -> dict | None:
        """The production version's metadata, or None."""
        prod = read_production(self.storage, pair, model_type)
        return prod.meta if prod else None

    def load(self, pair: str, model_type: str, version: str | None = None) -> LoadedModel:
        return load_model(self.storage, pair, model_type, version)

    def build_ensemble(self, pair: str, settings=None, *, store=None, candles=None, progress=None):
        """Build (not register) the ensemble of the enabled types' production versions of `pair`
        (ml.training.ensemble.build_from_settings; EnsembleError when it cannot be built honestly).
        `register` the result to store it under its own promotion rule."""
        from ml.training.ensemble import build_from_settings

        return build_from_settings(self.storage, pair, settings, load=load_model, store=store, candles=candles,
                                   progress=progress)
