"""The training pipeline, Ray-free (SPEC §4-§5).

candles -> feature matrix -> purged chronological train/val/test windows (scaler fitted on train
rows only) -> mini-batch training with early stopping on the validation loss (best weights
restored) -> calibration on validation (ml.training.calibration) -> test metrics against the base-rate
baseline (ml.evaluation.metrics) -> a TrainResult that the registry stores as a model version.

`fit` is the one training loop. `train_local` runs it in-process; `actors.trainer` runs the
same function inside Ray Train workers (with a shard of the training rows per worker and a DDP
model when there are several) and then calls the same `calibrate_and_evaluate` on the driver.

Determinism: `fit` seeds torch (weights, dropout) and numpy (shuffling) from `cfg.seed`, turns on
torch's deterministic algorithms and fixes the thread count, so the same seed, data and thread
count give bit-identical probabilities.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ml.config import PAIR_PATTERN
from ml.evaluation.metrics import base_rate_report, classification_report
from ml.training.calibration import Calibrator, fit_calibrator
from ml.training.dataset import Dataset, build_dataset
from ml.training.nets import MODEL_TYPES, build_model, count_params


def model_profile(settings, name: str | None = None):
    """(name, ProfileSettings) of a model profile (default: settings.model.profile); ValueError if unknown."""
    name = name or settings.model.profile
    if name not in settings.model.profiles:
        raise ValueError(f"unknown profile {name!r}; one of {', '.join(settings.model.profiles)}")
    return name, settings.model.profiles[name]


class TrainingCancelled(RuntimeError):
    """Raised when a cancel (should_stop) stopped the training: nothing is to be registered."""


class TrainConfig(BaseModel):
    """Everything one training run depends on (saved with the model version)."""

    model_config = ConfigDict(extra="forbid")

    pair: str = Field(pattern=PAIR_PATTERN)
    model_type: Literal["lstm", "gru", "cnn", "transformer"] = "lstm"
    profile: str = "quick"
    layers: int = Field(1, ge=1, le=8)
    hidden: int = Field(32, ge=1, le=1024)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    seq_len: int = Field(30, ge=2, le=1024)
    epochs: int = Field(30, ge=1, le=500)
    batch_size: int = Field(256, ge=1, le=65536)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    patience: int = Field(5, ge=1)
    seed: int = Field(7, ge=0)
    horizons: list[int] = [5]
    bars: int | None = Field(None, ge=300, description="history length in candles (None: the source's default)")
    train_fraction: float = 0.7
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    purge: int | None = Field(None, ge=1, description="rows left out between splits (default: max horizon)")
    max_train_samples: int | None = Field(None, ge=1, description="keep only the newest N training windows")
    calibration: Literal["temperature", "temperature_bias"] = "temperature"
    threads: int = Field(0, ge=0, description="torch threads (0: 1 in-process, one per reserved CPU under Ray)")

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, v: list[int]) -> list[int]:
        if not v or any(h < 1 for h in v) or len(set(v)) != len(v):
            raise ValueError(f"horizons must be distinct integers >= 1, got {v}")
        return [int(h) for h in v]

    @model_validator(mode="after")
    def _fractions(self) -> TrainConfig:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if min(self.train_fraction, self.val_fraction, self.test_fraction) <= 0 or abs(total - 1.0) > 1e-6:
            raise ValueError("train/val/test fractions must be > 0 and add up to 1")
        if self.purge is not None and self.purge < max(self.horizons):
            raise ValueError(f"purge ({self.purge}) must be >= the largest horizon ({max(self.horizons)})")
        return self

    @property
    def fractions(self) -> tuple[float, float, float]:
        return self.train_fraction, self.val_fraction, self.test_fraction

    @classmethod
    def from_settings(cls, pair: str, model_type: str | None = None, *, settings=None,
                      **overrides: Any) -> TrainConfig:
        """Defaults from the settings (model profile, training section, label horizons, split).

        Overrides win, e.g. from_settings("BTC", "gru", epochs=5, profile="full", hidden=64).
        None values in overrides are ignored (so optional API fields can be passed straight in).
        """
        if settings is None:
            from ml.config import get_settings

            settings = get_settings()
        overrides = {k: v for k, v in overrides.items() if v is not None}
        model_type = model_type or overrides.pop("model_type", None) or settings.model.default_type
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model type {model_type!r}; one of {', '.join(MODEL_TYPES)}")
        profile_name, prof = model_profile(settings, overrides.pop("profile", None))
        t = settings.training
        values: dict[str, Any] = {
            "pair": pair, "model_type": model_type, "profile": profile_name,
            "layers": prof.layers, "hidden": prof.hidden, "dropout": prof.dropout, "seq_len": prof.seq_len,
            "epochs": t.epochs, "batch_size": t.batch_size, "learning_rate": t.learning_rate,
            "patience": t.patience, "seed": t.seed, "horizons": list(settings.labels.horizons),
            "train_fraction": settings.split.train, "val_fraction": settings.split.val,
            "test_fraction": settings.split.test,
        }
        if "horizon" in overrides:  # the HTTP body's single `horizon`
            overrides["horizons"] = [int(overrides.pop("horizon"))]
        values.update(overrides)
        return cls(**values)

    def model_kwargs(self) -> dict[str, Any]:
        return {"layers": self.layers, "hidden": self.hidden, "dropout": self.dropout, "seq_len": self.seq_len}

    def torch_threads(self) -> int:
        """Intra-op threads. These nets are small: on 2 cores a second thread gains little when the
        machine is idle and costs several times the epoch time when other processes compete."""
        return self.threads or 1


# ----------------------------------------------------------------------------------------- data


def prepare_dataset(candles: pd.DataFrame, cfg: TrainConfig) -> Dataset:
    """Features -> labels -> purged chronological split -> scaler on train rows -> windows."""
    from ml.features import feature_matrix

    if candles is None or len(candles) == 0:
        raise ValueError(f"no candles for {cfg.pair}")
    features = feature_matrix(candles)
    close = pd.Series(np.asarray(candles["close"], dtype=np.float64),
                      index=np.asarray(candles["ts"], dtype=np.int64))
    return build_dataset(features, close, cfg.horizons, cfg.seq_len, cfg.fractions, cfg.purge,
                         materialize=False)


def load_training_candles(cfg: TrainConfig, settings=None, store=None) -> pd.DataFrame:
    """The candles a run trains on: the newest `cfg.bars` of the configured source."""
    from ml.data.sources import load_candles

    return load_candles(cfg.pair, settings, bars=cfg.bars, store=store)


def _windows_of(block: np.ndarray, seq_len: int) -> np.ndarray:
    return sliding_window_view(block, seq_len, axis=0).transpose(0, 2, 1)


def pack_dataset(dataset: Dataset, splits: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """A compact, picklable form of a Dataset (e.g. for the Ray object store).

    Windows of consecutive end rows overlap in all but one row, so a split is shipped as its block
    of seq_len - 1 + N scaled feature rows instead of N x seq_len rows; unpack_dataset rebuilds the
    windows as views. Splits not listed are shipped empty.
    """
    out: dict[str, Any] = {"seq_len": dataset.seq_len, "splits": {}}
    for name in ("train", "val", "test"):
        X, y = dataset.arrays(name)
        ends = getattr(dataset.split, name)
        ts = getattr(dataset, f"ts_{name}")
        if name not in splits:
            X, y, ends, ts = X[:0], y[:0], ends[:0], ts[:0]
        if len(y) > 1 and np.all(np.diff(ends) == 1):
            block = np.concatenate([X[0], X[1:, -1, :]]).astype(np.float32, copy=False)
            entry = {"block": np.ascontiguousarray(block)}
        else:
            entry = {"X": np.ascontiguousarray(X, dtype=np.float32)}
        entry.update(y=np.ascontiguousarray(y), ends=np.asarray(ends), ts=np.asarray(ts))
        out["splits"][name] = entry
    out.update(scaler=dataset.scaler.to_json(), feature_names=list(dataset.feature_names),
               horizons=list(dataset.horizons), purge=dataset.purge, ranges=dict(dataset.ranges),
               data_range=list(dataset.data_range))
    return out


def unpack_dataset(packed: dict) -> Dataset:
    """The Dataset of pack_dataset (windows as read-only views over the shipped row blocks)."""
    from ml.training.dataset import SplitIndices, StandardScaler

    seq_len = int(packed["seq_len"])
    arrays: dict[str, np.ndarray] = {}
    ends: dict[str, np.ndarray] = {}
    for name, entry in packed["splits"].items():
        arrays[f"X_{name}"] = _windows_of(entry["block"], seq_len) if "block" in entry else entry["X"]
        arrays[f"y_{name}"] = entry["y"]
        arrays[f"ts_{name}"] = entry["ts"]
        ends[name] = entry["ends"]
    return Dataset(
        scaler=StandardScaler.from_json(packed["scaler"]), feature_names=list(packed["feature_names"]),
        horizons=list(packed["horizons"]), seq_len=seq_len, purge=int(packed["purge"]),
        split=SplitIndices(train=ends["train"], val=ends["val"], test=ends["test"], purge=int(packed["purge"])),
        ranges=dict(packed["ranges"]), data_range=list(packed["data_range"]), **arrays,
    )


def train_arrays(dataset: Dataset, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Training windows and labels, cut to the newest `max_train_samples` if set."""
    X, y = dataset.X_train, dataset.y_train
    if cfg.max_train_samples and len(y) > cfg.max_train_samples:
        X, y = X[-cfg.max_train_samples:], y[-cfg.max_train_samples:]
    return X, y


