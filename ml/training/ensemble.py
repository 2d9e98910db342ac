"""Ensembles that earn their place: stacking the production models of the enabled types. Ray-free.

An ensemble is not trained, it is built from existing versions (its `members`, one per model type):

1. Every member's calibrated forecast (`forecast`: P(up) per horizon, then the served volatility per
   horizon; ml.registry.loader) is computed on the candle rows of the members' validation and test
   splits (each version's meta has `dataRange.splits` = first/last window-end timestamp per split).
2. The stacking weights are fitted on the rows inside EVERY member's validation range (their
   intersection), and scored on the rows inside every member's test range. Neither set touches a
   member's training rows, and the test rows decide nothing but the promotion. If either intersection
   is empty the build fails: the members were trained on different data.
3. Per horizon h, the ensemble's P(up) is sigmoid(b_h + sum_i w_ih * logit(p_ih)) with w_ih >= 0:
   a logistic regression on the members' calibrated logits, L2-regularised (`ensemble.l2`), fitted by
   minimising the validation log loss; b_h = 0 unless `ensemble.fit_bias`. Why this form:
     * logits, not probabilities: a member's calibrated logit is its evidence; adding evidence of
       independent members is what a logistic model does, and a weight per member can re-temper a
       sure member or switch off a useless one (w = 0 gives it no say at all);
     * non-negative weights: every member is a calibrated forecast of the same event, so a negative
       weight means betting against a model calibrated to be right; with correlated members on a few
       thousand validation rows that is mostly fitting noise;
     * not summing to 1: two members that carry independent evidence should add up (sum > 1), two
       noisy copies of one signal should shrink (sum < 1);
     * no bias by default: the members were calibrated on these same validation rows, and what a free
       bias adds is the validation period's up-rate, which with overlapping h-bar labels rests on
       about N/h independent outcomes, and costs test Brier when the test period's up-rate differs
       (tests/unit/test_ensemble.py prints both fits beside each other).
   The L2 penalty pulls the weights towards 0, i.e. towards P(up) = 0.5: with little evidence the
   stack says less, never more.
4. Volatility: the mean over members of their log predicted variances (the geometric mean of the
   served volatilities); unweighted, as one noisy QLIKE fit per horizon would gain little.
5. Metrics on the test rows: the ensemble's and every member's Brier / accuracy / log loss per horizon
   and the means over horizons, beside the base rate (the validation up-rate, the rows the ensemble
   was fitted on), and the volatility QLIKE against the naive trailing forecast
   (ml.training.volatility). The member with the lowest mean test Brier is `bestMember`; the
   promotion rule (ml.registry.versions.ensemble_promotion_decision) promotes the ensemble only if its
   test Brier beats every member's on these rows (and the base rate's).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ml.clock import now_ms
from ml.metrics import base_rate_report, classification_report
from ml.training.dataset import label_name, make_labels, windows_at

ENSEMBLE_TYPE = "ensemble"  # a model type built from the production versions of the enabled types
MIN_MEMBERS = 2  # enabled types an ensemble needs
ENSEMBLE_FILE = "ensemble.json"  # the stacking document, the version's only file
P_CLIP = 1e-6  # probabilities are clipped to [P_CLIP, 1 - P_CLIP] before the logit
BATCH_ROWS = 1024  # windows per forecast call (bounds the memory of long splits)


class EnsembleError(ValueError):
    """The ensemble cannot be built (missing members, members trained on different data, too few rows)."""


class BuildCancelled(RuntimeError):
    """`progress` asked the build to stop (the queue cancelled the job): nothing to register."""


# progress(steps done, steps in all) -> True to stop the build; called after each member's forecasts
Progress = Callable[[int, int], bool]


def member_types(enabled: Iterable[str]) -> list[str]:
    """The model types an ensemble combines: the enabled types (never `ensemble` itself)."""
    return [str(t) for t in enabled if str(t) != ENSEMBLE_TYPE]


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), P_CLIP, 1.0 - P_CLIP)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


# ----------------------------------------------------------------------------- stacking


def fit_stacking(z: np.ndarray, y: np.ndarray, l2: float, fit_bias: bool = False) -> tuple[np.ndarray, float]:
    """(weights (M,) >= 0, bias) minimising mean log loss of sigmoid(b + z @ w) + l2 * |w|^2.

    z: (N, M) member logits, y: (N,) 0/1 labels. The bias is 0 unless fit_bias (then not penalised).
    L-BFGS-B with the bounds w >= 0 (the objective is convex, so the start only affects the time taken:
    equal weights 1/M).
    """
    from scipy.optimize import minimize

    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, m = z.shape
    if n == 0:
        raise EnsembleError("no validation rows to fit the stacking weights on")

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:m], theta[m]
        s = b + z @ w
        # log loss = mean(log(1 + e^s) - y s), numerically stable
        loss = float(np.mean(np.logaddexp(0.0, s) - y * s)) + l2 * float(w @ w)
        g = (sigmoid(s) - y) / n
        grad = np.concatenate([z.T @ g + 2.0 * l2 * w, [g.sum()]])
        return loss, grad

    start = np.concatenate([np.full(m, 1.0 / m), [0.0]])
    res = minimize(objective, start, jac=True, method="L-BFGS-B",
                   bounds=[(0.0, None)] * m + [(None, None) if fit_bias else (0.0, 0.0)],
                   options={"maxiter": 500})
    theta = res.x
    return np.maximum(theta[:m], 0.0), float(theta[m])


def combine_logits(z: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """P(up) of the stack: sigmoid(bias + z @ weights) for z (N, M) or (M,)."""
    return sigmoid(bias + np.asarray(z, dtype=np.float64) @ np.asarray(weights, dtype=np.float64))


def combine_volatility(vols: np.ndarray) -> np.ndarray:
    """The ensemble's served volatility: exp(mean of log vol) over the members (axis 0).

    Served vol = sqrt(h * per-bar variance), so the mean of the log variances is the mean of
    2 * log vol; the result is the geometric mean of the members' volatilities."""
    v = np.maximum(np.asarray(vols, dtype=np.float64), 1e-300)
    return np.exp(np.mean(np.log(v), axis=0))


