"""Reading a candle file given on the command line: one place that turns its errors into usage errors."""

from __future__ import annotations

from pathlib import Path

from cli import UsageError


def load_file(path: Path, fmt: str, timeframe: str | None, default: str):
    """`ml.data.files.load_candle_file`, with a bad file or a contradicting `--timeframe` as one usage line."""
    from ml.data.files import CandleFileError, TimeframeMismatchError, load_candle_file

    try:
        return load_candle_file(path, fmt, timeframe, default=default)
    except TimeframeMismatchError as exc:
        raise UsageError(f"{str(exc).splitlines()[0]} (--timeframe {timeframe}; "
                         f"without it the file's spacing is used)") from None
    except CandleFileError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