# ----------------------------------------------------------------------------------------- loop


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, fix threads and use deterministic kernels for the duration (restored after)."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def new_model(cfg: TrainConfig, n_features: int) -> nn.Module:
    """A model for the config, initialised from `cfg.seed` (same seed, same initial weights)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model_type, n_features, len(cfg.horizons), **cfg.model_kwargs())


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def state_to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}


@torch.no_grad()
def predict_logits(model: nn.Module, X: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Raw logits (N, n_horizons) float64 in eval mode."""
    core = _unwrap(model)
    was_training = core.training
    core.eval()
    out = []
    for i in range(0, len(X), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(X[i:i + batch_size], dtype=np.float32))
        out.append(core(xb).double().numpy())
    core.train(was_training)
    if not out:
        return np.empty((0, 0))
    return np.concatenate(out)


def _broadcast_from_rank0(x: float) -> float:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([x], dtype=torch.float64)
        dist.broadcast(t, src=0)
        return float(t.item())
    return x


def _bce(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    stopped: str                 # "completed" | "early_stopping" | "cancelled"
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    train_samples: int = 0

    @property
    def cancelled(self) -> bool:
        return self.stopped == "cancelled"


def fit(model: nn.Module, dataset: Dataset, cfg: TrainConfig, *,
        on_epoch: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        start_state: dict | None = None,
        on_checkpoint: Callable[[dict], None] | None = None,
        shard: tuple[int, int] | None = None) -> FitResult:
    """Train `model` in place; early stopping on validation loss; best weights restored at the end.

    on_epoch(dict(epoch, total, loss, val_loss, best_val_loss, elapsed_s, epoch_s, eta_s)) after
    every epoch (epoch counts from 1). should_stop() is polled between batches; when it returns
    True the loop stops and the result says "cancelled". on_checkpoint(state) gets a resumable
    state after every epoch (model, optimizer, best weights, counters) and start_state resumes from
    one. shard=(rank, world_size) trains on this worker's share of every epoch's shuffled rows (the
    same number of batches on every rank, as DDP needs); the model may then be a DDP wrapper.
    Seeding of the initial weights is the caller's job (see new_model); shuffling and dropout are
    seeded here from cfg.seed.
    """
    rank, world = shard or (0, 1)
    X, y = train_arrays(dataset, cfg)
    n = len(y)
    if n == 0:
        raise ValueError("no training windows")
    X_val, y_val = dataset.X_val, dataset.y_val.astype(np.float64)
    core = _unwrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    batch = max(1, cfg.batch_size // world)

    history: list[dict] = []
    best_val, best_epoch, bad_epochs, start_epoch = math.inf, 0, 0, 0
    best_state = _clone_state(model)
    if start_state:
        core.load_state_dict(start_state["model"])
        optimizer.load_state_dict(start_state["optimizer"])
        best_state = start_state["best_state"]
        best_val = float(start_state["best_val_loss"])
        best_epoch = int(start_state["best_epoch"])
        bad_epochs = int(start_state["bad_epochs"])
        start_epoch = int(start_state["epoch"])
        history = list(start_state.get("history", []))

    stopped = "completed"
    t_start = time.perf_counter()
    epoch = start_epoch
    with deterministic(cfg.seed, cfg.torch_threads()):
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout masks: same on a resumed run
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
            if world > 1:  # pad to a multiple of world so every rank runs the same number of steps
                order = np.concatenate([order, order[: (-n) % world]])[rank::world]
            model.train()
            total_loss, seen = 0.0, 0
            cancelled = False
            for i in range(0, len(order), batch):
                if should_stop is not None and should_stop():
                    cancelled = True
                    break
                idx = np.sort(order[i:i + batch])  # sorted: faster gathers from the strided view
                xb = torch.from_numpy(np.ascontiguousarray(X[idx], dtype=np.float32))
                yb = torch.from_numpy(np.ascontiguousarray(y[idx], dtype=np.float32))
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                total_loss += float(loss.detach()) * len(idx)
                seen += len(idx)
            if cancelled:
                stopped = "cancelled"
                epoch -= 1
                break
            val_loss = _bce(predict_logits(core, X_val), y_val)
            if world > 1:  # every rank takes rank 0's value, so early stopping agrees everywhere
                val_loss = _broadcast_from_rank0(val_loss)
            improved = val_loss < best_val - 1e-6
            if improved:
                best_val, best_epoch, bad_epochs = val_loss, epoch, 0
                best_state = _clone_state(model)
            else:
                bad_epochs += 1
            now = time.perf_counter()
            epoch_s = now - t_epoch
            done = epoch - start_epoch
            remaining = cfg.epochs - epoch
            info = {
                "epoch": epoch, "total": cfg.epochs, "loss": total_loss / max(seen, 1),
                "val_loss": val_loss, "best_val_loss": best_val, "best_epoch": best_epoch,
                "improved": improved, "elapsed_s": now - t_start, "epoch_s": epoch_s,
                "samples_per_s": seen / epoch_s if epoch_s > 0 else float("nan"),
                "eta_s": (now - t_start) / done * remaining,
            }
            history.append({k: v for k, v in info.items() if k != "total"})
            stop_now = bad_epochs >= cfg.patience
            if stop_now:
                info["eta_s"] = 0.0
            if on_checkpoint is not None:
                on_checkpoint({"epoch": epoch, "model": _clone_state(model), "optimizer": optimizer.state_dict(),
                               "best_state": best_state, "best_val_loss": best_val, "best_epoch": best_epoch,
                               "bad_epochs": bad_epochs, "history": history, "metrics": info})
            if on_epoch is not None:
                on_epoch(info)
            if stop_now:
                stopped = "early_stopping"
                break
    core.load_state_dict(best_state)
    core.eval()
    return FitResult(epochs_run=epoch, best_epoch=best_epoch, best_val_loss=best_val, stopped=stopped,
                     history=history, elapsed_s=time.perf_counter() - t_start, train_samples=n)


# ---------------------------------------------------------------------------- calibrate + evaluate


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
    core = _unwrap(model)
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


# ----------------------------------------------------------------------------------------- result


@dataclass
class TrainResult:
    """A finished run: everything a model version needs, plus test predictions for analysis."""

    pair: str
    model_type: str
    state_dict: bytes
    scaler: dict
    feature_names: list[str]
    feature_hash: str
    config: dict
    model_spec: dict
    data_range: dict
    metrics: dict
    calibration: dict
    epochs_run: int
    best_epoch: int
    stopped: str
    history: list[dict]
    trained_at: int                      # epoch ms (UTC)
    train_seconds: float
    test_ts: np.ndarray | None = None    # prediction times of the test rows
    test_probs: np.ndarray | None = None  # calibrated P(up) (n_test, n_horizons)
    run_info: dict = field(default_factory=lambda: {"runner": "local"})

    @property
    def temperature(self) -> list[float | None]:
        return list(self.calibration.get("temperature", []))

    def to_registry_payload(self) -> dict:
        """{"meta": JSON-ready dict, "files": {"weights.pt": bytes, "scaler.json": bytes}}."""
        import json

        meta = {
            "pair": self.pair,
            "modelType": self.model_type,
            "model": self.model_spec,
            "featureNames": list(self.feature_names),
            "featureHash": self.feature_hash,
            "config": self.config,
            "dataRange": self.data_range,
            "metrics": self.metrics,
            "calibration": self.calibration,
            "temperature": self.temperature,
            "epochsRun": self.epochs_run,
            "bestEpoch": self.best_epoch,
            "stopped": self.stopped,
            "history": self.history,
            "trainedAt": self.trained_at,
            "trainSeconds": self.train_seconds,
            "run": self.run_info,
        }
        files = {"weights.pt": self.state_dict,
                 "scaler.json": json.dumps(self.scaler, sort_keys=True).encode()}
        return {"meta": meta, "files": files}


def feature_hash(names: list[str]) -> str:
    from ml.features import feature_names_hash

    return feature_names_hash(names)


def build_result(cfg: TrainConfig, dataset: Dataset, model: nn.Module, fit_result: FitResult,
                 train_seconds: float) -> TrainResult:
    """Calibrate + evaluate `model` (best weights loaded) and package the run."""
    core = _unwrap(model)
    calibrator, metrics, p_test = calibrate_and_evaluate(core, dataset, cfg)
    summary = dataset.summary()
    return TrainResult(
        pair=cfg.pair,
        model_type=cfg.model_type,
        state_dict=state_to_bytes(core.state_dict()),
        scaler=dataset.scaler.to_json(),
        feature_names=list(dataset.feature_names),
        feature_hash=feature_hash(list(dataset.feature_names)),
        config=cfg.model_dump(),
        model_spec={"type": cfg.model_type, "n_features": len(dataset.feature_names),
                    "n_horizons": len(dataset.horizons), "horizons": list(dataset.horizons),
                    "params": count_params(core), **cfg.model_kwargs()},
        data_range={"start": summary["dataRange"][0], "end": summary["dataRange"][1],
                    "splits": summary["ranges"], "counts": summary["counts"], "purge": summary["purge"],
                    "scaler_fit_rows": summary["scalerFitRows"], "base_rate": summary["baseRate"]},
        metrics=metrics,
        calibration=calibrator.to_dict(),
        epochs_run=fit_result.epochs_run,
        best_epoch=fit_result.best_epoch,
        stopped=fit_result.stopped,
        history=fit_result.history,
        trained_at=int(time.time() * 1000),
        train_seconds=train_seconds,
        test_ts=np.asarray(dataset.ts_test),
        test_probs=p_test,
    )


def train_on_dataset(cfg: TrainConfig, dataset: Dataset, *, on_epoch=None, should_stop=None) -> TrainResult:
    t0 = time.perf_counter()
    with deterministic(cfg.seed, cfg.torch_threads()):
        model = new_model(cfg, len(dataset.feature_names))
    fr = fit(model, dataset, cfg, on_epoch=on_epoch, should_stop=should_stop)
    if fr.cancelled:
        raise TrainingCancelled(f"training of {cfg.pair}/{cfg.model_type} cancelled after {fr.epochs_run} epoch(s)")
    with deterministic(cfg.seed, cfg.torch_threads()):
        return build_result(cfg, dataset, model, fr, time.perf_counter() - t0)


def train_local(cfg: TrainConfig, candles: pd.DataFrame | None = None, *, settings=None, store=None,
                on_epoch: Callable[[dict], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train in-process: candles (default: loaded from the configured source) -> TrainResult.

    Raises TrainingCancelled if should_stop() turned true.
    """
    if candles is None:
        candles = load_training_candles(cfg, settings, store)
    elif cfg.bars and len(candles) > cfg.bars:
        candles = candles.iloc[-cfg.bars:].reset_index(drop=True)
    dataset = prepare_dataset(candles, cfg)
    return train_on_dataset(cfg, dataset, on_epoch=on_epoch, should_stop=should_stop)
