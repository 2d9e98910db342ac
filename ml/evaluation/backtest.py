"""Walk-forward backtest of a direction model against baselines (`tbml backtest`; docs/evaluation.md).

The series is cut into K consecutive test blocks at its end. Fold k trains on the rows before its
test block (all of them, or the newest `train_bars`), leaving `purge` rows out in between, so no
training label (which looks up to the largest horizon ahead) overlaps a test row. Inside the
training block the newest `val_fraction` rows, again behind a purge gap, are the validation rows
that early stopping and calibration use. Everything that learns — the scaler, the feature selection
(`select_k`, on the fit rows), the network (one output per horizon plus its volatility head), its
calibration per horizon, the logistic and LightGBM baselines per horizon and theirs, the majority
rate, persistence's hit rate — is fitted inside the fold on its own training rows only; the test
rows are touched once, to be scored. Every horizon is scored on its own; `BacktestResult.by_horizon`
holds one view per horizon and the returned view is the default horizon's.

    rows:   [ ...... fit ...... | purge | val | purge | test k ] [ test k+1 ] ...

Features are computed once on the whole series. That is only equal to computing them per fold if
every feature is causal, so `run_backtest` first checks exactly that on the data it is given
(`ml.features.causality`) and refuses to run on a feature set that peeks ahead.

Scores (per fold and pooled over all test rows) for the model and every baseline: n, accuracy with
its Wilson 95 % interval, balanced accuracy, MCC, Brier, log loss, ECE, and the rate and accuracy
of the signals that are not HOLD; per horizon, the simulated trades (`ml.evaluation.trading`, sized
with the network's predicted volatility) and the QLIKE of that volatility against the naive one.
`equity_curves` turns the signals into the cumulative return of acting on them net of a cost per
trade. Ray-free; the CLI is `cli.backtest`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ml.data.candles import infer_timeframe_ms
from ml.evaluation.baselines import (
    BASELINES,
    FittedBaseline,
    calls,
    fit_lightgbm,
    fit_logistic,
    fit_majority,
    fit_persistence,
)
from ml.metrics import balanced_accuracy, brier, ece, log_loss, mcc, wilson_interval
from ml.training.dataset import StandardScaler, make_labels, windows_at
from ml.training.nets import MODEL_TYPES

MODEL = "model"
NAMES = (MODEL, *BASELINES)
MIN_FIT_ROWS = 200
MIN_TEST_ROWS = 20

Progress = Callable[[int, int, str], None]


CAUSALITY_BARS = 3000  # the look-ahead check runs on the newest bars...
CAUSALITY_CUTS = 96    # ...cut at this many random places (a sparse peek hides from a few cuts)


def causality_cuts(n: int, seed: int, n_cuts: int = CAUSALITY_CUTS) -> list[int]:
    """Cut positions for the look-ahead check: the evenly spread defaults plus seeded random ones
    over the whole range after the feature warm-up."""
    from ml.features import WARMUP_BARS
    from ml.features.causality import default_cuts

    lo, hi = WARMUP_BARS + 1, n - 2
    cuts = set(default_cuts(n))
    if hi > lo:
        cuts.update(int(c) for c in np.random.default_rng(seed).integers(lo, hi + 1, n_cuts))
    return sorted(cuts)


class BacktestInputError(ValueError):
    """The data cannot carry the requested backtest (too short for the folds, no candles, bad labels)."""


class BacktestConfig(BaseModel):
    """What a backtest depends on (reported in its JSON under "config").

    `horizons` are all evaluated from one network per fold (one output per horizon); `horizon` is
    the default one, whose numbers are also the JSON's top-level `overall` / `trading`.
    """

    model_config = ConfigDict(extra="forbid")

    model_type: str = "lstm"
    horizon: int = Field(5, ge=1, le=500)
    horizons: list[int] | None = None
    folds: int = Field(4, ge=1, le=50)
    train_bars: int | None = Field(None, ge=MIN_FIT_ROWS)
    test_bars: int | None = Field(None, ge=MIN_TEST_ROWS)
    purge: int | None = Field(None, ge=1)
    epochs: int = Field(15, ge=1, le=500)
    seed: int = Field(7, ge=0)
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    cost_bps: float = Field(10.0, ge=0.0, le=10_000)
    profile: str = "quick"
    layers: int = Field(1, ge=1, le=8)
    hidden: int = Field(32, ge=1, le=1024)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    seq_len: int = Field(30, ge=2, le=1024)
    batch_size: int = Field(256, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    patience: int = Field(5, ge=1)
    strong: float = 0.7
    weak: float = 0.55
    threads: int = Field(1, ge=1, le=64)
    check_causality: bool = True
    calibration: str = Field("temperature", pattern="^(temperature|temperature_bias)$")
    vol_window: int = Field(20, ge=2, le=1024)
    select_k: int | None = Field(None, ge=1)

    @field_validator("model_type")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in MODEL_TYPES:
            raise ValueError(f"unknown model type {v!r}; one of {', '.join(MODEL_TYPES)}")
        return v

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v or any(int(h) < 1 or int(h) > 500 for h in v) or len(set(v)) != len(v):
            raise ValueError(f"horizons must be distinct integers in [1, 500], got {v}")
        return [int(h) for h in v]

    @model_validator(mode="after")
    def _consistent(self) -> BacktestConfig:
        if self.horizons is None:
            self.horizons = [self.horizon]
        elif self.horizon not in self.horizons:
            raise ValueError(f"horizon {self.horizon} is not one of the horizons {self.horizons}")
        if self.seq_len < self.vol_window:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= vol_window ({self.vol_window}): the naive "
                             "volatility is computed from the window")
        return self

    @property
    def max_horizon(self) -> int:
        return max(self.horizons or [self.horizon])

    @property
    def effective_purge(self) -> int:
        """Default: the largest horizon + seq_len, so no training window or label shares a row with a
        test window."""
        h = self.max_horizon
        purge = self.purge if self.purge is not None else h + self.seq_len
        if purge < h:
            raise ValueError(f"purge ({purge}) must be >= the horizon ({h})")
        return purge

    @classmethod
    def from_settings(cls, settings=None, **overrides: Any) -> BacktestConfig:
        """Defaults from settings.backtest, the labels, the model profile and the signal thresholds;
        None is ignored. A `horizon` alone evaluates that one horizon; `horizons` alone evaluates
        them with labels.default_horizon as the default when it is one of them (else the first)."""
        if settings is None:
            from ml.config import get_settings

            settings = get_settings()
        from ml.training.config import model_profile

        overrides = {k: v for k, v in overrides.items() if v is not None}
        b = settings.backtest
        profile, prof = model_profile(settings, overrides.pop("profile", None))
        t = settings.training
        labels = settings.labels
        horizons = [int(h) for h in labels.horizons]
        default = int(getattr(labels, "default_horizon", horizons[0]))
        if "horizons" in overrides:
            horizons = [int(h) for h in overrides.pop("horizons")]
            default = int(overrides.pop("horizon", default if default in horizons else horizons[0]))
        elif "horizon" in overrides:
            default = int(overrides.pop("horizon"))
            horizons = [default]
        values: dict[str, Any] = {
            "model_type": settings.model.default_type, "horizon": default, "horizons": horizons,
            "folds": b.folds, "train_bars": b.train_bars, "test_bars": b.test_bars, "purge": b.purge,
            "epochs": b.epochs, "seed": t.seed, "val_fraction": b.val_fraction, "cost_bps": b.cost_bps,
            "profile": profile, "layers": prof.layers, "hidden": prof.hidden, "dropout": prof.dropout,
            "seq_len": prof.seq_len, "batch_size": t.batch_size, "learning_rate": t.learning_rate,
            "patience": t.patience, "strong": settings.signals.strong, "weak": settings.signals.weak,
            "vol_window": int(getattr(labels, "vol_window", 20)),
            "select_k": getattr(settings.features, "select_k", None),
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class FoldPlan:
    """Row positions (in the feature matrix) of one fold's window ends."""

    index: int
    fit: np.ndarray
    val: np.ndarray
    test: np.ndarray


