"""Calibration on the validation split and test metrics against the base-rate baseline.

The calibrator is fitted on validation logits (ml.training.calibration); the baseline predicts the
training up-rate on every test row (ml.metrics).
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


def calibrate_and_evaluate(model: nn.Module, dataset: Dataset, cfg: TrainConfig) -> tuple[Calibrator, dict, np.ndarray]:
    """Fit the calibrator on validation logits; metrics on the test split; calibrated test P(up).

    metrics = {"model": {...}, "baseline": {...}, "uncalibrated": {...}, "val": {...},
    "horizons": {"5": {"model", "baseline", "uncalibrated"}}, "primary_horizon", "n": {...}}.
    "model"/"baseline" are means over horizons (the one horizon's numbers by default). The baseline
    predicts the training up-rate on every test row.
    """
    core = unwrap(model)
    logits_val = predict_logits(core, dataset.X_val)
    calibrator = fit_calibrator(logits_val, dataset.y_val, cfg.calibration)
    logits_test = predict_logits(core, dataset.X_test)
    p_test = calibrator.apply(logits_test)
    p_raw = 1.0 / (1.0 + np.exp(-logits_test))
    p_val = calibrator.apply(logits_val)
    rates = base_rates(dataset)
    per_h: dict[str, dict] = {}
    for j, h in enumerate(dataset.horizons):
        y_t = dataset.y_test[:, j]
        per_h[str(h)] = {
            "model": classification_report(y_t, p_test[:, j]),
            "baseline": base_rate_report(y_t, rates[j]),
            "uncalibrated": classification_report(y_t, p_raw[:, j]),
            "val": classification_report(dataset.y_val[:, j], p_val[:, j]),
        }
    metrics = {
        "model": _mean_report([v["model"] for v in per_h.values()]),
        "baseline": _mean_report([v["baseline"] for v in per_h.values()]),
        "uncalibrated": _mean_report([v["uncalibrated"] for v in per_h.values()]),
        "val": _mean_report([v["val"] for v in per_h.values()]),
        "horizons": per_h,
        "primary_horizon": dataset.horizons[0],
        "base_rate_train": rates,
        "n": {"train": int(len(dataset.y_train)), "val": int(len(dataset.y_val)),
              "test": int(len(dataset.y_test))},
        "calibration": calibrator.to_dict(),
    }
    return calibrator, metrics, p_test
