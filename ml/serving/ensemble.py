"""Serving an ensemble: combine member outputs with a registry document, and who answers `model=ensemble`.

Pure (numpy only). An ensemble version's document (its meta, ml.training.ensemble) names its members
`{type: version}` and holds per-horizon stacking weights `weights[h][type]` and `bias[h]`. Serving
asks exactly those member versions (not whatever is production now: the weights were fitted on
them) and combines their `forecast` outputs, each (2H,) = P(up) per horizon then volatility per
horizon, with `combine`.

When no ensemble is production (none built yet, or none beat its members), `model=ensemble` is
answered by the best single member (lowest test Brier on the ensemble's test rows, `bestMember` /
`answered_by`); ml.serving.ensemble_choice decides that from the production versions and says so in
the answer (`ensemble: {promoted: false, answeredBy, reason}`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

P_CLIP = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), P_CLIP, 1.0 - P_CLIP)
    return np.log(p) - np.log1p(-p)


def members_of(doc: Mapping[str, Any]) -> dict[str, str]:
    """{model type: version} of the member versions serving must ask."""
    members = doc.get("members") or {}
    if not isinstance(members, Mapping) or len(members) < 2:
        raise ValueError("ensemble document has fewer than 2 members")
    return {str(t): str(v) for t, v in members.items()}


def combine(doc: Mapping[str, Any], outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The ensemble's (2H,) forecast from its members' (2H,) outputs (the loader's `forecast` layout).

    P(up)_h = sigmoid(bias_h + sum_i weights_h[i] * logit(p_ih)); volatility_h = exp(mean_i log vol_ih)
    (the mean of the members' log variances). Every member of the document must be in `outputs`.
    """
    horizons = [str(h) for h in doc["horizons"]]
    n_h = len(horizons)
    types = list(members_of(doc))
    missing = [t for t in types if t not in outputs]
    if missing:
        raise KeyError(f"ensemble outputs lack member(s): {', '.join(missing)}")
    arr = {}
    for t in types:
        a = np.asarray(outputs[t], dtype=np.float64)
        if a.shape != (2 * n_h,):
            raise ValueError(f"member {t} output has shape {a.shape}, expected ({2 * n_h},)")
        arr[t] = a
    p = np.empty(n_h)
    for j, h in enumerate(horizons):
        w = doc["weights"][h]
        z = float(doc["bias"][h]) + sum(float(w.get(t, 0.0)) * float(_logit(arr[t][j])) for t in types)
        p[j] = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    vols = np.stack([np.maximum(arr[t][n_h:], 1e-300) for t in types])
    return np.concatenate([p, np.exp(np.mean(np.log(vols), axis=0))])


def answered_by(doc: Mapping[str, Any]) -> str | None:
    """The member that answers `model=ensemble` when this document is not promoted: the one with the
    lowest test Brier on the ensemble's common test rows (`bestMember`)."""
    best = doc.get("bestMember")
    return str(best) if best else None
