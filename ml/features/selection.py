"""Feature selection on training rows: the few columns that carry a signal, not all of the catalog.

Why: a network fed the whole catalog (ml.features.catalog) on a few thousand rows spends its capacity
on noise columns and misses a simple signal that lives in one or two of them (docs/models.md). The
selection is fitted on TRAINING rows only (the caller passes only those), so it never sees a label
the model is evaluated on.

Method (pure numpy):
* score[f, target] = |Spearman rank correlation| between feature f at the window's LAST row and a
  target on the training window ends; robust to the heavy tails of returns and to monotone scaling;
* two rankings: direction (mean score over the horizons' direction labels) and, when given,
  volatility (mean score over ln q_h = ln(RV_h / NV), the volatility head's target);
* picks alternate between the two rankings (direction first); a candidate whose |rank correlation|
  with an already chosen feature exceeds `max_corr` is skipped (e.g. ret_log_1 vs its z-score), so
  k picks are k different pieces of information;
* k = None keeps every feature (in the serving order).
The result keeps the serving order of the chosen columns; their names go in the version meta
(`inputFeatures`) and the loader (ml.registry.loader) picks them from the full serving window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MAX_CORR = 0.95


@dataclass
class Selection:
    """The chosen features, in serving order, and why (JSON-ready via to_dict)."""

    names: list[str]
    indices: list[int]
    k: int | None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # chosen name -> {direction, volatility}
    order: list[str] = field(default_factory=list)                   # names in the order they were picked

    def to_dict(self) -> dict:
        return {"k": self.k, "names": list(self.names), "order": list(self.order),
                "scores": {n: {t: round(float(v), 6) for t, v in s.items()} for n, s in self.scores.items()},
                "method": "spearman_roundrobin", "fitted_on": "train"}


def _ranks(a: np.ndarray) -> np.ndarray:
    """Column-wise average ranks, standardised to mean 0 / norm 1 (a constant column gives zeros)."""
    a = np.asarray(a, dtype=np.float64)
    n = a.shape[0]
    order = np.argsort(a, axis=0, kind="mergesort")
    r = np.empty_like(a)
    cols = np.arange(a.shape[1])
    r[order, cols[None, :]] = np.arange(n, dtype=np.float64)[:, None]
    # ties: average the ranks of equal values (matters for binary labels and discrete features)
    for j in range(a.shape[1]):
        col = a[order[:, j], j]
        if len(col) > 1 and np.any(col[1:] == col[:-1]):
            _, start, counts = np.unique(col, return_index=True, return_counts=True)
            avg = start + (counts - 1) / 2.0
            r[order[:, j], j] = np.repeat(avg, counts)
    r -= r.mean(axis=0)
    norm = np.sqrt((r * r).sum(axis=0))
    norm[norm == 0] = 1.0
    return r / norm


def rank_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of every column of x (N, F) with every column of y (N, T): (F, T)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows, y {len(y)}")
    return _ranks(x).T @ _ranks(y)


def select_features(rows: np.ndarray, names: Sequence[str], k: int | None, labels: np.ndarray,
                    vol_targets: np.ndarray | None = None, *, max_corr: float = DEFAULT_MAX_CORR) -> Selection:
    """Choose k columns of `rows` (N training window ends, F features at the last row).

    labels: (N, H) direction labels; vol_targets: (N, H) q = RV / NV (positive) or None.
    """
    X = np.asarray(rows, dtype=np.float64)
    names = [str(n) for n in names]
    if X.ndim != 2 or X.shape[1] != len(names):
        raise ValueError(f"rows must be (N, {len(names)}), got {X.shape}")
    if k is None or k >= len(names):
        return Selection(names=names, indices=list(range(len(names))), k=k, order=list(names))
    if k < 1:
        raise ValueError(f"select_k must be >= 1, got {k}")
    y = np.asarray(labels, dtype=np.float64).reshape(len(X), -1)
    if len(X) < 10:
        raise ValueError(f"feature selection needs training rows, got {len(X)}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("feature selection: training rows and labels must be finite")
    rx = _ranks(X)
    rankings: list[tuple[str, np.ndarray]] = [("direction", np.abs(rx.T @ _ranks(y)).mean(axis=1))]
    if vol_targets is not None:
        q = np.asarray(vol_targets, dtype=np.float64).reshape(len(X), -1)
        if not (np.isfinite(q).all() and (q > 0).all()):
            raise ValueError("feature selection: volatility targets must be finite and positive")
        rankings.append(("volatility", np.abs(rx.T @ _ranks(np.log(q))).mean(axis=1)))
    score_of = {t: s for t, s in rankings}
    queues = [list(np.argsort(-s, kind="mergesort")) for _, s in rankings]
    chosen: list[int] = []
    turn = 0
    while len(chosen) < k and any(queues):
        queue = queues[turn % len(queues)]
        turn += 1
        while queue:
            j = int(queue.pop(0))
            if j in chosen:
                continue
            if chosen and np.max(np.abs(rx[:, chosen].T @ rx[:, j])) > max_corr:
                continue
            chosen.append(j)
            break
    indices = sorted(chosen)
    return Selection(
        names=[names[i] for i in indices], indices=indices, k=k, order=[names[i] for i in chosen],
        scores={names[i]: {t: float(s[i]) for t, s in score_of.items()} for i in indices})
