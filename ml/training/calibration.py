"""Post-hoc calibration of model logits on the validation split (pure numpy).

Method ``temperature`` (Guo et al. 2017): p = sigmoid(z / T), one T > 0 per horizon, fitted by
minimising the validation log loss. It rescales confidence but keeps p = 0.5 at z = 0.

Method ``temperature_bias`` (the default; two parameters per horizon, Platt-like on the logit):
p = sigmoid(z / T + b). The bias lets calibration remove a base-rate offset that temperature alone
cannot: a network trained on a signal-free series ends with nearly constant logits that need not
sit at the base rate; with the bias its calibrated output collapses to about the validation up-rate
instead of about 0.5. If the fitted slope 1/T is not positive (the logits carry no usable ranking on
validation), the slope is fixed at 0 and the output is the constant sigmoid(b) = validation up-rate.

Both are fitted with a damped Newton method on the exact log loss; the fitted parameters are saved
with the model version and applied by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("temperature", "temperature_bias")


def sigmoid(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _nll(s: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def _fit_one(z: np.ndarray, y: np.ndarray, fit_bias: bool, max_iter: int = 100) -> tuple[float, float]:
    """(scale a = 1/T, bias b) minimising the mean log loss of sigmoid(a z + b)."""
    X = np.column_stack([z, np.ones_like(z)]) if fit_bias else z[:, None]
    w = np.array([1.0, 0.0]) if fit_bias else np.array([1.0])
    ridge = 1e-8 * np.eye(len(w))
    loss = _nll(X @ w, y)
    for _ in range(max_iter):
        p = sigmoid(X @ w)
        grad = X.T @ (p - y) / len(y)
        hess = (X * (p * (1.0 - p))[:, None]).T @ X / len(y) + ridge
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = grad
        t = 1.0
        while t > 1e-6:
            cand = w - t * step
            cand_loss = _nll(X @ cand, y)
            if cand_loss <= loss:
                break
            t *= 0.5
        else:
            break
        converged = loss - cand_loss < 1e-12
        w, loss = cand, cand_loss
        if converged:
            break
    a = float(w[0])
    b = float(w[1]) if fit_bias else 0.0
    if a <= 0.0:
        # No positive relation between logit and outcome on validation: output a constant.
        a = 0.0
        if fit_bias:
            rate = float(np.clip(np.mean(y), 1e-6, 1 - 1e-6))
            b = float(np.log(rate / (1.0 - rate)))
        else:
            a = 0.0  # temperature only: exactly 0.5, the answer of a model without an edge (HOLD)
    return a, b


@dataclass
class Calibrator:
    """p = sigmoid(scale * logit + bias), per horizon; scale = 1/T."""

    method: str = "temperature_bias"
    scale: list[float] = field(default_factory=lambda: [1.0])
    bias: list[float] = field(default_factory=lambda: [0.0])

    @property
    def temperature(self) -> list[float | None]:
        """T = 1/scale per horizon (None where the scale is 0, i.e. a constant output)."""
        return [1.0 / a if a > 0 else None for a in self.scale]

    def apply(self, logits) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        squeeze = z.ndim == 1
        z2 = z[None, :] if squeeze else z
        if z2.shape[-1] != len(self.scale):
            raise ValueError(f"calibrator has {len(self.scale)} horizon(s), logits have {z2.shape[-1]}")
        p = sigmoid(z2 * np.asarray(self.scale) + np.asarray(self.bias))
        return p[0] if squeeze else p

    def to_dict(self) -> dict:
        return {"method": self.method, "scale": [float(a) for a in self.scale],
                "bias": [float(b) for b in self.bias], "temperature": self.temperature}

    @classmethod
    def from_dict(cls, d: dict) -> Calibrator:
        return cls(method=d.get("method", "temperature_bias"), scale=[float(a) for a in d["scale"]],
                   bias=[float(b) for b in d["bias"]])

    @classmethod
    def identity(cls, n_horizons: int) -> Calibrator:
        return cls(method="identity", scale=[1.0] * n_horizons, bias=[0.0] * n_horizons)


def fit_calibrator(logits, y, method: str = "temperature_bias") -> Calibrator:
    """Fit on validation logits (N, H) and labels (N, H)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(METHODS)}")
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    if z.ndim == 1:
        z, t = z[:, None], t.reshape(-1, 1)
    if z.shape != t.shape or z.shape[0] == 0:
        raise ValueError(f"need non-empty logits and labels of the same shape, got {z.shape} and {t.shape}")
    scales, biases = [], []
    for h in range(z.shape[1]):
        a, b = _fit_one(z[:, h], t[:, h], fit_bias=method == "temperature_bias")
        scales.append(a)
        biases.append(b)
    return Calibrator(method=method, scale=scales, bias=biases)
