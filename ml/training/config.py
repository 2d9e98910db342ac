"""What one training run depends on: TrainConfig (saved with every model version) and model profiles.

Defaults come from the settings (model profile, training section, label horizons, split); a run's
config is validated once here, so the loop, Ray Train and the registry all see the same values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ml.config import PAIR_PATTERN, LightGbmSettings
from ml.training.nets import MODEL_TYPES

GBM_TYPE = "lightgbm"  # boosted trees (ml.training.gbm); MODEL_TYPES are the networks
TRAINABLE_TYPES = (*MODEL_TYPES, GBM_TYPE)


def model_profile(settings, name: str | None = None):
    """(name, ProfileSettings) of a model profile (default: settings.model.profile); ValueError if unknown."""
    name = name or settings.model.profile
    if name not in settings.model.profiles:
        raise ValueError(f"unknown profile {name!r}; one of {', '.join(settings.model.profiles)}")
    return name, settings.model.profiles[name]


class TrainConfig(BaseModel):
    """Everything one training run depends on (saved with the model version)."""

    model_config = ConfigDict(extra="forbid")

    pair: str = Field(pattern=PAIR_PATTERN)
    model_type: Literal["lstm", "gru", "cnn", "transformer", "lightgbm"] = "lstm"
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
    horizons: list[int] = [1, 3, 6, 12]
    vol_window: int = Field(20, ge=2, description="rows of the naive trailing volatility (see model_vol_window)")
    vol_loss_weight: float = Field(0.5, ge=0.0, description="weight of the volatility loss beside the BCE")
    select_k: int | None = Field(None, ge=1, description="input features kept by ml.features.selection "
                                 "(None: all)")
    bars: int | None = Field(None, ge=300, description="history length in candles (None: the source's default)")
    train_fraction: float = 0.7
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    purge: int | None = Field(None, ge=1, description="rows left out between splits (default: max horizon)")
    max_train_samples: int | None = Field(None, ge=1, description="keep only the newest N training windows")
    calibration: Literal["temperature", "temperature_bias"] = "temperature"
    threads: int = Field(0, ge=0, description="torch threads (0: 1 in-process, one per reserved CPU under Ray)")
    lightgbm: LightGbmSettings | None = Field(None, description="the lightgbm run's tree parameters "
                                              "(from model.lightgbm; None for networks)")

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
        if self.model_type == GBM_TYPE:
            if self.lightgbm is None:
                self.lightgbm = LightGbmSettings()
            if max(self.lightgbm.lags) >= self.seq_len:
                raise ValueError(f"lightgbm lag {max(self.lightgbm.lags)} needs seq_len > it, got {self.seq_len}")
        return self

    @property
    def model_vol_window(self) -> int:
        """Rows of the naive volatility this run's model uses: vol_window, or the whole window when a run
        asks for a shorter seq_len (the settings' profiles are validated to be >= vol_window). Saved in
        the model spec, so serving computes the same naive forecast from the window."""
        return min(self.vol_window, self.seq_len)

    @property
    def fractions(self) -> tuple[float, float, float]:
        return self.train_fraction, self.val_fraction, self.test_fraction

    @classmethod
    def from_settings(cls, pair: str, model_type: str | None = None, *, settings=None,
                      **overrides: Any) -> TrainConfig:
        """Defaults from the settings (model profile, training section, label horizons, split).

        Overrides win, e.g. from_settings("BTC", "gru", epochs=5, profile="full", hidden=64).
        None values in overrides are ignored (so optional API fields can be passed straight in).
        A single `horizon` (the HTTP body's field) is added to the configured horizons: one network
        answers all of them, so the default horizon stays served.
        """
        if settings is None:
            from ml.config import get_settings

            settings = get_settings()
        overrides = {k: v for k, v in overrides.items() if v is not None}
        model_type = model_type or overrides.pop("model_type", None) or settings.model.default_type
        if model_type not in TRAINABLE_TYPES:
            raise ValueError(f"unknown model type {model_type!r}; one of {', '.join(TRAINABLE_TYPES)}")
        profile_name, prof = model_profile(settings, overrides.pop("profile", None))
        t = settings.training
        values: dict[str, Any] = {
            "pair": pair, "model_type": model_type, "profile": profile_name,
            "layers": prof.layers, "hidden": prof.hidden, "dropout": prof.dropout, "seq_len": prof.seq_len,
            "epochs": t.epochs, "batch_size": t.batch_size, "learning_rate": t.learning_rate,
            "patience": t.patience, "seed": t.seed, "horizons": list(settings.labels.horizons),
            "vol_window": settings.labels.vol_window, "vol_loss_weight": t.vol_loss_weight,
            "select_k": settings.features.select_k,
            "train_fraction": settings.split.train, "val_fraction": settings.split.val,
            "test_fraction": settings.split.test,
        }
        if "horizon" in overrides:  # the HTTP body's single `horizon`
            extra = int(overrides.pop("horizon"))
            base = list(overrides.get("horizons", values["horizons"]))
            overrides["horizons"] = sorted(set(base) | {extra})
        if model_type == GBM_TYPE:  # a request's learning rate is the trees' shrinkage; epochs do not apply
            gbm = settings.model.lightgbm.model_dump() | dict(overrides.pop("lightgbm", None) or {})
            if "learning_rate" in overrides:
                gbm["learning_rate"] = overrides.pop("learning_rate")
            values["lightgbm"] = gbm
        values.update(overrides)
        return cls(**values)

    def model_kwargs(self) -> dict[str, Any]:
        return {"layers": self.layers, "hidden": self.hidden, "dropout": self.dropout, "seq_len": self.seq_len}

    def torch_threads(self) -> int:
        """Intra-op threads. These nets are small: on 2 cores a second thread gains little when the
        machine is idle and costs several times the epoch time when other processes compete."""
        return self.threads or 1
