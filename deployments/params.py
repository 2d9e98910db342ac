"""Path and query parameters of the HTTP API: the canonical pair (404 with `availablePairs`) and the
model type (404 in a path, 422 in a query, with `availableModels`; `model_types` are the accepted
ones, `ml.serving.model_ids.accepted_types`: the enabled types and `ensemble` when two or more are). Pairs are the configured ones
plus those found in the candle store (re-listed every PAIRS_REFRESH_S).
"""

from __future__ import annotations

import re
import time
from typing import Any

from deployments.errors import ApiError
from ml.config import PAIR_PATTERN
from ml.serving.model_ids import ENSEMBLE

PAIRS_REFRESH_S = 5.0
MAX_ECHO = 40
_PAIR_RE = re.compile(PAIR_PATTERN)


def short(x: str) -> str:
    """A caller's string as echoed in an error message (cut at MAX_ECHO characters)."""
    return x if len(x) <= MAX_ECHO else x[:MAX_ECHO] + "..."


class Params:
    """`settings` are the replica's settings; `store` the candle store (not read with a live source)."""

    def __init__(self, settings: Any, store: Any, model_types: list[str], default_model: str) -> None:
        self.settings = settings
        self.store = store
        self.model_types = model_types
        self.default_model = default_model
        self._pairs: list[str] = list(settings.pairs)
        self._pairs_set: set[str] = set(self._pairs)
        self._pairs_at = 0.0

    def known_pairs(self) -> list[str]:
        if time.monotonic() - self._pairs_at > PAIRS_REFRESH_S:
            self._pairs_at = time.monotonic()
            try:
                stored = self.store.pairs()
            except OSError:
                stored = []
            configured = list(self.settings.pairs)
            self._pairs = configured + sorted(set(stored) - set(configured))
            self._pairs_set = set(self._pairs)
        return self._pairs

    def pair(self, raw: str) -> str:
        """The canonical pair, or 404 with the available pairs."""
        pair = raw.strip().upper() if raw.isascii() and len(raw) <= 64 else raw
        pairs = self.known_pairs()
        if not _PAIR_RE.fullmatch(pair) or pair not in self._pairs_set:
            why = "is not a valid pair name (2-15 letters or digits, e.g. BTC)" \
                if not _PAIR_RE.fullmatch(pair) else "is not served here"
            raise ApiError(404, "pair_not_found", f"pair {short(raw)!r} {why}", availablePairs=pairs)
        return pair

    def model_query(self, model: str | None, ensemble: bool = False) -> str:
        """`?model=` (default: the default model type), 422 unless exactly an accepted type (the enum
        of the OpenAPI document: no case folding, no empty value). `?ensemble=true` is
        `model=ensemble`; with another explicit model it is a 422 `conflicting_parameters`."""
        if ensemble:
            if model is not None and model != ENSEMBLE:
                raise ApiError(422, "conflicting_parameters",
                               f"ensemble=true asks for model=ensemble, but model={short(model)!r} was given: "
                               "send one of them", availableModels=self.model_types)
            model = ENSEMBLE
        if model is None:
            return self.default_model
        mt = model
        if mt == ENSEMBLE and mt not in self.model_types:
            raise ApiError(422, "invalid_model", "model 'ensemble' needs at least two enabled model types "
                                                 f"(model.enabled_types: {', '.join(self.model_types)})",
                           availableModels=self.model_types)
        if mt not in self.model_types:
            raise ApiError(422, "invalid_model", f"model {short(model)!r} is not enabled",
                           availableModels=self.model_types)
        return mt

    def model_path(self, model: str) -> str:
        """`{model}` of a path, 404 unless exactly an enabled type."""
        mt = model
        if mt not in self.model_types:
            raise ApiError(404, "model_not_found", f"model type {short(model)!r} is not enabled",
                           availableModels=self.model_types)
        return mt
