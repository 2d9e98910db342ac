"""A training request and its one validation: the limits below are what the queue, the CLI and the
HTTP body (deployments.schemas.TrainBody) accept."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ml.pairs import InvalidPairError, validate_pair
from ml.training.ensemble import ENSEMBLE_TYPE
from ml.training.ensemble import MIN_MEMBERS as ENSEMBLE_MIN_MEMBERS

PRIORITY_MIN, PRIORITY_MAX = 1, 10
DEFAULT_PRIORITY = 5
EPOCHS_MIN, EPOCHS_MAX = 1, 500
BATCH_SIZE_MIN, BATCH_SIZE_MAX = 1, 65_536
HORIZON_MIN, HORIZON_MAX = 1, 10_000
MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX = 1, 100
LEARNING_RATE_MAX = 1.0  # learning rates lie in (0, LEARNING_RATE_MAX]
API_FIELDS = ("epochs", "batchSize", "learningRate", "priority", "maxAttempts", "horizon")


TRAINING_FIELDS = ("epochs", "batch_size", "learning_rate", "horizon")  # what an ensemble build has no use for


def accepted_model_types(enabled: Iterable[str]) -> list[str]:
    """The model types a request may name: the enabled ones, plus `ensemble` when at least two are enabled
    (it combines their production models)."""
    types = [str(t) for t in enabled if str(t) != ENSEMBLE_TYPE]
    return types + [ENSEMBLE_TYPE] if len(types) >= ENSEMBLE_MIN_MEMBERS else types


class QueueError(Exception):
    """An operation the queue's rules do not allow."""


class InvalidRequest(QueueError, ValueError):
    """A training request with bad parameters (the caller's fault: HTTP 400/422, exit code 2)."""


@dataclass
class TrainRequest:
    """What a caller asks for. `None` parameters take the training defaults from the settings.

    `config_overrides` are extra keyword overrides for `TrainConfig.from_settings` (not exposed over
    HTTP; used by operators' tooling and tests, e.g. a smaller `bars`).
    """

    pair: str
    model_type: str = "lstm"
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    horizon: int | None = None
    priority: int = DEFAULT_PRIORITY
    max_attempts: int | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    source: str = "api"

    def validate(self, model_types: Iterable[str] | None = None) -> TrainRequest:
        """Raise InvalidRequest naming the first bad field; return self."""
        try:
            validate_pair(self.pair)
        except InvalidPairError as exc:
            raise InvalidRequest(str(exc)) from None
        if not isinstance(self.model_type, str) or not self.model_type:
            raise InvalidRequest("modelType must be a non-empty string")
        if model_types is not None:
            allowed = accepted_model_types(model_types)
            if self.model_type not in allowed:
                raise InvalidRequest(f"unknown or disabled model type {self.model_type!r}; one of {allowed}")
        if self.model_type == ENSEMBLE_TYPE:
            given = [f for f in TRAINING_FIELDS if getattr(self, f) is not None]
            if given:
                raise InvalidRequest(f"an ensemble is built, not trained: {', '.join(given)} do not apply")
        _check_int("priority", self.priority, PRIORITY_MIN, PRIORITY_MAX)
        if self.epochs is not None:
            _check_int("epochs", self.epochs, EPOCHS_MIN, EPOCHS_MAX)
        if self.batch_size is not None:
            _check_int("batchSize", self.batch_size, BATCH_SIZE_MIN, BATCH_SIZE_MAX)
        if self.horizon is not None:
            _check_int("horizon", self.horizon, HORIZON_MIN, HORIZON_MAX)
        if self.max_attempts is not None:
            _check_int("maxAttempts", self.max_attempts, MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX)
        if self.learning_rate is not None and (
            isinstance(self.learning_rate, bool)
            or not isinstance(self.learning_rate, int | float)
            or not math.isfinite(self.learning_rate)
            or not 0 < self.learning_rate <= LEARNING_RATE_MAX
        ):
            raise InvalidRequest(f"learningRate must be a number in (0, {LEARNING_RATE_MAX:g}]")
        if not isinstance(self.config_overrides, dict):
            raise InvalidRequest("config_overrides must be a mapping")
        return self

    @classmethod
    def from_api(cls, pair: str, model_type: str, body: dict[str, Any] | None, *,
                 source: str = "api") -> TrainRequest:
        """From an HTTP body in camelCase: {epochs, batchSize, learningRate, priority, maxAttempts, horizon}."""
        body = dict(body or {})
        unknown = set(body) - set(API_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        return cls(
            pair=pair, model_type=model_type, epochs=body.get("epochs"), batch_size=body.get("batchSize"),
            learning_rate=body.get("learningRate"), horizon=body.get("horizon"),
            priority=body.get("priority", DEFAULT_PRIORITY), max_attempts=body.get("maxAttempts"),
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRequest:
        """From snake_case fields; unknown keys are ignored and None means "the default"."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and v is not None})


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
