"""Candle file import: generic OHLCV CSV/Parquet and Binance klines, bad rows counted, bad files refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml.data.files import (
    CandleFileError,
    TimeframeMismatchError,
    UnknownTimeframeError,
    detect_format,
    detect_timeframe,
    epoch_to_ms,
    import_file,
    import_file_detailed,
    load_candle_file,
    read_candle_file,
)
from ml.data.store import CandleStore

REPO = Path(__file__).resolve().parents[2]
TF = 300_000
START = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def make_candles(n: int = 60, start: int = START, tf: int = TF, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = np.round(100 + np.cumsum(rng.normal(0, 1, n)), 2)
    open_ = np.r_[close[0], close[:-1]]
    high = np.round(np.maximum(open_, close) + rng.uniform(0, 1, n), 2)
    low = np.round(np.minimum(open_, close) - rng.uniform(0, 1, n), 2)
    volume = np.round(rng.uniform(1, 100, n), 3)
    ts = start + np.arange(n, dtype="int64") * tf
    return pd.DataFrame({"ts": ts, "open": open_, "high": high, "low": low, "close": close, "volume": volume})


def binance_csv(candles: pd.DataFrame, path: Path, micro: bool = False) -> Path:
    lines = []
    for r in candles.itertuples(index=False):
        open_time = int(r.ts) * (1000 if micro else 1)
        close_time = (int(r.ts) + TF - 1) * (1000 if micro else 1) + (999 if micro else 0)
        lines.append(",".join(map(str, [open_time, r.open, r.high, r.low, r.close, r.volume, close_time,
                                        round(r.volume * r.close, 4), 42, r.volume / 2, 1.5, 0])))
    path.write_text("\n".join(lines) + "\n")
    return path


def generic_csv(candles: pd.DataFrame, path: Path, time_col: str, times: list) -> Path:
    lines = [f"{time_col},Open,High,Low,Close,Volume"]
    for t, r in zip(times, candles.itertuples(index=False), strict=True):
        lines.append(f"{t},{r.open},{r.high},{r.low},{r.close},{r.volume}")
    path.write_text("\n".join(lines) + "\n")
    return path


def iso(ts_ms: int, style: int) -> str:
    t = pd.Timestamp(ts_ms, unit="ms", tz="UTC")
    return [t.strftime("%Y-%m-%dT%H:%M:%SZ"), t.strftime("%Y-%m-%d %H:%M:%S"),
            t.isoformat(), t.tz_convert("Europe/Berlin").isoformat()][style % 4]


def run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TBML_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------

@pytest.fixture
def candles() -> pd.DataFrame:
    return make_candles()


def test_all_formats_import_to_the_same_candles(tmp_path, candles):
    ts = candles["ts"].tolist()
    files = {
        "binance_ms": binance_csv(candles, tmp_path / "ms.csv"),
        "binance_us": binance_csv(candles, tmp_path / "us.csv", micro=True),
        "iso": generic_csv(candles, tmp_path / "iso.csv", "Date", [iso(t, i) for i, t in enumerate(ts)]),
        "seconds": generic_csv(candles, tmp_path / "s.csv", "timestamp", [t // 1000 for t in ts]),
        "millis": generic_csv(candles, tmp_path / "ms_generic.csv", "TS", ts),
        "micros": generic_csv(candles, tmp_path / "us_generic.csv", "open_time", [t * 1000 for t in ts]),
    }
    for name, path in files.items():
        result = import_file(path, "auto", TF)
        assert result.rejected_total == 0, name
        assert result.gaps == [], name
        pd.testing.assert_frame_equal(result.candles, candles, check_exact=True, obj=name)
    assert detect_format(files["binance_ms"]) == "binance"
    assert detect_format(files["binance_us"]) == "binance"
    assert detect_format(files["iso"]) == "ohlcv"


def test_explicit_formats_and_format_reported(tmp_path, candles):
    path = binance_csv(candles, tmp_path / "k.csv")
    result, used = import_file_detailed(path, "binance", TF)
    assert used == "binance" and len(result.candles) == len(candles)
    with pytest.raises(CandleFileError, match="no header"):
        read_candle_file(path, "ohlcv")
    generic = generic_csv(candles, tmp_path / "g.csv", "ts", candles["ts"].tolist())
    assert import_file_detailed(generic, "auto", TF)[1] == "ohlcv"
    with pytest.raises(CandleFileError, match="12 columns"):
        read_candle_file(generic, "binance")  # header skipped, but only 6 columns
    with pytest.raises(CandleFileError, match="unknown format"):
        read_candle_file(generic, "excel")


def test_binance_file_spanning_the_ms_to_us_switch(tmp_path, candles):
    head = binance_csv(candles.iloc[:30], tmp_path / "a.csv").read_text()
    tail = binance_csv(candles.iloc[30:], tmp_path / "b.csv", micro=True).read_text()
    path = tmp_path / "both.csv"
    path.write_text(head + tail)
    pd.testing.assert_frame_equal(import_file(path, "auto", TF).candles, candles)


def test_semicolon_delimiter_and_bom(tmp_path, candles):
    text = "\ufeffTimestamp;open;high;low;close;volume\n" + "".join(
        f"{r.ts};{r.open};{r.high};{r.low};{r.close};{r.volume}\n" for r in candles.itertuples())
    path = tmp_path / "semi.csv"
    path.write_text(text, encoding="utf-8")
    pd.testing.assert_frame_equal(import_file(path, "auto", TF).candles, candles)


def test_bad_rows_are_rejected_and_counted_by_reason(tmp_path, candles):
    c = candles.astype({"ts": "int64"})
    good = c.to_dict("records")
    rows = [dict(r) for r in good[:10]]
    step = TF

    def extra(i: int, **changes) -> dict:
        base = dict(good[0])
        base["ts"] = START + (100 + i) * step  # after the good rows, in order
        base.update(changes)
        return base

    rows += [
        dict(good[1]),                                           # duplicate_ts
        extra(0, close=""),                                      # nan (empty)
        extra(1, volume="abc"),                                  # nan (unparseable)
        extra(2, high=90.0, low=110.0, open=100.0, close=100.0),  # high_below_low
        extra(3, volume=-5.0),                                   # negative_volume
        extra(4, open=0.0),                                      # non_positive_price
        extra(5, open=good[0]["high"] + 50),                     # open_outside_range
        extra(6, close=good[0]["low"] - 50),                     # close_outside_range
        extra(7),                                                # accepted
        dict(good[5]),                                           # duplicate_ts
        extra(3 - 10),                                           # unordered_ts (older than last accepted)
    ]
    lines = ["ts,open,high,low,close,volume"]
    lines += [f"{r['ts']},{r['open']},{r['high']},{r['low']},{r['close']},{r['volume']}" for r in rows]
    lines.insert(5, "1704070000000,1,2,3,4,5,6,7")  # too many fields: a bad row, counted as nan
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    result = import_file(path, "auto", TF)
    assert result.rejected == {
        "nan": 3, "non_positive_price": 1, "high_below_low": 1, "open_outside_range": 1,
        "close_outside_range": 1, "negative_volume": 1, "duplicate_ts": 2, "unordered_ts": 1,
    }
    assert len(result.candles) == 11
    assert result.candles["ts"].is_monotonic_increasing
    summary = result.summary()
    assert summary["rejectedTotal"] == 11 and summary["duplicates"] == 2
    assert summary["gaps"] == 1 and summary["missingBars"] == 100 + 7 - 10


def test_binance_bad_rows_counted(tmp_path, candles):
    path = binance_csv(candles, tmp_path / "k.csv")
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace(",", ",x", 1)           # unparseable open
    lines[7] = ",".join(lines[7].split(",")[:5])        # too few fields → NaN volume
    path.write_text("\n".join(lines) + "\n")
    result = import_file(path, "auto", TF)
    assert result.rejected["nan"] == 2
    assert len(result.candles) == len(candles) - 2
    assert result.summary()["gaps"] == 2


def test_parquet_import(tmp_path, candles):
    # datetime column named "timestamp", capitalised price columns
    frame = candles.rename(columns=str.capitalize).rename(columns={"Ts": "timestamp"})
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="ms", utc=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "dt.parquet")
    pd.testing.assert_frame_equal(import_file(tmp_path / "dt.parquet", "auto", TF).candles, candles)
    # integer seconds in "time"
    frame2 = candles.rename(columns={"ts": "time"}).assign(time=candles["ts"] // 1000)
    pq.write_table(pa.Table.from_pandas(frame2, preserve_index=False), tmp_path / "s.parquet")
    result, used = import_file_detailed(tmp_path / "s.parquet", "auto", TF)
    assert used == "ohlcv"
    pd.testing.assert_frame_equal(result.candles, candles)
    with pytest.raises(CandleFileError, match="Parquet"):
        read_candle_file(tmp_path / "s.parquet", "binance")


def test_timeframe_mismatch_refused(tmp_path):
    path = binance_csv(make_candles(tf=60_000), tmp_path / "1m.csv")
    with pytest.raises(TimeframeMismatchError, match="1m apart but the timeframe is 5m"):
        import_file(path, "auto", TF)
    assert len(import_file(path, "auto", 60_000).candles) == 60


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\n\n  \n", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "not a CSV or Parquet"),
    (b"PAR1 this is not really parquet", "Parquet"),
    (b"hello,world\nfoo,bar\n", "no time column"),
    (b"ts,open,high,low,close\n1704067200000,1,2,0.5,1\n", "missing column(s) volume"),
    (b"ts,open,high,low,close,volume\n", "no data rows"),
    (b"1704067200000,1,2,0.5,1,10,1704067499999\n", "7 numeric fields and no header"),
])
def test_unreadable_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "f.csv"
    path.write_bytes(content)
    with pytest.raises(CandleFileError) as info:
        import_file(path, "auto", TF)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(CandleFileError, match="no such file"):
        read_candle_file(tmp_path / "nope.csv")
    with pytest.raises(CandleFileError, match="directory"):
        read_candle_file(tmp_path)


def test_epoch_units_by_magnitude():
    want = 1_704_067_200_000
    got = epoch_to_ms([want // 1000, want, want * 1000, want * 1_000_000])
    assert got.tolist() == [want] * 4
    assert epoch_to_ms([1_704_067_200.5, np.nan])[0] == want + 500
    assert np.isnan(epoch_to_ms(["x"])[0])


@pytest.mark.parametrize("content, fmt", [
    (b"", "auto"),
    (b"\x00\x01\x02garbage\xff\xfe", "auto"),
    (b"just some words\nmore words\n", "auto"),
    (b"1,2,3\n4,5,6\n", "binance"),
])
def test_cli_bad_file_exits_2_with_one_line(tmp_path, content, fmt):
    path = tmp_path / "in.csv"
    path.write_bytes(content)
    proc = run_cli("data", "import", "--pair", "BTC", "--file", str(path), "--format", fmt,
                   data_dir=tmp_path / "data")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tbml: error:"), proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "data" / "candles").exists()


# --------------------------------------------------------------------------------------------
# Timeframe detection (detect_timeframe / load_candle_file), shared by backtest, features, import
# --------------------------------------------------------------------------------------------

H1 = 3_600_000


def test_detect_timeframe_picks_the_most_common_spacing():
    # 5m bars with gaps of 10m and 1h, a 2m and a 3m step: 5m is still the most common spacing
    steps = [TF] * 20 + [2 * TF] * 4 + [H1] * 3 + [120_000, 180_000]
    ts = START + np.concatenate([[0], np.cumsum(steps)])
    assert detect_timeframe(ts) == "5m"
    assert detect_timeframe(ts, "5m") == "5m"
    assert detect_timeframe(START + np.arange(30) * H1) == "1h"
    assert detect_timeframe([START]) is None and detect_timeframe([START], "4h") == "4h"  # no spacing


def test_detect_timeframe_refuses_unknown_and_contradicting_spacing():
    seven = START + np.arange(30) * 420_000
    with pytest.raises(UnknownTimeframeError, match="bars are 7m apart, which is no known timeframe"):
        detect_timeframe(seven, where="x.csv")
    with pytest.raises(TimeframeMismatchError, match="7m apart but the timeframe is 5m"):
        detect_timeframe(seven, "5m")
    with pytest.raises(TimeframeMismatchError, match="1h apart but the timeframe is 15m"):
        detect_timeframe(START + np.arange(30) * H1, "15m")


def test_load_candle_file_counts_gaps_at_the_detected_timeframe(tmp_path):
    c = make_candles(n=40, tf=H1).drop(index=[10, 11, 25]).reset_index(drop=True)
    path = binance_csv(c, tmp_path / "1h.csv")
    loaded = load_candle_file(path)
    assert loaded.timeframe == "1h" and loaded.detected and loaded.format == "binance"
    assert [g.missing_bars for g in loaded.result.gaps] == [2, 1]
    one = generic_csv(c.iloc[:1], tmp_path / "one.csv", "ts", [int(c["ts"].iloc[0])])
    loaded = load_candle_file(one, default="30m")
    assert loaded.timeframe == "30m" and not loaded.detected


def test_cli_import_detects_1h_and_stores_it_under_1h(tmp_path):
    c = make_candles(n=48, tf=H1)
    path = generic_csv(c, tmp_path / "eurusd_1h.csv", "Date", [iso(t, 0) for t in c["ts"]])
    proc = run_cli("data", "import", "--pair", "EUR", "--file", str(path), data_dir=tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["timeframe"] == "1h" and doc["imported"] == doc["stored"] == 48 and doc["gaps"] == 0
    assert doc["path"] == str(tmp_path / "data" / "candles" / "EUR" / "1h.parquet")
    assert CandleStore(tmp_path / "data", "1h").read("EUR")["ts"].tolist() == c["ts"].tolist()
    assert not CandleStore(tmp_path / "data", "5m").exists("EUR")


@pytest.mark.parametrize("tf, extra, needle", [
    (H1, ["--timeframe", "5m"], "1h apart but the timeframe is 5m"),
    (420_000, [], "bars are 7m apart, which is no known timeframe"),
])
def test_cli_import_refuses_a_wrong_or_unknown_timeframe(tmp_path, tf, extra, needle):
    path = binance_csv(make_candles(n=30, tf=tf), tmp_path / "k.csv")
    proc = run_cli("data", "import", "--pair", "EUR", "--file", str(path), *extra, data_dir=tmp_path / "data")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tbml: error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "data" / "candles").exists()
