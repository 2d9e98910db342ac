"""TrainResult: a finished run, and the payload (meta + files) the registry stores as a model version."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from ml.clock import now_ms
from ml.training.config import TrainConfig
from ml.training.dataset import Dataset
from ml.training.evaluate import calibrate_and_evaluate, network_outputs
from ml.training.loop import FitResult
from ml.training.nets import count_params, state_to_bytes, unwrap
from ml.training.volatility import predicted_variance


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
    test_var: np.ndarray | None = None    # predicted per-bar variance (n_test, n_horizons); None without targets
    run_info: dict = field(default_factory=lambda: {"runner": "local"})
    input_features: list[str] | None = None  # the selected columns the model reads (None: all feature_names)
    selection: dict | None = None            # how they were chosen (ml.features.selection)

    @property
    def temperature(self) -> list[float | None]:
        return list(self.calibration.get("temperature", []))

    def to_registry_payload(self) -> dict:
        """{"meta": JSON-ready dict, "files": {"weights.pt": bytes, "scaler.json": bytes}}."""
        meta = {
            "pair": self.pair,
            "modelType": self.model_type,
            "model": self.model_spec,
            "featureNames": list(self.feature_names),
            "featureHash": self.feature_hash,
            "inputFeatures": list(self.input_features) if self.input_features else None,
            "featureSelection": self.selection,
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
    core = unwrap(model)
    calibrator, metrics, p_test = calibrate_and_evaluate(core, dataset, cfg)
    test_var = None
    if dataset.nv_test is not None:
        _, o_test = network_outputs(core, dataset, "test")
        test_var = predicted_variance(np.zeros_like(p_test) if o_test is None else o_test, dataset.nv_test)
    summary = dataset.summary()
    return TrainResult(
        pair=cfg.pair,
        model_type=cfg.model_type,
        state_dict=state_to_bytes(core.state_dict()),
        scaler=dataset.scaler.to_json(),
        feature_names=list(dataset.feature_names),
        feature_hash=feature_hash(list(dataset.feature_names)),
        config=cfg.model_dump(),
        model_spec={"type": cfg.model_type, "n_features": dataset.n_inputs,
                    "n_horizons": len(dataset.horizons), "horizons": list(dataset.horizons),
                    "vol_head": _outputs_vol(core, dataset),
                    "volatility": _outputs_vol(core, dataset) and _vol_trained(dataset, cfg),
                    "vol_window": cfg.model_vol_window,
                    "params": count_params(core), **cfg.model_kwargs()},
        data_range=registry_data_range(summary),
        metrics=metrics,
        calibration=calibrator.to_dict(),
        epochs_run=fit_result.epochs_run,
        best_epoch=fit_result.best_epoch,
        stopped=fit_result.stopped,
        history=fit_result.history,
        trained_at=now_ms(),
        train_seconds=train_seconds,
        test_ts=np.asarray(dataset.ts_test),
        test_probs=p_test,
        test_var=test_var,
        input_features=list(dataset.input_features) if dataset.input_features else None,
        selection=dataset.selection,
    )


def registry_data_range(summary: dict) -> dict:
    """A version's `dataRange` from `Dataset.summary()` (every model type stores the same shape)."""
    return {"start": summary["dataRange"][0], "end": summary["dataRange"][1], "splits": summary["ranges"],
            "counts": summary["counts"], "purge": summary["purge"], "scaler_fit_rows": summary["scalerFitRows"],
            "base_rate": summary["baseRate"]}


def _vol_trained(dataset: Dataset, cfg: TrainConfig) -> bool:
    """Whether the loop trained the volatility head (volatility targets and a positive `vol_loss_weight`;
    ml.training.loop). The spec's `volatility` (what serving reads) needs it: an untrained head would
    scale the naive forecast by its random initial weights, so such a version answers the naive
    forecast; `vol_head` says whether the weights have the head (how to build the network)."""
    return dataset.q_train is not None and cfg.vol_loss_weight > 0


def _outputs_vol(model: nn.Module, dataset: Dataset) -> bool:
    """Whether the network outputs the log-variance ratios after the direction logits (2H outputs)."""
    import torch


    x = torch.zeros((1, dataset.seq_len, dataset.n_inputs))
    was = model.training
    model.eval()
    with torch.no_grad():
        n_out = int(model(x).shape[-1])
    model.train(was)
    return n_out == 2 * len(dataset.horizons)
