"""The feature catalogue: every feature's name, group and formula, in matrix column order.

This list is the single source of FEATURE_NAMES (and of the table in docs/features.md). Changing a
name, adding, removing or reordering a feature changes `feature_names_hash`, which every saved model
carries, so a model is never fed columns it was not trained on.

Notation: o, h, l, c, v are the bar's open, high, low, close, volume; x[t-k] is x k bars ago;
r = ln(c / c[t-1]); HH_k / LL_k = highest high / lowest low over the last k bars (t included);
SMA_k, EMA_k, std_k are over the last k bars; flags are 0/1; trend and suggestion fields are
-1/0/+1 (+1 = bullish / buy). Divisions by zero give the neutral value in brackets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    group: str
    formula: str


_S = FeatureSpec

CATALOG: tuple[FeatureSpec, ...] = (
    # --- price / returns ------------------------------------------------------------------------
    _S("ret_log_1", "price", "ln(c / c[t-1])"),
    _S("ret_log_2", "price", "ln(c / c[t-2])"),
    _S("ret_log_3", "price", "ln(c / c[t-3])"),
    _S("ret_log_5", "price", "ln(c / c[t-5])"),
    _S("ret_log_10", "price", "ln(c / c[t-10])"),
    _S("ret_log_20", "price", "ln(c / c[t-20])"),
    _S("ret_log_50", "price", "ln(c / c[t-50])"),
    _S("ret_gap", "price", "ln(o / c[t-1]) (opening gap)"),
    _S("ret_sharpe_20", "price", "mean_20(r) / std_20(r) [0]"),
    _S("ret_up_frac_20", "price", "fraction of the last 20 bars with r > 0"),
    _S("candle_body", "price", "(c - o) / (h - l) [0], in [-1, 1]"),
    _S("candle_upper_wick", "price", "(h - max(o, c)) / (h - l) [0]"),
    _S("candle_lower_wick", "price", "(min(o, c) - l) / (h - l) [0]"),
    _S("candle_close_pos", "price", "(c - l) / (h - l) [0.5]"),
    _S("candle_range", "price", "ln(h / l)"),
    _S("candle_body_log", "price", "ln(c / o)"),
    _S("price_dist_high_20", "price", "c / HH_20 - 1"),
    _S("price_dist_high_50", "price", "c / HH_50 - 1"),
    _S("price_dist_high_100", "price", "c / HH_100 - 1"),
    _S("price_dist_low_20", "price", "c / LL_20 - 1"),
    _S("price_dist_low_50", "price", "c / LL_50 - 1"),
    _S("price_dist_low_100", "price", "c / LL_100 - 1"),
    _S("price_range_pos_20", "price", "(c - LL_20) / (HH_20 - LL_20) [0.5]"),
    _S("price_range_pos_50", "price", "(c - LL_50) / (HH_50 - LL_50) [0.5]"),
    # --- moving averages 10 / 21 (+ long SMAs) -------------------------------------------------
    _S("ma_sma_10_dist", "moving_average", "c / SMA_10(c) - 1"),
    _S("ma_sma_21_dist", "moving_average", "c / SMA_21(c) - 1"),
    _S("ma_ema_10_dist", "moving_average", "c / EMA_10(c) - 1"),
    _S("ma_ema_21_dist", "moving_average", "c / EMA_21(c) - 1"),
    _S("ma_sma_10_21_spread", "moving_average", "SMA_10 / SMA_21 - 1"),
    _S("ma_ema_10_21_spread", "moving_average", "EMA_10 / EMA_21 - 1"),
    _S("ma_ema_10_slope", "moving_average", "EMA_10 / EMA_10[t-5] - 1"),
    _S("ma_ema_21_slope", "moving_average", "EMA_21 / EMA_21[t-5] - 1"),
    _S("ma_trend", "moving_average", "sign(EMA_10 - EMA_21)"),
    _S("ma_cross", "moving_average", "+1 EMA_10 crosses above EMA_21 at t, -1 crosses below, else 0"),
    _S("ma_suggest", "moving_average", "+1 if c > EMA_10 > EMA_21, -1 if c < EMA_10 < EMA_21, else 0"),
    _S("ma_sma_50_dist", "moving_average", "c / SMA_50(c) - 1"),
    _S("ma_sma_100_dist", "moving_average", "c / SMA_100(c) - 1"),
    _S("ma_sma_200_dist", "moving_average", "c / SMA_200(c) - 1"),
    # --- RSI 14 (Wilder) ---------------------------------------------------------------------------
    _S("rsi_14", "rsi", "RSI(14), Wilder smoothing, in [0, 100] (talib.RSI)"),
    _S("rsi_overbought", "rsi", "rsi_14 > 70"),
    _S("rsi_oversold", "rsi", "rsi_14 < 30"),
    _S("rsi_trend", "rsi", "sign(rsi_14 - 50)"),
    _S("rsi_change_3", "rsi", "rsi_14 - rsi_14[t-3]"),
    _S("rsi_suggest", "rsi", "+1 if RSI crosses up through 30 at t, -1 if it crosses down through 70"),
    # --- MACD 12/26/9 ------------------------------------------------------------------------------
    _S("macd_line", "macd", "100 * (EMA_12 - EMA_26) / c (talib.MACD 12/26/9)"),
    _S("macd_signal_line", "macd", "100 * EMA_9(macd) / c"),
    _S("macd_hist", "macd", "100 * (macd - signal) / c"),
    _S("macd_hist_change", "macd", "100 * (hist - hist[t-1]) / c"),
    _S("macd_trend", "macd", "sign(macd - signal)"),
    _S("macd_cross", "macd", "+1 macd crosses above signal at t, -1 crosses below, else 0"),
    _S("macd_zero_side", "macd", "sign(macd)"),
    _S("macd_suggest", "macd", "+1 if hist > 0 and rising, -1 if hist < 0 and falling, else 0"),
    # --- Bollinger 20 / 2 sigma ----------------------------------------------------------------------
    _S("bb_pct_b", "bollinger", "(c - lower) / (upper - lower) [0.5]; bands SMA_20 +- 2 * pop. std_20"),
    _S("bb_width", "bollinger", "(upper - lower) / middle"),
    _S("bb_width_ratio_100", "bollinger", "bb_width / mean_100(bb_width) [1]"),
    _S("bb_dist_upper", "bollinger", "(c - upper) / c"),
    _S("bb_dist_lower", "bollinger", "(c - lower) / c"),
    _S("bb_overbought", "bollinger", "c > upper"),
    _S("bb_oversold", "bollinger", "c < lower"),
    _S("bb_trend", "bollinger", "sign(middle - middle[t-5])"),
    _S("bb_suggest", "bollinger",
       "+1 if c re-enters the band from below (c[t-1] < lower[t-1], c >= lower), -1 from above"),
    # --- Stochastic 14/3/3 (slow) ----------------------------------------------------------------
    _S("stoch_k", "stochastic", "slow %K = SMA_3(fast %K_14), in [0, 100] (talib.STOCH 14,3,SMA,3,SMA)"),
    _S("stoch_d", "stochastic", "%D = SMA_3(slow %K)"),
    _S("stoch_k_minus_d", "stochastic", "stoch_k - stoch_d"),
    _S("stoch_overbought", "stochastic", "stoch_k > 80"),
    _S("stoch_oversold", "stochastic", "stoch_k < 20"),
    _S("stoch_cross", "stochastic", "+1 %K crosses above %D at t, -1 crosses below, else 0"),
    _S("stoch_suggest", "stochastic",
       "+1 if %K crosses above %D with %K[t-1] < 20, -1 if it crosses below with %K[t-1] > 80"),
    # --- Williams %R 14 -----------------------------------------------------------------------------
    _S("willr_14", "williams_r", "-100 * (HH_14 - c) / (HH_14 - LL_14) [-50], in [-100, 0] (talib.WILLR)"),
    _S("willr_overbought", "williams_r", "willr_14 > -20"),
    _S("willr_oversold", "williams_r", "willr_14 < -80"),
    _S("willr_trend", "williams_r", "sign(willr_14 + 50)"),
    _S("willr_suggest", "williams_r", "+1 if %R crosses up through -80 at t, -1 if it crosses down through -20"),
    # --- Ichimoku 9/26/52, no Chikou -------------------------------------------------------------------
    _S("ichi_tenkan_dist", "ichimoku", "c / tenkan - 1; tenkan = (HH_9 + LL_9) / 2"),
    _S("ichi_kijun_dist", "ichimoku", "c / kijun - 1; kijun = (HH_26 + LL_26) / 2"),
    _S("ichi_tk_spread", "ichimoku", "tenkan / kijun - 1"),
    _S("ichi_span_a_dist", "ichimoku",
       "c / spanA[t-26] - 1; spanA = (tenkan + kijun) / 2 (the cloud edge plotted at t)"),
    _S("ichi_span_b_dist", "ichimoku",
       "c / spanB[t-26] - 1; spanB = (HH_52 + LL_52) / 2 (the cloud edge plotted at t)"),
    _S("ichi_cloud_thickness", "ichimoku", "(spanA[t-26] - spanB[t-26]) / c (signed: > 0 bullish cloud)"),
    _S("ichi_future_cloud", "ichimoku", "(spanA - spanB) / c, the cloud being projected 26 bars ahead"),
    _S("ichi_cloud_pos", "ichimoku", "+1 c above the cloud at t, -1 below, 0 inside"),
    _S("ichi_tk_cross", "ichimoku", "+1 tenkan crosses above kijun at t, -1 crosses below, else 0"),
    _S("ichi_trend", "ichimoku", "sign(tenkan - kijun)"),
    _S("ichi_suggest", "ichimoku",
       "+1 if above the cloud and tenkan > kijun, -1 if below the cloud and tenkan < kijun, else 0"),
    # --- ADX 14 with +DI / -DI --------------------------------------------------------------------------
    _S("adx_14", "adx", "ADX(14), Wilder, in [0, 100] (talib.ADX)"),
    _S("adx_plus_di", "adx", "+DI(14) (talib.PLUS_DI)"),
    _S("adx_minus_di", "adx", "-DI(14) (talib.MINUS_DI)"),
    _S("adx_di_spread", "adx", "+DI - -DI"),
    _S("adx_strong_trend", "adx", "adx_14 > 25"),
    _S("adx_trend", "adx", "sign(+DI - -DI)"),
    _S("adx_change_3", "adx", "adx_14 - adx_14[t-3]"),
    _S("adx_suggest", "adx", "adx_strong_trend * adx_trend"),
    # --- CCI 20 -------------------------------------------------------------------------------------------
    _S("cci_20", "cci", "(TP - SMA_20(TP)) / (0.015 * meandev_20(TP)) [0], TP = (h + l + c) / 3 (talib.CCI)"),
    _S("cci_overbought", "cci", "cci_20 > 100"),
    _S("cci_oversold", "cci", "cci_20 < -100"),
    _S("cci_trend", "cci", "sign(cci_20)"),
    _S("cci_suggest", "cci", "+1 if CCI crosses up through -100 at t, -1 if it crosses down through +100"),
    # --- Parabolic SAR 0.02 / 0.2 -------------------------------------------------------------------------
    _S("sar_dist", "sar", "(c - SAR) / c (talib.SAR acceleration 0.02, maximum 0.2)"),
    _S("sar_trend", "sar", "sign(c - SAR): +1 SAR below price (up-trend), -1 above"),
    _S("sar_suggest", "sar", "+1 on the bar the SAR trend flips up, -1 flips down, else 0"),
    _S("sar_trend_age", "sar", "bars since the last SAR flip, capped at 50"),
    # --- volume ------------------------------------------------------------------------------------------
    _S("vol_ratio_20", "volume", "v / mean_20(v) [1]"),
    _S("vol_ratio_50", "volume", "v / mean_50(v) [1]"),
    _S("vol_ratio_5_20", "volume", "mean_5(v) / mean_20(v) [1]"),
    _S("vol_spike", "volume", "v > 2 * mean_20(v)"),
    _S("vol_zscore_20", "volume", "(v - mean_20(v)) / std_20(v) [0]"),
    _S("vol_zscore_50", "volume", "(v - mean_50(v)) / std_50(v) [0]"),
    _S("vol_obv_slope_10", "volume",
       "sum_10(sign(c - c[t-1]) * v) / sum_10(v) [0]: OBV change over 10 bars per unit volume"),
    _S("vol_obv_slope_20", "volume", "sum_20(sign(c - c[t-1]) * v) / sum_20(v) [0]"),
    _S("vol_obv_trend", "volume", "sign(vol_obv_slope_20)"),
    _S("vol_trend", "volume", "sign(mean_5(v) - mean_20(v))"),
    _S("vol_mfi_14", "volume", "Money Flow Index 14, 100 * pos. flow / total flow [50], in [0, 100]"),
    _S("vol_cmf_20", "volume",
       "Chaikin money flow: sum_20(((c - l) - (h - c)) / (h - l) * v) / sum_20(v) [0], in [-1, 1]"),
    _S("vol_vwap_dist_20", "volume", "c / VWAP_20 - 1 [0]; VWAP_20 = sum_20(TP * v) / sum_20(v)"),
    _S("vol_suggest", "volume", "vol_spike * sign(c - o)"),
    # --- volatility ------------------------------------------------------------------------------------
    _S("volat_std_5", "volatility", "std_5(r), population"),
    _S("volat_std_10", "volatility", "std_10(r)"),
    _S("volat_std_20", "volatility", "std_20(r)"),
    _S("volat_std_50", "volatility", "std_50(r)"),
    _S("volat_std_100", "volatility", "std_100(r)"),
    _S("volat_ratio_5_50", "volatility", "volat_std_5 / volat_std_50 [1]"),
    _S("volat_ratio_20_100", "volatility", "volat_std_20 / volat_std_100 [1]"),
    _S("volat_atr_pct_14", "volatility", "100 * ATR_14 / c, Wilder ATR (talib.NATR)"),
    _S("volat_parkinson_20", "volatility", "sqrt(mean_20(ln(h / l)^2) / (4 ln 2))"),
    _S("volat_gk_20", "volatility",
       "Garman-Klass: sqrt(mean_20(0.5 ln(h / l)^2 - (2 ln 2 - 1) ln(c / o)^2))"),
    _S("volat_range_ratio_20", "volatility", "ln(h / l) / mean_20(ln(h / l)) [1]"),
    # --- time (UTC, bar open time) ------------------------------------------------------------------
    _S("time_hour", "time", "UTC hour of day of the bar's open time, 0-23"),
    _S("time_dow", "time", "UTC day of week, Monday = 0 ... Sunday = 6"),
    _S("time_hour_sin", "time", "sin(2 pi * hour_frac / 24), hour_frac = hour + minute / 60"),
    _S("time_hour_cos", "time", "cos(2 pi * hour_frac / 24)"),
    _S("time_dow_sin", "time", "sin(2 pi * (dow + hour_frac / 24) / 7)"),
    _S("time_dow_cos", "time", "cos(2 pi * (dow + hour_frac / 24) / 7)"),
    _S("time_weekend", "time", "dow >= 5 (Saturday, Sunday)"),
    # --- summary of the indicator votes ----------------------------------------------------------
    _S("sig_buy_votes", "summary", "fraction of the 11 *_suggest fields equal to +1"),
    _S("sig_sell_votes", "summary", "fraction of the 11 *_suggest fields equal to -1"),
    _S("sig_trend_net", "summary",
       "mean of ma_trend, macd_trend, rsi_trend, ichi_trend, adx_trend, sar_trend, vol_obv_trend"),
)

SUGGEST_FEATURES = ("rsi_suggest", "macd_suggest", "bb_suggest", "stoch_suggest", "willr_suggest",
                    "ichi_suggest", "adx_suggest", "cci_suggest", "sar_suggest", "ma_suggest",
                    "vol_suggest")
TREND_FEATURES = ("ma_trend", "macd_trend", "rsi_trend", "ichi_trend", "adx_trend", "sar_trend",
                  "vol_obv_trend")

