"""Multiplexed model ids, `PAIR:model_type:version`: what routes a request to a predictor replica
that already holds that model version."""

from __future__ import annotations

import re

from ml.config import PAIR_PATTERN
from ml.queue.requests import ENSEMBLE_TYPE, accepted_model_types

MODEL_ID_SEP = ":"
ENSEMBLE = ENSEMBLE_TYPE  # the type combined from the enabled types' versions (ml.serving.ensemble_choice)


def accepted_types(enabled: list[str]) -> list[str]:
    """The model types a request may name: the enabled ones, and `ensemble` when at least two are (the
    training queue's own rule, so the API and the queue accept the same types)."""
    return accepted_model_types(enabled)


def model_id(pair: str, model_type: str, version: str) -> str:
    return MODEL_ID_SEP.join((pair, model_type, version))


def parse_model_id(mid: str) -> tuple[str, str, str]:
    """(pair, model_type, version) of a model id; ValueError for anything else (ids reach the
    registry's paths, so a bad pair is refused here)."""
    parts = mid.split(MODEL_ID_SEP)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"model id must be PAIR:model:version, got {mid!r}")
    if not re.fullmatch(PAIR_PATTERN, parts[0]):
        raise ValueError(f"invalid pair in model id {mid!r}")
    return parts[0], parts[1], parts[2]
