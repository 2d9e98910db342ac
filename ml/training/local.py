"""`train_local`: one training run in this process, candles -> TrainResult (what `tbml train --local` runs).

Ray Train (actors.trainer) runs the same loop and builds the same result; only the placement differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pandas as pd

from ml.training.config import GBM_TYPE, TrainConfig
from ml.training.dataset import Dataset, load_training_candles, prepare_dataset
from ml.training.loop import TrainingCancelled, fit, new_model
from ml.training.nets import deterministic
from ml.training.result import TrainResult, build_result


def train_on_dataset(cfg: TrainConfig, dataset: Dataset, *, on_epoch=None, should_stop=None) -> TrainResult:
    """New model, fit, calibrate + evaluate: a prepared Dataset -> TrainResult (TrainingCancelled on a stop)."""
    if cfg.model_type == GBM_TYPE:  # boosted trees: their own fit, the same result (ml.training.gbm)
        from ml.training.gbm import train_gbm

        return train_gbm(cfg, dataset, on_epoch=on_epoch, should_stop=should_stop)
    t0 = time.perf_counter()
    with deterministic(cfg.seed, cfg.torch_threads()):
        model = new_model(cfg, dataset.n_inputs)
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
