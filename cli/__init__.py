"""`tbml`: the command line, one module per command group (each with a `register` function).
The top of the import graph: may import cluster, actors and ml; nothing imports cli.

Exit codes: 0 success, 2 bad input (one clear line on stderr), 1 failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("data", "features", "storage", "train", "backtest", "cluster")


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors follow the same contract
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tbml", description="trading-bot-ml: ML predictions for crypto pairs on Ray")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cli.{name}":
                continue  # command group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"tbml: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tbml: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, exit 1
        print(f"tbml: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
