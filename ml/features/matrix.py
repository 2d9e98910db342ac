"""The causal per-timestep feature matrix (the serving window of its newest rows is in window.py).

Row t of the matrix uses candles[<= t] only: every indicator is a trailing window or a forward
recursion (EMA, Wilder smoothing, SAR), shifts only look back, and nothing is centred, backfilled
or normalised with statistics of the whole series. All features are scale-free (returns, ratios,
% distances, bounded oscillators), so a pair's price level or volume unit does not matter.

Everything is computed on numpy arrays into one (features x rows) block that becomes the
DataFrame at the end. See docs/features.md for each feature's formula.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ml.config import get_settings
from ml.features import indicators as ind
from ml.features.catalog import CATALOG, SUGGEST_FEATURES, TREND_FEATURES

FEATURE_NAMES: list[str] = [f.name for f in CATALOG]
_IDX = {name: i for i, name in enumerate(FEATURE_NAMES)}
N_FEATURES = len(FEATURE_NAMES)

# The longest trailing window of any feature is SMA_200 (valid from bar 199), so 200 rows are the
# least warm-up that leaves no NaN. A larger `features.warmup_bars` in the config is honoured.
MIN_WARMUP_BARS = 200
WARMUP_BARS: int = max(MIN_WARMUP_BARS, int(get_settings().features.warmup_bars))

# Candles before a window row that latest_window() computes from. The windowed features need at
# most 200; the recursive ones (Wilder RSI/ATR/ADX with factor 13/14, EMA up to 26, MACD signal)
# forget their start like 0.93^k, which is below 1e-19 after 600 bars: far below float rounding,
# so the tail computation equals the full one to rounding.
LOOKBACK_BARS: int = max(600, WARMUP_BARS)

_SAR_ACCELERATION, _SAR_MAXIMUM = 0.02, 0.2
_SAR_AGE_CAP = 50
_ICHIMOKU_DISPLACEMENT = 26
_DAY_MS, _HOUR_MS = 86_400_000, 3_600_000
_REQUIRED = ("ts", "open", "high", "low", "close", "volume")


def feature_names_hash(names: Sequence[str] = FEATURE_NAMES) -> str:
    """sha256 (hex) of the ordered feature names, one per line (saved with every model)."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def _arrays(candles: pd.DataFrame) -> tuple[np.ndarray, ...]:
    missing = [c for c in _REQUIRED if c not in candles.columns]
    if missing:
        raise ValueError(f"candles lack column(s): {', '.join(missing)}")
    ts = candles["ts"].to_numpy(dtype=np.int64)
    if len(ts) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
        raise ValueError("candle timestamps must be strictly increasing")
    o, h, lo, c, v = (np.ascontiguousarray(candles[col].to_numpy(dtype=np.float64))
                      for col in ("open", "high", "low", "close", "volume"))
    # NaN-safe checks (a NaN fails every comparison): positive prices, non-negative volume.
    if len(ts) and not (bool((o > 0).all()) and bool((h > 0).all()) and bool((lo > 0).all())
                        and bool((c > 0).all()) and bool((v >= 0).all())
                        and bool(np.isfinite(h).all()) and bool(np.isfinite(v).all())):
        raise ValueError("candles have NaN/infinite values, non-positive prices or negative volume; "
                         "run them through ml.data.candles.validate_candles first")
    return ts, o, h, lo, c, v


