"""The look-ahead check: planted peeks are caught and named, causal features pass."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ml.data.synthetic import ORIGIN_TS, generate_candles
from ml.features import (
    FEATURE_NAMES,
    WARMUP_BARS,
    LeakReport,
    LookAheadError,
    assert_causal,
    feature_matrix,
    find_lookahead,
)
from ml.features.causality import default_cuts, leaking_features

TF = 300_000
N = 3_000


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    # A seed and trend no other fixture uses, so nothing here is tuned to one series.
    return generate_candles("ETH", N, seed=2024, drift=-1.3, end_ts=ORIGIN_TS + 40_000 * TF)


def _close(c: pd.DataFrame) -> pd.Series:
    return c.set_index("ts")["close"]


def with_column(name: str, make):
    """feature_matrix plus one extra column computed from the close series (aligned by ts)."""
    def fn(c: pd.DataFrame) -> pd.DataFrame:
        m = feature_matrix(c)
        m[name] = make(_close(c)).reindex(m.index)
        return m
    return fn


def test_real_feature_matrix_is_causal(candles: pd.DataFrame) -> None:
    assert find_lookahead(candles) == []
    assert_causal(candles)  # does not raise
    # more cuts, including the first row after the warm-up and the last bar that can be cut off
    assert find_lookahead(candles, cuts=[WARMUP_BARS, 777, 1999, N - 2], rtol=1e-12, atol=1e-14) == []


def test_one_bar_peek_is_caught_and_named(candles: pd.DataFrame) -> None:
    fn = with_column("peek_next_ret", lambda close: close.shift(-1) / close)
    reports = find_lookahead(candles, fn)
    cuts = default_cuts(N)
    assert leaking_features(reports) == ["peek_next_ret"]  # none of the real features
    assert [r.cut for r in reports] == cuts
    ts = candles["ts"].to_numpy()
    for r in reports:
        assert r.kind == "value" and r.cut_ts == ts[r.cut]
        assert r.first_diff_ts == ts[r.cut]  # one bar ahead: only the cut row knows the future
        assert r.max_abs_diff == math.inf  # NaN on the truncated side, a number on the full one
    with pytest.raises(LookAheadError, match="peek_next_ret") as info:
        assert_causal(candles, fn)
    assert isinstance(info.value, ValueError)
    assert info.value.features == ["peek_next_ret"] and info.value.reports == reports
    assert len(str(info.value).splitlines()) == 1


def test_centred_rolling_mean_is_caught(candles: pd.DataFrame) -> None:
    fn = with_column("close_centred_ma5", lambda close: close.rolling(5, center=True).mean() / close)
    reports = find_lookahead(candles, fn, cuts=[1200, 2500])
    assert leaking_features(reports) == ["close_centred_ma5"]
    ts = candles["ts"].to_numpy()
    assert [r.first_diff_ts for r in reports] == [ts[1199], ts[2499]]  # the window reaches 2 bars on


def test_peek_that_never_goes_nan_is_caught_with_its_size(candles: pd.DataFrame) -> None:
    # A whole-series normalisation and a back-filled peek: finite on both sides, just different.
    fn = with_column("close_zscore_all", lambda close: (close - close.mean()) / close.std())
    reports = find_lookahead(candles, fn)
    assert leaking_features(reports) == ["close_zscore_all"]
    assert all(0 < r.max_abs_diff < math.inf for r in reports)
    assert all(r.first_diff_ts == candles["ts"].iloc[WARMUP_BARS] for r in reports)  # every row moves

    ffilled = with_column("peek_ffilled", lambda close: (close.shift(-3) / close).ffill())
    assert leaking_features(find_lookahead(candles, ffilled, rtol=0, atol=0)) == ["peek_ffilled"]


def test_legit_causal_extra_columns_pass(candles: pd.DataFrame) -> None:
    def fn(c: pd.DataFrame) -> pd.DataFrame:
        m = feature_matrix(c)
        close = _close(c)
        m["close_trailing_ma5"] = (close.rolling(5).mean() / close).reindex(m.index)
        m["ret_pct_1"] = close.pct_change().reindex(m.index)
        m["close_expanding_max_dist"] = (close / close.cummax() - 1).reindex(m.index)
        return m

    assert find_lookahead(candles, fn) == []
    assert_causal(candles, fn, n_cuts=5)


def test_rows_dropped_because_of_the_future_are_caught(candles: pd.DataFrame) -> None:
    # shift(-1) followed by dropna: the truncated matrix lacks the cut row instead of holding NaN
    def fn(c: pd.DataFrame) -> pd.DataFrame:
        m = feature_matrix(c)
        close = _close(c)
        m["next_close_ratio"] = (close.shift(-1) / close).reindex(m.index)
        return m.dropna()

    reports = find_lookahead(candles, fn, cuts=[2000])
    assert {r.feature for r in reports} == set(FEATURE_NAMES) | {"next_close_ratio"}
    assert all(r.first_diff_ts == candles["ts"].iloc[2000] for r in reports)


def test_column_present_on_one_side_only_is_reported(candles: pd.DataFrame) -> None:
    def fn(c: pd.DataFrame) -> pd.DataFrame:
        m = feature_matrix(c)
        if len(c) == N:  # a column that only exists once the whole series is known
            m["only_with_future"] = 1.0
        else:
            m["only_without_future"] = 1.0
        return m

    reports = find_lookahead(candles, fn, cuts=[1500])
    assert reports == [
        LeakReport("only_with_future", 1500, int(candles["ts"].iloc[1500]), math.inf, None,
                   "missing_in_truncated"),
        LeakReport("only_without_future", 1500, int(candles["ts"].iloc[1500]), math.inf, None,
                   "missing_in_full"),
    ]
    with pytest.raises(LookAheadError, match="only_with_future.*only_without_future"):
        assert_causal(candles, fn, cuts=[1500])


def test_default_cuts_spread_over_the_second_half() -> None:
    assert default_cuts(3000) == [1500, 2249, 2998]
    assert default_cuts(3000, n_cuts=1) == [1500]
    assert default_cuts(300) == [WARMUP_BARS, 249, 298]  # never inside the warm-up
    assert default_cuts(WARMUP_BARS + 2, n_cuts=4) == [WARMUP_BARS]
    with pytest.raises(ValueError, match="candles"):
        default_cuts(WARMUP_BARS + 1)
    with pytest.raises(ValueError, match="n_cuts"):
        default_cuts(3000, n_cuts=0)


def test_bad_input(candles: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="cut positions"):
        find_lookahead(candles, cuts=[N - 1])
    with pytest.raises(ValueError, match="cut positions"):
        find_lookahead(candles, cuts=[-1])
    with pytest.raises(ValueError, match="candles"):
        find_lookahead(candles.iloc[:WARMUP_BARS])
    with pytest.raises(ValueError, match="indexed by the candles' ts"):
        find_lookahead(candles, lambda c: feature_matrix(c).reset_index(drop=True))
    with pytest.raises(TypeError, match="DataFrame"):
        find_lookahead(candles, lambda c: c["close"].to_numpy())
    with pytest.raises(ValueError, match="duplicate"):
        find_lookahead(candles, lambda c: pd.concat([feature_matrix(c)[["rsi_14"]]] * 2, axis=1))
