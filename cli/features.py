"""`tbml features --pair P [--file F] [--timeframe TF] [--json]`: the feature names and the latest row.

A --file is read at the timeframe of its bars (the most common spacing); --timeframe insists, and a
file spaced otherwise is refused. Without --file, --timeframe picks the store's file for that bar size.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ml.config import TIMEFRAME_MS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="show the causal feature matrix's names and latest row")
    p.add_argument("--pair", required=True, help="base symbol, e.g. BTC")
    p.add_argument("--file", help="compute from this candle file (CSV/Parquet/Binance) instead of the store")
    p.add_argument("--format", default="auto", choices=["auto", "ohlcv", "binance"])
    p.add_argument("--timeframe", choices=list(TIMEFRAME_MS), default=None,
                   help="bar size (--file default: detected from the file; else: settings)")
    p.add_argument("--bars", type=int, default=2000, help="candles to use (newest), default 2000")
    p.add_argument("--data-dir", help="data directory (default: settings.data_dir)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run)


def _candles(args: argparse.Namespace):
    from cli import UsageError
    from cli.files import load_file
    from ml.config import get_settings
    from ml.data.sources import load_candles
    from ml.data.store import CandleStore
    from ml.pairs import InvalidPairError, validate_pair

    try:
        validate_pair(args.pair)
    except InvalidPairError as exc:
        raise UsageError(str(exc)) from None
    if args.bars < 1:
        raise UsageError(f"--bars must be >= 1, got {args.bars}")
    settings = get_settings()
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
        loaded = load_file(path, args.format, args.timeframe, default=settings.timeframe)
        return loaded.result.candles.tail(args.bars).reset_index(drop=True), f"file {path}", loaded.timeframe
    timeframe = args.timeframe or settings.timeframe
    if timeframe != settings.timeframe:
        settings = settings.model_copy(update={"timeframe": timeframe})
    store = CandleStore(Path(args.data_dir) if args.data_dir else settings.data_dir, timeframe)
    if store.exists(args.pair):
        return store.tail(args.pair, args.bars), f"store {store.path(args.pair)}", timeframe
    return load_candles(args.pair, settings, bars=args.bars), f"source {settings.data.source}", timeframe


def run(args: argparse.Namespace) -> int:
    from cli import UsageError
    from ml.features import FEATURE_NAMES, WARMUP_BARS, feature_matrix, feature_names_hash

    candles, origin, timeframe = _candles(args)
    if len(candles) <= WARMUP_BARS:
        raise UsageError(
            f"{args.pair}: {len(candles)} candles from {origin}; features need more than {WARMUP_BARS} (warm-up)"
        )
    matrix = feature_matrix(candles)
    latest = matrix.iloc[-1]
    as_of = int(matrix.index[-1])
    if args.json:
        print(json.dumps({
            "pair": args.pair,
            "source": origin,
            "timeframe": timeframe,
            "count": len(FEATURE_NAMES),
            "namesHash": feature_names_hash(FEATURE_NAMES),
            "names": FEATURE_NAMES,
            "asOf": as_of,
            "bars": int(len(candles)),
            "rows": int(len(matrix)),
            "latest": {k: (None if not math.isfinite(v) else float(v)) for k, v in latest.items()},
        }))
        return 0
    print(f"{args.pair}: {len(FEATURE_NAMES)} features, {len(matrix)} rows from {len(candles)} {timeframe} candles"
          f" ({origin}), latest row at ts={as_of}")
    width = max(len(n) for n in FEATURE_NAMES)
    for name, value in latest.items():
        print(f"  {name:<{width}}  {value: .6g}")
    return 0
