"""The camelCase JSON shapes of the queue: a job, a submit's outcome, the whole queue, a finished run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ml.queue.jobs import ACTIVE, QUEUED, Job

RECENT_HISTORY = 20
ACCEPTED, DUPLICATE, COOLDOWN, PAUSED = "queued", "duplicate", "cooldown", "paused"
HTTP_STATUS = {ACCEPTED: 202, DUPLICATE: 409, COOLDOWN: 429, PAUSED: 503}


def minutes_left(ms: float) -> int:
    """Whole minutes, rounded up: never 0 while any cooldown is left."""
    return max(0, math.ceil(ms / 60_000))


def job_view(job: Job, now: int, *, position: int | None = None) -> dict[str, Any]:
    """A job as the API shows it (`id` kept for the original service's clients)."""
    out: dict[str, Any] = {
        "id": job.job_id,
        "jobId": job.job_id,
        "pair": job.pair,
        "modelType": job.model_type,
        "status": job.status,
        "priority": job.priority,
        "originalPriority": job.original_priority,
        "attempts": job.attempts,
        "maxAttempts": job.max_attempts,
        "params": {
            "epochs": job.params.get("epochs"),
            "batchSize": job.params.get("batch_size"),
            "learningRate": job.params.get("learning_rate"),
            "horizon": job.params.get("horizon"),
        },
        "source": job.source,
        "createdAt": job.created_at,
        "queuedAt": job.enqueued_at,
        "startedAt": job.started_at,
        "finishedAt": job.finished_at,
    }
    if job.status == QUEUED:
        out["queuePosition"] = position
        out["queuedFor"] = max(0, now - job.enqueued_at)
        out["notBefore"] = job.not_before or None
        out["retryInSeconds"] = max(0.0, (job.not_before - now) / 1000) if job.not_before else 0.0
    if job.status == ACTIVE and job.started_at is not None:
        out["duration"] = max(0, now - job.started_at)
        out["finalizing"] = job.finalizing
        out["runningAt"] = job.running_at  # when its training workers came up (None: still starting)
    if job.finished_at is not None and job.started_at is not None:
        out["duration"] = max(0, job.finished_at - job.started_at)
    if job.progress is not None:
        out["progress"] = dict(job.progress)
    if job.error:
        out["error"] = job.error
    if job.errors:
        out["errors"] = [dict(e) for e in job.errors]
    if job.result is not None:
        out["result"] = job.result
    if job.cancel_reason:
        out["cancelReason"] = job.cancel_reason
    if job.restored:
        out["restored"] = job.restored
    return out


@dataclass
class SubmitOutcome:
    status: str  # ACCEPTED | DUPLICATE | COOLDOWN | PAUSED
    job: Job | None = None
    existing_job_id: str | None = None
    retry_after_s: float | None = None
    queue_position: int | None = None
    message: str = ""
    can_train: dict[str, Any] | None = None

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED

    def to_dict(self, now: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "accepted": self.accepted,
            "httpStatus": HTTP_STATUS[self.status],
            "message": self.message,
            "jobId": self.job.job_id if self.job else self.existing_job_id,
            "queuePosition": self.queue_position,
            "canTrain": self.can_train,
        }
        if self.existing_job_id:
            out["existingJobId"] = self.existing_job_id
        if self.retry_after_s is not None:
            out["retryAfterSeconds"] = self.retry_after_s
            out["cooldownRemainingMinutes"] = minutes_left(self.retry_after_s * 1000)
        if self.job is not None:
            out["job"] = job_view(self.job, now, position=self.queue_position)
            out["pair"], out["modelType"] = self.job.pair, self.job.model_type
        return out


def cooldown_view(cooldowns: dict[str, int], now: int) -> list[dict[str, Any]]:
    """The cooldowns still running at `now`, soonest to end first."""
    out = []
    for key, until in sorted(cooldowns.items(), key=lambda kv: kv[1]):
        if until <= now:
            continue
        pair, model = key.split(":", 1)
        out.append({"pair": pair, "modelType": model, "until": until,
                    "cooldownRemainingMinutes": minutes_left(until - now),
                    "cooldownRemainingSeconds": (until - now) / 1000})
    return out


def queue_view(*, active: Sequence[Job], queued: Sequence[Job], history: Sequence[Job], history_total: int,
               cooldowns: dict[str, int], max_concurrent: int, cooldown_minutes: float, paused: bool,
               paused_at: int | None, now: int, recent: int = RECENT_HISTORY) -> dict[str, Any]:
    """The API's `queue` object: {active, queued, history, cooldowns, paused}. `queued` is in run
    order, `history` oldest first."""
    return {
        "active": {
            "count": len(active),
            "maxConcurrent": max_concurrent,
            "jobs": [job_view(j, now) for j in sorted(active, key=lambda j: j.started_at or 0)],
        },
        "queued": {
            "count": len(queued),
            "jobs": [job_view(j, now, position=i) for i, j in enumerate(queued, start=1)],
        },
        "history": {
            "total": history_total,
            "kept": len(history),
            "recent": [job_view(j, now) for j in reversed(history[-recent:])] if recent > 0 else [],
        },
        "cooldowns": cooldown_view(cooldowns, now),
        "cooldownMinutes": cooldown_minutes,
        "paused": paused,
        "pausedAt": paused_at,
    }


def result_summary(meta: Any, result: Any) -> dict[str, Any]:
    """A small JSON-able record of a registered run (registry meta + TrainResult) for the history."""
    meta = meta if isinstance(meta, dict) else {}
    metrics = getattr(result, "metrics", None) or meta.get("metrics") or {}
    model_m = metrics.get("model", {}) if isinstance(metrics, dict) else {}
    base_m = metrics.get("baseline", {}) if isinstance(metrics, dict) else {}

    def pick(d: dict, *names: str):
        for n in names:
            value = d.get(n)
            if isinstance(value, float) and not math.isfinite(value):
                return None  # documents are strict JSON
            if isinstance(value, int | float | str | bool):
                return value
        return None

    promotion = meta.get("promotion") if isinstance(meta.get("promotion"), dict) else {}
    return {
        "version": pick(meta, "version", "id"),
        "production": pick(promotion, "promoted"),
        "promotionReason": pick(promotion, "reason"),
        "epochsRun": getattr(result, "epochs_run", None),
        "stopped": getattr(result, "stopped", None),
        "trainSeconds": round(float(getattr(result, "train_seconds", 0.0) or 0.0), 2),
        "metrics": {
            "accuracy": pick(model_m, "accuracy"),
            "balancedAccuracy": pick(model_m, "balanced_accuracy"),
            "brier": pick(model_m, "brier"),
            "logLoss": pick(model_m, "log_loss"),
            "baselineBrier": pick(base_m, "brier"),
            "baselineLogLoss": pick(base_m, "log_loss"),
        },
    }
