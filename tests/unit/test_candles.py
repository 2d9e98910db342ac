"""Candle validation: every bad row is rejected and counted by its reason; gaps are reported."""

import numpy as np
import pandas as pd
import pytest

from ml.data.candles import find_gaps, infer_timeframe_ms, validate_candles
from ml.pairs import InvalidPairError, validate_pair

TF = 300_000


def _good(n=10, start=1_700_000_000_000):
    ts = start + TF * np.arange(n)
    close = 100 + np.arange(n, dtype=float)
    return pd.DataFrame(
        {"ts": ts, "open": close - 0.5, "high": close + 1, "low": close - 1, "close": close, "volume": 10.0}
    )


def test_good_candles_pass_unchanged():
    df = _good()
    res = validate_candles(df, TF)
    assert res.rejected_total == 0
    assert res.gaps == []
    pd.testing.assert_frame_equal(res.candles, df.astype({"volume": "float64"}))
    assert res.candles["ts"].dtype == np.int64


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"close": np.nan}, "nan"),
        ({"low": -1.0}, "non_positive_price"),
        ({"high": 90.0, "low": 95.0, "open": 92, "close": 92}, "high_below_low"),
        ({"open": 500.0}, "open_outside_range"),
        ({"close": 1.0}, "close_outside_range"),
        ({"volume": -5.0}, "negative_volume"),
    ],
)
def test_each_bad_value_is_counted_by_reason(row, reason):
    df = _good()
    for k, v in row.items():
        df.loc[4, k] = v
    res = validate_candles(df, TF)
    assert res.rejected[reason] == 1
    assert res.rejected_total == 1
    assert len(res.candles) == 9
    assert df.loc[4, "ts"] not in set(res.candles["ts"])


def test_duplicates_and_unordered():
    df = _good(6)
    df = pd.concat([df, df.iloc[[2]], df.iloc[[1]].assign(ts=df.ts[1] - 1)], ignore_index=True)
    res = validate_candles(df, TF)
    assert res.rejected["duplicate_ts"] == 1
    assert res.rejected["unordered_ts"] == 1
    assert res.duplicates == 1
    assert res.candles["ts"].is_monotonic_increasing


def test_newest_first_file_is_reversed_not_rejected():
    df = _good(8).iloc[::-1].reset_index(drop=True)
    res = validate_candles(df, TF)
    assert res.rejected_total == 0
    assert res.candles["ts"].is_monotonic_increasing


def test_gaps_reported():
    df = _good(10).drop(index=[3, 4, 7]).reset_index(drop=True)
    res = validate_candles(df, TF)
    assert [(g.missing_bars) for g in res.gaps] == [2, 1]
    s = res.summary()
    assert s["gaps"] == 2 and s["missingBars"] == 3 and s["imported"] == 7
    assert find_gaps(np.array([0, TF, 2 * TF]), TF) == []
    assert infer_timeframe_ms(df["ts"].to_numpy()) == TF


def test_missing_column_is_clear():
    with pytest.raises(ValueError, match="volume"):
        validate_candles(_good().drop(columns=["volume"]))


@pytest.mark.parametrize("bad", ["btc", "B", "../x", "", "BTC/USDT", "ＢＴＣ", "A" * 16, "BTC\x00"])
def test_invalid_pairs_refused(bad):
    with pytest.raises(InvalidPairError):
        validate_pair(bad)


def test_valid_pairs():
    for p in ["BTC", "ETH", "XMR", "RVN", "1INCH", "AB"]:
        assert validate_pair(p) == p
