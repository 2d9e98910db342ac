"""Calibration on the validation split and test metrics against the baselines.

Direction: the calibrator is fitted on validation logits per horizon (ml.training.calibration); the
baseline predicts the training up-rate on every test row (ml.metrics). A horizon whose validation
logits carry no ranking gets the constant 0.5 (temperature) or the validation up-rate
(temperature_bias): it answers HOLD on its own.

Volatility: on the test split, per horizon, QLIKE and MSE of the log of the model's per-bar variance
against the realized one, beside the naive trailing forecast on the same rows
(ml.training.volatility); skill = 1 - model QLIKE / naive QLIKE.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ml.metrics import base_rate_report, classification_report
from ml.training.calibration import Calibrator, fit_calibrator
from ml.training.config import TrainConfig
from ml.training.dataset import Dataset
from ml.training.nets import predict_logits, unwrap
from ml.training.volatility import predicted_variance, vol_scores


def base_rates(dataset: Dataset) -> list[float]:
    """Up-rate per horizon on the TRAINING labels: the baseline's constant probability."""
    return [float(x) for x in np.mean(dataset.y_train, axis=0)]


def _mean_report(reports: list[dict]) -> dict:
    """Mean over horizons of every numeric metric (equal to the single report for one horizon)."""
    if len(reports) == 1:
        return dict(reports[0])
    out: dict[str, Any] = {}
    for k, v in reports[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(np.mean([r[k] for r in reports]))
    return out


def volatility_metrics(dataset: Dataset, o_test: np.ndarray | None, nv_test: np.ndarray | None = None) -> dict:
    """{horizon: vol_scores} on the test split (o_test None: the naive forecast itself, skill 0);
    {} for a Dataset without volatility targets."""
    va = dataset.vol_arrays("test")
    if va is None or not len(va[0]):
        return {}
    _, rv, nv = va
    nv = nv if nv_test is None else nv_test
    o = np.zeros_like(rv) if o_test is None else np.asarray(o_test, dtype=np.float64)
    var = predicted_variance(o, nv)
    return {str(h): vol_scores(var[:, j], nv, rv[:, j]) for j, h in enumerate(dataset.horizons)}


def evaluate_outputs(dataset: Dataset, cfg: TrainConfig, *, logits_val: np.ndarray, logits_test: np.ndarray,
                     o_test: np.ndarray | None = None, nv_test: np.ndarray | None = None
                     ) -> tuple[Calibrator, dict, np.ndarray]:
    """Calibrate on validation logits (N, H); metrics on the test split; calibrated test P(up).

    metrics = {"model": {...}, "baseline": {...}, "uncalibrated": {...}, "val": {...},
    "horizons": {"6": {"model", "baseline", "uncalibrated", "val", "volatility"}}, "volatility":
    {"6": {model_qlike, naive_qlike, model_mse_log, naive_mse_log, skill, n}}, "primary_horizon",
    "n": {...}}. "model"/"baseline" are means over horizons. Any model type's outputs (o_test: its
    log-variance ratios, None without a volatility head; nv_test: the naive variance of the test rows,
    default the Dataset's) go through here, so every version's metrics mean the same.
    """
    calibrator = fit_calibrator(logits_val, dataset.y_val, cfg.calibration)
    p_test = calibrator.apply(logits_test)
    p_raw = 1.0 / (1.0 + np.exp(-np.asarray(logits_test, dtype=np.float64)))
    p_val = calibrator.apply(logits_val)
    rates = base_rates(dataset)
    vol = volatility_metrics(dataset, o_test, nv_test)
    per_h: dict[str, dict] = {}
    for j, h in enumerate(dataset.horizons):
        y_t = dataset.y_test[:, j]
        per_h[str(h)] = {
            "model": classification_report(y_t, p_test[:, j]),
            "baseline": base_rate_report(y_t, rates[j]),
            "uncalibrated": classification_report(y_t, p_raw[:, j]),
            "val": classification_report(dataset.y_val[:, j], p_val[:, j]),
        }
        if str(h) in vol:
            per_h[str(h)]["volatility"] = vol[str(h)]
    metrics = {
        "model": _mean_report([v["model"] for v in per_h.values()]),
        "baseline": _mean_report([v["baseline"] for v in per_h.values()]),
        "uncalibrated": _mean_report([v["uncalibrated"] for v in per_h.values()]),
        "val": _mean_report([v["val"] for v in per_h.values()]),
        "horizons": per_h,
        "volatility": vol,
        "primary_horizon": dataset.horizons[0],
        "base_rate_train": rates,
        "n": {"train": int(len(dataset.y_train)), "val": int(len(dataset.y_val)),
              "test": int(len(dataset.y_test))},
        "calibration": calibrator.to_dict(),
    }
    return calibrator, metrics, p_test


def network_outputs(model: nn.Module, dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(direction logits (N, H), log-variance ratios (N, H) or None without a volatility head)."""
    X, _ = dataset.arrays(split)
    out = predict_logits(unwrap(model), X, cols=dataset.input_idx)
    h = len(dataset.horizons)
    if out.size == 0:
        out = np.empty((0, 2 * h))
    return out[:, :h], (out[:, h:2 * h] if out.shape[1] >= 2 * h else None)


def calibrate_and_evaluate(model: nn.Module, dataset: Dataset, cfg: TrainConfig) -> tuple[Calibrator, dict, np.ndarray]:
    """A network's evaluate_outputs: calibrator, test metrics, calibrated test P(up)."""
    logits_val, _ = network_outputs(model, dataset, "val")
    logits_test, o_test = network_outputs(model, dataset, "test")
    return evaluate_outputs(dataset, cfg, logits_val=logits_val, logits_test=logits_test, o_test=o_test)
