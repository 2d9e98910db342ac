"""CandleStore: exact round trips, merge on append, row-group tail, footer coverage, safe paths, atomic files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import ml.data.store as store_mod
from ml.config import Settings
from ml.data.candles import empty_candles
from ml.data.sources import ensure_synthetic_history, load_candles
from ml.data.store import ROW_GROUP_SIZE, CandleStore, NoCandlesError
from ml.pairs import InvalidPairError
from ml.storage.atomic import is_temp_file

TF = 300_000
START = 1_704_067_200_000


def make_candles(n: int, start: int = START, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.01, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.01, n))
    return pd.DataFrame({"ts": start + np.arange(n, dtype="int64") * TF, "open": open_, "high": high,
                         "low": low, "close": close, "volume": rng.uniform(0, 10, n)})


def all_files(root) -> list:
    return sorted(p for p in root.rglob("*"))


@pytest.fixture
def store(tmp_path) -> CandleStore:
    return CandleStore(tmp_path, "5m")


def test_write_read_round_trip_is_exact(store, tmp_path):
    df = make_candles(1000)
    assert store.write("BTC", df) == 1000
    assert store.path("BTC") == tmp_path / "candles" / "BTC" / "5m.parquet"
    back = store.read("BTC")
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert list(back.dtypes.astype(str)) == ["int64"] + ["float64"] * 5
    assert isinstance(back.index, pd.RangeIndex)


def test_write_replaces_sorts_and_refuses_duplicates(store):
    store.write("BTC", make_candles(50))
    shuffled = make_candles(10, seed=5).sample(frac=1.0, random_state=1)
    store.write("BTC", shuffled)
    pd.testing.assert_frame_equal(store.read("BTC"), make_candles(10, seed=5))
    dup = pd.concat([make_candles(3), make_candles(3)])
    with pytest.raises(ValueError, match="duplicate"):
        store.write("BTC", dup)
    with pytest.raises(ValueError, match="lack column"):
        store.write("BTC", make_candles(3).drop(columns="volume"))


def test_append_adds_only_new_rows(store):
    base = make_candles(100)
    assert store.append("ETH", base) == 100  # creates
    changed = make_candles(150, seed=9)  # bars 0..99 differ from the stored ones
    assert store.append("ETH", changed) == 50
    got = store.read("ETH")
    assert len(got) == 150
    pd.testing.assert_frame_equal(got.iloc[:100], base)  # existing rows kept as they were
    pd.testing.assert_frame_equal(got.iloc[100:].reset_index(drop=True),
                                  changed.iloc[100:].reset_index(drop=True))
    mtime = store.path("ETH").stat().st_mtime_ns
    assert store.append("ETH", base.iloc[:10]) == 0
    assert store.path("ETH").stat().st_mtime_ns == mtime  # nothing new: no rewrite


def test_append_backfills_older_rows_sorted(store):
    full = make_candles(300)
    store.write("XMR", full.iloc[200:])
    assert store.append("XMR", full.iloc[:250]) == 200
    pd.testing.assert_frame_equal(store.read("XMR"), full)


def test_tail_matches_read_across_row_groups(store, monkeypatch):
    n = 2 * ROW_GROUP_SIZE + 1808
    df = make_candles(n)
    store.write("BTC", df)
    assert pq.ParquetFile(store.path("BTC")).metadata.num_row_groups == 3
    full = store.read("BTC")
    for k in (0, 1, 100, ROW_GROUP_SIZE - 1, 1808, 1809, ROW_GROUP_SIZE, ROW_GROUP_SIZE + 1808,
              ROW_GROUP_SIZE + 1809, n - 1, n, n + 10):
        pd.testing.assert_frame_equal(store.tail("BTC", k), full.tail(k).reset_index(drop=True), obj=f"n={k}")

    read_groups: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *args, **kwargs):
        read_groups.append(list(row_groups))
        return real(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    store.tail("BTC", 500)
    store.tail("BTC", 2000)
    assert read_groups == [[2], [1, 2]]  # only the row groups that hold the newest bars


def test_read_range_and_coverage(store):
    df = make_candles(10_000)
    store.write("BTC", df)
    got = store.read("BTC", start_ts=int(df["ts"][5000]), end_ts=int(df["ts"][5099]))
    pd.testing.assert_frame_equal(got, df.iloc[5000:5100].reset_index(drop=True))
    assert len(store.read("BTC", start_ts=int(df["ts"].iloc[-1]) + 1)) == 0
    assert store.coverage("BTC") == {"bars": 10_000, "start": START, "end": START + 9_999 * TF}
    assert store.coverage("ETH") is None
    store.write("ETH", empty_candles())
    assert store.coverage("ETH") == {"bars": 0, "start": None, "end": None}
    assert store.tail("ETH", 5).empty


def test_pairs_exists_and_missing(store, tmp_path):
    assert store.pairs() == []
    store.write("ETH", make_candles(5))
    store.write("BTC", make_candles(5))
    (tmp_path / "candles" / "junk").mkdir()
    (tmp_path / "candles" / "RVN").mkdir()  # a directory without candles
    assert store.pairs() == ["BTC", "ETH"]
    assert store.exists("BTC") and not store.exists("RVN")
    assert CandleStore(tmp_path, "1h").pairs() == []
    with pytest.raises(NoCandlesError, match="no 5m candles stored for RVN") as info:
        store.read("RVN")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "no 5m candles stored for RVN"
    with pytest.raises(NoCandlesError):
        store.tail("RVN", 3)


@pytest.mark.parametrize("bad", ["../x", "btc", "A", "", "BTC/../../x", "..", "BTC\x00", "B" * 16])
def test_invalid_pair_refused_and_nothing_created(tmp_path, bad):
    store = CandleStore(tmp_path / "data")
    df = make_candles(5)
    for call in (lambda: store.write(bad, df), lambda: store.append(bad, df), lambda: store.read(bad),
                 lambda: store.tail(bad, 1), lambda: store.coverage(bad), lambda: store.exists(bad),
                 lambda: store.path(bad)):
        with pytest.raises(InvalidPairError):
            call()
    assert all_files(tmp_path) == []


def test_unknown_timeframe_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown timeframe"):
        CandleStore(tmp_path, "../../etc")


def test_writes_are_atomic_and_leave_no_temp_files(store, tmp_path, monkeypatch):
    calls = []
    real = store_mod.atomic_write_bytes

    def spy(path, data, **kw):
        calls.append(path)
        return real(path, data, **kw)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", spy)
    good = make_candles(200)
    store.write("BTC", good)
    store.append("BTC", make_candles(300))
    before = store.read("BTC")
    assert len(before) == 300
    assert calls == [store.path("BTC")] * 2
    assert not [p for p in all_files(tmp_path) if is_temp_file(p)]

    # A write that dies before the rename leaves the previous file whole and no temp file behind.
    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr("ml.storage.atomic.os.replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        store.write("BTC", make_candles(10, seed=3))
    monkeypatch.undo()
    pd.testing.assert_frame_equal(store.read("BTC"), before)
    assert [p.name for p in all_files(tmp_path / "candles" / "BTC")] == ["5m.parquet"]


# -- sources ---------------------------------------------------------------------------------

def synth_settings(tmp_path, source: str = "synthetic") -> Settings:
    return Settings.model_validate({"data_dir": str(tmp_path), "data": {
        "source": source, "synthetic": {"seed": 7, "history_bars": 300, "signal_strength": 0.1}}})


def test_ensure_synthetic_history_appends_only_new_bars(tmp_path):
    from ml.data.synthetic import generate_candles

    settings = synth_settings(tmp_path)
    store = CandleStore(tmp_path, "5m")
    now = 1_767_225_600_000 + 123_456  # 2026-01-01 plus a bit
    last_closed = (now // TF) * TF - TF
    assert ensure_synthetic_history("BTC", settings, store, now_ms=now) == 300
    assert store.coverage("BTC") == {"bars": 300, "start": last_closed - 299 * TF, "end": last_closed}
    assert ensure_synthetic_history("BTC", settings, store, now_ms=now) == 0
    assert ensure_synthetic_history("BTC", settings, store, now_ms=now + 3 * TF) == 3
    got = store.read("BTC")
    want = generate_candles("BTC", 303, seed=7, signal_strength=0.1, lookback=10, end_ts=last_closed + 3 * TF)
    pd.testing.assert_frame_equal(got, want)


def test_load_candles_synthetic_and_files(tmp_path):
    settings = synth_settings(tmp_path)
    syn = load_candles("ETH", settings, bars=400)
    assert len(syn) == 400 and syn["ts"].is_monotonic_increasing
    assert len(load_candles("ETH", settings)) == 300  # history_bars
    files = synth_settings(tmp_path, "files")
    with pytest.raises(NoCandlesError):
        load_candles("ETH", files)
    CandleStore(tmp_path).write("ETH", syn)
    pd.testing.assert_frame_equal(load_candles("ETH", files), syn)
    pd.testing.assert_frame_equal(load_candles("ETH", files, bars=10), syn.tail(10).reset_index(drop=True))
    with pytest.raises(InvalidPairError):
        load_candles("eth", files)
