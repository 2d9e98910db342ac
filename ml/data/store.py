"""The candle store: one Parquet file per (pair, timeframe) on the shared volume.

Layout: `{data_dir}/candles/{PAIR}/{timeframe}.parquet`, columns CANDLE_COLUMNS, strictly
increasing `ts`, row groups of ROW_GROUP_SIZE rows with column statistics. Every write serialises
the whole file in memory and goes through `ml.storage.atomic.atomic_write_bytes`, so a reader
(any process, reading the file directly) sees the old or the new file, never a partial one.

Reads use the Parquet metadata: `tail(n)` reads only the last row group(s) that hold the `n`
newest bars, `coverage()` reads only the footer, `read(start_ts, end_ts)` skips row groups by their
`ts` statistics.

The pair is validated (`validate_pair`) before it is used in any path, and the timeframe must be
one of the configured names, so neither can escape `data_dir`. Within one process, writes to a
file are serialised by a lock; across processes the Storage actor is the single writer.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ml.config import TIMEFRAME_MS
from ml.data.candles import CANDLE_COLUMNS, empty_candles
from ml.pairs import validate_pair
from ml.storage.atomic import atomic_write_bytes

ROW_GROUP_SIZE = 4096
CANDLES_DIR = "candles"
SCHEMA = pa.schema([("ts", pa.int64())] + [(c, pa.float64()) for c in CANDLE_COLUMNS[1:]])

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


class NoCandlesError(KeyError):
    """The store holds no candles for a pair (at this timeframe)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else "no candles"


def _normalise(candles: pd.DataFrame) -> pd.DataFrame:
    """The schema columns with their dtypes, sorted by ts; ValueError on duplicates or NaN."""
    missing = [c for c in CANDLE_COLUMNS if c not in candles.columns]
    if missing:
        raise ValueError(f"candles lack column(s): {', '.join(missing)}")
    df = candles[CANDLE_COLUMNS]
    if df["ts"].isna().any():
        raise ValueError("candles have missing timestamps: validate them before storing")
    df = pd.DataFrame({
        "ts": df["ts"].to_numpy(dtype="int64"),
        **{c: df[c].to_numpy(dtype="float64") for c in CANDLE_COLUMNS[1:]},
    })
    ts = df["ts"].to_numpy()
    if len(ts) > 1 and not np.all(ts[1:] > ts[:-1]):
        df = df.sort_values("ts", kind="stable").reset_index(drop=True)
        if df["ts"].duplicated().any():
            raise ValueError("candles have duplicate timestamps: validate them before storing")
    return df


def _table_to_frame(table: pa.Table) -> pd.DataFrame:
    if table.num_rows == 0:
        return empty_candles()
    return pd.DataFrame({c: table.column(c).to_numpy() for c in CANDLE_COLUMNS})


