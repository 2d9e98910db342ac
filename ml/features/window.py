"""The serving window of the feature matrix: `latest_window` computes the newest rows from the tail of
the candles, and `encode_window` / `decode_window` carry it as a compact JSON value (what the feature
deployment returns and what Redis keeps under the features key).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pandas as pd

from ml.clock import now_ms
from ml.features import indicators as ind
from ml.features.matrix import (
    _SAR_ACCELERATION,
    _SAR_MAXIMUM,
    LOOKBACK_BARS,
    WARMUP_BARS,
    _arrays,
    _compute,
    _frame,
)


def latest_window(candles: pd.DataFrame, rows: int) -> pd.DataFrame:
    """The last `rows` rows of feature_matrix(candles), computed for serving from the tail only.

    The windowed features are computed from the last LOOKBACK_BARS + rows candles; the Parabolic
    SAR, the one path-dependent indicator, from all candles given (one C pass, microseconds).
    Equal to feature_matrix(candles).tail(rows) up to float rounding.
    """
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    rows = int(rows)
    ts, o, h, lo, c, v = _arrays(candles)
    n = len(ts)
    need = WARMUP_BARS + rows
    if n < need:
        raise ValueError(
            f"latest_window needs at least {need} candles ({WARMUP_BARS} warm-up + {rows} rows), got {n}")
    start = max(0, n - (LOOKBACK_BARS + rows))
    sar_raw = None
    if start > 0:
        sar_raw = ind.parabolic_sar(h, lo, _SAR_ACCELERATION, _SAR_MAXIMUM)[start:]
    block = _compute(ts[start:], o[start:], h[start:], lo[start:], c[start:], v[start:], sar_raw)
    return _frame(block[:, -rows:], ts[-rows:])


def encode_window(frame: pd.DataFrame, *, pair: str, bars: int, feature_hash: str) -> dict[str, Any]:
    """A feature window (DataFrame rows x features, index ts) as a compact JSON value.

    Values travel as base64 of float32 (what the models consume), so a 30 x 136 window is ~22 KB
    of JSON instead of ~100 KB of numbers.
    """
    values = np.ascontiguousarray(frame.to_numpy(dtype=np.float32))
    ts = [int(t) for t in frame.index.to_numpy()]
    return {
        "pair": pair,
        "ts": ts,
        "shape": list(values.shape),
        "dtype": "float32",
        "b64": base64.b64encode(values.tobytes()).decode("ascii"),
        "featureHash": feature_hash,
        "bars": int(bars),
        "extractedAt": now_ms(),
    }


def decode_window(payload: dict[str, Any]) -> np.ndarray:
    """The (rows, features) float32 array of an encoded window."""
    rows, cols = (int(x) for x in payload["shape"])
    data = base64.b64decode(payload["b64"])
    return np.frombuffer(data, dtype=np.float32).reshape(rows, cols)


def last_row(payload: dict[str, Any]) -> np.ndarray:
    """The newest feature row of an encoded window."""
    return decode_window(payload)[-1]