def plan_folds(valid_ends: np.ndarray, cfg: BacktestConfig) -> list[FoldPlan]:
    """Walk-forward folds over the labelled window ends (ascending row positions).

    Test blocks of `test_bars` rows tile the end of the series; default test_bars = n // (folds + 2),
    which leaves the first fold at least two blocks of history. ValueError when the data is too
    short for the requested layout (the message says what would fit).
    """
    ends = np.asarray(valid_ends, dtype=np.int64)
    n, k, purge = len(ends), cfg.folds, cfg.effective_purge
    test_bars = cfg.test_bars or n // (k + 2)
    if test_bars < MIN_TEST_ROWS:
        raise BacktestInputError(f"{n} labelled rows are too few for {k} folds (test blocks of {test_bars} rows; "
                         f"need >= {MIN_TEST_ROWS})")
    if k * test_bars >= n:
        raise BacktestInputError(f"{k} test blocks of {test_bars} rows do not fit into {n} labelled rows")
    plans = []
    for i in range(k):
        lo = n - (k - i) * test_bars
        test = ends[lo:lo + test_bars]
        train = ends[ends <= test[0] - purge - 1]
        if cfg.train_bars:
            train = train[-cfg.train_bars:]
        n_val = max(1, int(len(train) * cfg.val_fraction))
        val = train[-n_val:]
        fit = train[train <= val[0] - purge - 1] if len(val) else train[:0]
        if len(fit) < MIN_FIT_ROWS or len(val) < 20:
            raise BacktestInputError(
                f"fold {i + 1}: {len(fit)} training and {len(val)} validation rows (need >= {MIN_FIT_ROWS} "
                f"and 20); use fewer folds, smaller --test-bars or more data")
        plans.append(FoldPlan(index=i, fit=fit, val=val, test=test))
    return plans


