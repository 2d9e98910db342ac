"""`lightgbm`: gradient-boosted trees as a model type, trained and registered like the networks. Ray-free.

Why a tree model beside the networks: on a handful of informative columns among many noisy ones,
boosted trees on the latest feature row are what a practitioner tries first, and they are cheap.

Inputs are the networks' prepared Dataset (ml.training.dataset.prepare_dataset: the scaler fitted on
training rows, the purged chronological split), so both model kinds see the same rows. A window's
tabular row is its scaled feature rows `lags` bars back (0 = the window's last row), side by side
(`name@lag` columns), plus ln NV (the naive trailing variance of ml.training.volatility, from the
window's raw `ret_log_1` column) so the volatility trees can scale from it.

With feature selection (ml.features.selection, `select_k`) the rows hold the selected columns only;
the version's featureNames stay the full serving list.

Per horizon h:
  * a binary classifier of direction_h, early-stopped on the validation rows' log loss; its raw
    scores are the logits, calibrated on the validation rows (ml.training.calibration) as for the
    networks;
  * a regressor with objective "gamma" (log link) on q = RV_h / NV, early-stopped on the validation
    rows' gamma deviance; its raw score is o_h = ln(predicted variance / NV), the quantity the
    networks' volatility head predicts (o = 0 is the naive forecast).
Test metrics come from ml.training.evaluate like the networks', so the registry's promotion rule
applies unchanged. Stored files: `model.lgb.json` (every booster's text, the lags, the layout) and
`scaler.json`. Served by ml.registry.loader (LoadedGbm), whose seq_len is the rows a forecast needs:
max(lags) + 1, or the naive volatility's window if longer.

Determinism: `deterministic=True`, `force_col_wise=True`, every seed from `cfg.seed` and a fixed
thread count (`cfg.threads`, 1 when 0): the same data and config give the same boosters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml.clock import now_ms
from ml.training.calibration import Calibrator
from ml.training.config import TrainConfig
from ml.training.dataset import Dataset, StandardScaler
from ml.training.evaluate import evaluate_outputs
from ml.training.loop import TrainingCancelled
from ml.training.result import TrainResult, feature_hash, registry_data_range
from ml.training.volatility import VAR_FLOOR, naive_variance, predicted_variance

GBM_FILE = "model.lgb.json"
WEIGHTS_FILE = "weights.pt"  # the torch weights file of TrainResult.to_registry_payload
FORMAT = 1
KINDS = ("direction", "volatility")
RET_FEATURE = "ret_log_1"
PROGRESS_EVERY = 25  # boosting rounds between progress/cancel checks


# ----------------------------------------------------------------------------- rows


def model_seq_len(lags: Sequence[int], vol_window: int) -> int:
    """Rows of raw features one forecast needs: the oldest lag's row, or the naive volatility's window."""
    return max(max(int(x) for x in lags) + 1, int(vol_window))


def tabular_rows(scaled: np.ndarray, ln_nv: np.ndarray, lags: Sequence[int],
                 cols: np.ndarray | None = None) -> np.ndarray:
    """(N, len(lags) * F' + 1) float32: the scaled rows `lags` back from each window's end (columns
    `cols`, default all F), then ln NV.

    scaled: (N, L, F) scaled windows with L > max(lags); ln_nv: (N,).
    """
    L = scaled.shape[1]
    if max(lags) >= L:
        raise ValueError(f"lag {max(lags)} needs windows of more than {max(lags)} rows, got {L}")
    parts = [np.asarray(scaled[:, L - 1 - int(k), :] if cols is None else scaled[:, L - 1 - int(k), cols],
                        dtype=np.float32) for k in lags]
    parts.append(np.asarray(ln_nv, dtype=np.float32)[:, None])
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def column_names(feature_names: Sequence[str], lags: Sequence[int]) -> list[str]:
    return [f"{n}@{int(k)}" for k in lags for n in feature_names] + ["ln_nv"]


def input_index(feature_names: Sequence[str], inputs: Sequence[str] | None) -> np.ndarray | None:
    """Column indices of `inputs` in `feature_names`; None when every column is read."""
    if not inputs or list(inputs) == list(feature_names):
        return None
    pos = {n: i for i, n in enumerate(feature_names)}
    missing = [n for n in inputs if n not in pos]
    if missing:
        raise ValueError(f"input features not among the feature names: {', '.join(missing[:8])}")
    return np.asarray([pos[n] for n in inputs], dtype=np.int64)


def _ret_index(feature_names: Sequence[str]) -> int:
    try:
        return list(feature_names).index(RET_FEATURE)
    except ValueError:
        raise ValueError(f"lightgbm needs the {RET_FEATURE} feature for its volatility trees") from None


def raw_ret_column(scaled: np.ndarray, scaler: StandardScaler, ret_idx: int) -> np.ndarray:
    """The raw `ret_log_1` values of scaled windows (N, L): the scaler undone on one column."""
    return np.asarray(scaled[:, :, ret_idx], dtype=np.float64) * scaler.std_[ret_idx] + scaler.mean_[ret_idx]


# ----------------------------------------------------------------------------- the fitted model


@dataclass
class GbmModel:
    """The boosters of one run (one classifier and one gamma regressor per horizon) and how to feed them."""

    horizons: list[int]
    lags: list[int]
    vol_window: int
    feature_names: list[str]      # the full serving list (the scaler's columns)
    direction: list[Any]          # lightgbm.Booster per horizon
    volatility: list[Any]         # lightgbm.Booster per horizon
    params: dict = field(default_factory=dict)
    inputs: list[str] | None = None  # the selected columns the trees read (None: all feature_names)

    @property
    def seq_len(self) -> int:
        return model_seq_len(self.lags, self.vol_window)

    @property
    def input_idx(self) -> np.ndarray | None:
        return input_index(self.feature_names, self.inputs)

    def outputs_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(direction logits (N, H), o = ln(var / NV) (N, H)) of tabular rows (one thread: serving
        predicts a window at a time, and a thread per call would cost more than it saves)."""
        def scores(boosters: list) -> np.ndarray:
            if not len(rows):
                return np.empty((0, len(boosters)))
            return np.column_stack([b.predict(rows, raw_score=True, num_threads=1) for b in boosters])

        return scores(self.direction).astype(np.float64), scores(self.volatility).astype(np.float64)

    def outputs_scaled(self, scaled: np.ndarray, ln_nv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The outputs of scaled windows (N, L, F) and their ln NV (N,)."""
        return self.outputs_rows(tabular_rows(scaled, ln_nv, self.lags, self.input_idx))

    def outputs_raw(self, raw: np.ndarray, scaler: StandardScaler) -> tuple[np.ndarray, np.ndarray]:
        """The same from RAW windows (N, L >= seq_len, F), as serving holds them."""
        ret_idx = _ret_index(self.feature_names)
        nv = naive_variance(raw[:, :, ret_idx], self.vol_window)
        scaled = scaler.transform(np.asarray(raw, dtype=np.float32))
        return self.outputs_scaled(scaled, np.log(nv))

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "horizons": self.horizons, "lags": self.lags, "vol_window": self.vol_window,
               "feature_names": self.feature_names, "inputs": self.inputs,
               "columns": column_names(self.inputs or self.feature_names, self.lags), "params": self.params,
               "direction": [b.model_to_string() for b in self.direction],
               "volatility": [b.model_to_string() for b in self.volatility]}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> GbmModel:
        import lightgbm as lgb

        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{GBM_FILE}: unknown format {doc.get('format')!r}")
        hs = [int(h) for h in doc["horizons"]]
        if len(doc["direction"]) != len(hs) or len(doc["volatility"]) != len(hs):
            raise ValueError(f"{GBM_FILE}: {len(hs)} horizons but {len(doc['direction'])} direction and "
                             f"{len(doc['volatility'])} volatility boosters")
        return cls(horizons=hs, lags=[int(k) for k in doc["lags"]], vol_window=int(doc["vol_window"]),
                   feature_names=list(doc["feature_names"]),
                   direction=[lgb.Booster(model_str=s) for s in doc["direction"]],
                   volatility=[lgb.Booster(model_str=s) for s in doc["volatility"]],
                   params=dict(doc.get("params") or {}), inputs=doc.get("inputs"))


# ----------------------------------------------------------------------------- fitting


def booster_params(cfg: TrainConfig, kind: str) -> dict:
    """LightGBM parameters of one booster from the run's `lightgbm` settings (deterministic, seeded)."""
    g = cfg.lightgbm
    if g is None:
        raise ValueError("a lightgbm run needs its `lightgbm` settings (TrainConfig.from_settings fills them)")
    objective = {"direction": ("binary", "binary_logloss"), "volatility": ("gamma", "gamma_deviance")}[kind]
    return {
        "objective": objective[0], "metric": objective[1], "num_leaves": g.num_leaves,
        "learning_rate": g.learning_rate, "min_child_samples": g.min_child_samples,
        "lambda_l1": g.reg_alpha, "lambda_l2": g.reg_lambda, "feature_fraction": g.feature_fraction,
        "bagging_fraction": g.bagging_fraction, "bagging_freq": 1 if g.bagging_fraction < 1.0 else 0,
        "max_bin": g.max_bin, "seed": cfg.seed, "bagging_seed": cfg.seed + 1, "feature_fraction_seed": cfg.seed + 2,
        "data_random_seed": cfg.seed + 3, "deterministic": True, "force_col_wise": True,
        "num_threads": cfg.threads or 1, "verbosity": -1,
    }


@dataclass
class GbmTables:
    """The tabular rows of the training and validation splits and their targets."""

    X_train: np.ndarray
    X_val: np.ndarray
    y_train: np.ndarray   # direction labels (N, H)
    y_val: np.ndarray
    q_train: np.ndarray   # RV / NV (N, H)
    q_val: np.ndarray
    columns: list[str]


def split_rows(dataset: Dataset, split: str, lags: Sequence[int], vol_window: int) -> tuple[np.ndarray, np.ndarray]:
    """(tabular rows, NV (N,)) of one split of the Dataset; NV from the window's ret_log_1 column, as
    serving computes it."""
    X, _ = dataset.arrays(split)
    cols = dataset.input_idx
    if not len(X):
        width = len(lags) * (X.shape[2] if cols is None else len(cols)) + 1
        return np.empty((0, width), dtype=np.float32), np.empty(0)
    nv = naive_variance(raw_ret_column(X, dataset.scaler, _ret_index(dataset.feature_names)), vol_window)
    return tabular_rows(X, np.log(nv), lags, cols), nv


def realized_variance_of(dataset: Dataset, split: str) -> np.ndarray:
    """RV (N, H) of a split's window ends (the Dataset's volatility targets, ml.training.volatility)."""
    va = dataset.vol_arrays(split)
    if va is None:
        raise ValueError("lightgbm needs the Dataset's volatility targets (build_dataset with vol_window)")
    return np.asarray(va[1], dtype=np.float64)


def build_tables(dataset: Dataset, cfg: TrainConfig) -> GbmTables:
    lags, w = list(cfg.lightgbm.lags), cfg.model_vol_window
    X_tr, nv_tr = split_rows(dataset, "train", lags, w)
    X_va, nv_va = split_rows(dataset, "val", lags, w)
    q_tr = np.maximum(realized_variance_of(dataset, "train"), VAR_FLOOR) / nv_tr[:, None]
    q_va = np.maximum(realized_variance_of(dataset, "val"), VAR_FLOOR) / nv_va[:, None]
    if cfg.max_train_samples and len(X_tr) > cfg.max_train_samples:
        k = cfg.max_train_samples
        X_tr, q_tr = X_tr[-k:], q_tr[-k:]
        y_tr = dataset.y_train[-k:]
    else:
        y_tr = dataset.y_train
    return GbmTables(X_train=X_tr, X_val=X_va, y_train=np.asarray(y_tr, dtype=np.float64),
                     y_val=np.asarray(dataset.y_val, dtype=np.float64), q_train=q_tr, q_val=q_va,
                     columns=column_names(dataset.inputs, lags))


def _progress_callback(on_round: Callable[[int], None] | None):
    def callback(env) -> None:
        if on_round is not None and (env.iteration + 1) % PROGRESS_EVERY == 0:
            on_round(env.iteration + 1)
    callback.order = 30  # after early stopping's bookkeeping
    return callback


def binned(cfg: TrainConfig, tables: GbmTables):
    """(train, valid) lightgbm Datasets, binned once: binning 500+ columns costs more than a booster's
    rounds, and the bins do not depend on the label, so every booster reuses them with its own label."""
    import lightgbm as lgb

    params = {"max_bin": cfg.lightgbm.max_bin, "verbosity": -1, "num_threads": cfg.threads or 1,
              "data_random_seed": cfg.seed + 3, "deterministic": True, "force_col_wise": True}
    train = lgb.Dataset(tables.X_train, label=tables.y_train[:, 0], params=params, free_raw_data=True)
    valid = lgb.Dataset(tables.X_val, label=tables.y_val[:, 0], reference=train, params=params, free_raw_data=True)
    train.construct()
    valid.construct()
    return train, valid


def fit_booster(cfg: TrainConfig, kind: str, train, valid, t_tr: np.ndarray, t_va: np.ndarray, *,
                on_round: Callable[[int], None] | None = None):
    """One booster early-stopped on the validation rows: (booster, {rounds, best_iteration, val_loss,
    train_loss}). `train`/`valid` are binned() Datasets; t_* the booster's targets."""
    import lightgbm as lgb

    g = cfg.lightgbm
    params = booster_params(cfg, kind)
    train.set_label(t_tr)
    valid.set_label(t_va)
    evals: dict = {}
    # the training set among valid_sets only records its loss; early stopping watches the validation rows
    booster = lgb.train(params, train, num_boost_round=g.n_estimators, valid_sets=[train, valid],
                        valid_names=["train", "val"],
                        callbacks=[lgb.early_stopping(g.early_stopping_rounds, verbose=False),
                                   lgb.record_evaluation(evals), _progress_callback(on_round)])
    # LightGBM's gamma deviance is a sum over rows; per row it reads like the log loss of the classifiers
    per_row = params["metric"] == "gamma_deviance"
    curve = [v / (len(t_va) if per_row else 1) for v in evals.get("val", {}).get(params["metric"], [])]
    train_curve = [v / (len(t_tr) if per_row else 1) for v in evals.get("train", {}).get(params["metric"], [])]
    best = int(booster.best_iteration or len(curve))
    info = {"rounds": len(curve), "best_iteration": best,
            "val_loss": float(curve[best - 1]) if curve and best >= 1 else None,
            "train_loss": float(train_curve[best - 1]) if train_curve and best >= 1 else None}
    if best >= 1:  # keep only the rounds up to the best one: the saved model is the early-stopped one
        booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    return booster, info


def fit_gbm(cfg: TrainConfig, dataset: Dataset, *, done: dict[str, dict] | None = None,
            on_booster: Callable[[dict, dict[str, dict]], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> tuple[GbmModel, list[dict]]:
    """Fit every booster (direction then volatility, per horizon): (GbmModel, history).

    `done` maps booster keys ("direction/6") to {"model": booster text, "info": its fit record} of
    boosters already fitted (a resumed run skips them; JSON-ready, so a checkpoint can hold it).
    on_booster(info, done) runs after each booster; should_stop() is polled every PROGRESS_EVERY rounds
    and between boosters (TrainingCancelled).
    """
    import lightgbm as lgb

    if cfg.model_type != "lightgbm":
        raise ValueError(f"fit_gbm trains lightgbm, not {cfg.model_type!r}")
    tables = build_tables(dataset, cfg)
    done = dict(done or {})
    data: list = []  # the binned Datasets, made when the first booster is fitted
    history: list[dict] = []
    boosters: dict[str, list] = {k: [] for k in KINDS}
    total = len(KINDS) * len(dataset.horizons)

    def check(_round: int = 0) -> None:
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training of {cfg.pair}/lightgbm cancelled")

    for kind in KINDS:
        for j, h in enumerate(dataset.horizons):
            key = f"{kind}/{h}"
            check()
            t0 = time.perf_counter()
            if key in done:
                booster = lgb.Booster(model_str=done[key]["model"])
                info = {**done[key].get("info", {}), "resumed": True}
            else:
                if kind == "direction":
                    targets = (tables.y_train[:, j], tables.y_val[:, j])
                else:
                    targets = (tables.q_train[:, j], tables.q_val[:, j])
                if not data:
                    data.extend(binned(cfg, tables))
                booster, info = fit_booster(cfg, kind, data[0], data[1], targets[0], targets[1], on_round=check)
                done[key] = {"model": booster.model_to_string(), "info": info}
            boosters[kind].append(booster)
            entry = {"booster": key, "kind": kind, "horizon": int(h), "index": len(history) + 1, "total": total,
                     "seconds": time.perf_counter() - t0, **info}
            history.append(entry)
            if on_booster is not None:
                on_booster(entry, done)
    return assemble(cfg, dataset, boosters), history


def assemble(cfg: TrainConfig, dataset: Dataset, boosters: dict[str, list]) -> GbmModel:
    """The GbmModel of a run's boosters ({"direction": [per horizon], "volatility": [...]})."""
    return GbmModel(horizons=list(dataset.horizons), lags=list(cfg.lightgbm.lags),
                    vol_window=cfg.model_vol_window, feature_names=list(dataset.feature_names),
                    direction=list(boosters["direction"]), volatility=list(boosters["volatility"]),
                    params=booster_params(cfg, "direction") | {"objective": None, "metric": None},
                    inputs=list(dataset.input_features) if dataset.input_features else None)


def model_from_done(cfg: TrainConfig, dataset: Dataset, done: dict[str, dict]) -> GbmModel:
    """The GbmModel of a finished run's `done` boosters (fit_gbm's record, e.g. from a checkpoint)."""
    import lightgbm as lgb

    boosters: dict[str, list] = {k: [] for k in KINDS}
    for kind in KINDS:
        for h in dataset.horizons:
            entry = done.get(f"{kind}/{h}")
            if entry is None:
                raise ValueError(f"the run has no {kind}/{h} booster")
            boosters[kind].append(lgb.Booster(model_str=entry["model"]))
    return assemble(cfg, dataset, boosters)


def dataset_outputs(model: GbmModel, dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits (N, H), o (N, H), NV (N,)) of a Dataset split."""
    rows, nv = split_rows(dataset, split, model.lags, model.vol_window)
    logits, o = model.outputs_rows(rows)
    return logits, o, nv


# ----------------------------------------------------------------------------- the run's result


class GbmTrainResult(TrainResult):
    """A TrainResult whose model file is the boosters' document (GBM_FILE) instead of torch weights."""

    def to_registry_payload(self) -> dict:
        payload = super().to_registry_payload()
        files = dict(payload["files"])
        files.pop(WEIGHTS_FILE, None)
        files[GBM_FILE] = self.state_dict
        return {"meta": payload["meta"], "files": files}


def build_gbm_result(cfg: TrainConfig, dataset: Dataset, model: GbmModel, history: list[dict],
                     train_seconds: float) -> GbmTrainResult:
    """Calibrate on the validation logits, evaluate on the test split, package the run."""
    calibrator, metrics, p_test, test_var = evaluate_gbm(model, dataset, cfg)
    summary = dataset.summary()
    direction = [e for e in history if e["kind"] == "direction"]
    rounds = sum(int(e.get("rounds") or e.get("best_iteration") or 0) for e in history)
    early = any(e.get("rounds") and e.get("best_iteration") and e["rounds"] < cfg.lightgbm.n_estimators
                for e in history)
    primary = direction[0] if direction else {}
    return GbmTrainResult(
        pair=cfg.pair,
        model_type=cfg.model_type,
        state_dict=model.to_bytes(),
        scaler=dataset.scaler.to_json(),
        feature_names=list(dataset.feature_names),
        feature_hash=feature_hash(list(dataset.feature_names)),
        config=cfg.model_dump(),
        model_spec={"type": cfg.model_type, "n_features": dataset.n_inputs,
                    "n_horizons": len(dataset.horizons), "horizons": list(dataset.horizons),
                    "seq_len": model.seq_len, "volatility": True, "vol_window": model.vol_window,
                    "lags": list(model.lags), "columns": len(model.lags) * dataset.n_inputs + 1,
                    "params": leaf_count(model),  # the fitted numbers: one value per leaf
                    "n_trees": int(sum(b.num_trees() for b in model.direction + model.volatility)),
                    "trees": {e["booster"]: int(e.get("best_iteration") or 0) for e in history},
                    "lightgbm": cfg.lightgbm.model_dump()},
        data_range=registry_data_range(summary),
        metrics=metrics,
        calibration=calibrator.to_dict(),
        epochs_run=rounds,
        best_epoch=int(primary.get("best_iteration") or 0),
        stopped="early_stopping" if early else "completed",
        history=history,
        trained_at=now_ms(),
        train_seconds=train_seconds,
        test_ts=np.asarray(dataset.ts_test),
        test_probs=p_test,
        test_var=test_var,
        input_features=list(dataset.input_features) if dataset.input_features else None,
        selection=dataset.selection,
    )


def leaf_count(model: GbmModel) -> int:
    """Leaves over every tree of every booster (each holds one fitted value)."""
    return int(sum(t["num_leaves"] for b in model.direction + model.volatility for t in b.dump_model()["tree_info"]))


def train_gbm(cfg: TrainConfig, dataset: Dataset, *, on_epoch: Callable[[dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> GbmTrainResult:
    """A prepared Dataset -> GbmTrainResult in this process (TrainingCancelled on a stop).

    on_epoch gets {epoch, total, loss, val_loss, eta_s} after every booster, as the networks' loop
    reports its epochs.
    """
    t0 = time.perf_counter()

    def on_booster(info: dict, _done: dict) -> None:
        if on_epoch is not None:
            elapsed = time.perf_counter() - t0
            on_epoch({"epoch": info["index"], "total": info["total"], "loss": info.get("train_loss"),
                      "val_loss": info.get("val_loss"),
                      "eta_s": elapsed / info["index"] * (info["total"] - info["index"])})

    model, history = fit_gbm(cfg, dataset, on_booster=on_booster, should_stop=should_stop)
    return build_gbm_result(cfg, dataset, model, history, time.perf_counter() - t0)


def evaluate_gbm(model: GbmModel, dataset: Dataset, cfg: TrainConfig
                 ) -> tuple[Calibrator, dict, np.ndarray, np.ndarray]:
    """The networks' evaluation (ml.training.evaluate.evaluate_outputs) of the boosters' outputs: the
    calibrator fitted on the validation logits, test metrics (direction per horizon against the base
    rate, volatility against the naive forecast), calibrated test P(up), predicted test variance."""
    logits_val, _, _ = dataset_outputs(model, dataset, "val")
    logits_test, o_test, nv_test = dataset_outputs(model, dataset, "test")
    calibrator, metrics, p_test = evaluate_outputs(dataset, cfg, logits_val=logits_val, logits_test=logits_test,
                                                   o_test=o_test, nv_test=nv_test)
    return calibrator, metrics, p_test, predicted_variance(o_test, nv_test)