# ----------------------------------------------------------------------------- members and rows


@dataclass
class Member:
    model_type: str
    version: str
    model: Any  # a loaded model (ml.registry.loader): forecast(), seq_len, horizons, feature_names
    meta: dict

    def split_range(self, split: str) -> tuple[int, int]:
        rng = ((self.meta.get("dataRange") or {}).get("splits") or {}).get(split) or []
        if len(rng) != 2:
            raise EnsembleError(f"{self.model_type} {self.version} has no {split} range in its dataRange")
        return int(rng[0]), int(rng[1])


# (storage, pair, model_type) -> the production version loaded (ml.registry.loader.load_model; given by the
# caller, ml.registry.versions.Registry.build_ensemble, as the registry depends on training and not back)
Loader = Callable[[Any, str, str], Any]


def load_members(storage, pair: str, types: Sequence[str], load: Loader) -> dict[str, Member]:
    """The production version of every member type, loaded; EnsembleError names what is missing."""
    types = member_types(types)
    if len(types) < MIN_MEMBERS:
        raise EnsembleError(f"an ensemble needs at least 2 enabled model types, got {types}")
    members: dict[str, Member] = {}
    missing = []
    for t in types:
        try:
            model = load(storage, pair, t)
        except LookupError:  # ml.registry.loader.NoModelError
            missing.append(t)
            continue
        members[t] = Member(t, model.version, model, dict(model.meta))
    if missing:
        raise EnsembleError(f"no production model of {pair}/{', '.join(missing)}: train every member type "
                            f"({', '.join(types)}) before building the ensemble")
    horizons = {t: list(m.model.horizons) for t, m in members.items()}
    if len({tuple(h) for h in horizons.values()}) != 1:
        raise EnsembleError(f"members predict different horizons {horizons}: train the members on the same "
                            "horizons and data")
    return members


