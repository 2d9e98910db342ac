"""Volatility targets, the naive forecast and the QLIKE score (pure numpy).

Definitions (docs/models.md):

* r_t = ln(close_t / close_{t-1}), the one-bar log return (the `ret_log_1` feature).
* Realized per-bar variance over h bars after t: RV_h[t] = mean(r_{t+1..t+h}^2).
* The naive forecast is the trailing per-bar variance NV[t] = mean(r_{t-W+1..t}^2) with
  W = `labels.vol_window`. It is computed from the `ret_log_1` column of the feature window, so
  serving gets it from the raw window it already holds (the window must have >= W rows).
* A model predicts o_h = ln(predicted variance / NV) per horizon, so o = 0 IS the naive forecast.
  It is trained on q = RV / NV with the loss q * exp(-o) + o (the gamma deviance with a log link:
  QLIKE up to constants; its minimum in o is at ln E[q | x]); the torch version is in
  ml.training.loop.
* Score: QLIKE(pred, RV) = mean(RV / pred - ln(RV / pred) - 1) >= 0 (0 only for a perfect forecast),
  robust to the noise in RV as a proxy of the true variance (Patton 2011). RV and pred are floored at
  VAR_FLOOR so a bar without movement does not give an infinite score.
* Served volatility for horizon h = sqrt(h * predicted per-bar variance): the expected size of the
  move over the horizon as a fraction of the price.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VAR_FLOOR = 1e-12  # per-bar variance floor (a relative price move of 1e-6 per bar)


def log_returns(close) -> np.ndarray:
    """r[t] = ln(close[t] / close[t-1]); r[0] = NaN."""
    c = np.asarray(close, dtype=np.float64)
    r = np.full(len(c), np.nan)
    if len(c) > 1:
        r[1:] = np.diff(np.log(c))
    return r


def realized_variance(returns, horizons: Sequence[int]) -> np.ndarray:
    """RV (T, H): RV[t, j] = mean(r[t+1..t+h_j]^2); NaN where t + h_j is beyond the data or a
    return in the span is NaN."""
    r2 = np.asarray(returns, dtype=np.float64) ** 2
    n = len(r2)
    out = np.full((n, len(horizons)), np.nan)
    csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(r2, nan=0.0))])
    cnan = np.concatenate([[0], np.cumsum(np.isnan(r2))])
    for j, h in enumerate(int(x) for x in horizons):
        if h < 1:
            raise ValueError(f"horizons must be >= 1, got {h}")
        if n <= h:
            continue
        t = np.arange(n - h)
        s = (csum[t + h + 1] - csum[t + 1]) / h
        s[(cnan[t + h + 1] - cnan[t + 1]) > 0] = np.nan
        out[: n - h, j] = s
    return out


def trailing_variance(returns, window: int) -> np.ndarray:
    """NV (T,): NV[t] = mean(r[t-W+1..t]^2); NaN for the first rows or where a return in the span is NaN."""
    if window < 1:
        raise ValueError(f"vol window must be >= 1, got {window}")
    r2 = np.asarray(returns, dtype=np.float64) ** 2
    n = len(r2)
    out = np.full(n, np.nan)
    if n < window:
        return out
    csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(r2, nan=0.0))])
    cnan = np.concatenate([[0], np.cumsum(np.isnan(r2))])
    t = np.arange(window - 1, n)
    s = (csum[t + 1] - csum[t + 1 - window]) / window
    s[(cnan[t + 1] - cnan[t + 1 - window]) > 0] = np.nan
    out[window - 1:] = s
    return out


def naive_variance(ret_rows, window: int) -> np.ndarray:
    """The naive per-bar variance from the `ret_log_1` values of feature windows.

    ret_rows: (T,) one window or (N, T) a batch, T >= window; uses the last `window` rows.
    Returns a float (as a 0-d array) or (N,), floored at VAR_FLOOR.
    """
    r = np.asarray(ret_rows, dtype=np.float64)
    if r.shape[-1] < window:
        raise ValueError(f"the naive volatility needs {window} rows of ret_log_1, got {r.shape[-1]}")
    return np.maximum(np.mean(r[..., -window:] ** 2, axis=-1), VAR_FLOOR)


def vol_targets(close, horizons: Sequence[int], window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, rv, nv) for every row of `close`: q (T, H) = RV / NV, RV (T, H), NV (T,).

    NaN where RV or NV is undefined (the first W rows, the last h rows); both floored at VAR_FLOOR
    elsewhere. Training rows must have a finite q (they are the usable window ends).
    """
    r = log_returns(close)
    rv = realized_variance(r, horizons)
    nv = trailing_variance(r, window)
    rv = np.where(np.isnan(rv), np.nan, np.maximum(rv, VAR_FLOOR))
    nv = np.where(np.isnan(nv), np.nan, np.maximum(nv, VAR_FLOOR))
    return rv / nv[:, None], rv, nv


