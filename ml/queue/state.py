"""The training queue as a pure state machine. No Ray here: `actors/training_queue.py` is the thin
shell that gives it a place in the cluster, runs the jobs and persists `snapshot()`.

Every method that depends on time takes `now` (epoch ms) from the caller, so the rules are exact and
testable with a fake clock.

Rules
-----
* Priority 1-10, lower runs first; FIFO among equal priorities (by a monotonically increasing
  sequence number given when a job enters, or re-enters, the queue). Jobs interrupted by a restart
  (see restore) come before all of them.
* At most `max_concurrent` jobs are active. `runnable()` never offers more than the free slots and
  `start()` refuses to exceed them.
* One job per PAIR+model: a second request while one is queued or active is refused with the
  existing job id (`duplicate`).
* A success starts a cooldown for its PAIR+model (`cooldown_minutes`); requests inside it are refused
  with the remaining time (`cooldown`). `clear_cooldowns()` lifts one or all.
* A failure is retried while `attempts < max_attempts`: back in the queue with priority +2 (max 10)
  and not before `now + retry_base_s * 2**(attempts-1)`; after the last attempt the job is `failed`.
* Cancel: a queued job leaves the queue; an active job is marked cancelled and the caller stops its
  work. A late result of a cancelled job is ignored (`succeed`/`fail` return None).
* Finalizing: once training returned, the job asks `begin_finalize()` before it registers its model.
  From then on it can no longer be cancelled (registration is a short, atomic write), and a job that
  was cancelled first gets False and registers nothing.
* Emergency stop cancels every queued and active (not finalizing) job and pauses the queue: new
  requests are refused (`paused`) and nothing starts until `resume()`.
* History keeps the newest `history_limit` finished jobs.
* `snapshot()` / `QueueState.restore()`: a JSON-able round trip. Jobs that were *active* when the
  snapshot was taken are put back at the head of the queue on restore (their Ray work died with the
  old actor process); the interrupted attempt is not counted against `max_attempts`. With
  `keep_active=True` they stay active instead (same run id, `restored` + 1): the shell then either
  adopts the run, which outlived the old process, or reports it lost with `fail()` (the usual retry
  rule: the attempt counts, backoff, priority + 2).
* Start-up: `note_running()` records that a run's training workers came up (and the placement group
  that holds their CPUs); `overdue()` lists the runs that did not within `start_timeout_s`, which the
  shell stops and `fail()`s, so no run waits for resources forever.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ConfigDict, model_validator

from ml.config import QueueSettings
from ml.queue import views
from ml.queue.jobs import ACTIVE, CANCELLED, COMPLETED, FAILED, QUEUED, Job, cooldown_key, progress_record
from ml.queue.requests import PRIORITY_MAX, QueueError, TrainRequest
from ml.queue.retrain import oldest
from ml.queue.views import ACCEPTED, COOLDOWN, DUPLICATE, PAUSED, RECENT_HISTORY, SubmitOutcome, minutes_left
from ml.registry.production import Production

RETRY_PRIORITY_STEP = 2
SNAPSHOT_VERSION = 1


class JobNotFound(QueueError, KeyError):
    """No job with that id (neither queued, active nor in the history)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "job not found"


class JobNotCancellable(QueueError):
    """The job already finished, or it is registering its result."""


