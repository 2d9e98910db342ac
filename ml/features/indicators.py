"""Technical indicators and rolling helpers on plain float64 numpy arrays.

Every function is causal: output[t] uses inputs[<= t] only. Outputs have the input's length, with
NaN where the indicator is still warming up. Standard indicators come from TA-Lib with every
parameter passed explicitly (TA-Lib's own defaults are not the textbook ones for STOCH, CCI and
others); the helpers around them are small numpy routines written for two properties the feature
matrix needs:

* window-local: a rolling statistic at t depends only on the `w` values of its window, not on where
  the array starts (no running sums carried over thousands of bars), so the matrix computed from a
  tail of the candles equals the one computed from the whole history;
* guarded: degenerate windows (flat prices, zero volume) give a documented neutral value, never a
  division by zero.

Inputs must be 1-D float64 arrays without NaN (except a leading NaN prefix where noted).
"""

from __future__ import annotations

import numpy as np
import talib
from numpy.lib.stride_tricks import sliding_window_view

# A window whose variance is below this fraction of its mean square is treated as constant
# (variance 0): E[x^2] - E[x]^2 leaves only rounding noise there. Relative, hence scale-free.
_REL_VAR_FLOOR = 1e-12


# ----------------------------------------------------------------------------------------------
# Generic helpers
# ----------------------------------------------------------------------------------------------

def lag(x: np.ndarray, k: int) -> np.ndarray:
    """x shifted k bars into the past: out[t] = x[t-k] (NaN for t < k). Never a lead."""
    if k < 0:
        raise ValueError("lag() only looks back (k >= 0)")
    n = len(x)
    out = np.empty(n)
    if k >= n:
        out[:] = np.nan
        return out
    out[:k] = np.nan
    out[k:] = x[: n - k]
    return out


def log_return(x: np.ndarray, k: int) -> np.ndarray:
    """ln(x[t] / x[t-k]), NaN for t < k."""
    n = len(x)
    out = np.empty(n)
    if k >= n:
        out[:] = np.nan
        return out
    out[:k] = np.nan
    out[k:] = np.log(x[k:] / x[: n - k])
    return out


