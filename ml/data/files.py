"""Candle files: generic OHLCV CSV/Parquet with a header, and Binance kline CSV.

`read_candle_file` turns a file into a raw candle frame (the CANDLE_COLUMNS, unvalidated): values
that do not parse become NaN so that validation counts them, nothing is dropped here. A file that
cannot be candles at all (empty, binary garbage, no recognisable time column, wrong column count)
raises CandleFileError with one clear message.

Formats
- ``ohlcv``: CSV (delimiter `,` `;` tab or `|`) or Parquet with a header. The time column is the
  first of TIME_COLUMNS present (names are case-insensitive); its values may be ISO-8601 strings or
  epoch numbers in seconds, milliseconds, microseconds or nanoseconds, told apart per value by
  magnitude (see `epoch_to_ms`). The price columns are open/high/low/close/volume (or o/h/l/c/v).
- ``binance``: the kline CSV of data.binance.vision: 12 columns, no header (open_time, open, high,
  low, close, volume, close_time, quote_volume, trades, taker_base, taker_quote, ignore).
  open_time is in ms, or in µs for spot files from 2025 on; both are detected per row, so a
  concatenation across the switch imports correctly.
- ``auto``: Parquet by its magic bytes; a CSV whose first line is a header is ``ohlcv``; a first
  line of 12 numeric fields is ``binance``.

Timeframe: `load_candle_file` reads a file at the timeframe of its own bars (`detect_timeframe`: the
most common spacing, named as in ml.config.TIMEFRAME_MS), which is what the CLI's --file commands use.
"""

from __future__ import annotations

import codecs
import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml.config import TIMEFRAME_MS
from ml.data.candles import CANDLE_COLUMNS, ValidationResult, find_gaps, infer_timeframe_ms, validate_candles

FORMATS = ("auto", "ohlcv", "binance")
TIME_COLUMNS = ("ts", "timestamp", "date", "open_time", "time", "datetime")
PRICE_ALIASES = {
    "open": ("open", "o"),
    "high": ("high", "h"),
    "low": ("low", "l"),
    "close": ("close", "c"),
    "volume": ("volume", "v", "vol"),
}
BINANCE_COLUMNS = (
    "open_time", "open", "high", "low", "close", "volume",
    "close_time", "quote_volume", "trades", "taker_base", "taker_quote", "ignore",
)
_DELIMITERS = (",", ";", "\t", "|")
_SNIFF_BYTES = 64 * 1024
_PARQUET_MAGIC = b"PAR1"


class CandleFileError(ValueError):
    """A file that cannot be read as candles at all (the message is one clear line)."""


class TimeframeMismatchError(CandleFileError):
    """The bars in a file are spaced differently from the timeframe they are imported as."""


class UnknownTimeframeError(CandleFileError):
    """The bars in a file are spaced by no timeframe of ml.config.TIMEFRAME_MS (e.g. 7 minutes)."""


# --------------------------------------------------------------------------------------------
# Timestamps
# --------------------------------------------------------------------------------------------

