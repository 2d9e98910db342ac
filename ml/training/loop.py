"""`fit`: the one training loop, run in-process (ml.training.local) and inside Ray Train workers.

Mini-batch AdamW on the total loss = BCE-with-logits of the direction logits + `vol_loss_weight` x
the gamma (QLIKE) loss q * exp(-o) + o of the log-variance ratios o against q = RV / NV
(ml.training.volatility). Early stopping on the validation TOTAL with the best weights restored. A
Dataset without volatility targets trains the direction logits only (BCE). Determinism: `fit` seeds torch (dropout) and numpy (shuffling) from `cfg.seed`, turns on
torch's deterministic algorithms and fixes the thread count, so the same seed, data and thread
count give bit-identical probabilities; `new_model` seeds the initial weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ml.training.config import TrainConfig
from ml.training.dataset import Dataset, train_arrays, train_vol_targets
from ml.training.nets import build_model, clone_state, deterministic, predict_logits, unwrap


class TrainingCancelled(RuntimeError):
    """Raised when a cancel (should_stop) stopped the training: nothing is to be registered."""


def new_model(cfg: TrainConfig, n_features: int) -> nn.Module:
    """A model for the config, initialised from `cfg.seed` (same seed, same initial weights).

    n_features is the number of inputs the model reads (Dataset.n_inputs after a feature selection).
    It has the volatility head (2 x horizons outputs)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model_type, n_features, len(cfg.horizons), volatility=True, **cfg.model_kwargs())


def _broadcast_from_rank0(x: float) -> float:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([x], dtype=torch.float64)
        dist.broadcast(t, src=0)
        return float(t.item())
    return x


def _bce(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def gamma_loss(o: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """mean(q * exp(-o) + o): the gamma deviance with a log link up to constants (QLIKE); minimised at
    o = ln E[q | x], and o = 0 is the naive trailing forecast (ml.training.volatility)."""
    return (q * torch.exp(-o.clamp(min=-30.0, max=30.0)) + o).mean()


def validation_losses(outputs: np.ndarray, y: np.ndarray, q: np.ndarray | None, vol_weight: float) -> dict:
    """{"bce", "vol" (None without targets), "total"} of eval-mode outputs on the validation rows."""
    h = y.shape[1]
    bce = _bce(outputs[:, :h], y)
    if q is None or outputs.shape[1] < 2 * h:
        return {"bce": bce, "vol": None, "total": bce}
    o = np.clip(outputs[:, h:2 * h], -30.0, 30.0)
    vol = float(np.mean(q * np.exp(-o) + o))
    return {"bce": bce, "vol": vol, "total": bce + vol_weight * vol}


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
    """Train `model` in place; early stopping on the validation total loss (BCE + vol_loss_weight x
    gamma loss, BCE alone without volatility targets); best weights restored at the end.

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
    q = train_vol_targets(dataset, cfg)
    n = len(y)
    if n == 0:
        raise ValueError("no training windows")
    X_val, y_val = dataset.X_val, dataset.y_val.astype(np.float64)
    q_val = None if dataset.q_val is None else np.asarray(dataset.q_val, dtype=np.float64)
    cols = dataset.input_idx
    n_h = y.shape[1]
    vol_weight = float(cfg.vol_loss_weight)
    use_vol = q is not None and vol_weight > 0
    core = unwrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    batch = max(1, cfg.batch_size // world)

    history: list[dict] = []
    best_val, best_epoch, bad_epochs, start_epoch = math.inf, 0, 0, 0
    best_state = clone_state(model)
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
                xw = X[idx] if cols is None else X[idx][:, :, cols]
                xb = torch.from_numpy(np.ascontiguousarray(xw, dtype=np.float32))
                yb = torch.from_numpy(np.ascontiguousarray(y[idx], dtype=np.float32))
                optimizer.zero_grad(set_to_none=True)
                out = model(xb)
                loss = loss_fn(out[:, :n_h], yb)
                if use_vol:
                    qb = torch.from_numpy(np.ascontiguousarray(q[idx], dtype=np.float32))
                    loss = loss + vol_weight * gamma_loss(out[:, n_h:2 * n_h], qb)
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
            parts = validation_losses(predict_logits(core, X_val, cols=cols), y_val,
                                      q_val if use_vol else None, vol_weight)
            val_loss = parts["total"]
            if world > 1:  # every rank takes rank 0's value, so early stopping agrees everywhere
                val_loss = _broadcast_from_rank0(val_loss)
            improved = val_loss < best_val - 1e-6
            if improved:
                best_val, best_epoch, bad_epochs = val_loss, epoch, 0
                best_state = clone_state(model)
            else:
                bad_epochs += 1
            now = time.perf_counter()
            epoch_s = now - t_epoch
            done = epoch - start_epoch
            remaining = cfg.epochs - epoch
            info = {
                "epoch": epoch, "total": cfg.epochs, "loss": total_loss / max(seen, 1),
                "val_loss": val_loss, "val_bce": parts["bce"], "val_vol": parts["vol"],
                "best_val_loss": best_val, "best_epoch": best_epoch,
                "improved": improved, "elapsed_s": now - t_start, "epoch_s": epoch_s,
                "samples_per_s": seen / epoch_s if epoch_s > 0 else float("nan"),
                "eta_s": (now - t_start) / done * remaining,
            }
            history.append({k: v for k, v in info.items() if k != "total"})
            stop_now = bad_epochs >= cfg.patience
            if stop_now:
                info["eta_s"] = 0.0
            if on_checkpoint is not None:
                on_checkpoint({"epoch": epoch, "model": clone_state(model), "optimizer": optimizer.state_dict(),
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
