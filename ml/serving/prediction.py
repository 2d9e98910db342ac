"""The prediction a client reads: a model's answer (direction, probability, signal, volatility,
times, a few feature values, every horizon in `horizons`) or the neutral HOLD fallback when there is
no model, no data or an error, and the body of `GET /api/predictions/{pair}` around it. The
all-horizon record a prediction is picked from: `ml.serving.forecast`.

`ml.features` is imported lazily: a Serve replica sets its environment before the settings that
the feature module reads at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ml.serving.forecast import fallback_record, horizon_entry, pick
from ml.serving.signals import Signal, data_is_stale

# A few well-known features shown with every prediction (the rest: GET /api/features/{pair}).
SAMPLE_FEATURES = ("rsi_14", "macd_hist", "bb_pct_b", "stoch_k", "adx_14", "vol_ratio_20",
                   "volat_atr_pct_14", "ret_log_1")


def finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


class _LazyIndex(dict):
    """FEATURE_NAMES -> column, built on first use (see the module docstring)."""

    def _fill(self) -> None:
        if not self:
            from ml.features import FEATURE_NAMES

            self.update({name: i for i, name in enumerate(FEATURE_NAMES)})

    def __contains__(self, key: object) -> bool:
        self._fill()
        return super().__contains__(key)

    def __getitem__(self, key: str) -> int:
        self._fill()
        return super().__getitem__(key)


_INDEX = _LazyIndex()


def feature_sample(last: np.ndarray) -> dict[str, Any]:
    """`features` of a prediction: how many features the model read and SAMPLE_FEATURES' values."""
    from ml.features import FEATURE_NAMES

    sample = {}
    for name in SAMPLE_FEATURES:
        if name in _INDEX:
            sample[name] = finite_or_none(round(float(last[_INDEX[name]]), 6))
    return {"count": len(FEATURE_NAMES), "sample": sample}


def model_prediction(s: Signal, *, model_type: str, version: str, horizon: int, as_of: int, timeframe_ms: int,
                     stale: bool, last: np.ndarray, volatility: float | None = None) -> dict[str, Any]:
    """A one-horizon model answer (`ml.serving.forecast.forecast_record` makes the all-horizon one);
    `as_of` is the close time of the last candle of the window it read."""
    record = {"modelType": model_type, "modelVersion": version, "asOf": as_of, "stale": stale, "fallback": False,
              "features": feature_sample(last),
              "horizons": {str(int(horizon)): horizon_entry(s, volatility, horizon, as_of, timeframe_ms)}}
    return pick(record, horizon)


def fallback_prediction(*, model_type: str, version: str | None, horizon: int, reason: str,
                        as_of: int | None = None, timeframe_ms: int | None = None,
                        horizons: Sequence[int] | None = None) -> dict[str, Any]:
    """The neutral HOLD answered when there is no model, no data or an error (never scored live), at
    `horizon`, with a neutral entry for each of `horizons` (default: that one)."""
    hs = [int(h) for h in (horizons or [horizon])]
    if int(horizon) not in hs:
        hs.append(int(horizon))
    return pick(fallback_record(model_type=model_type, version=version, horizons=hs, reason=reason, as_of=as_of,
                                timeframe_ms=timeframe_ms), horizon)


def with_data_lag(pred: dict[str, Any], now_ms: int, timeframe_ms: int, max_lag_bars: int) -> dict[str, Any]:
    """A model answer on candles older than `max_lag_bars` bars, as a copy with `stale: true` and
    `reason: "data"` (applied when answering, so a cached answer ages too); else `pred` itself.
    Fallbacks keep their own reason."""
    if pred.get("fallback") or not data_is_stale(pred.get("asOf"), now_ms, timeframe_ms, max_lag_bars):
        return pred
    return {**pred, "stale": True, "reason": "data"}


def failure_cause(exc: BaseException) -> str:
    """`Type: last line` of an exception (a Ray error's cause, not its traceback), for a reason field."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def round_ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def prediction_body(pair: str, pred: dict[str, Any], hit: Any, elapsed_s: float, ts: int) -> dict[str, Any]:
    """The body of `GET /api/predictions/{pair}`: `hit` is the cache hit (None: computed now)."""
    body: dict[str, Any] = {"pair": pair, "prediction": pred, "timestamp": ts, "cached": hit is not None}
    if hit is not None:
        body["cacheAge"] = int(hit.age_s * 1000)
    body["responseTime"] = round_ms(elapsed_s)
    return body


__all__ = ["SAMPLE_FEATURES", "failure_cause", "fallback_prediction", "feature_sample", "finite_or_none",
           "model_prediction", "prediction_body", "round_ms", "with_data_lag"]
