"""The feature matrix (docs/features.md): names, warm-up, causality, scale-freeness, the serving window."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.features import (
    CATALOG,
    FEATURE_NAMES,
    LOOKBACK_BARS,
    WARMUP_BARS,
    feature_matrix,
    feature_names_hash,
    find_lookahead,
    latest_window,
)
from ml.features.catalog import SUGGEST_FEATURES, TREND_FEATURES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "features.md"
T0 = 1_735_689_600_000  # 2025-01-01T00:00Z, a Wednesday
BAR_MS = 300_000


def make_candles(n: int, seed: int = 0, price: float = 100.0, start_ts: int = T0) -> pd.DataFrame:
    """A private random walk with volatility clustering, valid OHLC and a volume pattern."""
    rng = np.random.default_rng(seed)
    logvol = np.zeros(n)
    eps = rng.normal(0.0, 0.25, n)
    for i in range(1, n):
        logvol[i] = 0.97 * logvol[i - 1] + eps[i]
    ret = rng.standard_t(5, n) * 0.002 * np.exp(logvol)
    close = price * np.exp(np.cumsum(ret))
    opn = np.empty(n)
    if n:
        opn[0] = price
        opn[1:] = close[:-1] * np.exp(rng.normal(0.0, 0.0002, n - 1))
    wick = np.abs(rng.normal(0.0, 0.001, (2, n))) * np.exp(logvol)
    high = np.maximum(opn, close) * np.exp(wick[0])
    low = np.minimum(opn, close) * np.exp(-wick[1])
    volume = rng.lognormal(2.0, 0.6, n) * (1 + np.abs(ret) * 200)
    ts = start_ts + np.arange(n, dtype=np.int64) * BAR_MS
    return pd.DataFrame({"ts": ts, "open": opn, "high": high, "low": low, "close": close,
                         "volume": volume})


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    return make_candles(2000, seed=11)


@pytest.fixture(scope="module")
def matrix(candles: pd.DataFrame) -> pd.DataFrame:
    return feature_matrix(candles)


def assert_same(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert list(a.columns) == list(b.columns)
    np.testing.assert_array_equal(a.index.to_numpy(), b.index.to_numpy())
    x, y = a.to_numpy(), b.to_numpy()
    bad = ~np.isclose(x, y, rtol=rtol, atol=atol)
    if bad.any():
        cols = sorted({a.columns[j] for j in np.flatnonzero(bad.any(axis=0))})
        raise AssertionError(f"{int(bad.sum())} values differ, in {cols[:10]}")


# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------

def test_names_unique_snake_case_and_enough() -> None:
    assert len(FEATURE_NAMES) >= 84
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name), name
    assert [f.name for f in CATALOG] == FEATURE_NAMES
    assert set(SUGGEST_FEATURES) <= set(FEATURE_NAMES) and set(TREND_FEATURES) <= set(FEATURE_NAMES)


def test_every_original_indicator_has_value_flags_trend_and_suggestion() -> None:
    names = set(FEATURE_NAMES)
    for prefix in ("rsi", "stoch", "willr", "cci", "bb"):
        assert {f"{prefix}_overbought", f"{prefix}_oversold", f"{prefix}_suggest"} <= names, prefix
    for prefix in ("rsi", "macd", "bb", "willr", "ichi", "adx", "cci", "sar", "ma", "vol_obv", "vol"):
        assert f"{prefix}_trend" in names, prefix
    assert {"rsi_14", "macd_line", "macd_signal_line", "macd_hist", "bb_pct_b", "bb_width",
            "ma_sma_10_dist", "ma_sma_21_dist", "ma_ema_10_dist", "ma_ema_21_dist", "vol_ratio_20",
            "vol_spike", "vol_obv_slope_20", "stoch_k", "stoch_d", "willr_14", "ichi_tenkan_dist",
            "ichi_kijun_dist", "adx_14", "adx_plus_di", "adx_minus_di", "cci_20", "sar_dist"} <= names
    assert not any("chikou" in n for n in names)
    groups = {f.group for f in CATALOG}
    assert {"price", "volume", "volatility", "time"} <= groups


def test_feature_names_hash() -> None:
    h = feature_names_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert h == feature_names_hash(list(FEATURE_NAMES))
    swapped = list(FEATURE_NAMES)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert feature_names_hash(swapped) != h
    assert feature_names_hash(FEATURE_NAMES[:-1]) != h


def test_docs_list_every_feature() -> None:
    text = DOCS.read_text()
    missing = [n for n in FEATURE_NAMES if f"`{n}`" not in text]
    assert not missing, f"docs/features.md lacks {missing}"


# ------------------------------------------------------------------------------------------------
# shape, warm-up, determinism
# ------------------------------------------------------------------------------------------------

def test_shape_index_dtypes_and_no_nan_after_warmup(candles: pd.DataFrame, matrix: pd.DataFrame) -> None:
    assert WARMUP_BARS >= 200
    assert list(matrix.columns) == FEATURE_NAMES
    assert len(matrix) == len(candles) - WARMUP_BARS
    assert matrix.index.name == "ts" and matrix.index.dtype == np.int64
    np.testing.assert_array_equal(matrix.index.to_numpy(), candles["ts"].to_numpy()[WARMUP_BARS:])
    assert (matrix.dtypes == np.float64).all()
    assert np.isfinite(matrix.to_numpy()).all()


def test_first_row_after_warmup_is_complete() -> None:
    m = feature_matrix(make_candles(WARMUP_BARS + 1, seed=5))
    assert len(m) == 1 and np.isfinite(m.to_numpy()).all()
    assert len(feature_matrix(make_candles(WARMUP_BARS, seed=5))) == 0
    empty = feature_matrix(make_candles(0))
    assert empty.shape == (0, len(FEATURE_NAMES)) and list(empty.columns) == FEATURE_NAMES


def test_drop_warmup_false_keeps_every_row(candles: pd.DataFrame, matrix: pd.DataFrame) -> None:
    full = feature_matrix(candles, drop_warmup=False)
    assert len(full) == len(candles)
    assert full.iloc[:WARMUP_BARS].isna().all().all()
    assert_same(full.iloc[WARMUP_BARS:], matrix, rtol=0, atol=0)


def test_deterministic(candles: pd.DataFrame, matrix: pd.DataFrame) -> None:
    again = feature_matrix(candles.copy())
    assert again.equals(matrix)


def test_value_ranges_and_codes(matrix: pd.DataFrame) -> None:
    def within(col: str, lo: float, hi: float) -> None:
        x = matrix[col].to_numpy()
        assert ((x >= lo) & (x <= hi)).all(), col

    within("rsi_14", 0, 100)
    within("stoch_k", 0, 100)
    within("stoch_d", 0, 100)
    within("willr_14", -100, 0)
    within("adx_14", 0, 100)
    within("vol_mfi_14", 0, 100)
    within("candle_close_pos", 0, 1)
    within("candle_body", -1, 1)
    within("vol_cmf_20", -1, 1)
    within("time_hour", 0, 23)
    within("time_dow", 0, 6)
    for name in FEATURE_NAMES:
        if name.endswith(("_overbought", "_oversold", "_spike", "_strong_trend", "_weekend")):
            assert set(np.unique(matrix[name])) <= {0.0, 1.0}, name
        if name.endswith(("_trend", "_suggest", "_cross", "_cloud_pos", "_zero_side")) and name != "sig_trend_net":
            assert set(np.unique(matrix[name])) <= {-1.0, 0.0, 1.0}, name
    # every flag and suggestion actually fires somewhere on 1,800 bars of a random walk
    for name in ("rsi_overbought", "rsi_oversold", "stoch_suggest", "macd_cross", "sar_suggest", "ma_cross"):
        assert (matrix[name] != 0).any(), name


def test_time_features_are_utc() -> None:
    # 2025-01-04 is a Saturday; bar open 13:30 UTC
    start = T0 + 3 * 86_400_000 + 13 * 3_600_000 + 30 * 60_000 - WARMUP_BARS * BAR_MS
    m = feature_matrix(make_candles(WARMUP_BARS + 1, start_ts=start))
    row = m.iloc[0]
    assert m.index[0] == T0 + 3 * 86_400_000 + 13 * 3_600_000 + 30 * 60_000
    assert row["time_hour"] == 13 and row["time_dow"] == 5 and row["time_weekend"] == 1
    angle = 2 * np.pi * 13.5 / 24
    assert row["time_hour_sin"] == pytest.approx(np.sin(angle)) and row["time_hour_cos"] == pytest.approx(np.cos(angle))


# ------------------------------------------------------------------------------------------------
# causality
# ------------------------------------------------------------------------------------------------

def test_rows_up_to_k_only_use_candles_up_to_k(candles: pd.DataFrame) -> None:
    # The truncation check of ml.features.causality (tests/unit/test_causality.py covers the check
    # itself): the matrix of candles[:k+1] equals the full matrix's rows <= k, for several k.
    cuts = [WARMUP_BARS, WARMUP_BARS + 1, 257, 640, 1333, 1998]
    reports = find_lookahead(candles, cuts=cuts, rtol=1e-12, atol=1e-14)
    assert not reports, [r.describe() for r in reports[:10]]
    assert feature_matrix(candles.iloc[: WARMUP_BARS + 1]).index[-1] == candles["ts"].iloc[WARMUP_BARS]


@pytest.mark.parametrize("k", [WARMUP_BARS + 3, 700, 1500])
def test_future_spike_changes_no_past_row(candles: pd.DataFrame, matrix: pd.DataFrame, k: int) -> None:
    spiked = candles.copy()
    j = k + 1
    spiked.loc[j, "close"] *= 25.0
    spiked.loc[j, "high"] = max(spiked.loc[j, "high"] * 30.0, spiked.loc[j, "close"])
    spiked.loc[j, "low"] *= 0.5
    spiked.loc[j, "volume"] *= 1000.0
    m = feature_matrix(spiked)
    t_k = candles["ts"].iloc[k]
    assert_same(m.loc[:t_k], matrix.loc[:t_k], rtol=1e-12, atol=1e-14)
    changed = ~np.isclose(m.loc[candles["ts"].iloc[j]].to_numpy(), matrix.loc[candles["ts"].iloc[j]].to_numpy())
    assert changed.sum() > len(FEATURE_NAMES) // 2  # the spike is visible from bar k+1 on


def test_ichimoku_cloud_uses_spans_from_26_bars_ago(candles: pd.DataFrame, matrix: pd.DataFrame) -> None:
    h, lo, c = (candles[x].to_numpy() for x in ("high", "low", "close"))
    t = 1500
    s = t - 26
    span_a = ((h[s - 8: s + 1].max() + lo[s - 8: s + 1].min()) / 2
              + (h[s - 25: s + 1].max() + lo[s - 25: s + 1].min()) / 2) / 2
    span_b = (h[s - 51: s + 1].max() + lo[s - 51: s + 1].min()) / 2
    row = matrix.loc[candles["ts"].iloc[t]]
    assert row["ichi_span_a_dist"] == pytest.approx(c[t] / span_a - 1, rel=1e-9, abs=1e-13)
    assert row["ichi_span_b_dist"] == pytest.approx(c[t] / span_b - 1, rel=1e-9, abs=1e-13)


# ------------------------------------------------------------------------------------------------
# scale-freeness, degenerate candles, bad input
# ------------------------------------------------------------------------------------------------

def test_scale_free(candles: pd.DataFrame, matrix: pd.DataFrame) -> None:
    scaled = candles.copy()
    scaled[["open", "high", "low", "close"]] *= 1000.0
    scaled["volume"] *= 7.0
    assert_same(feature_matrix(scaled), matrix, rtol=1e-7, atol=1e-10)
    tiny = candles.copy()
    tiny[["open", "high", "low", "close"]] *= 1e-6  # a sub-cent coin
    assert_same(feature_matrix(tiny), matrix, rtol=1e-7, atol=1e-10)


def test_flat_candles_and_zero_volume_stay_finite() -> None:
    c = make_candles(900, seed=2)
    c.loc[300:520, ["open", "high", "low", "close"]] = float(c.loc[299, "close"])
    c.loc[400:700, "volume"] = 0.0
    m = feature_matrix(c)
    assert np.isfinite(m.to_numpy()).all()
    flat = m.loc[c["ts"].iloc[500]]
    assert flat["stoch_k"] == 50.0 and flat["willr_14"] == -50.0 and flat["bb_pct_b"] == 0.5
    dead = m.loc[c["ts"].iloc[690]]
    assert dead["vol_ratio_20"] == 1.0 and dead["vol_zscore_20"] == 0.0 and dead["vol_mfi_14"] == 50.0


def test_bad_input_is_refused() -> None:
    c = make_candles(300)
    with pytest.raises(ValueError, match="volume"):
        feature_matrix(c.drop(columns=["volume"]))
    with pytest.raises(ValueError, match="increasing"):
        feature_matrix(c.iloc[::-1].reset_index(drop=True))
    bad = c.copy()
    bad.loc[10, "close"] = np.nan
    with pytest.raises(ValueError, match="validate"):
        feature_matrix(bad)


# ------------------------------------------------------------------------------------------------
# the serving window
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_candles() -> pd.DataFrame:
    return make_candles(5000, seed=21)


@pytest.fixture(scope="module")
def long_matrix(long_candles: pd.DataFrame) -> pd.DataFrame:
    return feature_matrix(long_candles)


@pytest.mark.parametrize("rows", [1, 30, 60, 700])
def test_latest_window_equals_tail_on_long_series(long_candles: pd.DataFrame, long_matrix: pd.DataFrame,
                                                 rows: int) -> None:
    assert len(long_candles) > LOOKBACK_BARS + rows  # really computed from a tail
    w = latest_window(long_candles, rows)
    assert w.index.name == "ts" and list(w.columns) == FEATURE_NAMES and len(w) == rows
    assert_same(w, long_matrix.tail(rows), rtol=1e-9, atol=1e-12)


def test_latest_window_on_short_series() -> None:
    for n, rows in ((WARMUP_BARS + 60, 60), (WARMUP_BARS + 1, 1), (400, 60), (LOOKBACK_BARS + 60, 60)):
        c = make_candles(n, seed=n)
        assert_same(latest_window(c, rows), feature_matrix(c).tail(rows), rtol=0, atol=0)


def test_latest_window_tracks_sar_over_the_whole_history() -> None:
    """SAR is path-dependent: a long trend before the tail must still be seen by the window."""
    c = make_candles(3000, seed=8)
    drift = np.exp(np.linspace(0, 0.8, 3000))  # a persistent up-trend
    c[["open", "high", "low", "close"]] = c[["open", "high", "low", "close"]].mul(drift, axis=0)
    assert_same(latest_window(c, 60), feature_matrix(c).tail(60), rtol=1e-9, atol=1e-12)


def test_latest_window_runs_the_path_dependent_sar_over_all_candles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in SAR whose value depends on where its array starts: only a SAR computed over all
    candles given (not over the tail) lets the window equal the full matrix."""
    from ml.features import indicators

    def start_dependent_sar(high: np.ndarray, low: np.ndarray, acceleration: float, maximum: float) -> np.ndarray:
        return np.minimum.accumulate(low) * 0.999

    monkeypatch.setattr(indicators, "parabolic_sar", start_dependent_sar)
    c = make_candles(LOOKBACK_BARS + 400, seed=9)
    c[["open", "high", "low", "close"]] = c[["open", "high", "low", "close"]].mul(
        np.exp(np.linspace(0.0, 1.0, len(c))), axis=0)  # rising: the running minimum of the tail differs
    assert_same(latest_window(c, 60), feature_matrix(c).tail(60), rtol=1e-9, atol=1e-12)


def test_latest_window_too_few_candles() -> None:
    c = make_candles(WARMUP_BARS + 59)
    with pytest.raises(ValueError, match=f"at least {WARMUP_BARS + 60} candles"):
        latest_window(c, 60)
    with pytest.raises(ValueError):
        latest_window(make_candles(1000), 0)
    with pytest.raises(ValueError):
        latest_window(make_candles(0), 1)