def score(y: np.ndarray, p: np.ndarray, hard: np.ndarray | None = None, *, weak: float = 0.55,
          overlap: int = 1, always_calls: bool = False) -> dict[str, Any]:
    """The metrics block M of one prediction vector: hard calls default to p >= 0.5.

    `coverage` is the share of rows with a directional call (P(up) not 0.5 at 6 decimals); the
    service answers the others neutral/HOLD, and `hard` (see `calls`) scores them as the majority.
    `always_calls`: a rule that calls every row whatever its probability (persistence).

    A signal fires where the probability of the called direction exceeds `weak` (BUY/SELL and
    STRONG_*; the rest is HOLD); signal_accuracy is the accuracy of the fired ones (None if none).
    `overlap`: labels of consecutive rows share overlap - 1 bars of their future (overlap = h), so
    consecutive outcomes are not independent; the Wilson interval then counts n / overlap
    observations (`n_effective`) — with n it would be about sqrt(h) times too narrow.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    hard = (p >= 0.5).astype(np.float64) if hard is None else np.asarray(hard, dtype=np.float64)
    n = int(len(y))
    if n == 0:
        return {"n": 0, "accuracy": None, "balanced_accuracy": None, "mcc": None, "brier": None,
                "log_loss": None, "ece": None, "accuracy_ci95": [None, None], "signal_rate": None,
                "signal_accuracy": None, "signals": 0, "n_effective": 0, "coverage": None}
    correct = hard == y
    acc = float(np.mean(correct))
    n_eff = max(1, n // max(1, int(overlap)))
    lo, hi = wilson_interval(acc * n_eff, n_eff)
    fires = np.maximum(p, 1.0 - p) > weak
    coverage = 1.0 if always_calls else float(np.mean(np.round(p, 6) != 0.5))
    return {
        "n": n, "accuracy": acc, "balanced_accuracy": balanced_accuracy(y, hard), "mcc": mcc(y, hard),
        "brier": brier(y, p), "log_loss": log_loss(y, p), "ece": ece(y, p), "accuracy_ci95": [lo, hi], "n_effective": n_eff,
        "signal_rate": float(np.mean(fires)),
        "signal_accuracy": float(np.mean(correct[fires])) if fires.any() else None,
        "signals": int(fires.sum()), "coverage": coverage, "mean_p": float(np.mean(p)),
        "positive_rate": float(np.mean(y)),
    }


@dataclass
class BacktestResult:
    """The JSON report plus the pooled test rows (chronological) that the plots need.

    The fields are those of ONE horizon (`config["horizon"]`); `by_horizon` holds the same view for
    every evaluated horizon (this one included), so every function that reads a result (the report,
    `edge_summary`) works on any horizon's view.
    """

    data: dict[str, Any]
    config: dict[str, Any]
    overall: dict[str, dict[str, Any]]
    folds: list[dict[str, Any]]
    ts: np.ndarray                    # prediction time of each test row (epoch ms)
    y: np.ndarray                     # 1.0 = close[t + h] > close[t]
    fold: np.ndarray                  # fold index of each test row
    forward_return: np.ndarray        # close[t + h] / close[t] - 1
    probs: dict[str, np.ndarray]      # name -> P(up) per test row
    hard: dict[str, np.ndarray]       # name -> the call (1 = up) per test row
    checks: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    close: np.ndarray | None = None       # close of each test row's bar
    volatility: np.ndarray | None = None  # the volatility forecast the simulator sized stops with
    trading: dict[str, Any] = field(default_factory=dict)    # ml.evaluation.trading: simulated trades
    simulators: dict[str, Any] = field(default_factory=dict)  # name -> ml.simulation.trades.Simulator
    vol_score: dict[str, Any] = field(default_factory=dict)   # QLIKE of the volatility forecast vs naive
    by_horizon: dict[int, BacktestResult] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)   # e.g. a planted rule's accuracy (set by callers)

    @property
    def horizon(self) -> int:
        return int(self.config["horizon"])

    def at(self, horizon: int) -> BacktestResult:
        """The view of one evaluated horizon (KeyError if it was not evaluated)."""
        if not self.by_horizon:
            if int(horizon) != self.horizon:
                raise KeyError(horizon)
            return self
        return self.by_horizon[int(horizon)]

    def horizon_summary(self) -> dict[str, Any]:
        """The per-horizon block of the JSON: overall, trading, volatility score, strategy, edge."""
        return {"overall": self.overall, "trading": self.trading, "volatility": self.vol_score,
                "strategy": self.strategy_summary(), "edge": edge_summary(self)}

    def to_json(self) -> dict[str, Any]:
        views = self.by_horizon or {self.horizon: self}
        doc = {"data": self.data, "config": self.config, "overall": self.overall, "folds": self.folds,
               "checks": self.checks, "strategy": self.strategy_summary(), "trading": self.trading,
               "volatility": self.vol_score, "edge": edge_summary(self), "elapsedSeconds": self.elapsed_s,
               "horizons": {str(h): v.horizon_summary() for h, v in sorted(views.items())}}
        if self.reference:
            doc["reference"] = self.reference
        return doc

    def export(self, path: Any) -> Any:
        """Every test row as Parquet (`ml.evaluation.trading.export_rows`): per horizon, every model's
        P(up), the volatility the simulator used, the network's signal and its simulated position."""
        from ml.evaluation.trading import export_rows

        views = self.by_horizon or {self.horizon: self}
        per_h = {}
        for h, v in sorted(views.items()):
            per_h[h] = {"probs": v.probs, "volatility": v.volatility, "signal": v.signals(),
                        "position": v.sim_positions()}
        return export_rows(path, self.ts, self.close, self.fold, per_h, default_horizon=self.horizon)

    def signals(self, name: str = MODEL) -> np.ndarray:
        """The served signal (`ml.serving.signals.classify`) of each test row's P(up)."""
        from ml.serving.signals import classify

        strong, weak = float(self.config["strong"]), float(self.config["weak"])
        return np.array([classify(float(x), strong, weak).signal for x in self.probs[name]], dtype=object)

    def sim_positions(self, name: str = MODEL) -> np.ndarray:
        """+1 / -1 / 0: what `name`'s simulated account holds after each test row's close."""
        from ml.evaluation.trading import positions

        return positions(self.simulators[name], self.ts) if name in self.simulators else np.zeros(len(self.ts))

    def positions(self, name: str) -> np.ndarray:
        """+1 long / -1 short where the signal fires (BUY* / SELL*), 0 on HOLD."""
        p = self.probs[name]
        weak = float(self.config["weak"])
        fires = np.maximum(p, 1.0 - p) > weak
        side = np.where(self.hard[name] > 0.5, 1.0, -1.0)
        return np.where(fires, side, 0.0)

    def equity_curves(self, cost_bps: float | None = None) -> dict[str, np.ndarray]:
        """Cumulative return of acting on each model's signals, net of cost, plus buy & hold.

        Each test bar's signal puts 1/h of the capital into a position held for the next h bars
        (so h overlapping positions use the capital once); a trade costs `cost_bps` (entry plus
        exit) of its stake. Curves are sums of simple returns (no compounding).
        """
        cost = (self.config["cost_bps"] if cost_bps is None else cost_bps) / 10_000.0
        h = float(self.config["horizon"])
        out = {"buy_and_hold": np.cumsum(self.forward_return / h)}
        for name in self.probs:
            pos = self.positions(name)
            out[name] = np.cumsum((pos * self.forward_return - np.abs(pos) * cost) / h)
        return out

    def strategy_summary(self) -> dict[str, dict[str, float | int]]:
        curves = self.equity_curves()
        summary = {}
        for name, curve in curves.items():
            trades = int(np.count_nonzero(self.positions(name))) if name in self.probs else len(curve)
            summary[name] = {"return": float(curve[-1]) if len(curve) else 0.0, "trades": trades}
        summary["costBps"] = float(self.config["cost_bps"])
        return summary


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _select(cfg: BacktestConfig, X_fit: np.ndarray, y_fit: np.ndarray, names: list[str],
            q_fit: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Column indices a learner reads: all, or `cfg.select_k` chosen by `ml.features.selection` on the
    fold's fit rows only (the feature row at each fit window end, its direction labels and, for the
    network's volatility head, its q = RV / NV targets)."""
    if not cfg.select_k or cfg.select_k >= len(names):
        return np.arange(len(names)), {}
    from ml.features.selection import select_features

    sel = select_features(X_fit, names, cfg.select_k, y_fit, q_fit)
    return np.asarray(sel.indices, dtype=np.int64), sel.to_dict()


def _train_network(cfg: BacktestConfig, Xs: np.ndarray, Y: np.ndarray, Q: np.ndarray, plan: FoldPlan,
                   names: list[str], cols: np.ndarray):
    """Fit ONE network with an output per horizon on the fold's fit rows (early stopping on val),
    calibrate each horizon on val.

    Returns (P(up) (N_test, H), the log-variance ratio o (N_test, H) or None when the network has no
    volatility head, calibrator, fingerprint, fit info).
    """
    import dataclasses as dc

    from ml.training.calibration import fit_calibrator
    from ml.training.config import TrainConfig
    from ml.training.dataset import Dataset, SplitIndices
    from ml.training.loop import fit, new_model
    from ml.training.nets import deterministic, predict_logits, state_to_bytes

    hs = list(cfg.horizons or [cfg.horizon])
    H = len(hs)
    # the fields both configs have mean the same, except the split's purge and validation share
    shared = (set(TrainConfig.model_fields) & set(BacktestConfig.model_fields)) - {
        "purge", "val_fraction", "horizons", "select_k"}
    tcfg = TrainConfig(pair="BACKTEST", horizons=hs, **cfg.model_dump(include=shared))
    L = cfg.seq_len
    sub = Xs[:, cols] if len(cols) != Xs.shape[1] else Xs
    sel_names = [names[i] for i in cols]
    sets = {s: (windows_at(sub, ends, L), Y[ends].astype(np.float32), ends)
            for s, ends in (("train", plan.fit), ("val", plan.val), ("test", plan.test))}
    ds = Dataset(X_train=sets["train"][0], y_train=sets["train"][1], X_val=sets["val"][0], y_val=sets["val"][1],
                 X_test=sets["test"][0], y_test=sets["test"][1], scaler=StandardScaler(sel_names),
                 feature_names=sel_names, horizons=hs, seq_len=L, purge=cfg.effective_purge,
                 split=SplitIndices(train=plan.fit, val=plan.val, test=plan.test, purge=cfg.effective_purge),
                 ts_train=plan.fit, ts_val=plan.val, ts_test=plan.test)
    fields = {f.name for f in dc.fields(Dataset)}
    if {"q_train", "q_val"} <= fields:  # the volatility targets (ml.training.volatility) when the loop trains them
        ds = dc.replace(ds, q_train=Q[plan.fit].astype(np.float32), q_val=Q[plan.val].astype(np.float32),
                        **({"q_test": Q[plan.test].astype(np.float32)} if "q_test" in fields else {}))
    with deterministic(cfg.seed, cfg.threads):
        model = new_model(tcfg, len(sel_names))
        result = fit(model, ds, tcfg)
        out_val = predict_logits(model, ds.X_val)
        out_test = predict_logits(model, ds.X_test)
    z_val, z_test = out_val[:, :H], out_test[:, :H]
    o_test = out_test[:, H:2 * H] if out_test.shape[1] >= 2 * H else None
    calibrator = fit_calibrator(z_val, ds.y_val, cfg.calibration)
    p_test = calibrator.apply(z_test)
    state = state_to_bytes({k: v.contiguous() for k, v in model.state_dict().items()})
    info = {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss, "stopped": result.stopped,
            "volatilityHead": o_test is not None, "inputFeatures": len(sel_names)}
    return p_test, o_test, calibrator, _fingerprint(state, calibrator.to_dict()), info


def run_backtest(
    candles: pd.DataFrame,
    cfg: BacktestConfig,
    *,
    labels: np.ndarray | None = None,
    progress: Progress | None = None,
    source: str | None = None,
    feature_fn: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    simulation: Any = None,
) -> BacktestResult:
    """Walk-forward evaluation of `cfg.model_type` and the baselines on `candles` (ts-sorted), for
    every horizon of `cfg.horizons` from one network per fold; returns the default horizon's view
    (`BacktestResult.by_horizon` has every horizon's).

    `labels` (one per candle, NaN = unknown; (n,) for one horizon or (n, H)) replaces the direction
    labels: tests use it to show that scrambling what a fold is scored on leaves what it learned
    untouched. `progress(done, total, what)` is called after every fitted model. `feature_fn`
    replaces the feature matrix (it must be causal; the check runs on it too). `simulation` (an
    `ml.simulation.trades.SimConfig`; default its defaults) sets the simulated trades of
    `ml.evaluation.trading`.
    """
    from ml.features import feature_matrix
    from ml.training.volatility import predicted_variance, served_volatility, vol_scores, vol_targets

    t0 = time.perf_counter()
    feature_fn = feature_fn or feature_matrix
    if candles is None or len(candles) == 0:
        raise BacktestInputError("no candles to backtest")
    hs = list(cfg.horizons or [cfg.horizon])
    H, hmax = len(hs), max(hs)
    checks: dict[str, Any] = {}
    if cfg.check_causality:
        from ml.features.causality import assert_causal

        t_check = time.perf_counter()
        sample = candles.iloc[-min(len(candles), CAUSALITY_BARS):].reset_index(drop=True)
        cuts = causality_cuts(len(sample), cfg.seed)
        assert_causal(sample, feature_fn, cuts=cuts)
        checks["causality"] = {"passed": True, "cuts": len(cuts), "bars": len(sample),
                               "seconds": round(time.perf_counter() - t_check, 3),
                               "meaning": f"no look-ahead found at {len(cuts)} cut points"}
    feats = feature_fn(candles)
    names = [str(c) for c in feats.columns]
    fts = np.asarray(feats.index, dtype=np.int64)
    cts = np.asarray(candles["ts"], dtype=np.int64)
    close_all = np.asarray(candles["close"], dtype=np.float64)
    pos = np.searchsorted(cts, fts)  # candle row of every feature row
    if labels is None:
        y_all = make_labels(pd.Series(close_all, index=cts), hs).to_numpy(dtype=np.float64)
    else:
        y_all = np.asarray(labels, dtype=np.float64)
        if y_all.ndim == 1:
            y_all = y_all[:, None]
        if y_all.shape != (len(candles), H):
            raise BacktestInputError(f"labels must have one value per candle and horizon ({len(candles)}, {H}), "
                                     f"got {y_all.shape}")
    Y = y_all[pos]                                  # (rows, H)
    fwd = np.full((len(pos), H), np.nan)
    last_up = np.full((len(pos), H), np.nan)
    for j, h in enumerate(hs):
        ok_fwd = pos + h < len(close_all)
        fwd[ok_fwd, j] = close_all[pos[ok_fwd] + h] / close_all[pos[ok_fwd]] - 1.0
        ok_last = pos - h >= 0
        last_up[ok_last, j] = (close_all[pos[ok_last]] > close_all[pos[ok_last] - h]).astype(np.float64)
    q_all, rv_all, nv_all = vol_targets(close_all, hs, cfg.vol_window)
    Q, RV, NV = q_all[pos], rv_all[pos], nv_all[pos]

    # labels count rows; where candles have a gap, h rows are more than h bars: not the question
    tf = infer_timeframe_ms(cts)
    spans_gap = np.zeros(len(pos), dtype=bool)
    ok_max = pos + hmax < len(close_all)
    if tf:
        spans_gap[ok_max] = cts[pos[ok_max] + hmax] - cts[pos[ok_max]] != hmax * tf
    valid = (np.isfinite(Y).all(axis=1) & np.isfinite(fwd).all(axis=1) & np.isfinite(last_up).all(axis=1)
             & np.isfinite(Q).all(axis=1) & ~spans_gap & (np.arange(len(Y)) >= cfg.seq_len - 1))
    plans = plan_folds(np.flatnonzero(valid), cfg)
    X = feats.to_numpy(dtype=np.float64)
    X32 = X.astype(np.float32)  # what each fold's scaler transforms
    total = len(plans) * (1 + 2 * H)
    done = 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    fold_base: list[dict[str, Any]] = []
    fold_metrics: list[dict[int, dict[str, Any]]] = []
    pooled = {h: {name: [] for name in NAMES} for h in hs}
    pooled_hard = {h: {name: [] for name in NAMES} for h in hs}
    pooled_o: list[np.ndarray | None] = []
    for plan in plans:
        t_fold = time.perf_counter()
        first = max(0, int(plan.fit[0]) - cfg.seq_len + 1)
        scaler = StandardScaler(names).fit(X[first:int(plan.fit[-1]) + 1])
        Xs = scaler.transform(X32)
        train_rows = np.concatenate([plan.fit, plan.val])
        cols, selection = _select(cfg, X[plan.fit], Y[plan.fit], names, Q[plan.fit])

        t_net = time.perf_counter()
        p_model, o_test, calibrator, fp_model, info = _train_network(cfg, Xs, Y, Q, plan, names, cols)
        net_s = time.perf_counter() - t_net
        gbm_s = 0.0
        pooled_o.append(o_test)
        step(f"fold {plan.index + 1}/{len(plans)} {cfg.model_type}")
        fps: dict[str, Any] = {"scaler": _fingerprint(scaler.to_json()), MODEL: fp_model,
                               "selection": {MODEL: _fingerprint(selection.get("names", "all"))}}
        per_h: dict[int, dict[str, Any]] = {}
        chosen: dict[str, Any] = {}
        for j, h in enumerate(hs):
            yj = Y[:, j]
            lu = last_up[:, j]
            cols_h, sel_h = _select(cfg, X[plan.fit], yj[plan.fit], names)  # direction only, this horizon
            Xb = Xs[:, cols_h]
            fps["selection"][str(h)] = _fingerprint(sel_h.get("names", "all"))
            if sel_h:
                chosen[str(h)] = sel_h["names"]
            fitted: dict[str, FittedBaseline] = {
                "majority": fit_majority(yj[train_rows]),
                "persistence": fit_persistence(yj[train_rows], lu[train_rows]),
                "logistic": fit_logistic(Xb[plan.fit], yj[plan.fit], Xb[plan.val], yj[plan.val], seed=cfg.seed,
                                         calibration=cfg.calibration),
            }
            step(f"fold {plan.index + 1}/{len(plans)} logistic h{h}")
            t_gbm = time.perf_counter()
            fitted["lightgbm"] = fit_lightgbm(Xb[plan.fit], yj[plan.fit], Xb[plan.val], yj[plan.val],
                                              seed=cfg.seed, threads=cfg.threads, calibration=cfg.calibration)
            gbm_s += time.perf_counter() - t_gbm
            step(f"fold {plan.index + 1}/{len(plans)} lightgbm h{h}")
            majority_call = float(np.mean(yj[train_rows]) >= 0.5)
            probs = {MODEL: p_model[:, j]}
            hards = {MODEL: calls(p_model[:, j], majority_call)}
            for name, b in fitted.items():
                probs[name] = b.predict(Xb[plan.test], lu[plan.test])
                hards[name] = b.hard(probs[name], lu[plan.test], majority_call)
            metrics = {name: score(yj[plan.test], probs[name], hards[name], weak=cfg.weak, overlap=h,
                                   always_calls=name == "persistence") for name in NAMES}
            metrics["baseRateTrain"] = float(np.mean(yj[train_rows]))
            per_h[h] = metrics
            for name in NAMES:
                pooled[h][name].append(probs[name])
                pooled_hard[h][name].append(hards[name])
                if name != MODEL:
                    fps.setdefault(name, {})[str(h)] = fitted[name].fingerprint()
        fold_base.append({
            "index": plan.index,
            "train": [int(fts[plan.fit[0]]), int(fts[plan.val[-1]])],
            "validation": [int(fts[plan.val[0]]), int(fts[plan.val[-1]])],
            "test": [int(fts[plan.test[0]]), int(fts[plan.test[-1]])],
            "rows": {"fit": int(len(plan.fit)), "validation": int(len(plan.val)), "test": int(len(plan.test))},
            "purge": cfg.effective_purge,
            "training": {**info, "calibration": calibrator.to_dict()},
            "selection": ({"network": selection, "baselines": chosen} if selection else
                          {"k": None, "names": "all"}),
            "fingerprints": fps,
            # wall time of the fold's fits: all, the network, LightGBM over every horizon
            "seconds": {"total": round(time.perf_counter() - t_fold, 3), "network": round(net_s, 3),
                        "lightgbm": round(gbm_s, 3)},
        })
        fold_metrics.append(per_h)

    test_rows = np.concatenate([p.test for p in plans])
    fold_of = np.concatenate([np.full(len(p.test), p.index) for p in plans])
    from ml.features import feature_names_hash

    config = {**cfg.model_dump(), "purge": cfg.effective_purge,
              "test_bars": int(len(plans[0].test)), "features": len(names),
              "feature_hash": feature_names_hash(names)}
    data = {"rows": int(len(candles)), "start": int(cts[0]), "end": int(cts[-1]),
            "featureRows": int(len(fts)), "labelledRows": int(valid.sum()), "gapRows": int(spans_gap.sum()),
            "source": source}
    from ml.evaluation.trading import simulated_trading
    from ml.simulation.trades import SimConfig

    test_close = close_all[pos[test_rows]]
    nv_test = NV[test_rows]
    has_head = all(o is not None for o in pooled_o)
    o_pool = np.concatenate(pooled_o) if has_head else np.zeros((len(test_rows), H))
    var_model = predicted_variance(o_pool, nv_test)                    # (N, H) per-bar variance
    vol_model = served_volatility(var_model, hs)
    vol_naive = served_volatility(np.repeat(nv_test[:, None], H, axis=1), hs)
    vol_used = vol_model if has_head else vol_naive
    vol_desc = ("the network's predicted volatility per horizon (ml.training.volatility)" if has_head else
                f"naive: sqrt(h x mean of the last {cfg.vol_window} squared one-bar log returns) "
                "(the network has no volatility head)")
    elapsed = round(time.perf_counter() - t0, 3)
    views: dict[int, BacktestResult] = {}
    for j, h in enumerate(hs):
        probs_all = {name: np.concatenate(v) for name, v in pooled[h].items()}
        hard_all = {name: np.concatenate(v) for name, v in pooled_hard[h].items()}
        y_pool = Y[test_rows, j]
        overall = {name: score(y_pool, probs_all[name], hard_all[name], weak=cfg.weak, overlap=h,
                               always_calls=name == "persistence") for name in NAMES}
        folds_h = []
        for base, per_h in zip(fold_base, fold_metrics, strict=True):
            doc = {**base, "baseRateTrain": per_h[h]["baseRateTrain"],
                   **{name: per_h[h][name] for name in NAMES}}
            if h == cfg.horizon:
                doc["horizons"] = {str(k): {name: per_h[k][name] for name in NAMES} for k in hs}
            folds_h.append(doc)
        trading, sims = simulated_trading(candles, fts[test_rows], test_close, probs_all, vol_used[:, j],
                                          horizon=h, timeframe_ms=tf, strong=cfg.strong, weak=cfg.weak,
                                          config=simulation or SimConfig(), volatility_source=vol_desc)
        score_h = vol_scores(var_model[:, j], nv_test, RV[test_rows, j])
        score_h["volatilityHead"] = has_head
        views[h] = BacktestResult(
            data=data, config={**config, "horizon": h}, overall=overall, folds=folds_h, ts=fts[test_rows],
            y=y_pool, fold=fold_of, forward_return=fwd[test_rows, j], probs=probs_all, hard=hard_all,
            checks=checks, elapsed_s=elapsed, close=test_close, volatility=vol_used[:, j], trading=trading,
            simulators=sims, vol_score=score_h)
    main = views[cfg.horizon]
    main.config = config
    main.by_horizon = views
    for v in views.values():
        v.by_horizon = views
    main.elapsed_s = round(time.perf_counter() - t0, 3)
    return main


def add_planted_rule(result: BacktestResult, candles: pd.DataFrame, lookback: int) -> dict[str, Any]:
    """The embedded synthetic source's planted rule (`ml.data.synthetic.planted_rule`), scored on the
    backtest's own pooled test rows per horizon: the ceiling a learner can reach on that data. It is
    not a baseline (it is told what generated the data), so it is reported beside them, never fitted.
    Sets `reference` on every horizon's view and returns it."""
    from ml.data.synthetic import rule_accuracy

    views = result.by_horizon or {result.horizon: result}
    acc = {}
    for h, v in sorted(views.items()):
        a, n = rule_accuracy(candles, horizon=int(h), lookback=int(lookback), ts=v.ts)
        acc[str(h)] = {"accuracy": a, "n": n}
    ref = {"rule": {"label": f"planted rule (lookback {lookback})", "lookback": int(lookback), "accuracy": acc}}
    for v in {**views, result.horizon: result}.values():
        v.reference = ref
    return ref


def edge_summary(result: BacktestResult, name: str = MODEL) -> dict[str, Any]:
    """Does `name` beat the simple baselines beyond noise? (for the report's verdict line)

    Compares accuracy with the best of majority and persistence, and asks whether the Wilson 95 %
    interval of the model's accuracy excludes that best baseline's accuracy and 50 %.
    """
    m = result.overall[name]
    best_name = max(("majority", "persistence"), key=lambda n: result.overall[n]["accuracy"])
    best_simple = result.overall[best_name]["accuracy"]
    lo, hi = m["accuracy_ci95"]
    return {
        "accuracy": m["accuracy"], "ci95": [lo, hi], "bestSimpleName": best_name, "bestSimpleBaseline": best_simple,
        "margin": m["accuracy"] - best_simple,
        "beatsSimpleBeyondNoise": bool(lo > best_simple),
        "coversHalf": bool(lo <= 0.5 <= hi),
        "brierSkill": (1.0 - m["brier"] / result.overall["majority"]["brier"])
        if result.overall["majority"]["brier"] else math.nan,
    }