class QueueConfig(QueueSettings):
    """The `queue` settings section (its fields and defaults are the one definition), checked for the
    state machine and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _check(self) -> QueueConfig:
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.cooldown_minutes < 0 or self.retry_base_s < 0:
            raise ValueError("cooldown_minutes and retry_base_s must be >= 0")
        if self.history_limit < 1:
            raise ValueError("history_limit must be >= 1")
        if not self.start_timeout_s > 0:
            raise ValueError("start_timeout_s must be > 0")
        return self

    @classmethod
    def from_settings(cls, queue_settings: Any = None, **overrides: Any) -> QueueConfig:
        """From `Settings.queue` (or the process settings), with keyword overrides."""
        if queue_settings is None:
            from ml.config import get_settings

            queue_settings = get_settings().queue
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"unknown queue settings: {', '.join(sorted(unknown))}")
        values = {name: getattr(queue_settings, name) for name in cls.model_fields if hasattr(queue_settings, name)}
        values.update(overrides)
        return cls(**values)

    @property
    def cooldown_ms(self) -> int:
        return int(round(self.cooldown_minutes * 60_000))

    @property
    def start_timeout_ms(self) -> int:
        return int(round(self.start_timeout_s * 1000))

    @property
    def retrain_interval_ms(self) -> int:
        return int(self.retrain_interval_minutes * 60_000)

    def backoff_ms(self, attempt: int) -> int:
        """Delay before retrying after the `attempt`-th attempt failed (1-based): base * 2**(attempt-1)."""
        return int(round(self.retry_base_s * 1000 * 2 ** max(0, attempt - 1)))


class QueueState:
    """Queued, active and finished jobs, cooldowns and the pause flag. Not thread-safe: one owner."""

    def __init__(self, config: QueueConfig | None = None) -> None:
        self.config = config or QueueConfig()
        self.queued: dict[str, Job] = {}
        self.active: dict[str, Job] = {}
        self.history: list[Job] = []  # oldest first
        self.history_total = 0
        self.cooldowns: dict[str, int] = {}  # "PAIR:model" -> until (epoch ms)
        self.paused = False
        self.paused_at: int | None = None
        self.last_retrain_at: int | None = None
        self.revision = 0  # +1 on every change: the shell persists when it moves
        self._seq = 0
        self._last_id_ms: dict[str, int] = {}

    # ---------------------------------------------------------------- helpers
    def _changed(self) -> None:
        self.revision += 1

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _new_job_id(self, pair: str, model_type: str, now: int) -> str:
        prefix = f"{pair}_{model_type}"
        ms = max(int(now), self._last_id_ms.get(prefix, -1) + 1)
        while self._find(f"{prefix}_{ms}") is not None:
            ms += 1
        self._last_id_ms[prefix] = ms
        return f"{prefix}_{ms}"

    def _find(self, job_id: str) -> Job | None:
        job = self.active.get(job_id) or self.queued.get(job_id)
        if job is not None:
            return job
        for old in reversed(self.history):
            if old.job_id == job_id:
                return old
        return None

    def _to_history(self, job: Job) -> None:
        self.history.append(job)
        self.history_total += 1
        overflow = len(self.history) - self.config.history_limit
        if overflow > 0:
            del self.history[:overflow]

    def _prune_cooldowns(self, now: int) -> None:
        for key in [k for k, until in self.cooldowns.items() if until <= now]:
            del self.cooldowns[key]

    def ordered_queue(self) -> list[Job]:
        """Queued jobs in run order: priority ascending, then FIFO."""
        return sorted(self.queued.values(), key=lambda j: (not j.head, j.priority, j.seq))

    def queue_position(self, job_id: str) -> int | None:
        for i, job in enumerate(self.ordered_queue(), start=1):
            if job.job_id == job_id:
                return i
        return None

    def pending_for(self, pair: str, model_type: str) -> Job | None:
        """The queued or active job of this PAIR+model, if any."""
        for job in (*self.active.values(), *self.queued.values()):
            if job.pair == pair and job.model_type == model_type:
                return job
        return None

    def cooldown_remaining_ms(self, pair: str, model_type: str, now: int) -> int:
        until = self.cooldowns.get(cooldown_key(pair, model_type))
        return max(0, until - now) if until else 0

    def get(self, job_id: str) -> Job:
        job = self._find(job_id)
        if job is None:
            raise JobNotFound(f"no training job {job_id!r}")
        return job

    # ---------------------------------------------------------------- gate
    def can_train(self, pair: str, model_type: str, now: int) -> dict[str, Any]:
        """{allowed, reason, cooldownRemainingMinutes[, jobId]}: would a request be accepted now?"""
        if self.paused:
            return {"allowed": False, "reason": "Training paused by emergency stop (resume to continue)",
                    "cooldownRemainingMinutes": 0}
        pending = self.pending_for(pair, model_type)
        if pending is not None:
            what = "Already training" if pending.status == ACTIVE else "Already queued"
            return {"allowed": False, "reason": what, "cooldownRemainingMinutes": 0, "jobId": pending.job_id}
        left = self.cooldown_remaining_ms(pair, model_type, now)
        if left > 0:
            return {"allowed": False, "reason": "Cooldown active", "cooldownRemainingMinutes": minutes_left(left),
                    "cooldownRemainingSeconds": left / 1000}
        if len(self.active) < self.config.max_concurrent and not any(
            j.not_before <= now for j in self.queued.values()
        ):
            return {"allowed": True, "reason": "Can start immediately", "cooldownRemainingMinutes": 0}
        return {"allowed": True, "reason": f"Will be queued ({len(self.queued)} waiting, "
                f"{len(self.active)} training)", "cooldownRemainingMinutes": 0}

    def submit(self, request: TrainRequest, now: int) -> SubmitOutcome:
        request.validate()
        self._prune_cooldowns(now)
        can = self.can_train(request.pair, request.model_type, now)
        label = f"{request.pair}:{request.model_type}"
        if self.paused:
            return SubmitOutcome(PAUSED, message=f"Training queue is paused (emergency stop); {label} refused",
                                 can_train=can)
        pending = self.pending_for(request.pair, request.model_type)
        if pending is not None:
            return SubmitOutcome(
                DUPLICATE, existing_job_id=pending.job_id, can_train=can,
                queue_position=self.queue_position(pending.job_id),
                message=f"{label} is already {'training' if pending.status == ACTIVE else 'queued'} "
                        f"as {pending.job_id}",
            )
        left = self.cooldown_remaining_ms(request.pair, request.model_type, now)
        if left > 0:
            return SubmitOutcome(COOLDOWN, retry_after_s=left / 1000, can_train=can,
                                 message=f"{label} is cooling down for {left / 1000:.0f} s more")
        job = Job(
            job_id=self._new_job_id(request.pair, request.model_type, now),
            pair=request.pair,
            model_type=request.model_type,
            priority=request.priority,
            original_priority=request.priority,
            max_attempts=request.max_attempts or self.config.max_attempts,
            params={"epochs": request.epochs, "batch_size": request.batch_size,
                    "learning_rate": request.learning_rate, "horizon": request.horizon},
            config_overrides=dict(request.config_overrides),
            source=request.source,
            created_at=int(now),
            seq=self._next_seq(),
            enqueued_at=int(now),
        )
        self.queued[job.job_id] = job
        self._changed()
        position = self.queue_position(job.job_id)
        return SubmitOutcome(ACCEPTED, job=job, queue_position=position, can_train=can,
                             message=f"Training job queued for {label}")

    # ---------------------------------------------------------------- scheduling
    def free_slots(self, busy: int = 0) -> int:
        """Slots left; `busy` counts work the shell still runs outside the active set (e.g. a
        cancelled job whose Ray work is still shutting down)."""
        return max(0, self.config.max_concurrent - len(self.active) - max(0, busy))

    def runnable(self, now: int, busy: int = 0) -> list[Job]:
        """Jobs to start now, in order: never more than the free slots; none while paused."""
        if self.paused:
            return []
        slots = self.free_slots(busy)
        if slots == 0:
            return []
        return [j for j in self.ordered_queue() if j.not_before <= now][:slots]

    def next_wakeup(self, now: int) -> int | None:
        """When the earliest backed-off job becomes eligible (for a scheduler that sleeps)."""
        waits = [j.not_before for j in self.queued.values() if j.not_before > now]
        return min(waits) if waits else None

    def start(self, job_id: str, now: int, busy: int = 0) -> Job:
        job = self.queued.get(job_id)
        if job is None:
            raise QueueError(f"job {job_id!r} is not queued")
        if self.paused:
            raise QueueError("queue is paused")
        if self.free_slots(busy) == 0:
            raise QueueError(f"max_concurrent={self.config.max_concurrent} reached")
        if job.not_before > now:
            raise QueueError(f"job {job_id!r} may not start before {job.not_before}")
        del self.queued[job_id]
        job.status = ACTIVE
        job.attempts += 1
        job.started_at = int(now)
        job.finalizing = False
        job.progress = None
        job.run_id = f"a{job.attempts}r{job.restored}"
        job.head = False
        job.placement_group = None
        job.running_at = None
        self.active[job_id] = job
        self._changed()
        return job

    def active_run(self, job_id: str, run_id: str | None = None) -> Job | None:
        """The active job, if `run_id` (when given) is its current run."""
        job = self.active.get(job_id)
        if job is None or (run_id is not None and run_id != job.run_id):
            return None
        return job

    def progress(self, job_id: str, data: dict[str, Any], now: int, run_id: str | None = None) -> Job | None:
        """Record a progress report {epoch, total, loss, val_loss, eta_s}; ignored unless active
        (and, with `run_id`, unless it comes from the job's current run).

        The record (with its ETA) is ml.queue.jobs.progress_record.
        """
        job = self.active_run(job_id, run_id)
        if job is None:
            return None
        job.progress = progress_record(job.progress, data, now)
        # Not a persisted change: progress is transient (a restored job starts over without it),
        # and writing the snapshot every epoch would be wasted I/O.
        return job

    def note_running(self, job_id: str, now: int, run_id: str | None = None,
                     placement_group: str | None = None) -> Job | None:
        """The run's training workers are up (`placement_group`: hex id of what holds their CPUs).

        Persisted (a change): after a restart the shell still knows what to release if the run is lost.
        None unless the job is active and `run_id` (when given) is its current run.
        """
        job = self.active_run(job_id, run_id)
        if job is None:
            return None
        changed = job.running_at is None or (placement_group and placement_group != job.placement_group)
        if job.running_at is None:
            job.running_at = int(now)
        if placement_group:
            job.placement_group = placement_group
        if changed:
            self._changed()
        return job

    def overdue(self, now: int) -> list[Job]:
        """Active runs whose training workers did not come up within `start_timeout_s` of the start."""
        limit = self.config.start_timeout_ms
        return [j for j in self.active.values()
                if j.running_at is None and not j.finalizing and j.started_at is not None
                and now - j.started_at >= limit]

    def begin_finalize(self, job_id: str, run_id: str | None = None) -> bool:
        """May this job register its result? True once, only while it is active (not cancelled) and
        `run_id` (when given) is its current run: a stale run never registers."""
        job = self.active_run(job_id, run_id)
        if job is None or job.finalizing:
            return False
        job.finalizing = True
        self._changed()
        return True

    def succeed(self, job_id: str, summary: dict[str, Any] | None, now: int) -> Job | None:
        """Active -> completed, cooldown for its PAIR+model. None if the job is no longer active."""
        job = self.active.pop(job_id, None)
        if job is None:
            return None
        job.status = COMPLETED
        job.finished_at = int(now)
        job.finalizing = False
        job.result = summary
        job.error = None
        if job.progress is not None:
            job.progress["etaSeconds"] = 0.0
        if self.config.cooldown_ms > 0:
            self.cooldowns[job.key] = int(now) + self.config.cooldown_ms
        self._to_history(job)
        self._changed()
        return job

    def fail(self, job_id: str, error: str, now: int) -> Job | None:
        """Active -> queued again after a backoff (status QUEUED), or `failed` after the last attempt.

        None if the job is no longer active (cancelled: its error is not news).
        """
        job = self.active.pop(job_id, None)
        if job is None:
            return None
        job.finalizing = False
        job.error = str(error)
        job.errors.append({"attempt": job.attempts, "error": str(error)[:2000], "at": int(now)})
        if job.attempts < job.max_attempts and not self.paused:
            job.status = QUEUED
            job.not_before = int(now) + self.config.backoff_ms(job.attempts)
            job.priority = min(PRIORITY_MAX, job.priority + RETRY_PRIORITY_STEP)
            job.seq = self._next_seq()
            job.enqueued_at = int(now)
            job.started_at = None
            self.queued[job_id] = job
        else:
            job.status = FAILED
            job.finished_at = int(now)
            self._to_history(job)
        self._changed()
        return job

    # ---------------------------------------------------------------- operator actions
    def cancel(self, job_id: str, reason: str | None, now: int) -> Job:
        """Queued: removed. Active: marked cancelled (the caller stops its work). Returns the job
        with `status == CANCELLED`; `job.started_at` tells whether it was running."""
        job = self.queued.pop(job_id, None)
        if job is None:
            job = self.active.get(job_id)
            if job is None:
                old = self._find(job_id)
                if old is None:
                    raise JobNotFound(f"no training job {job_id!r}")
                raise JobNotCancellable(f"job {job_id} already {old.status}")
            if job.finalizing:
                raise JobNotCancellable(f"job {job_id} finished training and is registering its model")
            del self.active[job_id]
        else:
            job.started_at = None  # a queued job (even a retrying one) has no running work
        job.status = CANCELLED
        job.finished_at = int(now)
        job.cancel_reason = reason or "cancelled"
        self._to_history(job)
        self._changed()
        return job

    def emergency_stop(self, now: int, reason: str = "emergency stop") -> list[str]:
        """Cancel everything queued and active, pause. Returns the ids of active jobs to stop.

        A job that is already registering its model (finalizing) is left to finish its short write.
        """
        for job_id in [j.job_id for j in self.ordered_queue()]:
            self.cancel(job_id, reason, now)
        stopped = []
        for job_id, job in list(self.active.items()):
            if not job.finalizing:
                self.cancel(job_id, reason, now)
                stopped.append(job_id)
        self.paused = True
        self.paused_at = int(now)
        self._changed()
        return stopped

    def resume(self) -> bool:
        """Unpause; True if the queue was paused."""
        was = self.paused
        self.paused = False
        self.paused_at = None
        self._changed()
        return was

    def clear_cooldowns(self, pair: str | None = None, model_type: str | None = None) -> int:
        """Remove the cooldowns matching pair and/or model type (both None: all). Returns the count."""
        keys = [k for k in self.cooldowns
                if (pair is None or k.split(":", 1)[0] == pair)
                and (model_type is None or k.split(":", 1)[1] == model_type)]
        for k in keys:
            del self.cooldowns[k]
        if keys:
            self._changed()
        return len(keys)

    # ---------------------------------------------------------------- periodic retraining
    def retrain_due(self, interval_ms: int, now: int) -> bool:
        if interval_ms <= 0:
            return False
        return self.last_retrain_at is None or now - self.last_retrain_at >= interval_ms

    def mark_retrain(self, now: int) -> None:
        self.last_retrain_at = int(now)
        self._changed()

    def pick_retrain_target(self, candidates: Iterable[tuple[str, str, Production | None]],
                            now: int) -> tuple[str, str] | None:
        """The (pair, model) whose production model is oldest by training time (no model: oldest of
        all), skipping PAIR+models that are cooling down or already queued/active."""
        return oldest(candidates, now, eligible=lambda pair, model: self.pending_for(pair, model) is None
                      and self.cooldown_remaining_ms(pair, model, now) == 0)

    # ---------------------------------------------------------------- views
    def job_view(self, job_id: str, now: int) -> dict[str, Any] | None:
        job = self._find(job_id)
        if job is None:
            return None
        return views.job_view(job, now, position=self.queue_position(job_id) if job.status == QUEUED else None)

    def cooldown_view(self, now: int) -> list[dict[str, Any]]:
        return views.cooldown_view(self.cooldowns, now)

    def view(self, now: int, *, recent: int = RECENT_HISTORY) -> dict[str, Any]:
        """The API's `queue` object (ml.queue.views.queue_view)."""
        return views.queue_view(active=list(self.active.values()), queued=self.ordered_queue(), history=self.history,
                          history_total=self.history_total, cooldowns=self.cooldowns,
                          max_concurrent=self.config.max_concurrent, cooldown_minutes=self.config.cooldown_minutes,
                          paused=self.paused, paused_at=self.paused_at, now=now, recent=recent)

    def summary(self, now: int) -> dict[str, Any]:
        """A small view for health endpoints."""
        return {"active": len(self.active), "queued": len(self.queued), "paused": self.paused,
                "maxConcurrent": self.config.max_concurrent, "cooldowns": len(self.cooldown_view(now)),
                "historyTotal": self.history_total}

    # ---------------------------------------------------------------- persistence
    def snapshot(self) -> dict[str, Any]:
        """Everything needed to rebuild the state; JSON-able."""
        return {
            "version": SNAPSHOT_VERSION,
            "queued": [j.to_dict() for j in self.ordered_queue()],
            "active": [j.to_dict() for j in self.active.values()],
            "history": [j.to_dict() for j in self.history],
            "historyTotal": self.history_total,
            "cooldowns": dict(self.cooldowns),
            "paused": self.paused,
            "pausedAt": self.paused_at,
            "lastRetrainAt": self.last_retrain_at,
            "seq": self._seq,
            "lastIdMs": dict(self._last_id_ms),
            "revision": self.revision,
        }

    @classmethod
    def restore(cls, data: dict[str, Any] | None, config: QueueConfig | None = None, *,
                keep_active: bool = False) -> QueueState:
        """Rebuild from `snapshot()`. Jobs that were active go back to the head of the queue (their
        work died with the process that owned it); that interrupted attempt is not counted.

        keep_active=True: they stay active with their run id (`restored` + 1), for a shell whose runs
        can outlive it; it adopts each or reports it lost (`fail`)."""
        state = cls(config)
        if not data:
            return state
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported queue snapshot version {data.get('version')!r}")
        state._seq = int(data.get("seq", 0))
        state._last_id_ms = {k: int(v) for k, v in (data.get("lastIdMs") or {}).items()}
        for raw in data.get("queued", []):
            job = Job.from_dict(raw)
            job.status = QUEUED
            state.queued[job.job_id] = job
        interrupted = sorted((Job.from_dict(raw) for raw in data.get("active", [])),
                             key=lambda j: j.started_at or 0)
        if keep_active:
            for job in interrupted:
                job.status = ACTIVE
                job.restored += 1
                state.active[job.job_id] = job
            interrupted = []
        head = min([j.seq for j in state.queued.values()], default=state._seq + 1)
        for offset, job in enumerate(reversed(interrupted), start=1):
            job.status = QUEUED
            job.attempts = max(0, job.attempts - 1)
            job.started_at = None
            job.finalizing = False
            job.progress = None
            job.not_before = 0
            job.run_id = None
            job.restored += 1
            job.head = True  # ahead of every queued job, whatever its priority
            job.seq = head - offset  # FIFO (by start time) among the interrupted
            state.queued[job.job_id] = job
        state.history = [Job.from_dict(raw) for raw in data.get("history", [])][-state.config.history_limit:]
        state.history_total = int(data.get("historyTotal", len(state.history)))
        state.cooldowns = {k: int(v) for k, v in (data.get("cooldowns") or {}).items()}
        state.paused = bool(data.get("paused", False))
        state.paused_at = data.get("pausedAt")
        state.last_retrain_at = data.get("lastRetrainAt")
        state.revision = int(data.get("revision", 0))
        return state
