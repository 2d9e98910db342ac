"""Look-ahead check for feature functions: does any row change when the future is cut off?

A causal feature at bar t uses candles[<= t] only, so computing the features on the series cut
after bar k must give the same rows <= k as computing them on the whole series. A feature that
peeks ahead (`shift(-1)`, a centred window, a backfill, a whole-series normalisation) gives a
different value, or NaN, at the rows just before the cut. `find_lookahead` runs that comparison at
a few cut points and reports every column that differs; `assert_causal` turns reports into an
error. It is cheap (a few feature computations), so a backtest can run it before it starts.

Plain pandas/numpy, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

FeatureFn = Callable[[pd.DataFrame], pd.DataFrame]

DEFAULT_N_CUTS = 3


@dataclass(frozen=True)
class LeakReport:
    """One feature that is not the same on the truncated series as on the full one.

    `cut` is the position (in the candles) of the last bar the truncated series keeps, `cut_ts` its
    open time. `kind` is "value" (a value at a row <= cut differs), "missing_in_truncated" or
    "missing_in_full" (the column exists on one side only). `max_abs_diff` is inf when one side is
    NaN (or missing) and the other is not; `first_diff_ts` is the earliest differing row's ts
    (None for a column missing on one side).
    """

    feature: str
    cut: int
    cut_ts: int
    max_abs_diff: float
    first_diff_ts: int | None
    kind: str = "value"

    def describe(self) -> str:
        if self.kind != "value":
            return f"{self.feature}: {self.kind.replace('_', ' ')} (cut at bar {self.cut})"
        return (f"{self.feature}: differs at cut bar {self.cut} (ts {self.cut_ts}) from ts "
                f"{self.first_diff_ts}, max |diff| {self.max_abs_diff:.3g}")


class LookAheadError(ValueError):
    """Features whose past rows change when the future is cut off: they peek ahead."""

    def __init__(self, reports: Sequence[LeakReport]):
        self.reports = list(reports)
        self.features = leaking_features(self.reports)
        shown = ", ".join(self.features[:20]) + (" ..." if len(self.features) > 20 else "")
        first = {}
        for r in self.reports:
            first.setdefault(r.feature, r)
        detail = "; ".join(first[f].describe() for f in self.features[:3])
        super().__init__(f"look-ahead in {len(self.features)} feature(s): {shown} ({detail})")


def leaking_features(reports: Sequence[LeakReport]) -> list[str]:
    """The distinct feature names in `reports`, in order of first appearance."""
    return list(dict.fromkeys(r.feature for r in reports))


def default_cuts(n: int, n_cuts: int = DEFAULT_N_CUTS, min_cut: int | None = None) -> list[int]:
    """`n_cuts` cut positions spread over the second half of `n` candles, from max(n // 2, min_cut)
    to n - 2 (the last bar that still leaves one bar to cut off). `min_cut` defaults to the feature
    warm-up, so every truncated series still has feature rows to compare."""
    if min_cut is None:
        from ml.features.matrix import WARMUP_BARS

        min_cut = WARMUP_BARS
    if n_cuts < 1:
        raise ValueError(f"n_cuts must be >= 1, got {n_cuts}")
    lo, hi = max(n // 2, int(min_cut)), n - 2
    if lo > hi:
        raise ValueError(f"a look-ahead check needs more than {max(min_cut, 0) + 1} candles "
                         f"(warm-up {min_cut} + bars to cut off), got {n}")
    return sorted({int(round(x)) for x in np.linspace(lo, hi, n_cuts)})


def _matrix(fn: FeatureFn, candles: pd.DataFrame, ts: np.ndarray, what: str) -> pd.DataFrame:
    m = fn(candles)
    if not isinstance(m, pd.DataFrame):
        raise TypeError(f"feature_fn must return a DataFrame, got {type(m).__name__} ({what})")
    if m.columns.has_duplicates:
        dup = sorted({str(c) for c in m.columns[m.columns.duplicated()]})
        raise ValueError(f"feature_fn returned duplicate column(s) {dup} ({what})")
    if len(m) and not (m.index.is_monotonic_increasing and bool(np.isin(m.index.to_numpy(), ts).all())):
        raise ValueError(f"feature_fn must return rows indexed by the candles' ts, increasing ({what})")
    return m


def _compare(full: pd.DataFrame, trunc: pd.DataFrame, cut: int, cut_ts: int, rtol: float,
             atol: float) -> list[LeakReport]:
    reports: list[LeakReport] = []
    trunc_cols = set(trunc.columns)
    full_cols = set(full.columns)
    for col in full.columns:
        if col not in trunc_cols:
            reports.append(LeakReport(str(col), cut, cut_ts, math.inf, None, "missing_in_truncated"))
    for col in trunc.columns:
        if col not in full_cols:
            reports.append(LeakReport(str(col), cut, cut_ts, math.inf, None, "missing_in_full"))
    common = [c for c in full.columns if c in trunc_cols]
    if not common:
        return reports
    # Rows <= cut on either side; a row that exists on one side only compares as NaN on the other.
    a = full.loc[:cut_ts, common]
    b = trunc.loc[:cut_ts, common]
    if not a.index.equals(b.index):
        idx = a.index.union(b.index)
        a, b = a.reindex(idx), b.reindex(idx)
    if a.empty:
        return reports
    x = a.to_numpy(dtype=np.float64)
    y = b.to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        same = np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
        bad_cols = np.flatnonzero(~same.all(axis=0))
        if bad_cols.size == 0:
            return reports
        idx = a.index.to_numpy()
        for j in bad_cols:
            bad = ~same[:, j]
            diff = np.abs(x[bad, j] - y[bad, j])
            diff = np.where(np.isnan(diff), math.inf, diff)  # NaN on one side only
            first = int(np.argmax(bad))
            reports.append(LeakReport(str(common[j]), cut, cut_ts, float(diff.max()), int(idx[first])))
    return reports


def find_lookahead(
    candles: pd.DataFrame,
    feature_fn: FeatureFn | None = None,
    cuts: Sequence[int] | None = None,
    n_cuts: int = DEFAULT_N_CUTS,
    rtol: float = 1e-9,
    atol: float = 1e-12,
) -> list[LeakReport]:
    """Every feature whose rows <= a cut change when the candles after the cut are dropped.

    `feature_fn(candles)` (default: `ml.features.feature_matrix`) must return a DataFrame indexed by
    the candles' ts (warm-up rows may be dropped). It is computed on the full candles and on
    `candles.iloc[:cut + 1]` for each cut position; values are compared with
    `np.isclose(rtol, atol)`, NaN equal to NaN; a row <= cut that exists on one side only (e.g. dropped
    for a NaN that came from the future) compares as NaN there, so every column with a value in it
    is reported. `cuts` defaults to `n_cuts` positions spread over
    the second half, never inside the feature warm-up (see `default_cuts`). An empty list means no
    look-ahead was detected at these cuts (not a proof: a peek whose value happens to coincide, or
    that only reaches beyond the end of the series, is invisible).
    """
    if feature_fn is None:
        from ml.features.matrix import feature_matrix as feature_fn
    if "ts" not in candles.columns:
        raise ValueError("candles lack a 'ts' column")
    n = len(candles)
    ts = candles["ts"].to_numpy(dtype=np.int64)
    if cuts is None:
        cut_list = default_cuts(n, n_cuts)
    else:
        cut_list = sorted({int(k) for k in cuts})
        bad = [k for k in cut_list if not 0 <= k < n - 1]
        if bad:
            raise ValueError(f"cut positions must be in [0, {n - 2}] for {n} candles, got {bad}")
    full = _matrix(feature_fn, candles, ts, "full series")
    reports: list[LeakReport] = []
    for k in cut_list:
        trunc = _matrix(feature_fn, candles.iloc[: k + 1], ts, f"cut at bar {k}")
        reports.extend(_compare(full, trunc, k, int(ts[k]), rtol, atol))
    return reports


def assert_causal(candles: pd.DataFrame, feature_fn: FeatureFn | None = None, **kwargs) -> None:
    """Raise LookAheadError naming the leaking features when `find_lookahead` reports any.

    Keyword arguments go to `find_lookahead` (cuts, n_cuts, rtol, atol).
    """
    reports = find_lookahead(candles, feature_fn, **kwargs)
    if reports:
        raise LookAheadError(reports)
