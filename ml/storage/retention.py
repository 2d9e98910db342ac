"""Retention: which prediction and training records are old enough to remove, and when to look again.

The rule, in one place for the Storage actor's schedule (storage.retention_hours, checked every
storage.retention_interval_s) and for the explicit cleanups (`tbml storage cleanup`,
`POST /api/storage/cleanup`): a record whose time is before `now - hours` is removed; nothing else is.
Every function takes `now` (epoch ms) as an argument, so the rule is tested with fixed timestamps;
only the edges read the clock (ml.clock).

Retention removes records only. Model versions are pruned by the explicit cleanup alone (beyond
storage.keep_versions, older than the cutoff, never the production version).
"""

from __future__ import annotations

import math
from typing import Any

HOUR_MS = 3_600_000
# An explicit cleanup below one hour is almost always a slip (0 removes every record): it needs `force`.
MIN_MAX_AGE_HOURS = 1.0
MAX_MAX_AGE_HOURS = 1_000_000.0
RETENTION_DOCUMENT = "retention"  # training/retention.json: the last run and the totals, for stats
RECORD_TIME_KEYS = ("recordedAt", "completedAt", "finishedAt", "timestamp", "createdAt")


class MaxAgeError(ValueError):
    """A maxAgeHours value outside the allowed range (the CLI exits 2, HTTP answers 4xx)."""


def check_max_age_hours(value: Any, *, force: bool = False, name: str = "maxAgeHours",
                        force_name: str = "force") -> float:
    """The validated age limit of an explicit cleanup: a finite number >= 1 (>= 0 with `force`),
    at most MAX_MAX_AGE_HOURS. Raises MaxAgeError with a one-line message (naming the field and the
    force switch as the caller spells them) otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MaxAgeError(f"{name} must be a number of hours, got {value!r}")
    hours = float(value)
    low = 0.0 if force else MIN_MAX_AGE_HOURS
    if not math.isfinite(hours) or hours < low or hours > MAX_MAX_AGE_HOURS:
        hint = f" ({force_name} allows 0 to 1)" if not force and 0 <= hours < low else ""
        raise MaxAgeError(f"{name} must be a finite number from {low:g} to {MAX_MAX_AGE_HOURS:.0f}, "
                          f"got {value!r}{hint}")
    return hours


def retention_cutoff(now: int, hours: float) -> int | None:
    """Records with a time before this (epoch ms) are expired; None when `hours` is 0 (keep forever)."""
    if hours <= 0:
        return None
    return int(now) - int(hours * HOUR_MS)


def cutoff_for_age(now: int, max_age_hours: float) -> int:
    """The cutoff of an explicit cleanup (0 hours means: everything up to `now`)."""
    return int(now) - int(max_age_hours * HOUR_MS)


def record_time(record: dict) -> int:
    """When a training record last changed (its first epoch-ms time field; 0 when it has none)."""
    for key in RECORD_TIME_KEYS:
        v = record.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return int(v)
    return 0


def split_expired(records: list[dict], cutoff: int) -> tuple[list[dict], int]:
    """(records kept in their order, how many are expired) for training records."""
    keep = [r for r in records if record_time(r) >= cutoff]
    return keep, len(records) - len(keep)


def next_run_at(now: int, last_run_at: int | None, interval_s: float) -> int:
    """When the schedule runs next: at once when it never ran (or the last run is in the future,
    i.e. the clock went back), else one interval after the last run."""
    if last_run_at is None or last_run_at > now:
        return int(now)
    return int(last_run_at + interval_s * 1000)


def empty_state() -> dict:
    return {"runs": 0, "lastRun": None, "totalRemoved": {"predictions": 0, "trainingRecords": 0}}


def add_run(state: dict | None, run: dict) -> dict:
    """The persisted state after one run: `run` becomes lastRun and its counts join the totals."""
    base = empty_state() if not isinstance(state, dict) else state
    totals = dict(base.get("totalRemoved") or {})
    for key, n in run["removed"].items():
        totals[key] = int(totals.get(key, 0)) + int(n)
    return {"runs": int(base.get("runs", 0)) + 1, "lastRun": run, "totalRemoved": totals}
