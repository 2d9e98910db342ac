"""Baselines a direction model has to beat, fitted on exactly the rows the model is fitted on.

Every baseline answers P(up) per row, so all of them are scored with the same metrics:

* `majority`: the training up-rate as a constant probability (its hard call is the majority class).
* `persistence`: "the next h bars go the way the last h bars went". Its hard call is that rule; its
  probability is the rule's hit rate on the training rows (never below 0.5: a rule that loses in
  training gets no confidence, and still makes its call).
* `logistic`: L2 logistic regression on the scaled feature row at the prediction time.
* `lightgbm`: gradient-boosted trees on the same row, early-stopped on the validation rows. The
  strongest usual tabular baseline.

The learned baselines are calibrated on the validation rows like the neural model
(`ml.training.calibration`), so a difference in Brier score is a difference in skill, not in calibration.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from ml.training.calibration import Calibrator, fit_calibrator

LEARNED_BASELINES = ("logistic", "lightgbm")
BASELINES = ("majority", "persistence", *LEARNED_BASELINES)


def calls(p: np.ndarray, neutral_call: float) -> np.ndarray:
    """The up/down call of each probability as the service makes it: P(up) rounded to 6 decimals
    (what a prediction shows), up above 0.5, down below; exactly 0.5 is the service's neutral HOLD,
    scored here as `neutral_call` (the fold's training majority class, i.e. what "no edge" earns)."""
    q = np.round(np.asarray(p, dtype=np.float64), 6)
    return np.where(q > 0.5, 1.0, np.where(q < 0.5, 0.0, float(neutral_call)))


@dataclass
class FittedBaseline:
    """A fitted baseline: `predict(X_rows, last_up)` gives calibrated P(up); `fingerprint` pins it."""

    name: str
    params: dict = field(default_factory=dict)
    model: object | None = None
    calibrator: Calibrator | None = None

    def predict(self, X: np.ndarray, last_up: np.ndarray) -> np.ndarray:
        n = len(last_up)
        if self.name == "majority":
            return np.full(n, self.params["rate"])
        if self.name == "persistence":
            q = self.params["confidence"]
            return np.where(last_up > 0.5, q, 1.0 - q)
        z = _logits(self.name, self.model, X)
        return self.calibrator.apply(z[:, None])[:, 0] if self.calibrator else _sigmoid(z)

    def hard(self, p: np.ndarray, last_up: np.ndarray, neutral_call: float) -> np.ndarray:
        """The baseline's call (1 = up): persistence calls the rule whatever its confidence; the
        others call as the service does (see `calls`)."""
        if self.name == "persistence":
            return (last_up > 0.5).astype(np.float64)
        return calls(p, neutral_call)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.params, sort_keys=True, default=str).encode())
        if self.name == "logistic" and self.model is not None:
            h.update(np.ascontiguousarray(self.model.coef_).tobytes())
            h.update(np.ascontiguousarray(self.model.intercept_).tobytes())
        elif self.name == "lightgbm" and self.model is not None:
            h.update(self.model.booster_.model_to_string().encode())
        if self.calibrator is not None:
            h.update(json.dumps(self.calibrator.to_dict(), sort_keys=True).encode())
        return h.hexdigest()[:16]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _logits(name: str, model, X: np.ndarray) -> np.ndarray:
    if name == "logistic":
        return np.asarray(model.decision_function(X), dtype=np.float64)
    return np.asarray(model.predict(X, raw_score=True), dtype=np.float64)


def fit_majority(y_train: np.ndarray) -> FittedBaseline:
    return FittedBaseline("majority", {"rate": float(np.mean(y_train))})


def fit_persistence(y_train: np.ndarray, last_up_train: np.ndarray) -> FittedBaseline:
    hit = float(np.mean((last_up_train > 0.5) == (y_train > 0.5)))
    return FittedBaseline("persistence", {"hit_rate": hit, "confidence": max(hit, 0.5)})


def fit_logistic(X_fit: np.ndarray, y_fit: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                 *, seed: int = 7, c: float = 0.05, calibration: str = "temperature") -> FittedBaseline:
    """L2 logistic regression (strong regularisation: features are many and correlated)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny test sets
        model.fit(X_fit, y_fit.astype(np.int64))
    cal = fit_calibrator(_logits("logistic", model, X_val)[:, None], y_val[:, None], calibration)
    return FittedBaseline("logistic", {"C": c}, model, cal)


def fit_lightgbm(X_fit: np.ndarray, y_fit: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                 *, seed: int = 7, threads: int = 1, calibration: str = "temperature") -> FittedBaseline:
    """Shallow boosted trees, early-stopped on the validation rows' log loss."""
    import lightgbm as lgb

    params = {"n_estimators": 400, "learning_rate": 0.03, "num_leaves": 15, "min_child_samples": 100,
              "subsample": 0.8, "subsample_freq": 1, "colsample_bytree": 0.5, "reg_lambda": 1.0}
    model = lgb.LGBMClassifier(**params, random_state=seed, n_jobs=threads, verbose=-1, deterministic=True,
                               force_col_wise=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "X does not have valid feature names"
        model.fit(X_fit, y_fit.astype(np.int64), eval_set=[(X_val, y_val.astype(np.int64))],
                  eval_metric="binary_logloss", callbacks=[lgb.early_stopping(40, verbose=False)])
        z_val = _logits("lightgbm", model, X_val)
    cal = fit_calibrator(z_val[:, None], y_val[:, None], calibration)
    return FittedBaseline("lightgbm", {**params, "best_iteration": int(model.best_iteration_ or 0)}, model, cal)