def epoch_to_ms(values) -> np.ndarray:
    """Epoch numbers in s, ms, µs or ns (per value, by magnitude) → float64 epoch ms (NaN kept).

    |v| < 1e11 → seconds (up to year 5138), < 1e14 → milliseconds, < 1e17 → microseconds, else
    nanoseconds. The ranges of real dates in the four units do not overlap, so mixed files work.
    Integer inputs are converted exactly; fractional seconds are rounded to the millisecond.
    """
    s = pd.to_numeric(pd.Series(values), errors="coerce")
    if pd.api.types.is_integer_dtype(s.dtype) and not pd.api.types.is_extension_array_dtype(s.dtype):
        a = s.to_numpy(dtype="int64")
        mag = np.abs(a)
        out = np.where(
            mag < 10**11, a * 1000,
            np.where(mag < 10**14, a,
                     np.where(mag < 10**17, (a + 500) // 1000, (a + 500_000) // 1_000_000)))
        return out.astype("float64")
    a = s.to_numpy(dtype="float64", na_value=np.nan)
    mag = np.abs(a)
    with np.errstate(invalid="ignore"):
        factor = np.where(mag < 1e11, 1000.0,
                          np.where(mag < 1e14, 1.0, np.where(mag < 1e17, 1e-3, 1e-6)))
        return np.round(a * factor)


def _datetimes_to_ms(dt: pd.Series) -> np.ndarray:
    if getattr(dt.dt, "tz", None) is None:
        dt = dt.dt.tz_localize("UTC")
    ms = (dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")
    return pd.to_numeric(ms, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def time_column_to_ms(col: pd.Series) -> np.ndarray:
    """A time column of any supported kind → float64 epoch ms, NaN where a value does not parse."""
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        return _datetimes_to_ms(col)
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        return epoch_to_ms(col)
    text = col.astype("string").str.strip()
    nonempty = text.notna() & (text != "")
    numbers = pd.to_numeric(text, errors="coerce")
    if nonempty.any() and numbers[nonempty].notna().mean() >= 0.5:
        return epoch_to_ms(numbers)
    dt = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
    failed = dt.isna() & nonempty
    if failed.any():  # other spellings (e.g. "2024/01/02 03:04"), parsed one by one
        dt = dt.copy()
        dt[failed] = pd.to_datetime(text[failed], utc=True, errors="coerce", format="mixed")
    return _datetimes_to_ms(dt)


# --------------------------------------------------------------------------------------------
# Sniffing
# --------------------------------------------------------------------------------------------

def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _sniff(path: Path) -> tuple[str, str, list[str]]:
    """("parquet" | "csv", delimiter, fields of the first non-blank line)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise CandleFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CandleFileError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise CandleFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if head.startswith(_PARQUET_MAGIC):
        return "parquet", "", []
    if not head.strip():
        raise CandleFileError(f"{path}: file is empty")
    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=False)
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise CandleFileError(f"{path}: not a CSV or Parquet file (binary content)")
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delimiter = max(_DELIMITERS, key=first.count)
    if first.count(delimiter) == 0:
        delimiter = ","
    fields = next(csv.reader([first], delimiter=delimiter, skipinitialspace=True))
    return "csv", delimiter, [f.strip() for f in fields]


def _known_name(field: str) -> bool:
    name = field.strip().strip('"').lower()
    return name in TIME_COLUMNS or any(name in names for names in PRICE_ALIASES.values())


def _looks_like_header(fields: list[str]) -> bool:
    return any(_known_name(f) for f in fields) or not any(_is_number(f) for f in fields)


def detect_format(path: str | Path) -> str:
    """"ohlcv" or "binance" for a file (Parquet is always "ohlcv"); CandleFileError if neither."""
    path = Path(path)
    kind, _, fields = _sniff(path)
    return "ohlcv" if kind == "parquet" else _auto_format(path, fields)


def _auto_format(path: Path, fields: list[str]) -> str:
    if _looks_like_header(fields):
        return "ohlcv"
    if len(fields) == len(BINANCE_COLUMNS):
        return "binance"
    raise CandleFileError(
        f"{path}: first line has {len(fields)} numeric fields and no header; expected a header "
        f"(ts,open,high,low,close,volume) or a 12-column Binance kline CSV"
    )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _read_csv(path: Path, delimiter: str, header: int | None) -> pd.DataFrame:
    opts = dict(sep=delimiter, header=header, skipinitialspace=True, keep_default_na=False,
                encoding="utf-8-sig", skip_blank_lines=True, index_col=False)
    try:
        with warnings.catch_warnings():
            # pandas truncates an over-long first row with only a warning: treat it as malformed
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, **opts)
    except pd.errors.EmptyDataError:
        raise CandleFileError(f"{path}: file is empty") from None
    except UnicodeDecodeError:
        raise CandleFileError(f"{path}: not a CSV or Parquet file (not UTF-8 text)") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning):
        return _read_csv_lenient(path, delimiter, header is not None)


def _read_csv_lenient(path: Path, delimiter: str, has_header: bool) -> pd.DataFrame:
    """Some lines have a different number of fields from the first one: read those as all-empty
    rows, so validation counts them (as "nan") instead of failing the file or dropping them."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh, delimiter=delimiter, skipinitialspace=True)
                    if any(f.strip() for f in r)]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise CandleFileError(f"{path}: not a readable CSV file: {str(exc).splitlines()[0]}") from None
    if not rows:
        raise CandleFileError(f"{path}: file is empty")
    names = [f.strip() for f in rows[0]] if has_header else list(range(len(rows[0])))
    body = rows[1:] if has_header else rows
    width = len(names)
    fixed = [r if len(r) == width else [""] * width for r in body]
    return pd.DataFrame(fixed, columns=names, dtype=str)


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise CandleFileError(f"{path}: not a readable Parquet file: {str(exc).splitlines()[0]}") from None


def _to_raw_frame(ts_ms: np.ndarray, columns: dict[str, pd.Series]) -> pd.DataFrame:
    out = pd.DataFrame({"ts": ts_ms})
    for name in CANDLE_COLUMNS[1:]:
        out[name] = pd.to_numeric(columns[name], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    if not out["ts"].isna().any():
        out["ts"] = out["ts"].astype("int64")
    return out


def _from_headered(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    names = {str(c).strip().strip('"').lower(): c for c in df.columns}
    time_col = next((names[n] for n in TIME_COLUMNS if n in names), None)
    if time_col is None:
        shown = ", ".join(str(c) for c in list(df.columns)[:12])
        raise CandleFileError(
            f"{path}: no time column (one of {', '.join(TIME_COLUMNS)}) in header [{shown}]"
        )
    picked: dict[str, pd.Series] = {}
    missing = []
    for name, aliases in PRICE_ALIASES.items():
        col = next((names[a] for a in aliases if a in names), None)
        if col is None:
            missing.append(name)
        else:
            picked[name] = df[col]
    if missing:
        raise CandleFileError(f"{path}: missing column(s) {', '.join(missing)} in header")
    if df.empty:
        raise CandleFileError(f"{path}: header but no data rows")
    return _to_raw_frame(time_column_to_ms(df[time_col]), picked)


def _from_binance(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    if df.shape[1] != len(BINANCE_COLUMNS):
        raise CandleFileError(
            f"{path}: a Binance kline CSV has {len(BINANCE_COLUMNS)} columns, this file has {df.shape[1]}"
        )
    if df.empty:
        raise CandleFileError(f"{path}: no data rows")
    df = df.set_axis(list(BINANCE_COLUMNS), axis=1)
    ts = epoch_to_ms(pd.to_numeric(df["open_time"], errors="coerce"))
    return _to_raw_frame(ts, {c: df[c] for c in CANDLE_COLUMNS[1:]})


def read_candle_file(path: str | Path, fmt: str = "auto") -> pd.DataFrame:
    """Read a candle file into a raw (unvalidated) frame with the CANDLE_COLUMNS.

    `ts` is int64 epoch ms, or float64 with NaN where a time did not parse; prices and volume are
    float64 with NaN for unparseable values.
    """
    return _read(Path(path), fmt)[0]


def _read(path: Path, fmt: str) -> tuple[pd.DataFrame, str]:
    if fmt not in FORMATS:
        raise CandleFileError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    kind, delimiter, fields = _sniff(path)
    if kind == "parquet":
        if fmt == "binance":
            raise CandleFileError(f"{path}: is Parquet; the binance format is the kline CSV (use ohlcv)")
        return _from_headered(_read_parquet(path), path), "ohlcv"
    header = _looks_like_header(fields)
    if fmt == "auto":
        fmt = _auto_format(path, fields)
    if fmt == "ohlcv":
        if not header:
            hint = " (looks like Binance klines: use --format binance)" if len(fields) == 12 else ""
            raise CandleFileError(f"{path}: no header line; a generic OHLCV file needs one{hint}")
        return _from_headered(_read_csv(path, delimiter, header=0), path), "ohlcv"
    # binance: a header line (as in Binance futures files) is skipped
    return _from_binance(_read_csv(path, delimiter, header=0 if header else None), path), "binance"


def import_file(path: str | Path, fmt: str = "auto", timeframe_ms: int | None = None) -> ValidationResult:
    """Read and validate a candle file. Rejected rows are counted by reason; gaps are reported.

    With `timeframe_ms`, the file's bar spacing (the most common one) must equal it, else
    TimeframeMismatchError: 1m bars stored as 5m would silently corrupt the store.
    """
    return import_file_detailed(path, fmt, timeframe_ms)[0]


def import_file_detailed(path: str | Path, fmt: str = "auto",
                         timeframe_ms: int | None = None) -> tuple[ValidationResult, str]:
    """Like import_file, also returning the format actually read ("ohlcv" or "binance")."""
    path = Path(path)
    raw, used = _read(path, fmt)
    result = validate_candles(raw, timeframe_ms)
    if timeframe_ms:
        spacing = infer_timeframe_ms(result.candles["ts"].to_numpy())
        if spacing is not None and spacing != timeframe_ms:
            raise TimeframeMismatchError(
                f"{path}: bars are {_fmt_ms(spacing)} apart but the timeframe is {_fmt_ms(timeframe_ms)}"
            )
    return result, used


# --------------------------------------------------------------------------------------------
# Timeframes
# --------------------------------------------------------------------------------------------

def detect_timeframe(ts, timeframe: str | None = None, *, where: str = "candles") -> str | None:
    """The timeframe name (a key of TIMEFRAME_MS) of candles with open times `ts` (epoch ms).

    The spacing is the most common difference between consecutive bars, so gaps and a few odd
    bars do not change it. A spacing that is no known timeframe raises UnknownTimeframeError; with
    `timeframe` (the caller insists), a different spacing raises TimeframeMismatchError naming both.
    Fewer than two bars have no spacing: the result is `timeframe` (None when not given).
    """
    if timeframe is not None and timeframe not in TIMEFRAME_MS:
        raise CandleFileError(f"unknown timeframe {timeframe!r}; one of {', '.join(TIMEFRAME_MS)}")
    spacing = infer_timeframe_ms(np.asarray(ts, dtype="int64"))
    if spacing is None:
        return timeframe
    if timeframe is not None and spacing != TIMEFRAME_MS[timeframe]:
        raise TimeframeMismatchError(
            f"{where}: bars are {_fmt_ms(spacing)} apart but the timeframe is {timeframe}"
        )
    name = next((k for k, v in TIMEFRAME_MS.items() if v == spacing), None)
    if name is None:
        raise UnknownTimeframeError(
            f"{where}: bars are {_fmt_ms(spacing)} apart, which is no known timeframe "
            f"(one of {', '.join(TIMEFRAME_MS)})"
        )
    return name


@dataclass
class CandleFile:
    """A validated candle file with the format read and the timeframe its bars are spaced by."""

    result: ValidationResult
    format: str
    timeframe: str
    detected: bool  # True when the timeframe comes from the bars' spacing, not a fallback


def load_candle_file(path: str | Path, fmt: str = "auto", timeframe: str | None = None, *,
                     default: str = "5m") -> CandleFile:
    """Read and validate a candle file at the timeframe of its own bars (see detect_timeframe).

    `timeframe` insists on one (a file spaced otherwise is refused); `default` is used only when
    the file has fewer than two valid bars and so no spacing. Gaps are counted at that timeframe.
    """
    path = Path(path)
    raw, used = _read(path, fmt)
    result = validate_candles(raw, None)
    ts = result.candles["ts"].to_numpy()
    found = detect_timeframe(ts, timeframe, where=str(path))
    detected = len(ts) >= 2
    tf = found or default
    result.gaps = find_gaps(ts, TIMEFRAME_MS[tf])
    return CandleFile(result=result, format=used, timeframe=tf, detected=detected)


def _fmt_ms(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
