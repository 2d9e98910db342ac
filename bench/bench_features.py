"""Feature benchmark: full matrix for 1,000 and 10,000 candles, serving window.

Targets: the matrix of 1,000 candles in <= 10 ms, the serving window in <= 5 ms (p50).

Each figure is the p50 wall time of one call, beside an anchor measured in the same run: the time
TA-Lib alone takes for the same indicators on the same candles (the talib functions the matrix
uses, called directly on numpy arrays). The ratio shows what the rest of the matrix costs (the
derived fields, the numpy features, building the DataFrame).

Run: python -m bench.bench_features [--quick]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import talib

from bench.common import BenchResult, bench_main, p50, percentile, time_calls
from ml.features import FEATURE_NAMES, LOOKBACK_BARS, feature_matrix, latest_window

SECTION = "features"
WINDOW_ROWS = 60


def _candles(n: int, seed: int = 0) -> pd.DataFrame:
    """A random walk with volatility clustering, 5-minute bars (the bench needs no data source)."""
    rng = np.random.default_rng(seed)
    vol = np.exp(np.convolve(rng.normal(0.0, 0.15, n + 50), np.ones(50) / 7.0, mode="valid")[:n])
    close = 30_000.0 * np.exp(np.cumsum(rng.normal(0.0, 0.002, n) * vol))
    opn = np.r_[30_000.0, close[:-1]]
    high = np.maximum(opn, close) * np.exp(np.abs(rng.normal(0.0, 0.001, n)) * vol)
    low = np.minimum(opn, close) * np.exp(-np.abs(rng.normal(0.0, 0.001, n)) * vol)
    volume = rng.lognormal(3.0, 0.5, n)
    ts = 1_735_689_600_000 + np.arange(n, dtype=np.int64) * 300_000
    return pd.DataFrame({"ts": ts, "open": opn, "high": high, "low": low, "close": close, "volume": volume})


def _talib_only(h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
    """The TA-Lib calls for the indicators of the matrix, alone (same parameters)."""
    talib.RSI(c, timeperiod=14)
    talib.MACD(c, fastperiod=12, slowperiod=26, signalperiod=9)
    talib.BBANDS(c, timeperiod=20, nbdevup=2.0, nbdevdn=2.0, matype=0)
    talib.SMA(c, timeperiod=10)
    talib.SMA(c, timeperiod=21)
    talib.EMA(c, timeperiod=10)
    talib.EMA(c, timeperiod=21)
    for p in (50, 100, 200):
        talib.SMA(c, timeperiod=p)
    talib.STOCH(h, lo, c, fastk_period=14, slowk_period=3, slowk_matype=0, slowd_period=3, slowd_matype=0)
    talib.WILLR(h, lo, c, timeperiod=14)
    for p in (9, 20, 26, 50, 52, 100):  # Ichimoku midpoints, distances to highs/lows
        talib.MAX(h, timeperiod=p)
        talib.MIN(lo, timeperiod=p)
    talib.ADX(h, lo, c, timeperiod=14)
    talib.PLUS_DI(h, lo, c, timeperiod=14)
    talib.MINUS_DI(h, lo, c, timeperiod=14)
    talib.CCI(h, lo, c, timeperiod=20)
    talib.SAR(h, lo, acceleration=0.02, maximum=0.2)
    talib.NATR(h, lo, c, timeperiod=14)
    talib.MFI(h, lo, c, v, timeperiod=14)


def _arrays(candles: pd.DataFrame) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(candles[k].to_numpy(dtype=np.float64))
                 for k in ("high", "low", "close", "volume"))


def _measure(fn, anchor_fn, repeat: int) -> tuple[float, float, float]:
    samples = time_calls(fn, repeat=repeat, warmup=3)
    anchor = time_calls(anchor_fn, repeat=repeat, warmup=3)
    return p50(samples), percentile(samples, 95), p50(anchor)


def run(quick: bool = False) -> list[BenchResult]:
    repeat = 30 if quick else 200
    results: list[BenchResult] = []
    for n, target in ((1_000, 10.0), (10_000, None)):
        candles = _candles(n)
        arrs = _arrays(candles)
        value, v95, anchor = _measure(lambda c=candles: feature_matrix(c),
                                      lambda a=arrs: _talib_only(*a),
                                      repeat if n <= 1_000 else max(10, repeat // 4))
        results.append(BenchResult(
            section=SECTION, name=f"feature_matrix, {n:,} candles", value=value, unit="ms",
            anchor_name="TA-Lib alone, same indicators and candles", anchor_value=anchor,
            target="<= 10 ms" if target else "", ok=(value <= target) if target else None,
            note=f"{len(FEATURE_NAMES)} features; p95 {v95:.2f} ms"))

    candles = _candles(1_000)
    tail = candles.iloc[-(LOOKBACK_BARS + WINDOW_ROWS):]
    h, lo, c, v = _arrays(tail)
    h_all, lo_all = _arrays(candles)[:2]

    def talib_window() -> None:
        _talib_only(h, lo, c, v)
        talib.SAR(h_all, lo_all, acceleration=0.02, maximum=0.2)  # latest_window runs SAR on all

    value, v95, anchor = _measure(lambda: latest_window(candles, WINDOW_ROWS), talib_window, repeat)
    results.append(BenchResult(
        section=SECTION, name=f"latest_window, 1,000 candles, rows={WINDOW_ROWS}", value=value, unit="ms",
        anchor_name=f"TA-Lib alone on the {LOOKBACK_BARS + WINDOW_ROWS}-candle tail it reads",
        anchor_value=anchor, target="<= 5 ms", ok=value <= 5.0,
        note=f"p95 {v95:.2f} ms; computed from the last {LOOKBACK_BARS + WINDOW_ROWS} candles"))
    return results


if __name__ == "__main__":
    raise SystemExit(bench_main(run, __doc__))
