"""The candle schema and its validation, used by every data path (synthetic, files, core).

A candle frame is a pandas DataFrame with exactly the columns of CANDLE_COLUMNS: `ts` (open time,
UTC epoch milliseconds, int64) and float64 `open, high, low, close, volume`, strictly increasing
in `ts`, with a RangeIndex. Bad rows are never dropped silently: each is counted by its reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

CANDLE_COLUMNS = ["ts", "open", "high", "low", "close", "volume"]
PRICE_COLUMNS = ["open", "high", "low", "close"]

# Reasons a row is rejected, in the order they are checked (a row counts once, for its first reason).
REJECT_REASONS = (
    "nan",
    "non_positive_price",
    "high_below_low",
    "open_outside_range",
    "close_outside_range",
    "negative_volume",
    "duplicate_ts",
    "unordered_ts",
)



@dataclass
class Gap:
    """Missing bars between two consecutive accepted candles."""

    after_ts: int
    before_ts: int
    missing_bars: int

    def to_dict(self) -> dict[str, int]:
        return {"afterTs": self.after_ts, "beforeTs": self.before_ts, "missingBars": self.missing_bars}


@dataclass
class ValidationResult:
    candles: pd.DataFrame
    rejected: dict[str, int] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def duplicates(self) -> int:
        return self.rejected.get("duplicate_ts", 0)

    def summary(self) -> dict:
        c = self.candles
        return {
            "imported": int(len(c)),
            "rejected": {k: v for k, v in self.rejected.items() if v},
            "rejectedTotal": self.rejected_total,
            "duplicates": self.duplicates,
            "gaps": len(self.gaps),
            "missingBars": int(sum(g.missing_bars for g in self.gaps)),
            "gapList": [g.to_dict() for g in self.gaps[:20]],
            "start": int(c["ts"].iloc[0]) if len(c) else None,
            "end": int(c["ts"].iloc[-1]) if len(c) else None,
        }


def empty_candles() -> pd.DataFrame:
    return pd.DataFrame({"ts": pd.Series([], dtype="int64"),
                         **{c: pd.Series([], dtype="float64") for c in CANDLE_COLUMNS[1:]}})


def validate_candles(raw: pd.DataFrame, timeframe_ms: int | None = None) -> ValidationResult:
    """Check every row; return the accepted candles, rejections by reason, and the gaps.

    `raw` must have the CANDLE_COLUMNS (ts may be any integer-like dtype; prices numeric, NaN for
    unparseable). Rows are taken in the given order: a timestamp equal to an accepted one is a
    duplicate, one earlier than the last accepted is unordered. A file that is entirely newest-first
    is reversed first (exports often are), so it is not rejected wholesale.
    """
    missing = [c for c in CANDLE_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"candles lack column(s): {', '.join(missing)}")
    df = raw[CANDLE_COLUMNS].copy()
    for col in CANDLE_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df = df.reset_index(drop=True)
    ts_all = df["ts"].to_numpy(dtype="float64")
    finite_ts = ts_all[np.isfinite(ts_all)]
    if len(finite_ts) > 2 and np.all(np.diff(finite_ts) < 0):
        df = df.iloc[::-1].reset_index(drop=True)

    values = df[CANDLE_COLUMNS].to_numpy(dtype="float64")
    ts, o, h, lo, c, v = (values[:, i] for i in range(6))
    reason = np.full(len(df), "", dtype=object)

    def mark(mask: np.ndarray, why: str) -> None:
        sel = mask & (reason == "")
        reason[sel] = why

    with np.errstate(invalid="ignore"):
        mark(~np.isfinite(values).all(axis=1), "nan")
        mark((o <= 0) | (h <= 0) | (lo <= 0) | (c <= 0), "non_positive_price")
        mark(h < lo, "high_below_low")
        mark((o < lo) | (o > h), "open_outside_range")
        mark((c < lo) | (c > h), "close_outside_range")
        mark(v < 0, "negative_volume")

    # Ordering checks run over the rows that passed the value checks, in file order.
    last = -np.inf
    seen: set[int] = set()
    for i in np.flatnonzero(reason == ""):
        t = int(ts[i])
        if t in seen:
            reason[i] = "duplicate_ts"
        elif t < last:
            reason[i] = "unordered_ts"
        else:
            seen.add(t)
            last = t

    counts = Counter(r for r in reason if r)
    rejected = {r: int(counts.get(r, 0)) for r in REJECT_REASONS}
    good = df.loc[reason == ""].reset_index(drop=True)
    good["ts"] = good["ts"].astype("int64")
    for col in CANDLE_COLUMNS[1:]:
        good[col] = good[col].astype("float64")
    gaps = find_gaps(good["ts"].to_numpy(), timeframe_ms) if timeframe_ms else []
    return ValidationResult(candles=good, rejected=rejected, gaps=gaps)


def find_gaps(ts: np.ndarray, timeframe_ms: int) -> list[Gap]:
    """Consecutive timestamps further apart than one bar."""
    if len(ts) < 2:
        return []
    d = np.diff(ts)
    idx = np.flatnonzero(d > timeframe_ms)
    return [Gap(int(ts[i]), int(ts[i + 1]), int(d[i] // timeframe_ms) - 1) for i in idx]


def infer_timeframe_ms(ts: np.ndarray) -> int | None:
    """The most common spacing between bars (None for fewer than 2 bars)."""
    if len(ts) < 2:
        return None
    d = np.diff(np.asarray(ts, dtype="int64"))
    d = d[d > 0]
    if not len(d):
        return None
    vals, counts = np.unique(d, return_counts=True)
    return int(vals[np.argmax(counts)])