class CandleStore:
    def __init__(self, data_dir: str | Path, timeframe: str = "5m") -> None:
        if timeframe not in TIMEFRAME_MS:
            raise ValueError(f"unknown timeframe {timeframe!r}; one of {', '.join(TIMEFRAME_MS)}")
        self.data_dir = Path(data_dir)
        self.timeframe = timeframe
        self.timeframe_ms = TIMEFRAME_MS[timeframe]
        self.root = self.data_dir / CANDLES_DIR

    # -- paths -------------------------------------------------------------------------------
    def path(self, pair: str) -> Path:
        return self.root / validate_pair(pair) / f"{self.timeframe}.parquet"

    def exists(self, pair: str) -> bool:
        return self.path(pair).is_file()

    def pairs(self) -> list[str]:
        """Pairs that have candles at this timeframe, sorted."""
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            try:
                validate_pair(d.name)
            except ValueError:
                continue
            if (d / f"{self.timeframe}.parquet").is_file():
                out.append(d.name)
        return sorted(out)

    def _require(self, pair: str) -> Path:
        path = self.path(pair)
        if not path.is_file():
            raise NoCandlesError(f"no {self.timeframe} candles stored for {pair}")
        return path

    # -- writing -----------------------------------------------------------------------------
    @staticmethod
    def encode(candles: pd.DataFrame) -> bytes:
        """Parquet bytes of a (normalised) candle frame."""
        table = pa.Table.from_pandas(candles, schema=SCHEMA, preserve_index=False)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROW_GROUP_SIZE, write_statistics=True)
        return buf.getvalue()

    def write(self, pair: str, candles: pd.DataFrame) -> int:
        """Replace the pair's candles; returns the number of bars stored."""
        path = self.path(pair)
        df = _normalise(candles)
        with _lock_for(path):
            atomic_write_bytes(path, self.encode(df))
        return len(df)

    def append(self, pair: str, candles: pd.DataFrame) -> int:
        """Merge: keep every stored bar, add the bars with new timestamps; returns how many were added."""
        path = self.path(pair)
        new = _normalise(candles)
        with _lock_for(path):
            if not path.is_file():
                if new.empty:
                    return 0
                atomic_write_bytes(path, self.encode(new))
                return len(new)
            old = self._read_path(path)
            new = new[~new["ts"].isin(old["ts"])]
            if new.empty:
                return 0
            merged = pd.concat([old, new], ignore_index=True)
            if not old.empty and new["ts"].iloc[0] <= old["ts"].iloc[-1]:
                merged = merged.sort_values("ts", kind="stable").reset_index(drop=True)
            atomic_write_bytes(path, self.encode(merged))
            return len(new)

    # -- reading -----------------------------------------------------------------------------
    @staticmethod
    def _read_path(path: Path, filters=None) -> pd.DataFrame:
        return _table_to_frame(pq.read_table(path, columns=CANDLE_COLUMNS, filters=filters))

    def read(self, pair: str, start_ts: int | None = None, end_ts: int | None = None) -> pd.DataFrame:
        """Bars with start_ts <= ts <= end_ts (either bound optional), oldest first."""
        path = self._require(pair)
        filters = []
        if start_ts is not None:
            filters.append(("ts", ">=", int(start_ts)))
        if end_ts is not None:
            filters.append(("ts", "<=", int(end_ts)))
        return self._read_path(path, filters or None)

    def tail(self, pair: str, n: int) -> pd.DataFrame:
        """The newest `n` bars, reading only the row groups that hold them."""
        if n < 0:
            raise ValueError("n must be >= 0")
        path = self._require(pair)
        pf = pq.ParquetFile(path)
        try:
            md = pf.metadata
            groups: list[int] = []
            rows = 0
            for i in range(md.num_row_groups - 1, -1, -1):
                if rows >= n:
                    break
                groups.append(i)
                rows += md.row_group(i).num_rows
            if not groups:
                return empty_candles()
            table = pf.read_row_groups(sorted(groups), columns=CANDLE_COLUMNS)
        finally:
            pf.close()
        df = _table_to_frame(table)
        return df.iloc[len(df) - min(n, len(df)):].reset_index(drop=True)

    def coverage(self, pair: str) -> dict | None:
        """{"bars", "start", "end"} (ts of the first and last bar) from the footer; None if absent."""
        path = self.path(pair)
        if not path.is_file():
            return None
        pf = pq.ParquetFile(path)
        try:
            md = pf.metadata
            bars = md.num_rows
            if bars == 0:
                return {"bars": 0, "start": None, "end": None}
            ts_idx = md.schema.names.index("ts")
            first = md.row_group(0).column(ts_idx).statistics
            last = md.row_group(md.num_row_groups - 1).column(ts_idx).statistics
            if first is not None and first.has_min_max and last is not None and last.has_min_max:
                start, end = int(first.min), int(last.max)
            else:  # no statistics: read the ts column of the two row groups
                start = int(pf.read_row_group(0, columns=["ts"]).column(0)[0].as_py())
                end = int(pf.read_row_group(md.num_row_groups - 1, columns=["ts"]).column(0)[-1].as_py())
        finally:
            pf.close()
        return {"bars": int(bars), "start": start, "end": end}
