"""Binary classification metrics for probabilistic direction forecasts (pure numpy).

Conventions: ``y`` holds 0/1 labels (1 = up), ``p`` holds P(up) in [0, 1]; a hard prediction is
``p >= threshold`` (default 0.5). Every function accepts array-likes of equal length and returns a
plain float (NaN for an empty input) so the results go straight into JSON.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-12


def _arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.size} vs {p.size}")
    return y, p


def _hard(p: np.ndarray, threshold: float) -> np.ndarray:
    return (p >= threshold).astype(np.float64)


def accuracy(y, p, threshold: float = 0.5) -> float:
    y, p = _arrays(y, p)
    return float(np.mean(_hard(p, threshold) == y)) if y.size else float("nan")


def balanced_accuracy(y, p, threshold: float = 0.5) -> float:
    """Mean of the true-positive rate and the true-negative rate (a class absent from y is skipped)."""
    y, p = _arrays(y, p)
    if not y.size:
        return float("nan")
    pred = _hard(p, threshold)
    rates = [float(np.mean(pred[y == c] == c)) for c in (0.0, 1.0) if np.any(y == c)]
    return float(np.mean(rates))


def brier(y, p) -> float:
    """Mean squared error of the probability: 0 is perfect, 0.25 is a constant 0.5."""
    y, p = _arrays(y, p)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def log_loss(y, p, eps: float = 1e-7) -> float:
    """Mean negative log-likelihood in nats, probabilities clipped to [eps, 1 - eps]."""
    y, p = _arrays(y, p)
    if not y.size:
        return float("nan")
    q = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))


def mcc(y, p, threshold: float = 0.5) -> float:
    """Matthews correlation coefficient of the hard predictions (0 when undefined)."""
    y, p = _arrays(y, p)
    if not y.size:
        return float("nan")
    pred = _hard(p, threshold)
    tp = float(np.sum((pred == 1) & (y == 1)))
    tn = float(np.sum((pred == 0) & (y == 0)))
    fp = float(np.sum((pred == 1) & (y == 0)))
    fn = float(np.sum((pred == 0) & (y == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom > 0 else 0.0


def ece(y, p, n_bins: int = 10) -> float:
    """Expected calibration error: equal-width bins on [0, 1], |mean p - mean y| weighted by bin size.

    Bin edges are closed on the left; p = 1.0 falls in the last bin.
    """
    y, p = _arrays(y, p)
    if not y.size:
        return float("nan")
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        if np.any(m):
            total += m.sum() * abs(float(p[m].mean()) - float(y[m].mean()))
    return float(total / y.size)


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default); (nan, nan) when n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    phat = successes / n
    denom = 1.0 + z * z / n
    center = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1.0 - phat) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, center - half)), float(min(1.0, center + half))


def classification_report(y, p, threshold: float = 0.5) -> dict:
    """All metrics of one probability vector against its labels, as a JSON-ready dict."""
    y, p = _arrays(y, p)
    n = int(y.size)
    acc = accuracy(y, p, threshold)
    lo, hi = wilson_interval(acc * n, n) if n else (float("nan"), float("nan"))
    return {
        "n": n,
        "accuracy": acc,
        "accuracy_ci95": [lo, hi],
        "balanced_accuracy": balanced_accuracy(y, p, threshold),
        "brier": brier(y, p),
        "log_loss": log_loss(y, p),
        "mcc": mcc(y, p, threshold),
        "ece": ece(y, p),
        "positive_rate": float(np.mean(y)) if n else float("nan"),
        "mean_p": float(np.mean(p)) if n else float("nan"),
    }


def base_rate_report(y_test, base_rate: float) -> dict:
    """The base-rate baseline: predict the TRAIN up-rate as a constant probability on the test rows.

    Its hard prediction is the majority class of the training labels, so its accuracy is the test
    share of that class.
    """
    y = np.asarray(y_test, dtype=np.float64).ravel()
    report = classification_report(y, np.full(y.shape, float(base_rate)))
    report["base_rate"] = float(base_rate)
    return report
