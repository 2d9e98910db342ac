"""Indicators against hand-computed textbook values (plain Python loops, no TA-Lib), ranges, and
the rolling helpers the feature matrix is built from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import talib

from ml.features import indicators as ind


def _series(n: int = 80, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small fixed OHLCV random walk (valid OHLC, positive prices)."""
    rng = np.random.default_rng(seed)
    close = 50.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))
    opn = np.r_[50.0, close[:-1]]
    high = np.maximum(opn, close) * (1 + rng.uniform(0.0005, 0.006, n))
    low = np.minimum(opn, close) * (1 - rng.uniform(0.0005, 0.006, n))
    vol = rng.uniform(10, 100, n)
    return high, low, close, vol


def _assert_close_where_defined(got: np.ndarray, want: list[float | None], rtol: float = 1e-10) -> None:
    want_arr = np.array([np.nan if w is None else w for w in want])
    assert np.array_equal(np.isnan(got), np.isnan(want_arr)), "warm-up (NaN) positions differ"
    ok = ~np.isnan(want_arr)
    np.testing.assert_allclose(got[ok], want_arr[ok], rtol=rtol, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# hand-computed references
# ------------------------------------------------------------------------------------------------

def _rsi_wilder(close: list[float], period: int = 14) -> list[float | None]:
    out: list[float | None] = [None] * len(close)
    gains = [max(close[i] - close[i - 1], 0.0) for i in range(1, len(close))]
    losses = [max(close[i - 1] - close[i], 0.0) for i in range(1, len(close))]
    avg_g = sum(gains[:period]) / period
    avg_l = sum(losses[:period]) / period
    out[period] = 100.0 * avg_g / (avg_g + avg_l)
    for i in range(period + 1, len(close)):
        avg_g = (avg_g * (period - 1) + gains[i - 1]) / period
        avg_l = (avg_l * (period - 1) + losses[i - 1]) / period
        out[i] = 100.0 * avg_g / (avg_g + avg_l)
    return out


def _stoch_slow(high: list[float], low: list[float], close: list[float], k: int = 14, ks: int = 3,
                d: int = 3) -> tuple[list[float | None], list[float | None]]:
    n = len(close)
    fast: list[float | None] = [None] * n
    for t in range(k - 1, n):
        hh = max(high[t - k + 1: t + 1])
        ll = min(low[t - k + 1: t + 1])
        fast[t] = 100.0 * (close[t] - ll) / (hh - ll)
    slow_k: list[float | None] = [None] * n
    for t in range(k - 1 + ks - 1, n):
        slow_k[t] = sum(fast[t - ks + 1: t + 1]) / ks
    slow_d: list[float | None] = [None] * n
    for t in range(k - 1 + ks - 1 + d - 1, n):
        slow_d[t] = sum(slow_k[t - d + 1: t + 1]) / d
    return slow_k, slow_d


def _willr(high: list[float], low: list[float], close: list[float], p: int = 14) -> list[float | None]:
    out: list[float | None] = [None] * len(close)
    for t in range(p - 1, len(close)):
        hh = max(high[t - p + 1: t + 1])
        ll = min(low[t - p + 1: t + 1])
        out[t] = -100.0 * (hh - close[t]) / (hh - ll)
    return out


def _cci(high: list[float], low: list[float], close: list[float], p: int = 20) -> list[float | None]:
    tp = [(h + lo + c) / 3.0 for h, lo, c in zip(high, low, close, strict=True)]
    out: list[float | None] = [None] * len(close)
    for t in range(p - 1, len(close)):
        win = tp[t - p + 1: t + 1]
        mean = sum(win) / p
        md = sum(abs(x - mean) for x in win) / p
        out[t] = (tp[t] - mean) / (0.015 * md)
    return out


# ------------------------------------------------------------------------------------------------
# the indicators
# ------------------------------------------------------------------------------------------------

def test_rsi_matches_wilder_hand_computation() -> None:
    _, _, close, _ = _series()
    _assert_close_where_defined(ind.rsi(close, 14), _rsi_wilder(close.tolist(), 14))


def test_rsi_fixed_values() -> None:
    # 15 closes -> one RSI value from 14 changes: gains sum 10, losses sum 4 -> RSI = 100 * 10 / 14
    close = np.array([10, 11, 12, 11, 12, 13, 12, 13, 14, 13, 14, 15, 14, 15, 16], dtype=float)
    gains = sum(max(b - a, 0) for a, b in zip(close[:-1], close[1:], strict=True))
    losses = sum(max(a - b, 0) for a, b in zip(close[:-1], close[1:], strict=True))
    assert (gains, losses) == (10.0, 4.0)
    want = 100.0 * (gains / 14) / (gains / 14 + losses / 14)
    got = ind.rsi(close, 14)
    assert np.isnan(got[:14]).all()
    assert got[14] == pytest.approx(want, rel=1e-12)


def test_stochastic_14_3_3_matches_hand_computation() -> None:
    high, low, close, _ = _series()
    k_want, d_want = _stoch_slow(high.tolist(), low.tolist(), close.tolist())
    k, d = ind.stochastic(high, low, close, 14, 3, 3)
    _assert_close_where_defined(k, k_want)
    _assert_close_where_defined(d, d_want)
    # and it is TA-Lib's slow stochastic when the parameters are spelled out (its defaults are 5/3/3)
    tk, td = talib.STOCH(high, low, close, fastk_period=14, slowk_period=3, slowk_matype=0,
                         slowd_period=3, slowd_matype=0)
    np.testing.assert_allclose(k[17:], tk[17:], rtol=1e-10)
    np.testing.assert_allclose(d[17:], td[17:], rtol=1e-10)
    assert not np.allclose(k[17:], talib.STOCH(high, low, close)[0][17:])


def test_williams_r_matches_hand_computation() -> None:
    high, low, close, _ = _series()
    _assert_close_where_defined(ind.williams_r(high, low, close, 14), _willr(high.tolist(), low.tolist(),
                                                                          close.tolist()))


def test_cci_20_uses_0015_and_period_20() -> None:
    high, low, close, _ = _series()
    _assert_close_where_defined(ind.cci(high, low, close, 20), _cci(high.tolist(), low.tolist(), close.tolist()),
                                rtol=1e-9)


def test_ichimoku_midpoints_by_hand() -> None:
    high, low, _, _ = _series()
    tenkan, kijun, span_a, span_b = ind.ichimoku(high, low, 9, 26, 52)
    t = len(high) - 1
    want_t = (max(high[t - 8: t + 1]) + min(low[t - 8: t + 1])) / 2
    want_k = (max(high[t - 25: t + 1]) + min(low[t - 25: t + 1])) / 2
    want_b = (max(high[t - 51: t + 1]) + min(low[t - 51: t + 1])) / 2
    assert tenkan[t] == pytest.approx(want_t, rel=1e-12)
    assert kijun[t] == pytest.approx(want_k, rel=1e-12)
    assert span_a[t] == pytest.approx((want_t + want_k) / 2, rel=1e-12)
    assert span_b[t] == pytest.approx(want_b, rel=1e-12)
    assert np.isnan(span_b[50]) and not np.isnan(span_b[51])


def test_bollinger_matches_talib_bbands_and_hand() -> None:
    _, _, close, _ = _series()
    up, mid, lo = ind.bollinger(close, 20, 2.0)
    tu, tm, tl = talib.BBANDS(close, timeperiod=20, nbdevup=2.0, nbdevdn=2.0, matype=0)
    np.testing.assert_allclose(up[19:], tu[19:], rtol=1e-9)
    np.testing.assert_allclose(mid[19:], tm[19:], rtol=1e-12)
    np.testing.assert_allclose(lo[19:], tl[19:], rtol=1e-9)
    win = close[-20:].tolist()
    m = sum(win) / 20
    sd = math.sqrt(sum((x - m) ** 2 for x in win) / 20)  # population sigma, as Bollinger defines it
    assert up[-1] == pytest.approx(m + 2 * sd, rel=1e-12)
    assert lo[-1] == pytest.approx(m - 2 * sd, rel=1e-12)


def test_mfi_matches_talib_on_regular_data() -> None:
    high, low, close, vol = _series()
    np.testing.assert_allclose(ind.mfi(high, low, close, vol, 14)[14:],
                               talib.MFI(high, low, close, vol, timeperiod=14)[14:], rtol=1e-9)
    assert np.isnan(ind.mfi(high, low, close, vol, 14)[:14]).all()


def test_macd_sar_adx_parameters_are_the_textbook_ones() -> None:
    high, low, close, _ = _series(200)
    m, s, hist = ind.macd(close, 12, 26, 9)
    tm, ts, th = talib.MACD(close, fastperiod=12, slowperiod=26, signalperiod=9)
    np.testing.assert_array_equal(m, tm)
    np.testing.assert_allclose(hist[40:], (m - s)[40:], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(ind.parabolic_sar(high, low, 0.02, 0.2),
                                  talib.SAR(high, low, acceleration=0.02, maximum=0.2))
    a, p, n = ind.adx(high, low, close, 14)
    np.testing.assert_array_equal(a, talib.ADX(high, low, close, timeperiod=14))
    assert np.isnan(a[26]) and not np.isnan(a[27])  # ADX 14: 2 * 14 - 1 bars of warm-up


def test_value_ranges() -> None:
    for seed in range(5):
        high, low, close, vol = _series(300, seed)
        rsi = ind.rsi(close, 14)[14:]
        assert ((rsi >= 0) & (rsi <= 100)).all()
        wr = ind.williams_r(high, low, close, 14)[13:]
        assert ((wr >= -100) & (wr <= 0)).all()
        k, d = ind.stochastic(high, low, close)
        assert ((k[15:] >= 0) & (k[15:] <= 100)).all() and ((d[17:] >= 0) & (d[17:] <= 100)).all()
        a, p, n = ind.adx(high, low, close, 14)
        for x in (a[27:], p[14:], n[14:]):
            assert ((x >= 0) & (x <= 100)).all()
        mfi = ind.mfi(high, low, close, vol, 14)[14:]
        assert ((mfi >= 0) & (mfi <= 100)).all()


def test_flat_windows_give_neutral_oscillators() -> None:
    flat = np.full(40, 7.0)
    k, d = ind.stochastic(flat, flat, flat)
    assert k[-1] == 50.0 and d[-1] == 50.0
    assert ind.williams_r(flat, flat, flat)[-1] == -50.0
    assert ind.mfi(flat, flat, flat, np.zeros(40))[-1] == 50.0
    assert ind.cci(flat, flat, flat, 20)[-1] == 0.0
    up, mid, lo = ind.bollinger(flat)
    assert up[-1] == mid[-1] == lo[-1] == 7.0


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def test_rolling_helpers_match_naive_windows() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.001, 0.01, 300)
    for w in (1, 5, 20, 100):
        s = ind.rolling_sum(x, w)
        m = ind.rolling_mean(x, w)
        sd = ind.rolling_std(x, w)
        sd2 = ind.rolling_std_2pass(x, w)
        assert np.isnan(s[: w - 1]).all()
        for t in (w - 1, 150, 299):
            win = x[t - w + 1: t + 1]
            assert s[t] == pytest.approx(win.sum(), rel=1e-12, abs=1e-15)
            assert m[t] == pytest.approx(win.mean(), rel=1e-12, abs=1e-15)
            assert sd[t] == pytest.approx(win.std(), rel=1e-6, abs=1e-12)
            assert sd2[t] == pytest.approx(win.std(), rel=1e-12, abs=1e-15)
    assert np.isnan(ind.rolling_sum(x[:3], 5)).all()
    assert np.isnan(ind.rolling_std_2pass(x[:3], 5)).all()


def test_rolling_helpers_are_window_local() -> None:
    """The value at t does not depend on where the array starts (what latest_window relies on)."""
    rng = np.random.default_rng(1)
    x = 1000.0 + np.cumsum(rng.normal(0, 1, 3000))
    for fn in (ind.rolling_mean, ind.rolling_std_2pass, ind.rolling_max):
        full = fn(x, 20)
        tail = fn(x[2500:], 20)
        np.testing.assert_array_equal(full[2519:], tail[19:])


def test_constant_windows_have_zero_std() -> None:
    x = np.full(50, 123456.789)
    assert (ind.rolling_std(x, 10)[9:] == 0).all()
    assert (ind.rolling_std_2pass(x, 10)[9:] == 0).all()


def test_lag_log_return_safe_div_crossed() -> None:
    x = np.array([1.0, 2.0, 4.0, 8.0])
    np.testing.assert_array_equal(ind.lag(x, 1)[1:], [1.0, 2.0, 4.0])
    assert np.isnan(ind.lag(x, 1)[0]) and np.isnan(ind.lag(x, 9)).all()
    with pytest.raises(ValueError):
        ind.lag(x, -1)  # a lead would be look-ahead
    np.testing.assert_allclose(ind.log_return(x, 2)[2:], [math.log(4), math.log(4)])
    assert np.isnan(ind.log_return(x, 7)).all()
    np.testing.assert_array_equal(ind.safe_div(np.array([1.0, 1.0]), np.array([2.0, 0.0]), 9.0), [0.5, 9.0])
    a = np.array([0.0, 1.0, 2.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(ind.crossed(a, 1.5)[1:], [0, 1, -1, 0, 0])
