"""A queued, running or finished training job (the record the queue keeps and persists) and its statuses."""

from __future__ import annotations

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

    @property
    def key(self) -> str:
        return cooldown_key(self.pair, self.model_type)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
