"""`tbml data synth|import|fetch`: put candles in the candle store.

    tbml data synth --pairs BTC,ETH --bars N [--seed S] [--strength X] [--drift D] [--timeframe 5m]
                    [--data-dir D | --out FILE]
        Generates N synthetic bars per pair ending at the last closed bar, replaces the pair's
        stored candles, prints one JSON object per pair (one per line). With --out FILE the bars of
        the one pair given go to a CSV (ts,open,high,low,close,volume; importable by `data import`)
        written atomically, instead of the store.
    tbml data import --pair P --file F [--format auto|ohlcv|binance] [--timeframe 1h] [--data-dir D]
        Reads and validates the file, merges the valid bars into the store under the timeframe of
        the file's bars (the most common spacing; --timeframe insists, and a file spaced otherwise
        is refused), existing bars kept and bars with new timestamps added, and prints one JSON
        summary.
    tbml data fetch --pair BTC[,ETH] [--exchange binance] [--timeframe 1h] [--bars N | --since DATE]
                    [--data-dir D]
        Backfills the store from a crypto exchange through ccxt (`ml.data.exchange`; data.exchange in
        the config): the closed candles the store lacks, validated like an import, merged atomically;
        a progress bar on a terminal; one JSON summary per pair (the keys of an import's summary).

Bad input (invalid pair, missing/empty/garbage file, a file whose bars contradict --timeframe or
are spaced by no known timeframe, a file without a single valid row, several pairs with --out, an
--out path that cannot be written, |--drift| > 10; for fetch: an unknown exchange or symbol, a bad
date, --bars with --since) exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cli import UsageError
from ml.config import TIMEFRAME_MS
from ml.data.files import FORMATS
from ml.pairs import InvalidPairError, validate_pair

if TYPE_CHECKING:
    import pandas as pd


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="generate or import candles into the candle store")
    sub = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))

    synth = sub.add_parser("synth", help="generate synthetic candles and store them")
    synth.add_argument("--pairs", required=True, help="comma-separated pairs, e.g. BTC,ETH")
    synth.add_argument("--bars", type=int, default=None, help="bars per pair (default: data.synthetic.history_bars)")
    synth.add_argument("--seed", type=int, default=None, help="random seed (default: data.synthetic.seed)")
    synth.add_argument("--strength", type=float, default=None,
                       help="planted signal strength 0..1, 0 = random walk (default: data.synthetic.signal_strength)")
    synth.add_argument("--drift", type=float, default=0.0,
                       help="annualised log drift added to every bar's mean return, e.g. 0.5 (default: 0)")
    synth.add_argument("--timeframe", choices=list(TIMEFRAME_MS), default=None, help="bar size (default: settings)")
    synth.add_argument("--data-dir", default=None, help="data directory (default: TBML_DATA_DIR / settings)")
    synth.add_argument("--out", default=None, metavar="FILE",
                       help="write the candles of one pair to this CSV instead of the store")
    synth.set_defaults(handler=cmd_synth)

    imp = sub.add_parser("import", help="import a CSV/Parquet candle file into the store")
    imp.add_argument("--pair", required=True, help="pair the file belongs to, e.g. BTC")
    imp.add_argument("--file", required=True, help="CSV or Parquet file")
    imp.add_argument("--format", choices=list(FORMATS), default="auto", help="file format (default: auto)")
    imp.add_argument("--timeframe", choices=list(TIMEFRAME_MS), default=None,
                     help="bar size (default: detected from the file's bar spacing)")
    imp.add_argument("--data-dir", default=None, help="data directory (default: TBML_DATA_DIR / settings)")
    imp.set_defaults(handler=cmd_import)

    fetch = sub.add_parser("fetch", help="backfill the candle store from a crypto exchange (ccxt)")
    fetch.add_argument("--pair", required=True, help="comma-separated pairs, e.g. BTC,ETH (BTC = BTC/<quote>)")
    fetch.add_argument("--exchange", default=None, help="ccxt exchange id (default: data.exchange.id)")
    fetch.add_argument("--timeframe", choices=list(TIMEFRAME_MS), default=None, help="bar size (default: settings)")
    span = fetch.add_mutually_exclusive_group()
    span.add_argument("--bars", type=int, default=None,
                      help="closed candles to hold per pair (default: data.exchange.history_bars)")
    span.add_argument("--since", default=None, metavar="DATE",
                      help="every candle from this UTC date/time on (ISO-8601, e.g. 2025-01-01)")
    fetch.add_argument("--data-dir", default=None, help="data directory (default: TBML_DATA_DIR / settings)")
    fetch.set_defaults(handler=cmd_fetch)


def _pair(value: str) -> str:
    try:
        return validate_pair(value.strip())
    except InvalidPairError as exc:
        raise UsageError(str(exc)) from None


def _store(args, settings):
    from ml.data.store import CandleStore

    return CandleStore(Path(args.data_dir) if args.data_dir else settings.data_dir,
                       args.timeframe or settings.timeframe)


def _print(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


def _out_path(value: str) -> Path:
    """The --out target, checked before any work: a file name in an existing, writable directory."""
    if not value.strip():
        raise UsageError("--out needs a file name, e.g. --out btc.csv")
    out = Path(value).expanduser()
    if out.is_dir():
        raise UsageError(f"--out {value}: is a directory, not a file")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"--out {value}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {value}: directory {parent} is not writable")
    return out


def write_candles_csv(path: Path, candles: pd.DataFrame) -> str:
    """Write a candle frame as `ts,open,high,low,close,volume` CSV atomically; return its sha256.

    Floats are written with repr precision, so the file reads back to the exact same values.
    """
    from ml.data.candles import CANDLE_COLUMNS
    from ml.storage.atomic import atomic_write_bytes

    text = candles[CANDLE_COLUMNS].to_csv(index=False, lineterminator="\n")
    return atomic_write_bytes(path, text.encode("ascii"))


def cmd_synth(args: argparse.Namespace) -> int:
    from ml.clock import last_closed_bar_ts
    from ml.config import get_settings
    from ml.data.synthetic import MAX_ABS_DRIFT, generate_candles

    settings = get_settings()
    pairs = [p for p in (s.strip() for s in args.pairs.split(",")) if p]
    if not pairs:
        raise UsageError("--pairs needs at least one pair, e.g. BTC,ETH")
    pairs = [_pair(p) for p in dict.fromkeys(pairs)]
    syn = settings.data.synthetic
    bars = syn.history_bars if args.bars is None else args.bars
    if bars < 1:
        raise UsageError(f"--bars must be at least 1, got {bars}")
    seed = syn.seed if args.seed is None else args.seed
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    strength = syn.signal_strength if args.strength is None else args.strength
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"--strength must be between 0 and 1, got {strength:g}")
    drift = args.drift
    if not (math.isfinite(drift) and abs(drift) <= MAX_ABS_DRIFT):
        raise UsageError(f"--drift must be an annual log drift between -{MAX_ABS_DRIFT:g} and "
                         f"{MAX_ABS_DRIFT:g}, got {drift:g}")
    out = None
    if args.out is not None:
        if len(pairs) != 1:
            raise UsageError(f"--out writes one pair's candles; got {len(pairs)} pairs ({','.join(pairs)})")
        out = _out_path(args.out)
        timeframe = args.timeframe or settings.timeframe
        store = None
    else:
        store = _store(args, settings)
        timeframe = store.timeframe
    timeframe_ms = TIMEFRAME_MS[timeframe]
    end = last_closed_bar_ts(timeframe_ms)
    for pair in pairs:
        try:
            candles = generate_candles(pair, bars, seed=seed, signal_strength=strength,
                                       lookback=syn.signal_lookback, end_ts=end,
                                       timeframe_ms=timeframe_ms, drift=drift)
        except ValueError as exc:  # e.g. more bars than the synthetic history holds
            raise UsageError(str(exc)) from None
        if out is not None:
            try:
                write_candles_csv(out, candles)
            except OSError as exc:  # e.g. read-only file system, disk full
                raise UsageError(f"--out {out}: cannot write: {exc.strerror or exc}") from None
            written, where = len(candles), out
        else:
            written, where = store.write(pair, candles), store.path(pair)
        _print({
            "pair": pair,
            "source": "synthetic",
            "bars": written,
            "timeframe": timeframe,
            "seed": seed,
            "signalStrength": strength,
            "drift": drift,
            "start": int(candles["ts"].iloc[0]),
            "end": int(candles["ts"].iloc[-1]),
            "path": str(where),
        })
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from cli.files import load_file
    from ml.config import get_settings
    from ml.data.store import CandleStore

    settings = get_settings()
    pair = _pair(args.pair)
    path = Path(args.file)
    loaded = load_file(path, args.format, args.timeframe, default=settings.timeframe)
    result, used = loaded.result, loaded.format
    store = CandleStore(Path(args.data_dir) if args.data_dir else settings.data_dir, loaded.timeframe)
    summary = result.summary()
    gap_list = summary.pop("gapList")
    doc = {"pair": pair, "file": str(path), "format": used, "timeframe": store.timeframe, **summary}
    if result.candles.empty:
        _print({**doc, "added": 0, "stored": (store.coverage(pair) or {}).get("bars", 0)})
        raise UsageError(f"{path}: no valid candles ({result.rejected_total} row(s) rejected)")
    added = store.append(pair, result.candles)
    cov = store.coverage(pair) or {}
    _print({**doc, "added": added, "stored": cov.get("bars", 0), "storedStart": cov.get("start"),
            "storedEnd": cov.get("end"), "path": str(store.path(pair)), "gapList": gap_list})
    return 0


def _since_ms(value: str) -> int:
    """--since as epoch ms: an ISO-8601 date or date-time, UTC unless it says otherwise."""
    import pandas as pd

    text = value.strip()
    try:
        when = pd.Timestamp(text)
    except (ValueError, TypeError, OverflowError):
        when = None
    if when is None or pd.isna(when) or not text:
        raise UsageError(f"--since {value!r}: not a date; use ISO-8601, e.g. 2025-01-01 or 2025-01-01T12:00")
    try:
        when = when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")
        return int(when.value // 1_000_000)
    except (OverflowError, ValueError):
        raise UsageError(f"--since {value!r}: out of range") from None


class _FetchProgress:
    """tqdm on stderr (only on a terminal): candles received against the span asked for."""

    def __init__(self, pair: str, total: int, enabled: bool) -> None:
        import sys

        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"fetch {pair}", unit="bar", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, leave=False)

    def __call__(self, kept: int, _reached_ts: int) -> None:
        self.bar.update(kept)

    def close(self) -> None:
        self.bar.close()


def cmd_fetch(args: argparse.Namespace) -> int:
    import sys

    from ml.clock import last_closed_bar_ts
    from ml.config import get_settings
    from ml.data.exchange import ExchangeClient, ExchangeInputError, ensure_exchange_history

    settings = get_settings()
    pairs = [p for p in (s.strip() for s in args.pair.split(",")) if p]
    if not pairs:
        raise UsageError("--pair needs at least one pair, e.g. BTC or BTC,ETH")
    pairs = [_pair(p) for p in dict.fromkeys(pairs)]
    if args.bars is not None and args.bars < 1:
        raise UsageError(f"--bars must be at least 1, got {args.bars}")
    since = _since_ms(args.since) if args.since is not None else None
    store = _store(args, settings)
    try:
        client = ExchangeClient.from_settings(settings, **({"exchange_id": args.exchange} if args.exchange else {}))
    except ExchangeInputError as exc:
        raise UsageError(str(exc)) from None
    tf = store.timeframe_ms
    with client:
        end = last_closed_bar_ts(tf, client._clock())
        if since is not None and since > end:
            raise UsageError(f"--since {args.since}: after the last closed {store.timeframe} bar")
        for pair in pairs:
            cov = store.coverage(pair) or {}
            want = (end - since) // tf + 1 if since is not None else (args.bars or settings.data.exchange.history_bars)
            progress = _FetchProgress(pair, max(want - int(cov.get("bars") or 0), 0), sys.stderr.isatty())
            try:
                report = ensure_exchange_history(pair, settings, store, client=client, bars=args.bars,
                                                 since_ts=since, on_page=progress)
            except ExchangeInputError as exc:
                raise UsageError(str(exc)) from None
            finally:
                progress.close()
            cov = store.coverage(pair) or {}
            doc = report.summary()
            gap_list = doc.pop("gapList")
            _print({**doc, "stored": cov.get("bars", 0), "storedStart": cov.get("start"),
                    "storedEnd": cov.get("end"), "path": str(store.path(pair)), "gapList": gap_list})
    return 0
