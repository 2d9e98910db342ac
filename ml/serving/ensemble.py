"""Serving an ensemble: combine member outputs with a registry document, and who answers `model=ensemble`.

Pure (numpy; the stacking arithmetic is ml.training.ensemble's). An ensemble version's document (its meta, ml.training.ensemble) names its members
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

from collections.abc import Mapping
from typing import Any

import numpy as np

from ml.training.ensemble import MIN_MEMBERS, combine_logits, combine_volatility, logit


def members_of(doc: Mapping[str, Any]) -> dict[str, str]:
    """{model type: version} of the member versions serving must ask."""
    members = doc.get("members") or {}
    if not isinstance(members, Mapping) or len(members) < MIN_MEMBERS:
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
    # the functions the build fitted and scored the stack with, so serving combines exactly as it did
    p = np.empty(n_h)
    for j, h in enumerate(horizons):
        w = doc["weights"][h]
        z = logit(np.array([arr[t][j] for t in types]))
        p[j] = float(combine_logits(z, np.array([float(w.get(t, 0.0)) for t in types]), float(doc["bias"][h])))
    return np.concatenate([p, combine_volatility(np.stack([arr[t][n_h:] for t in types]))])


def answered_by(doc: Mapping[str, Any]) -> str | None:
    """The member that answers `model=ensemble` when this document is not promoted: the one with the
    lowest test Brier on the ensemble's common test rows (`bestMember`)."""
    best = doc.get("bestMember")
    return str(best) if best else None