def intersect(members: dict[str, Member], split: str) -> tuple[int, int]:
    """[first, last] timestamp inside every member's `split` range; EnsembleError if empty."""
    ranges = {t: m.split_range(split) for t, m in members.items()}
    lo = max(r[0] for r in ranges.values())
    hi = min(r[1] for r in ranges.values())
    if lo > hi:
        what = "validation" if split == "val" else split
        raise EnsembleError(f"the members' {what} ranges do not overlap ({ranges}): train the members on the "
                            "same data")
    return lo, hi


def candles_needed(members: dict[str, Member], timeframe_ms: int, warmup_bars: int, now: int) -> int:
    """Bars from the earliest member's first feature row (minus the feature warm-up) up to `now`: the
    history to load so every member's validation and test rows have their features and labels."""
    start = min(int((m.meta.get("dataRange") or {}).get("start", now)) for m in members.values())
    return int((now - start) // timeframe_ms) + int(warmup_bars) + 1


def _member_forecasts(member: Member, X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(len(rows), 2H) forecast of one member at feature rows `rows` (raw windows, in batches)."""
    seq = int(member.model.seq_len)
    out = []
    for i in range(0, len(rows), BATCH_ROWS):
        ends = rows[i:i + BATCH_ROWS]
        out.append(np.asarray(member.model.forecast(windows_at(X, ends, seq)), dtype=np.float64))
    return np.concatenate(out) if out else np.empty((0, 2 * len(member.model.horizons)))


@dataclass
class SplitRows:
    """Rows of one split of the ensemble: timestamps, labels (N, H) and member forecasts (N, 2H)."""

    ts: np.ndarray
    rows: np.ndarray
    y: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def probs(self, t: str) -> np.ndarray:
        return self.outputs[t][:, : self.y.shape[1]]

    def vols(self, t: str) -> np.ndarray:
        return self.outputs[t][:, self.y.shape[1]:]


def _rows_in(ts: np.ndarray, valid: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.flatnonzero(valid & (ts >= lo) & (ts <= hi))


# ----------------------------------------------------------------------------- the build


@dataclass
class EnsembleResult:
    """A built ensemble: the registry payload of a version of model type `ensemble`.

    Duck-types the parts of ml.training.result.TrainResult that the registry and the queue's history
    read (model_type, trained_at, metrics, train_seconds, to_registry_payload)."""

    pair: str
    members: dict[str, str]
    horizons: list[int]
    weights: dict[str, dict[str, float]]  # horizon -> {member type: weight}
    bias: dict[str, float]                # horizon -> bias
    metrics: dict
    best_member: str
    data_range: dict
    config: dict
    trained_at: int
    train_seconds: float
    model_type: str = ENSEMBLE_TYPE
    epochs_run: int = 0
    stopped: str = "built"

    def document(self) -> dict:
        """What serving needs to combine member outputs (ml.serving.ensemble.combine)."""
        return {"members": dict(self.members), "horizons": list(self.horizons), "weights": self.weights,
                "bias": self.bias, "volatility": "mean_log_variance"}

    def to_registry_payload(self) -> dict:
        doc = self.document()
        meta = {
            "pair": self.pair,
            "modelType": ENSEMBLE_TYPE,
            "model": {"type": ENSEMBLE_TYPE, "horizons": list(self.horizons), "n_horizons": len(self.horizons),
                      "members": list(self.members)},
            **doc,
            "bestMember": self.best_member,
            "metrics": self.metrics,
            "dataRange": self.data_range,
            "config": self.config,
            "trainedAt": self.trained_at,
            "trainSeconds": self.train_seconds,
            "run": {"runner": "ensemble_build"},
        }
        blob = json.dumps(doc, sort_keys=True).encode()
        return {"meta": meta, "files": {ENSEMBLE_FILE: blob}}


def _mean_metrics(reports: list[dict]) -> dict:
    keys = ("brier", "accuracy", "log_loss", "balanced_accuracy", "ece")
    return {k: float(np.mean([r[k] for r in reports])) for k in keys} | {"n": int(reports[0]["n"])}


def build_ensemble(storage, pair: str, candles: pd.DataFrame, types: Sequence[str], *, load: Loader,
                   l2: float = 1e-3, fit_bias: bool = False, min_rows: int = 50, vol_window: int | None = None,
                   members: dict[str, Member] | None = None, progress: Progress | None = None) -> EnsembleResult:
    """Fit the stack of the production members of `types` on their common validation rows and score it
    on their common test rows (module docstring). `candles` must cover both (see candles_needed);
    `members` (load_members) saves loading them again; `progress` may stop it (BuildCancelled).

    Raises EnsembleError with the reason when it cannot be built honestly.
    """
    from ml.features import feature_matrix
    from ml.training.volatility import vol_scores, vol_targets

    t0 = time.perf_counter()
    members = members if members is not None else load_members(storage, pair, types, load)
    order = list(members)
    horizons = list(next(iter(members.values())).model.horizons)
    val_lo, val_hi = intersect(members, "val")
    test_lo, test_hi = intersect(members, "test")

    features = feature_matrix(candles)
    names = [str(c) for c in features.columns]
    for m in members.values():
        m.model.check_feature_names(names)
    fts = np.asarray(features.index, dtype=np.int64)
    close = pd.Series(np.asarray(candles["close"], dtype=np.float64),
                      index=np.asarray(candles["ts"], dtype=np.int64))
    labels = make_labels(close, horizons).reindex(features.index)[[label_name(h) for h in horizons]]
    y_all = labels.to_numpy(dtype=np.float64)
    X = features.to_numpy(dtype=np.float64).astype(np.float32)
    max_seq = max(int(m.model.seq_len) for m in members.values())
    valid = ~np.isnan(y_all).any(axis=1) & (np.arange(len(fts)) >= max_seq - 1)
    window = int(vol_window or getattr(next(iter(members.values())).model, "vol_window", 20))
    _, rv_all, nv_all = vol_targets(close.to_numpy(), horizons, window)
    pos = pd.Index(close.index).get_indexer(fts)  # candle position of every feature row

    splits: dict[str, SplitRows] = {}
    steps, total = 0, 2 * len(order) + 1

    def step() -> None:
        nonlocal steps
        steps += 1
        if progress is not None and progress(steps, total):
            raise BuildCancelled(f"ensemble build of {pair} cancelled after {steps} of {total} steps")

    for name, (lo, hi) in (("val", (val_lo, val_hi)), ("test", (test_lo, test_hi))):
        rows = _rows_in(fts, valid, lo, hi)
        if len(rows) < min_rows:
            what = "validation" if name == "val" else name
            raise EnsembleError(f"only {len(rows)} {what} rows common to every member (need {min_rows}): the "
                                "candles do not cover them, or the members were not trained on the same data")
        sr = SplitRows(ts=fts[rows], rows=rows, y=y_all[rows])
        for t in order:
            sr.outputs[t] = _member_forecasts(members[t], X, rows)
            step()
        splits[name] = sr
    val, test = splits["val"], splits["test"]

    weights: dict[str, dict[str, float]] = {}
    bias: dict[str, float] = {}
    per_h: dict[str, dict] = {}
    p_ens = np.empty_like(test.y)
    for j, h in enumerate(horizons):
        z_val = np.column_stack([logit(val.probs(t)[:, j]) for t in order])
        w, b = fit_stacking(z_val, val.y[:, j], l2, fit_bias)
        weights[str(h)] = {t: float(w[i]) for i, t in enumerate(order)}
        bias[str(h)] = b
        z_test = np.column_stack([logit(test.probs(t)[:, j]) for t in order])
        p_ens[:, j] = combine_logits(z_test, w, b)
        y_t = test.y[:, j]
        rate = float(np.mean(val.y[:, j]))
        per_h[str(h)] = {
            "model": classification_report(y_t, p_ens[:, j]),
            "baseline": base_rate_report(y_t, rate),
            "members": {t: classification_report(y_t, test.probs(t)[:, j]) for t in order},
            "val": classification_report(val.y[:, j], combine_logits(z_val, w, b)),
        }

    # volatility: geometric mean of the members' served volatilities, QLIKE vs the naive forecast
    vol_ens = combine_volatility(np.stack([test.vols(t) for t in order]))
    cpos = pos[test.rows]
    rv, nv = rv_all[cpos], nv_all[cpos]
    vol: dict[str, dict] = {}
    for j, h in enumerate(horizons):
        ok = np.isfinite(rv[:, j]) & np.isfinite(nv)
        ens_var = vol_ens[ok, j] ** 2 / h
        entry = vol_scores(ens_var, nv[ok], rv[ok, j])
        entry["members"] = {t: vol_scores(test.vols(t)[ok, j] ** 2 / h, nv[ok], rv[ok, j])["model_qlike"]
                            for t in order}
        vol[str(h)] = entry

    step()
    member_means = {t: _mean_metrics([per_h[str(h)]["members"][t] for h in horizons]) for t in order}
    best = min(order, key=lambda t: member_means[t]["brier"])
    metrics = {
        "model": _mean_metrics([per_h[str(h)]["model"] for h in horizons]),
        "baseline": _mean_metrics([per_h[str(h)]["baseline"] for h in horizons]),
        "members": member_means,
        "val": _mean_metrics([per_h[str(h)]["val"] for h in horizons]),
        "horizons": per_h,
        "volatility": vol,
        "primary_horizon": horizons[0],
        "n": {"val": int(len(val.rows)), "test": int(len(test.rows))},
    }
    data_range = {"start": int(val.ts[0]), "end": int(test.ts[-1]),
                  "splits": {"val": [int(val.ts[0]), int(val.ts[-1])], "test": [int(test.ts[0]), int(test.ts[-1])]},
                  "counts": {"val": int(len(val.rows)), "test": int(len(test.rows))},
                  "memberRanges": {t: (members[t].meta.get("dataRange") or {}).get("splits") for t in order}}
    return EnsembleResult(
        pair=pair, members={t: members[t].version for t in order}, horizons=horizons, weights=weights,
        bias=bias, metrics=metrics, best_member=best, data_range=data_range,
        config={"l2": float(l2), "fit_bias": bool(fit_bias), "min_rows": int(min_rows), "vol_window": window, "types": order},
        trained_at=now_ms(), train_seconds=time.perf_counter() - t0,
    )


def build_from_settings(storage, pair: str, settings=None, *, load: Loader, store=None,
                        candles: pd.DataFrame | None = None, now: int | None = None,
                        progress: Progress | None = None) -> EnsembleResult:
    """Build the ensemble of the enabled types with the settings' `ensemble` section; the candles come
    from the configured source as a training run reads them (the store the feed keeps), far enough
    back to cover every member's validation and test rows."""
    if settings is None:
        from ml.config import get_settings

        settings = get_settings()
    types = member_types(settings.model.enabled_types)
    members = load_members(storage, pair, types, load)
    if candles is None:
        from ml.data.sources import load_candles
        from ml.features.matrix import WARMUP_BARS

        bars = candles_needed(members, settings.timeframe_ms, WARMUP_BARS, now or now_ms())
        candles = load_candles(pair, settings, bars=bars, store=store, refresh=False)
    cfg = settings.ensemble
    return build_ensemble(storage, pair, candles, types, load=load, l2=cfg.l2, fit_bias=cfg.fit_bias, min_rows=cfg.min_rows,
                          vol_window=settings.labels.vol_window, members=members, progress=progress)
