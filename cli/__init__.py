"""`tbml`: the command line, one module per command group (each with a `register` function).
The top of the import graph: may import cluster, actors and ml; nothing imports cli.

Exit codes: 0 success, 2 bad input (one clear line on stderr), 1 failure, and 141 (128 + SIGPIPE, what
a Unix tool killed by SIGPIPE reports) when the reader of stdout went away early, as in
`tbml storage stats | head -1`: nothing on stderr then, and a pipeline under `set -o pipefail` sees
the same as with any other tool that lost its reader.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import sys

COMMAND_MODULES = ("data", "features", "storage", "train", "backtest", "cluster")
EXIT_READER_GONE = 141


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
        try:
            return _dispatch(argv)
        finally:
            sys.stdout.flush()  # a closed reader shows up here at the latest, not at interpreter exit
    except BrokenPipeError as exc:
        if not _stdout_broken():  # a pipe or socket of the command's own, not its stdout: a failure
            print(f"tbml: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        _silence_stdout()
        return EXIT_READER_GONE


def _stdout_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file descriptor: assume it is the one
        return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so what is still buffered is dropped quietly when Python exits."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _dispatch(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except BrokenPipeError:
        raise  # main decides: the reader went away, or a real failure
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
