"""One model answer for every horizon at once, and the prediction of one horizon picked from it.

A forward pass gives a model's whole forecast: P(up) and the served volatility per horizon (the
loader's `forecast(x)`, shape (2H,), `ml.registry.loader`). Serving computes and caches that
"record" once per pair, model version and candle; a request then picks the horizon it asks for, so
`?horizon=` and the close events never cost another forward pass.

A record (JSON, what the cache holds):
  {modelType, modelVersion, asOf, stale, fallback, reason?, features,
   horizons: {"1": {direction, probability, confidence, signal, volatility, targetTime}, ...},
   forecast: {horizons: [1, 3, ...], pUp: [...], volatility: [...]} | None, ensemble?}
`forecast` keeps the unrounded outputs (what an ensemble combines); it is never answered.
Each horizon is classified on its own (`ml.serving.signals.classify`): a horizon without an edge
answers 0.5 / HOLD whatever the others say. A fallback record has a neutral entry for every
horizon (probability 0.5, HOLD, `volatility: null`) and no `forecast`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ml.serving.signals import Signal, classify, neutral

VOL_DIGITS = 6  # significant digits of a served volatility


def round_volatility(v: float | None) -> float | None:
    """A served volatility: 6 significant digits; None for a missing, non-finite or negative value."""
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v) or v < 0:
        return None
    return float(f"{v:.{VOL_DIGITS}g}")


def horizon_entry(s: Signal, volatility: float | None, h: int, as_of: int | None,
                  timeframe_ms: int | None) -> dict[str, Any]:
    """One horizon of a record: its own signal, its volatility and when its outcome is known."""
    target = as_of + int(h) * timeframe_ms if as_of is not None and timeframe_ms else None
    return {"direction": s.direction, "probability": s.probability, "confidence": round(s.confidence, 6),
            "signal": s.signal, "volatility": round_volatility(volatility), "targetTime": target}


def split_forecast(values: Sequence[float] | np.ndarray, n_horizons: int) -> tuple[np.ndarray, np.ndarray]:
    """(P(up) (H,), volatility (H,)) of a forecast vector (2H,); ValueError for another shape."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (2 * n_horizons,):
        raise ValueError(f"a forecast of {n_horizons} horizons has {2 * n_horizons} values, got {arr.shape}")
    return arr[:n_horizons], arr[n_horizons:]


def forecast_record(values: Sequence[float] | np.ndarray, horizons: Sequence[int], *, model_type: str,
                    version: str, as_of: int, timeframe_ms: int, stale: bool, features: dict[str, Any],
                    strong: float, weak: float) -> dict[str, Any]:
    """The record of a model answer: `values` is its forecast (2H,) = P(up) per horizon, then the
    served volatility per horizon, in the order of `horizons`."""
    hs = [int(h) for h in horizons]
    p_up, vol = split_forecast(values, len(hs))
    entries = {}
    for h, p, v in zip(hs, p_up, vol, strict=True):
        # Rounded once, so probability and confidence shown agree exactly (confidence = |p - 0.5| * 2).
        entries[str(h)] = horizon_entry(classify(round(float(p), 6), strong, weak), float(v), h, as_of,
                                        timeframe_ms)
    return {"modelType": model_type, "modelVersion": version, "asOf": as_of, "stale": bool(stale),
            "fallback": False, "features": features, "horizons": entries,
            "forecast": {"horizons": hs, "pUp": [float(p) for p in p_up], "volatility": [float(v) for v in vol]}}


def fallback_record(*, model_type: str, version: str | None, horizons: Sequence[int], reason: str,
                    as_of: int | None = None, timeframe_ms: int | None = None) -> dict[str, Any]:
    """The neutral record answered without a model answer (no model, no data, an error): every
    horizon 0.5 / HOLD with `volatility: null`."""
    s = neutral()
    return {"modelType": model_type, "modelVersion": version, "asOf": as_of, "stale": False, "fallback": True,
            "reason": reason, "features": {"count": 0, "sample": {}},
            "horizons": {str(int(h)): horizon_entry(s, None, int(h), as_of, timeframe_ms) for h in horizons},
            "forecast": None}


def record_horizons(record: dict[str, Any]) -> list[int]:
    """The horizons a record answers, in its order."""
    return [int(h) for h in record.get("horizons") or {}]


def pick(record: dict[str, Any], h: int) -> dict[str, Any]:
    """The prediction of horizon `h` (the API's `Prediction`): that horizon's fields at the top, the
    whole `horizons` block beside them. KeyError for a horizon the record does not have."""
    entry = record["horizons"][str(int(h))]
    out: dict[str, Any] = {
        "direction": entry["direction"], "probability": entry["probability"], "confidence": entry["confidence"],
        "signal": entry["signal"], "volatility": entry["volatility"], "modelType": record["modelType"],
        "modelVersion": record["modelVersion"], "horizon": int(h), "asOf": record["asOf"],
        "targetTime": entry["targetTime"], "stale": record["stale"], "fallback": record["fallback"],
    }
    if record.get("reason"):
        out["reason"] = record["reason"]
    out["features"] = record["features"]
    out["horizons"] = record["horizons"]
    if record.get("ensemble") is not None:
        out["ensemble"] = record["ensemble"]
    return out


def outputs_of(record: dict[str, Any]) -> np.ndarray | None:
    """The unrounded forecast (2H,) of a model record (None for a fallback): what an ensemble combines."""
    fc = record.get("forecast")
    if not fc:
        return None
    return np.asarray([*fc["pUp"], *fc["volatility"]], dtype=np.float64)


def default_horizon(horizons: Sequence[int], configured: int) -> int:
    """The horizon answered when a request names none: `labels.default_horizon` when the model
    predicts it, else the model's first horizon (a version trained with other horizons)."""
    hs = [int(h) for h in horizons]
    return int(configured) if int(configured) in hs else hs[0]


__all__ = ["default_horizon", "fallback_record", "forecast_record", "horizon_entry", "outputs_of", "pick",
           "record_horizons", "round_volatility", "split_forecast"]