def predicted_variance(log_ratio, nv) -> np.ndarray:
    """Per-bar variance from a model's o = ln(var / NV): NV * exp(o) (nv broadcast over horizons)."""
    o = np.asarray(log_ratio, dtype=np.float64)
    v = np.asarray(nv, dtype=np.float64)
    return np.maximum(v[..., None] * np.exp(np.clip(o, -30.0, 30.0)), VAR_FLOOR)


def served_volatility(per_bar_var, horizons: Sequence[int]) -> np.ndarray:
    """sqrt(h * per-bar variance) per horizon (last axis = horizons)."""
    v = np.asarray(per_bar_var, dtype=np.float64)
    return np.sqrt(np.maximum(v, 0.0) * np.asarray(horizons, dtype=np.float64))


def qlike(pred_var, rv) -> float:
    """mean(RV/pred - ln(RV/pred) - 1), both floored at VAR_FLOOR; NaN pairs are skipped."""
    p = np.asarray(pred_var, dtype=np.float64).ravel()
    y = np.asarray(rv, dtype=np.float64).ravel()
    ok = np.isfinite(p) & np.isfinite(y)
    if not ok.any():
        return float("nan")
    ratio = np.maximum(y[ok], VAR_FLOOR) / np.maximum(p[ok], VAR_FLOOR)
    return float(np.mean(ratio - np.log(ratio) - 1.0))


def mse_log(pred_var, rv) -> float:
    """mean((ln pred - ln RV)^2), both floored at VAR_FLOOR; NaN pairs are skipped."""
    p = np.asarray(pred_var, dtype=np.float64).ravel()
    y = np.asarray(rv, dtype=np.float64).ravel()
    ok = np.isfinite(p) & np.isfinite(y)
    if not ok.any():
        return float("nan")
    d = np.log(np.maximum(p[ok], VAR_FLOOR)) - np.log(np.maximum(y[ok], VAR_FLOOR))
    return float(np.mean(d * d))


def gamma_loss(log_ratio, q) -> float:
    """The training loss in numpy: mean(q * exp(-o) + o) (o = 0 is the naive forecast)."""
    o = np.asarray(log_ratio, dtype=np.float64)
    return float(np.mean(np.asarray(q, dtype=np.float64) * np.exp(-o) + o))


def vol_scores(pred_var, nv, rv) -> dict:
    """Model vs naive on the same rows: {model_qlike, naive_qlike, model_mse_log, naive_mse_log, skill}.

    pred_var, rv: (N,) for one horizon; nv: (N,). skill = 1 - model_qlike / naive_qlike (> 0: the
    model beats the naive trailing forecast).
    """
    naive = np.asarray(nv, dtype=np.float64)
    mq, nq = qlike(pred_var, rv), qlike(naive, rv)
    return {"model_qlike": mq, "naive_qlike": nq, "model_mse_log": mse_log(pred_var, rv),
            "naive_mse_log": mse_log(naive, rv),
            "skill": float(1.0 - mq / nq) if nq > 0 else 0.0, "n": int(np.isfinite(np.asarray(rv)).sum())}
