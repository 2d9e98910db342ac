"""Metrics and calibration on small hand-checked examples."""

import math

import numpy as np
import pytest

from ml.metrics import (
    accuracy,
    balanced_accuracy,
    base_rate_report,
    brier,
    classification_report,
    ece,
    log_loss,
    mcc,
    wilson_interval,
)
from ml.training.calibration import Calibrator, fit_calibrator, sigmoid

Y = [1, 0, 1, 1]
P = [0.9, 0.2, 0.4, 0.6]  # hard predictions 1, 0, 0, 1: tp 2, tn 1, fp 0, fn 1


def test_accuracy_and_balanced_accuracy():
    assert accuracy(Y, P) == 0.75
    assert balanced_accuracy(Y, P) == pytest.approx((2 / 3 + 1) / 2)
    assert balanced_accuracy([1, 1], [0.9, 0.1]) == 0.5  # one class only: its recall


def test_brier_and_log_loss():
    assert brier(Y, P) == pytest.approx((0.01 + 0.04 + 0.36 + 0.16) / 4)
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.6)) / 4
    assert log_loss(Y, P) == pytest.approx(expected)
    assert brier([0, 1], [0.5, 0.5]) == 0.25
    assert log_loss([0, 1], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert math.isfinite(log_loss([1], [0.0]))  # clipped, not inf


def test_mcc():
    assert mcc(Y, P) == pytest.approx(2 / math.sqrt(12))
    assert mcc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == pytest.approx(1.0)
    assert mcc([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]) == pytest.approx(-1.0)
    assert mcc([0, 1], [0.9, 0.9]) == 0.0  # undefined (one predicted class) -> 0


def test_ece():
    assert ece(Y, P) == pytest.approx((0.1 + 0.2 + 0.6 + 0.4) / 4)
    # two bins: [0.2, 0.4] -> |0.3 - 0.5| x 2, [0.9, 0.6] -> |0.75 - 1| x 2
    assert ece(Y, P, n_bins=2) == pytest.approx((0.2 * 2 + 0.25 * 2) / 4)
    assert ece([1, 0], [1.0, 0.0]) == 0.0


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_reports():
    rep = classification_report(Y, P)
    assert rep["n"] == 4 and rep["accuracy"] == 0.75 and len(rep["accuracy_ci95"]) == 2
    base = base_rate_report([1, 0, 0, 0], 0.6)  # train up-rate 0.6 -> always "up" on the test rows
    assert base["accuracy"] == 0.25
    assert base["brier"] == pytest.approx((0.16 + 3 * 0.36) / 4)
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError):
        brier([1, 0], [0.5])


def test_temperature_and_bias_are_recovered():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=40_000)
    y = (rng.random(z.size) < sigmoid(z / 2.0 + 0.3)).astype(float)
    cal = fit_calibrator(z, y, "temperature_bias")
    assert cal.temperature[0] == pytest.approx(2.0, rel=0.05)
    assert cal.bias[0] == pytest.approx(0.3, abs=0.05)
    only_t = fit_calibrator(z, y, "temperature")
    assert only_t.bias == [0.0] and only_t.temperature[0] == pytest.approx(2.0, rel=0.1)
    # Calibration lowers the log loss of over-confident logits.
    assert log_loss(y, cal.apply(z[:, None])[:, 0]) < log_loss(y, sigmoid(z))
    again = Calibrator.from_dict(cal.to_dict())
    assert np.array_equal(again.apply(z[:5, None]), cal.apply(z[:5, None]))


def test_uninformative_logits_collapse_to_the_validation_rate():
    rng = np.random.default_rng(1)
    z = rng.normal(size=5000)
    y = (rng.random(5000) < 0.3).astype(float)
    z_anti = -z + 0 * y  # independent of y: fitted slope ~0 or negative
    cal = fit_calibrator(z_anti, y)
    p = cal.apply(z_anti[:, None])[:, 0]
    assert np.all(np.abs(p - y.mean()) < 0.05)
