"""`tbml storage stats | doctor [--repair] | cleanup --max-age-hours H [--force]` — on the files directly.

No cluster is needed. Reading (stats, doctor without --repair) is always safe; writing (repair,
cleanup) takes the data directory's writer lock, so it refuses while the Storage actor runs (then
use `POST /api/storage/cleanup`, or stop the cluster first).

cleanup takes H by the rule of ml.storage.retention (the HTTP API's too): a number >= 1, or >= 0 with
--force; anything else exits 2 before the directory is opened, so a bad value deletes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli import UsageError


def _data_dir(args: argparse.Namespace) -> Path:
    from ml.config import get_settings

    return Path(args.data_dir if args.data_dir else get_settings().data_dir).expanduser().resolve()


def _print(obj: dict) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _open_writer(data_dir: Path):
    from ml.storage.store import Storage, StorageLockedError

    try:
        return Storage(data_dir, writer_lock=True)
    except StorageLockedError as exc:
        print(f"tbml: failed: {exc}", file=sys.stderr)
        return None


def cmd_stats(args: argparse.Namespace) -> int:
    from ml.storage.store import Storage

    data_dir = _data_dir(args)
    if not data_dir.is_dir():
        raise UsageError(f"no data directory at {data_dir} (set --data-dir or TBML_DATA_DIR)")
    stats = Storage.reader(data_dir).stats()
    if not args.files:
        stats.pop("files", None)
    _print(stats)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from ml.storage.store import Storage

    if args.temp_grace_seconds < 0:
        raise UsageError("--temp-grace-seconds must be >= 0")
    data_dir = _data_dir(args)
    if not data_dir.is_dir():
        raise UsageError(f"no data directory at {data_dir} (set --data-dir or TBML_DATA_DIR)")
    if args.repair:
        storage = _open_writer(data_dir)
        if storage is None:
            return 1
        try:
            report = storage.doctor(repair=True, temp_grace_seconds=args.temp_grace_seconds)
        finally:
            storage.close()
    else:
        report = Storage.reader(data_dir).doctor(repair=False, temp_grace_seconds=args.temp_grace_seconds)
    _print(report)
    return 0 if report["ok"] else 1


def cmd_cleanup(args: argparse.Namespace) -> int:
    from ml.storage.retention import MaxAgeError, check_max_age_hours

    try:
        hours = check_max_age_hours(args.max_age_hours, force=args.force, name="--max-age-hours",
                                    force_name="--force")
    except MaxAgeError as exc:
        raise UsageError(str(exc)) from None
    data_dir = _data_dir(args)
    if not data_dir.is_dir():
        raise UsageError(f"no data directory at {data_dir} (set --data-dir or TBML_DATA_DIR)")
    storage = _open_writer(data_dir)
    if storage is None:
        return 1
    try:
        result = storage.cleanup(hours)
    finally:
        storage.close()
    _print(result)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("storage", help="inspect and maintain the data directory")
    sub = p.add_subparsers(dest="storage_command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", default=None, help="data directory (default: TBML_DATA_DIR or ./data)")

    s = sub.add_parser("stats", help="count and size per category (JSON)")
    common(s)
    s.add_argument("--files", action="store_true", help="also list the files")
    s.set_defaults(handler=cmd_stats)

    d = sub.add_parser("doctor", help="check checksums, temp files, versions, candles (JSON report); "
                                      "exit 0 when healthy or repaired, 1 when problems remain")
    common(d)
    d.add_argument("--repair", action="store_true", help="fix what can be fixed")
    d.add_argument("--temp-grace-seconds", type=float, default=60.0,
                   help="temp files younger than this count as writes in progress (default 60)")
    d.set_defaults(handler=cmd_doctor)

    c = sub.add_parser("cleanup", help="remove records and model versions older than H hours "
                                       "(never the production version)")
    common(c)
    c.add_argument("--max-age-hours", type=float, required=True, metavar="H",
                   help="a number >= 1 (>= 0 with --force; 0 removes every record)")
    c.add_argument("--force", action="store_true", help="allow H below 1 hour")
    c.set_defaults(handler=cmd_cleanup)
