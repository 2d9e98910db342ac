"""`tbml backtest`: walk-forward evaluation of a model against its baselines.

    tbml backtest (--file F [--format auto|ohlcv|binance] | --pair P [--data-dir D]) [--timeframe TF] [--bars N]
                  [--model M] [--horizons H1,H2,...] [--horizon H] [--select-k K] [--folds K]
                  [--train-bars N] [--test-bars N] [--purge N] [--epochs N] [--seed S] [--cost-bps C]
                  [--json OUT|-] [--report DIR] [--export FILE.parquet] [--no-progress]

--file reads and validates a candle file (rejected rows are reported on stderr and in the JSON) at
the timeframe of its bars (the most common spacing; --timeframe insists, and a file spaced otherwise
is refused); --pair uses the candle store when it holds the pair, else the configured source (--bars, default
backtest.bars). Unset options come from the settings (configs/default.yaml, section backtest).
Every horizon of labels.horizons is evaluated from one network per fold (--horizon H: only H;
--horizons: those), the default horizon (labels.default_horizon) being the one of the top-level
numbers. Prints a per-horizon summary and the default horizon's tables (unless --json -), writes
the JSON report (strict JSON: NaN becomes null) and the Markdown/PNG report. On the embedded
synthetic source the planted rule's accuracy on the same test rows is reported beside the models. A progress bar on stderr follows the fitted models when stderr is a
terminal.

Exit codes: 2 for bad input, checked before any model is fitted (missing or unreadable file, both
or neither of --file/--pair, purge < horizon, too few rows for the folds, unknown model, an output
that cannot be written); 1 when the run itself fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli import UsageError
from ml.config import TIMEFRAME_MS
from ml.data.files import FORMATS

if TYPE_CHECKING:
    import pandas as pd

    from ml.evaluation.backtest import BacktestConfig

# BacktestConfig field -> the option that sets it (for one-line validation messages)
OPTION_OF = {"model_type": "--model", "horizon": "--horizon", "folds": "--folds", "train_bars": "--train-bars",
             "test_bars": "--test-bars", "purge": "--purge", "epochs": "--epochs", "seed": "--seed",
             "cost_bps": "--cost-bps", "horizons": "--horizons", "select_k": "--select-k"}


def register(subparsers) -> None:
    p = subparsers.add_parser("backtest", help="walk-forward backtest of a model against baselines")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="candle file (CSV/Parquet, generic OHLCV or Binance klines)")
    src.add_argument("--pair", help="base symbol, e.g. BTC: the candle store, else the configured source")
    p.add_argument("--format", choices=list(FORMATS), default="auto", help="--file format (default: auto)")
    p.add_argument("--timeframe", choices=list(TIMEFRAME_MS), default=None,
                   help="bar size (--file default: detected from the file; --pair default: settings)")
    p.add_argument("--bars", type=int, default=None,
                   help="newest candles to use (--pair default: backtest.bars; --file default: all)")
    p.add_argument("--data-dir", default=None, help="data directory (default: TBML_DATA_DIR / settings)")
    p.add_argument("--model", default=None, help="model type (default: model.default_type)")
    p.add_argument("--horizon", type=int, default=None,
                   help="alone: evaluate this one horizon; with --horizons: the default one among them "
                        "(default: labels.default_horizon)")
    p.add_argument("--horizons", default=None, metavar="H1,H2,...",
                   help="evaluate these horizons, comma-separated, from one network (default: labels.horizons)")
    p.add_argument("--select-k", type=int, default=None,
                   help="features the learners read, ranked on each fold's fit rows (default: features.select_k)")
    p.add_argument("--folds", type=int, default=None, help="walk-forward folds (default: backtest.folds)")
    p.add_argument("--train-bars", type=int, default=None, help="rows per training block (default: expanding)")
    p.add_argument("--test-bars", type=int, default=None, help="rows per test block (default: from the data)")
    p.add_argument("--purge", type=int, default=None, help="rows between training and test, >= horizon "
                   "(default: seq_len + horizon)")
    p.add_argument("--epochs", type=int, default=None, help="max epochs per fold (default: backtest.epochs)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: training.seed)")
    p.add_argument("--cost-bps", type=float, default=None,
                   help="cost per trade, entry plus exit, in basis points (default: backtest.cost_bps)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the JSON report to OUT ('-': stdout)")
    p.add_argument("--report", default=None, metavar="DIR", help="write report.md and PNG plots into DIR")
    p.add_argument("--export", default=None, metavar="FILE.parquet",
                   help="write every test row (ts, close, fold; per horizon: P(up) per model, volatility, "
                        "signal, simulated position) to a Parquet file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_backtest)


# ------------------------------------------------------------------------------------------ input

def _config(args: argparse.Namespace, settings) -> BacktestConfig:
    """The run's configuration; every invalid option becomes one UsageError line naming the option."""
    from pydantic import ValidationError

    from ml.evaluation.backtest import BacktestConfig
    from ml.training.nets import MODEL_TYPES

    if args.model is not None and args.model not in MODEL_TYPES:
        raise UsageError(f"unknown model {args.model!r}; one of {', '.join(MODEL_TYPES)}")
    if args.cost_bps is not None and not math.isfinite(args.cost_bps):
        raise UsageError(f"--cost-bps must be a finite number, got {args.cost_bps}")
    horizons = None
    if args.horizons is not None:
        try:
            horizons = [int(x) for x in args.horizons.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--horizons must be comma-separated integers, got {args.horizons!r}") from None
        if not horizons:
            raise UsageError("--horizons needs at least one horizon")
    try:
        cfg = BacktestConfig.from_settings(
            settings, model_type=args.model, horizon=args.horizon, horizons=horizons, select_k=args.select_k,
            folds=args.folds,
            train_bars=args.train_bars, test_bars=args.test_bars, purge=args.purge, epochs=args.epochs,
            seed=args.seed, cost_bps=args.cost_bps)
        cfg.effective_purge  # noqa: B018 - raises when purge < horizon
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err.get("loc"):  # a check across fields (e.g. the horizon is not one of the horizons)
            raise UsageError(str(err["msg"]).removeprefix("Value error, ")) from None
        field = str(err["loc"][0])
        option = OPTION_OF.get(field, field or "option")
        raise UsageError(f"{option}: {err['msg']} (got {err.get('input')!r})") from None
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    return cfg


def _file_target(flag: str, value: str | None) -> Path | None:
    """An output file, checked before any work: a file in an existing, writable directory."""
    if value is None:
        return None
    out = Path(value).expanduser()
    if not value.strip() or out.is_dir():
        raise UsageError(f"{flag} {value!r} is a directory, not a file")
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise UsageError(f"{flag} {value}: {out.parent} {what}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {value}: directory {out.parent} is not writable")
    return out


def _json_target(value: str | None) -> Path | str | None:
    """The --json target: '-' (stdout) or a file (`_file_target`)."""
    return value if value == "-" else _file_target("--json", value)


def _export_target(value: str | None) -> Path | None:
    out = _file_target("--export", value)
    if out is not None and out.suffix.lower() != ".parquet":
        raise UsageError(f"--export {value}: the file name must end in .parquet")
    return out


def _report_target(value: str | None) -> Path | None:
    """The --report directory, checked before any work: an existing writable directory, or creatable."""
    if value is None:
        return None
    out = Path(value).expanduser()
    if not value.strip():
        raise UsageError("--report needs a directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--report {value}: exists and is not a directory")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--report {value}: cannot create it, {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--report {value}: {ancestor} is not writable")
    return out


def _candles(args: argparse.Namespace, settings) -> tuple[pd.DataFrame, str, dict[str, Any]]:
    """(candles, where they came from, extra facts for the JSON's data block)."""
    from cli.files import load_file
    from ml.data.sources import load_candles
    from ml.data.store import CandleStore, NoCandlesError
    from ml.pairs import InvalidPairError, validate_pair

    if args.bars is not None and args.bars < 1:
        raise UsageError(f"--bars must be >= 1, got {args.bars}")
    if args.file is not None:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
        loaded = load_file(path, args.format, args.timeframe, default=settings.timeframe)
        result = loaded.result
        summary = result.summary()
        summary.pop("gapList", None)
        if result.candles.empty:
            raise UsageError(f"{path}: no valid candles ({result.rejected_total} row(s) rejected)")
        if summary["rejectedTotal"] or summary["gaps"]:
            reasons = f" {summary['rejected']}" if summary["rejected"] else ""
            print(f"tbml: note: {path}: {summary['rejectedTotal']} row(s) rejected{reasons}, "
                  f"{summary['gaps']} gap(s) ({summary['missingBars']} missing bars)", file=sys.stderr)
        candles = result.candles
        if args.bars is not None:
            candles = candles.tail(args.bars).reset_index(drop=True)
        extra = {"file": str(path), "timeframe": loaded.timeframe, "import": {k: summary[k] for k in
                                               ("imported", "rejected", "rejectedTotal", "duplicates",
                                                "gaps", "missingBars")}}
        return candles, f"file {path}", extra
    try:
        pair = validate_pair(args.pair.strip())
    except InvalidPairError as exc:
        raise UsageError(str(exc)) from None
    bars = args.bars if args.bars is not None else settings.backtest.bars
    timeframe = args.timeframe or settings.timeframe
    if timeframe != settings.timeframe:
        settings = settings.model_copy(update={"timeframe": timeframe})
    store = CandleStore(Path(args.data_dir).expanduser() if args.data_dir else settings.data_dir, timeframe)
    extra = {"pair": pair, "timeframe": timeframe}
    if store.exists(pair):
        return store.tail(pair, bars), f"store {store.path(pair)}", extra
    try:
        candles = load_candles(pair, settings, bars=bars, store=store)
    except NoCandlesError as exc:
        raise UsageError(str(exc)) from None
    return candles, f"{settings.data.source} source ({pair})", extra


# ----------------------------------------------------------------------------------------- output

def strict_json(value: Any) -> Any:
    """`value` with NaN/inf as None and numpy scalars/arrays as plain Python (JSON has no NaN)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return [strict_json(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(target: Path | str, doc: dict[str, Any]) -> None:
    from ml.storage.atomic import atomic_write_bytes

    text = json.dumps(strict_json(doc), indent=2, allow_nan=False)
    if target == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    try:
        atomic_write_bytes(Path(target), (text + "\n").encode("utf-8"))
    except OSError as exc:
        raise UsageError(f"--json {target}: cannot write: {exc.strerror or exc}") from None


class _Progress:
    """tqdm on stderr (only on a terminal), and whether any model has been fitted yet."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.fitted = 0
        self.bar = tqdm(total=total, desc="backtest", unit="fit", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, leave=False)
        self.bar.set_postfix_str("features and look-ahead check")

    def __call__(self, done: int, total: int, what: str) -> None:
        self.fitted = done
        self.bar.total = total
        self.bar.set_postfix_str(what, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def cmd_backtest(args: argparse.Namespace) -> int:
    from ml.config import get_settings
    from ml.evaluation.backtest import BacktestInputError, run_backtest
    from ml.evaluation.report import (
        horizon_table,
        horizon_verdicts,
        summary_table,
        trading_table,
        utc,
        write_report,
    )
    from ml.features import LookAheadError
    from ml.simulation.trades import SimConfig

    settings = get_settings()
    cfg = _config(args, settings)
    json_target = _json_target(args.json)
    report_dir = _report_target(args.report)
    export_target = _export_target(args.export)
    candles, origin, extra = _candles(args, settings)

    progress = _Progress(cfg.folds * (1 + 2 * len(cfg.horizons or [cfg.horizon])), enabled=not args.no_progress and sys.stderr.isatty())
    try:
        result = run_backtest(candles, cfg, progress=progress, source=origin,
                              simulation=SimConfig.from_settings(settings))
    except LookAheadError:
        raise  # the feature set peeks ahead: a defect, not the user's input (exit 1)
    except BacktestInputError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None  # e.g. too few rows for the folds
    finally:
        progress.close()

    result.data.update(extra)
    if origin.startswith("synthetic source"):  # the data's generating rule, scored on the same rows
        from ml.evaluation.backtest import add_planted_rule

        add_planted_rule(result, candles, settings.data.synthetic.signal_lookback)
    doc = result.to_json()
    if json_target is not None:
        _write_json(json_target, doc)
    paths = {}
    if report_dir is not None:
        title = (f"Backtest of {extra.get('pair') or Path(extra.get('file', 'data')).name}: "
                 f"{cfg.model_type}, horizon {cfg.horizon} bars, {len(result.folds)} folds")
        if len(cfg.horizons or []) > 1:
            title += f" (horizons {', '.join(str(h) for h in cfg.horizons)})"
        try:
            paths = write_report(result, report_dir, title=title)
        except OSError as exc:
            raise UsageError(f"--report {report_dir}: cannot write: {exc.strerror or exc}") from None
    if export_target is not None:
        try:
            result.export(export_target)
        except OSError as exc:
            raise UsageError(f"--export {export_target}: cannot write: {exc.strerror or exc}") from None
    if json_target == "-":
        return 0
    data = result.data
    name = extra.get("pair") or Path(extra.get("file", "data")).name
    also = [h for h in (cfg.horizons or []) if h != cfg.horizon]
    print(f"{name}: {cfg.model_type}, horizon {cfg.horizon}"
          f"{' (also ' + ', '.join(str(h) for h in also) + ')' if also else ''}, {len(result.folds)} folds, "
          f"{data['rows']:,} candles {utc(data['start'])} → {utc(data['end'])} UTC ({origin}), "
          f"{result.elapsed_s:.1f} s")
    print("\nper horizon (the network vs the best baseline; its simulated trades; volatility QLIKE):")
    print(horizon_table(result))
    print(f"\nhorizon {cfg.horizon} (default):")
    print(summary_table(result))
    print("\nsimulated trading (one position at a time, stops sized from volatility, fees and slippage):")
    print(trading_table(result))
    for line in horizon_verdicts(result):
        print(line)
    if json_target is not None:
        print(f"json: {json_target}")
    if paths:
        print(f"report: {paths['report']}")
    if export_target is not None:
        print(f"export: {export_target}")
    return 0
