"""A queued, running or finished training job (the record the queue keeps and persists), its statuses
and its progress record."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

QUEUED, ACTIVE, COMPLETED, FAILED, CANCELLED = "queued", "training", "completed", "failed", "cancelled"
FINISHED = (COMPLETED, FAILED, CANCELLED)


def cooldown_key(pair: str, model_type: str) -> str:
    return f"{pair}:{model_type}"


@dataclass
class Job:
    job_id: str
    pair: str
    model_type: str
    priority: int
    original_priority: int
    max_attempts: int
    params: dict[str, Any]
    config_overrides: dict[str, Any]
    source: str
    created_at: int
    seq: int
    enqueued_at: int
    status: str = QUEUED
    not_before: int = 0
    attempts: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    finalizing: bool = False
    progress: dict[str, Any] | None = None
    error: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    cancel_reason: str | None = None
    restored: int = 0
    run_id: str | None = None  # identifies one start of the job (attempt + restore count)
    head: bool = False  # interrupted by a restart: runs before every other queued job
    placement_group: str | None = None  # hex id of the current run's Ray Train placement group (its CPUs)
    running_at: int | None = None  # when the current run's training workers came up (None: still starting)

    @property
    def key(self) -> str:
        return cooldown_key(self.pair, self.model_type)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def progress_record(previous: dict[str, Any] | None, data: dict[str, Any], now: int) -> dict[str, Any]:
    """A job's progress after a report {epoch, total, loss, val_loss, eta_s} (camelCase spellings too).

    The ETA comes from the epoch rate measured since the first report (which excludes the
    cluster's start-up time); before two reports it falls back to the reporter's own estimate.
    """
    epoch = _num(data.get("epoch"))
    total = _num(data.get("total", data.get("total_epochs", data.get("totalEpochs"))))
    prev = previous or {}
    first_at = prev.get("firstReportAt", now)
    first_epoch = prev.get("firstEpoch", epoch)
    eta = _num(data.get("eta_s", data.get("etaSeconds")))
    if epoch is not None and total is not None:
        done_since = epoch - (first_epoch or 0)
        if done_since > 0 and now > first_at:
            eta = (now - first_at) / 1000 / done_since * max(0, total - epoch)
        elif epoch >= total:
            eta = 0.0
    return {
        "epoch": int(epoch) if epoch is not None else None,
        "totalEpochs": int(total) if total is not None else None,
        "loss": _num(data.get("loss")),
        "valLoss": _num(data.get("val_loss", data.get("valLoss"))),
        "etaSeconds": round(eta, 1) if eta is not None else None,
        "percent": round(100 * epoch / total, 1) if epoch is not None and total else None,
        "updatedAt": int(now),
        "firstReportAt": first_at,
        "firstEpoch": first_epoch,
    }


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None