def safe_div(a: np.ndarray, b: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """a / b, with `fill` where b == 0 (NaN in a or b stays NaN)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.full(np.broadcast(a, b).shape, fill)
    np.divide(a, b, out=out, where=(b != 0))
    return out


def sign(x: np.ndarray) -> np.ndarray:
    """-1/0/+1 (NaN stays NaN)."""
    return np.sign(x)


def flag(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as 0.0/1.0."""
    return mask.astype(np.float64)


def crossed(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    """+1 where a crosses above b at t (a[t-1] <= b[t-1] and a[t] > b[t]), -1 where it crosses
    below (a[t-1] >= b[t-1] and a[t] < b[t]), else 0."""
    d = a - b
    prev = lag(d, 1)
    up = (prev <= 0) & (d > 0)
    down = (prev >= 0) & (d < 0)
    return up.astype(np.float64) - down.astype(np.float64)


def rolling_sum(x: np.ndarray, w: int) -> np.ndarray:
    """Sum of the last w values (window-local: no running total), NaN for t < w-1."""
    n = len(x)
    out = np.empty(n)
    if n < w:
        out[:] = np.nan
        return out
    out[: w - 1] = np.nan
    out[w - 1:] = np.convolve(x, np.ones(w), mode="valid")
    return out


def rolling_mean(x: np.ndarray, w: int) -> np.ndarray:
    return rolling_sum(x, w) / w


def rolling_std(x: np.ndarray, w: int) -> np.ndarray:
    """Population standard deviation of the last w values, via E[x^2] - E[x]^2.

    For series whose mean is not huge against their spread (returns, volume, indicator values).
    Price levels go through `rolling_std_2pass`. Windows that are constant up to rounding give 0.
    """
    m = rolling_mean(x, w)
    m2 = rolling_mean(x * x, w)
    var = m2 - m * m
    with np.errstate(invalid="ignore"):
        var[var <= _REL_VAR_FLOOR * m2] = 0.0
    return np.sqrt(var)


def rolling_std_2pass(x: np.ndarray, w: int) -> np.ndarray:
    """Population standard deviation of the last w values, two-pass per window.

    Numerically exact for price levels (no cancellation between E[x^2] and E[x]^2) and
    bit-identical whatever the array's start. Windows constant up to rounding give 0.
    """
    n = len(x)
    out = np.empty(n)
    if n < w:
        out[:] = np.nan
        return out
    win = sliding_window_view(x, w)
    mean = win.mean(axis=1)
    sd = np.sqrt(((win - mean[:, None]) ** 2).mean(axis=1))
    sd[sd <= 1e-10 * np.abs(mean)] = 0.0
    out[: w - 1] = np.nan
    out[w - 1:] = sd
    return out


def rolling_max(x: np.ndarray, w: int) -> np.ndarray:
    return talib.MAX(x, timeperiod=w)


def rolling_min(x: np.ndarray, w: int) -> np.ndarray:
    return talib.MIN(x, timeperiod=w)


def sma(x: np.ndarray, period: int) -> np.ndarray:
    """Simple moving average; the values of talib.SMA, but window-local (TA-Lib carries a running
    sum along the whole array, whose rounding drift makes the result depend on the array start)."""
    return rolling_mean(x, period)


def ema(x: np.ndarray, period: int) -> np.ndarray:
    """EMA with alpha = 2/(period+1), seeded with the SMA of the first `period` values (TA-Lib)."""
    return talib.EMA(x, timeperiod=period)


# ----------------------------------------------------------------------------------------------
# The indicators of the original service, standard parameters
# ----------------------------------------------------------------------------------------------

def rsi(close: np.ndarray, period: int = 14) -> np.ndarray:
    """Wilder's RSI in [0, 100]: first average gain/loss = simple mean of the first `period`
    changes, then avg = (avg * (period - 1) + change) / period."""
    return talib.RSI(close, timeperiod=period)


def macd(close: np.ndarray, fast: int = 12, slow: int = 26, signal: int = 9
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(macd line = EMA_fast - EMA_slow, signal = EMA_signal(macd), histogram = macd - signal)."""
    return talib.MACD(close, fastperiod=fast, slowperiod=slow, signalperiod=signal)


def bollinger(close: np.ndarray, period: int = 20, nbdev: float = 2.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(upper, middle, lower): middle = SMA(period), bands = middle +- nbdev * population std.

    The same formula as talib.BBANDS(matype=0); the standard deviation is computed two-pass per
    window because TA-Lib's running sum of squares loses precision on price levels.
    """
    middle = rolling_mean(close, period)
    sd = rolling_std_2pass(close, period)
    return middle + nbdev * sd, middle, middle - nbdev * sd


def stochastic(high: np.ndarray, low: np.ndarray, close: np.ndarray, k_period: int = 14,
               k_smooth: int = 3, d_period: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Slow stochastic (%K, %D) in [0, 100], textbook 14/3/3.

    fast %K = 100 * (close - lowest low) / (highest high - lowest low) over k_period bars;
    slow %K = SMA(k_smooth) of fast %K; %D = SMA(d_period) of slow %K. The values of
    talib.STOCH(fastk_period=14, slowk_period=3, slowk_matype=SMA, slowd_period=3,
    slowd_matype=SMA), with two differences: the smoothing is window-local (see `sma`), and a
    window with no range (highest high == lowest low) has fast %K = 50 (neutral), where TA-Lib
    puts 0.
    """
    hh = talib.MAX(high, timeperiod=k_period)
    ll = talib.MIN(low, timeperiod=k_period)
    fast_k = 100.0 * safe_div(close - ll, hh - ll, 0.5)
    slow_k = sma(fast_k, k_smooth)
    return slow_k, sma(slow_k, d_period)


def williams_r(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int = 14) -> np.ndarray:
    """Williams %R in [-100, 0]: -100 * (highest high - close) / (highest high - lowest low).
    A window with no range gives -50 (neutral); TA-Lib would put 0 there."""
    wr = talib.WILLR(high, low, close, timeperiod=period)
    flat = (talib.MAX(high, timeperiod=period) - talib.MIN(low, timeperiod=period)) == 0
    if flat.any():
        wr[flat] = -50.0
    return wr


def ichimoku(high: np.ndarray, low: np.ndarray, tenkan: int = 9, kijun: int = 26, senkou_b: int = 52
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tenkan-sen, kijun-sen, senkou span A, senkou span B) as computed AT bar t.

    Midpoints of the highest high and lowest low over 9 / 26 / 52 bars; span A = (tenkan +
    kijun) / 2. Charts plot the spans 26 bars ahead, so the cloud drawn at t is lag(span, 26).
    The Chikou span (close plotted 26 bars back) needs future closes and is not computed at all.
    """
    t = (talib.MAX(high, timeperiod=tenkan) + talib.MIN(low, timeperiod=tenkan)) / 2
    k = (talib.MAX(high, timeperiod=kijun) + talib.MIN(low, timeperiod=kijun)) / 2
    b = (talib.MAX(high, timeperiod=senkou_b) + talib.MIN(low, timeperiod=senkou_b)) / 2
    return t, k, (t + k) / 2, b


def adx(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int = 14
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ADX, +DI, -DI), Wilder smoothing, all in [0, 100]."""
    return (talib.ADX(high, low, close, timeperiod=period),
            talib.PLUS_DI(high, low, close, timeperiod=period),
            talib.MINUS_DI(high, low, close, timeperiod=period))


def cci(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int = 20) -> np.ndarray:
    """Commodity Channel Index: (TP - SMA(TP)) / (0.015 * mean absolute deviation of TP),
    TP = (high + low + close) / 3. TA-Lib's constant is the textbook 0.015; 0 when the
    deviation is 0."""
    return talib.CCI(high, low, close, timeperiod=period)


def parabolic_sar(high: np.ndarray, low: np.ndarray, acceleration: float = 0.02,
                  maximum: float = 0.2) -> np.ndarray:
    """Wilder's Parabolic SAR (step 0.02, maximum 0.2). Path-dependent: the value at t depends
    on the whole history of the series it is computed on (see docs/features.md)."""
    return talib.SAR(high, low, acceleration=acceleration, maximum=maximum)


def natr(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int = 14) -> np.ndarray:
    """ATR (Wilder, `period`) as a percentage of the close."""
    return talib.NATR(high, low, close, timeperiod=period)


def mfi(high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray,
        period: int = 14) -> np.ndarray:
    """Money Flow Index in [0, 100]: 100 * positive flow / (positive + negative flow) over
    `period` bars, flow = typical price * volume, signed by the change of the typical price.

    Same formula as talib.MFI, computed here so that a window without any flow (no volume, or a
    flat typical price) gives 50 (neutral) where TA-Lib gives 0.
    """
    tp = (high + low + close) / 3.0
    d = tp - lag(tp, 1)
    flow = tp * volume
    pos = rolling_sum(np.where(d > 0, flow, 0.0), period)
    neg = rolling_sum(np.where(d < 0, flow, 0.0), period)
    out = safe_div(100.0 * pos, pos + neg, 50.0)
    out[: min(period, len(out))] = np.nan
    return out