def _compute(ts: np.ndarray, o: np.ndarray, h: np.ndarray, lo: np.ndarray, c: np.ndarray,
             v: np.ndarray, sar_raw: np.ndarray | None = None) -> np.ndarray:
    """The (N_FEATURES, n) block for these candles. `sar_raw` (in price units) may be given when
    the SAR was computed over a longer history than these candles (latest_window)."""
    n = len(c)
    out = np.empty((N_FEATURES, n))
    if n == 0:
        return out
    filled = np.zeros(N_FEATURES, dtype=bool)

    def put(name: str, x: np.ndarray) -> None:
        i = _IDX[name]
        out[i] = x
        filled[i] = True

    if sar_raw is None:
        sar_raw = ind.parabolic_sar(h, lo, _SAR_ACCELERATION, _SAR_MAXIMUM)
    # Prices relative to the power of two nearest the first close: TA-Lib then sees values near 1
    # whatever the pair's price level (its internal "is zero" tolerances are absolute), and the
    # division is exact, so the result does not depend on which bar the arrays start at.
    ref = math.ldexp(1.0, round(math.log2(c[0])))
    o, h, lo, c = o / ref, h / ref, lo / ref, c / ref
    sar = sar_raw / ref

    # --- price / returns --------------------------------------------------------------------
    r1 = ind.log_return(c, 1)
    for k in (1, 2, 3, 5, 10, 20, 50):
        put(f"ret_log_{k}", r1 if k == 1 else ind.log_return(c, k))
    c_prev = ind.lag(c, 1)
    put("ret_gap", np.log(o / c_prev))
    std_r = {w: ind.rolling_std(r1, w) for w in (5, 10, 20, 50, 100)}
    put("ret_sharpe_20", ind.safe_div(ind.rolling_mean(r1, 20), std_r[20], 0.0))
    up = ind.flag(r1 > 0)
    up[0] = np.nan
    put("ret_up_frac_20", ind.rolling_mean(up, 20))

    rng = h - lo
    body_hi, body_lo = np.maximum(o, c), np.minimum(o, c)
    put("candle_body", ind.safe_div(c - o, rng, 0.0))
    put("candle_upper_wick", ind.safe_div(h - body_hi, rng, 0.0))
    put("candle_lower_wick", ind.safe_div(body_lo - lo, rng, 0.0))
    put("candle_close_pos", ind.safe_div(c - lo, rng, 0.5))
    log_hl = np.log(h / lo)
    log_co = np.log(c / o)
    put("candle_range", log_hl)
    put("candle_body_log", log_co)

    hh = {w: ind.rolling_max(h, w) for w in (9, 14, 20, 26, 50, 52, 100)}
    ll = {w: ind.rolling_min(lo, w) for w in (9, 14, 20, 26, 50, 52, 100)}
    for w in (20, 50, 100):
        put(f"price_dist_high_{w}", c / hh[w] - 1.0)
    for w in (20, 50, 100):
        put(f"price_dist_low_{w}", c / ll[w] - 1.0)
    for w in (20, 50):
        put(f"price_range_pos_{w}", ind.safe_div(c - ll[w], hh[w] - ll[w], 0.5))

    # --- moving averages 10/21 ------------------------------------------------------------------
    sma10, sma21 = ind.sma(c, 10), ind.sma(c, 21)
    ema10, ema21 = ind.ema(c, 10), ind.ema(c, 21)
    put("ma_sma_10_dist", c / sma10 - 1.0)
    put("ma_sma_21_dist", c / sma21 - 1.0)
    put("ma_ema_10_dist", c / ema10 - 1.0)
    put("ma_ema_21_dist", c / ema21 - 1.0)
    put("ma_sma_10_21_spread", sma10 / sma21 - 1.0)
    put("ma_ema_10_21_spread", ema10 / ema21 - 1.0)
    put("ma_ema_10_slope", ema10 / ind.lag(ema10, 5) - 1.0)
    put("ma_ema_21_slope", ema21 / ind.lag(ema21, 5) - 1.0)
    ma_trend = ind.sign(ema10 - ema21)
    put("ma_trend", ma_trend)
    put("ma_cross", ind.crossed(ema10, ema21))
    put("ma_suggest", ind.flag((c > ema10) & (ema10 > ema21)) - ind.flag((c < ema10) & (ema10 < ema21)))
    for w in (50, 100, 200):
        put(f"ma_sma_{w}_dist", c / ind.sma(c, w) - 1.0)

    # --- RSI 14 ------------------------------------------------------------------------------------
    rsi = ind.rsi(c, 14)
    rsi_prev = ind.lag(rsi, 1)
    put("rsi_14", rsi)
    put("rsi_overbought", ind.flag(rsi > 70))
    put("rsi_oversold", ind.flag(rsi < 30))
    rsi_trend = ind.sign(rsi - 50.0)
    put("rsi_trend", rsi_trend)
    put("rsi_change_3", rsi - ind.lag(rsi, 3))
    put("rsi_suggest", ind.flag((rsi_prev < 30) & (rsi >= 30)) - ind.flag((rsi_prev > 70) & (rsi <= 70)))

    # --- MACD 12/26/9 --------------------------------------------------------------------------------
    m_line, m_sig, m_hist = ind.macd(c, 12, 26, 9)
    hist_prev = ind.lag(m_hist, 1)
    put("macd_line", 100.0 * m_line / c)
    put("macd_signal_line", 100.0 * m_sig / c)
    put("macd_hist", 100.0 * m_hist / c)
    put("macd_hist_change", 100.0 * (m_hist - hist_prev) / c)
    macd_trend = ind.sign(m_hist)
    put("macd_trend", macd_trend)
    put("macd_cross", ind.crossed(m_line, m_sig))
    put("macd_zero_side", ind.sign(m_line))
    put("macd_suggest", ind.flag((m_hist > 0) & (m_hist > hist_prev))
        - ind.flag((m_hist < 0) & (m_hist < hist_prev)))

    # --- Bollinger 20/2 --------------------------------------------------------------------------------
    bb_up, bb_mid, bb_lo = ind.bollinger(c, 20, 2.0)
    bb_width = (bb_up - bb_lo) / bb_mid
    put("bb_pct_b", ind.safe_div(c - bb_lo, bb_up - bb_lo, 0.5))
    put("bb_width", bb_width)
    put("bb_width_ratio_100", ind.safe_div(bb_width, ind.rolling_mean(bb_width, 100), 1.0))
    put("bb_dist_upper", (c - bb_up) / c)
    put("bb_dist_lower", (c - bb_lo) / c)
    put("bb_overbought", ind.flag(c > bb_up))
    put("bb_oversold", ind.flag(c < bb_lo))
    put("bb_trend", ind.sign(bb_mid - ind.lag(bb_mid, 5)))
    lo_prev, up_prev = ind.lag(bb_lo, 1), ind.lag(bb_up, 1)
    put("bb_suggest", ind.flag((c_prev < lo_prev) & (c >= bb_lo)) - ind.flag((c_prev > up_prev) & (c <= bb_up)))

    # --- Stochastic 14/3/3 -------------------------------------------------------------------------------
    st_k, st_d = ind.stochastic(h, lo, c, 14, 3, 3)
    k_prev = ind.lag(st_k, 1)
    st_cross = ind.crossed(st_k, st_d)
    put("stoch_k", st_k)
    put("stoch_d", st_d)
    put("stoch_k_minus_d", st_k - st_d)
    put("stoch_overbought", ind.flag(st_k > 80))
    put("stoch_oversold", ind.flag(st_k < 20))
    put("stoch_cross", st_cross)
    put("stoch_suggest", ind.flag((st_cross > 0) & (k_prev < 20)) - ind.flag((st_cross < 0) & (k_prev > 80)))

    # --- Williams %R 14 ------------------------------------------------------------------------------------
    wr = ind.williams_r(h, lo, c, 14)
    wr_prev = ind.lag(wr, 1)
    put("willr_14", wr)
    put("willr_overbought", ind.flag(wr > -20))
    put("willr_oversold", ind.flag(wr < -80))
    put("willr_trend", ind.sign(wr + 50.0))
    put("willr_suggest", ind.flag((wr_prev < -80) & (wr >= -80)) - ind.flag((wr_prev > -20) & (wr <= -20)))

    # --- Ichimoku 9/26/52 (no Chikou) ------------------------------------------------------------------------
    tenkan = (hh[9] + ll[9]) / 2
    kijun = (hh[26] + ll[26]) / 2
    span_a = (tenkan + kijun) / 2
    span_b = (hh[52] + ll[52]) / 2
    cloud_a = ind.lag(span_a, _ICHIMOKU_DISPLACEMENT)   # computed 26 bars ago = plotted at t
    cloud_b = ind.lag(span_b, _ICHIMOKU_DISPLACEMENT)
    cloud_top, cloud_bottom = np.maximum(cloud_a, cloud_b), np.minimum(cloud_a, cloud_b)
    cloud_pos = ind.flag(c > cloud_top) - ind.flag(c < cloud_bottom)
    ichi_trend = ind.sign(tenkan - kijun)
    put("ichi_tenkan_dist", c / tenkan - 1.0)
    put("ichi_kijun_dist", c / kijun - 1.0)
    put("ichi_tk_spread", tenkan / kijun - 1.0)
    put("ichi_span_a_dist", c / cloud_a - 1.0)
    put("ichi_span_b_dist", c / cloud_b - 1.0)
    put("ichi_cloud_thickness", (cloud_a - cloud_b) / c)
    put("ichi_future_cloud", (span_a - span_b) / c)
    put("ichi_cloud_pos", cloud_pos)
    put("ichi_tk_cross", ind.crossed(tenkan, kijun))
    put("ichi_trend", ichi_trend)
    put("ichi_suggest", ind.flag((cloud_pos > 0) & (tenkan > kijun)) - ind.flag((cloud_pos < 0) & (tenkan < kijun)))

    # --- ADX 14 -------------------------------------------------------------------------------------------------
    adx, pdi, mdi = ind.adx(h, lo, c, 14)
    adx_strong = ind.flag(adx > 25)
    adx_trend = ind.sign(pdi - mdi)
    put("adx_14", adx)
    put("adx_plus_di", pdi)
    put("adx_minus_di", mdi)
    put("adx_di_spread", pdi - mdi)
    put("adx_strong_trend", adx_strong)
    put("adx_trend", adx_trend)
    put("adx_change_3", adx - ind.lag(adx, 3))
    put("adx_suggest", adx_strong * adx_trend + 0.0)  # + 0.0: no negative zeros

    # --- CCI 20 ---------------------------------------------------------------------------------------------------
    cci = ind.cci(h, lo, c, 20)
    cci_prev = ind.lag(cci, 1)
    put("cci_20", cci)
    put("cci_overbought", ind.flag(cci > 100))
    put("cci_oversold", ind.flag(cci < -100))
    put("cci_trend", ind.sign(cci))
    put("cci_suggest", ind.flag((cci_prev < -100) & (cci >= -100)) - ind.flag((cci_prev > 100) & (cci <= 100)))

    # --- Parabolic SAR 0.02/0.2 ------------------------------------------------------------------------------------
    sar_trend = ind.sign(c - sar)
    trend_prev = ind.lag(sar_trend, 1)
    flip = (sar_trend != trend_prev) & (sar_trend != 0) & (trend_prev != 0) & ~np.isnan(trend_prev)
    bar = np.arange(n)
    last_flip = np.maximum.accumulate(np.where(flip, bar, 0))
    put("sar_dist", (c - sar) / c)
    put("sar_trend", sar_trend)
    put("sar_suggest", np.where(flip, sar_trend, 0.0))
    put("sar_trend_age", np.minimum(bar - last_flip, _SAR_AGE_CAP).astype(np.float64))

    # --- volume (raw units only ever inside ratios) ---------------------------------------------------------------
    vsum = {w: ind.rolling_sum(v, w) for w in (5, 10, 20, 50)}
    vmean = {w: vsum[w] / w for w in (5, 20, 50)}
    put("vol_ratio_20", ind.safe_div(v, vmean[20], 1.0))
    put("vol_ratio_50", ind.safe_div(v, vmean[50], 1.0))
    put("vol_ratio_5_20", ind.safe_div(vmean[5], vmean[20], 1.0))
    spike = ind.flag(v > 2.0 * vmean[20])
    put("vol_spike", spike)
    put("vol_zscore_20", ind.safe_div(v - vmean[20], ind.rolling_std(v, 20), 0.0))
    put("vol_zscore_50", ind.safe_div(v - vmean[50], ind.rolling_std(v, 50), 0.0))
    obv_flow = np.sign(c - c_prev) * v
    obv20 = ind.safe_div(ind.rolling_sum(obv_flow, 20), vsum[20], 0.0)
    put("vol_obv_slope_10", ind.safe_div(ind.rolling_sum(obv_flow, 10), vsum[10], 0.0))
    put("vol_obv_slope_20", obv20)
    obv_trend = ind.sign(obv20)
    put("vol_obv_trend", obv_trend)
    put("vol_trend", ind.sign(vmean[5] - vmean[20]))
    put("vol_mfi_14", ind.mfi(h, lo, c, v, 14))
    mfm = ind.safe_div((c - lo) - (h - c), rng, 0.0)
    put("vol_cmf_20", ind.safe_div(ind.rolling_sum(mfm * v, 20), vsum[20], 0.0))
    tp = (h + lo + c) / 3.0
    put("vol_vwap_dist_20", ind.safe_div(c * vsum[20], ind.rolling_sum(tp * v, 20), 1.0) - 1.0)
    put("vol_suggest", spike * np.sign(c - o) + 0.0)

    # --- volatility -------------------------------------------------------------------------------------------------
    for w in (5, 10, 20, 50, 100):
        put(f"volat_std_{w}", std_r[w])
    put("volat_ratio_5_50", ind.safe_div(std_r[5], std_r[50], 1.0))
    put("volat_ratio_20_100", ind.safe_div(std_r[20], std_r[100], 1.0))
    put("volat_atr_pct_14", ind.natr(h, lo, c, 14))
    hl2 = log_hl * log_hl
    put("volat_parkinson_20", np.sqrt(ind.rolling_mean(hl2, 20) / (4.0 * math.log(2.0))))
    gk = 0.5 * hl2 - (2.0 * math.log(2.0) - 1.0) * log_co * log_co
    put("volat_gk_20", np.sqrt(np.maximum(ind.rolling_mean(gk, 20), 0.0)))
    put("volat_range_ratio_20", ind.safe_div(log_hl, ind.rolling_mean(log_hl, 20), 1.0))

    # --- time (UTC, the bar's open time) -------------------------------------------------------------------------------
    ms_of_day = ts % _DAY_MS
    hour_frac = ms_of_day / _HOUR_MS
    dow = ((ts // _DAY_MS) + 3) % 7                     # 1970-01-01 was a Thursday
    day_angle = 2.0 * math.pi * hour_frac / 24.0
    week_angle = 2.0 * math.pi * (dow + hour_frac / 24.0) / 7.0
    put("time_hour", np.floor(hour_frac))
    put("time_dow", dow.astype(np.float64))
    put("time_hour_sin", np.sin(day_angle))
    put("time_hour_cos", np.cos(day_angle))
    put("time_dow_sin", np.sin(week_angle))
    put("time_dow_cos", np.cos(week_angle))
    put("time_weekend", ind.flag(dow >= 5))

    # --- summary of the votes -----------------------------------------------------------------------------------------
    votes = out[[_IDX[s] for s in SUGGEST_FEATURES]]
    put("sig_buy_votes", (votes > 0).mean(axis=0))
    put("sig_sell_votes", (votes < 0).mean(axis=0))
    put("sig_trend_net", out[[_IDX[s] for s in TREND_FEATURES]].mean(axis=0))

    if not filled.all():  # a catalogue entry without code is a bug, never a silent column
        missing = [FEATURE_NAMES[i] for i in np.flatnonzero(~filled)]
        raise RuntimeError(f"features not computed: {missing}")
    return out


def _frame(block: np.ndarray, ts: np.ndarray) -> pd.DataFrame:
    """(features x rows) block -> DataFrame indexed by ts, without copying the block."""
    return pd.DataFrame(block.T, index=pd.Index(ts, dtype=np.int64, name="ts"),
                        columns=FEATURE_NAMES, copy=False)


def feature_matrix(candles: pd.DataFrame, *, drop_warmup: bool = True) -> pd.DataFrame:
    """One row per candle (index: the candle's ts), columns FEATURE_NAMES, float64.

    Row t uses candles[<= t] only. With drop_warmup (default) the first WARMUP_BARS rows are
    dropped and no value is NaN or infinite; with drop_warmup=False they are kept, all NaN.
    """
    ts, o, h, lo, c, v = _arrays(candles)
    block = _compute(ts, o, h, lo, c, v)
    w = min(WARMUP_BARS, len(ts))
    if drop_warmup:
        return _frame(block[:, w:], ts[w:])
    block[:, :w] = np.nan
    return _frame(block, ts)

