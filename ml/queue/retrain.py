"""Periodic retraining's choice: the pair/model type whose production model is oldest by its training time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from ml.registry.production import Production


def model_age_ms(production: Production | None, now: int) -> float:
    """Age of a production version by when it was TRAINED (promotion can come much later).

    No model: infinitely old (it goes first). A version whose metadata lacks `trainedAt` is aged by
    its promotion time, or counts as trained at 0 without one.
    """
    if production is None:
        return math.inf
    age = production.age_ms(now)
    if age is None:
        age = max(0, int(now) - int(production.promoted_at or 0))
    return float(age)


def oldest(candidates: Iterable[tuple[str, str, Production | None]], now: int,
           eligible: Callable[[str, str], bool] | None = None) -> tuple[str, str] | None:
    """The eligible (pair, model type) whose production model is oldest at `now`; ties keep the
    candidates' order; None if none is eligible."""
    best: tuple[tuple[float, int], tuple[str, str]] | None = None
    for i, (pair, model, production) in enumerate(candidates):
        if eligible is not None and not eligible(pair, model):
            continue
        key = (-model_age_ms(production, now), i)
        if best is None or key < best[0]:
            best = (key, (pair, model))
    return None if best is None else best[1]
