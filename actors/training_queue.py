"""The TrainingQueue actor: a detached, named singleton that gates Ray Train jobs.

The rules live in `ml.queue` (pure Python: `ml.queue.state.QueueState`); this module is the shell:

* State: one QueueState, restored from the Storage actor (`queue/<state_name>` document) when the
  actor (re)starts, and written back after EVERY change, in order (one writer coroutine, newest
  snapshot wins). The actor is created with `max_restarts=-1`, so a crash or `ray.kill(...,
  no_restart=False)` brings it back with every queued job; jobs that were running go back to the
  head of the queue (their Ray task died with the actor that owned it).
* Scheduler: an asyncio task ticks every `tick_s` (and on every change), starts what
  `QueueState.runnable()` allows as Ray tasks (`run_training_job`), and queues periodic retraining
  when `retrain_interval_minutes > 0` (of the pair/model type whose production model was trained
  longest ago: `ml.queue.retrain`).
* A job = one Ray task running `actors.trainer.run_torch_trainer` (which owns the TorchTrainer and
  its workers). Progress arrives through `report_progress` from the rank-0 worker; its reply tells
  a run that is no longer wanted to stop at the epoch boundary.
* Registration happens inside the job's task, after it asked the queue `begin_finalize(job_id,
  run_id)` (run_id names this start of the job). The queue answers True only while that run is the
  job's current one and the job is not cancelled, and from then on refuses to cancel it. So a job
  cancelled at any time before that answer registers nothing: its task is stopped (below), and even
  a task that outlived the stop would be told False. The task never writes files itself: the
  registry goes through the Storage actor.
* Cancel: a queued job leaves the queue; an active job's task is stopped (graceful Ray Train abort,
  then a kill after `cancel_grace_s`) and its late result or error is ignored; until its Ray work has
  really ended it keeps its `max_concurrent` slot. Emergency stop does that for everything and
  pauses until `resume`.

Public methods return JSON-able dicts (camelCase), so the Serve ingress can pass them through.

Run `python -m actors.training_queue [--address auto] [--namespace tbml]` to create (or find) the
Storage and TrainingQueue actors of a running cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import ray

from ml.clock import now_ms
from ml.queue.jobs import ACTIVE, FINISHED
from ml.queue.requests import InvalidRequest, TrainRequest
from ml.queue.state import JobNotCancellable, JobNotFound, QueueConfig, QueueState
from ml.queue.views import job_view, result_summary
from ml.registry.production import Production, production_from

log = logging.getLogger(__name__)

QUEUE_ACTOR_NAME = "tbml-training-queue"
STATE_CATEGORY = "queue"
DEFAULT_STATE_NAME = "state"
RETRAIN_PRIORITY = 8
CANCEL_GRACE_S = 15.0  # graceful abort first (Ray Train releases its workers and placement group)
PG_RELEASE_WAIT_S = 5.0  # after a stopped run's task ended: time Ray Train gets to free its placement group
RUN_SEP = "#"  # progress reports name "{job_id}#{run_id}", so a stale run's reports are recognised
QUEUE_KEYS = frozenset(QueueConfig.model_fields)  # the `queue` settings section's keys
ACTOR_KEYS = {"tick_s", "train_overrides", "num_workers", "cpus_per_worker", "task_num_cpus", "cancel_grace_s",
              "pairs"}


def _settings():
    from ml.config import get_settings

    return get_settings()


def _storage_handle(namespace: str, data_dir: str | None):
    from actors.storage import get_or_create_storage_actor

    return get_or_create_storage_actor(data_dir=data_dir, namespace=namespace)


def _describe_error(exc: BaseException) -> str:
    """One readable line: the root cause of a RayTaskError, or the system error's name."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        exc = cause
    text = str(exc).strip().splitlines()
    last = text[-1] if text else ""
    return f"{type(exc).__name__}: {last}"[:1000]


@ray.remote(num_cpus=0, max_retries=0)
def run_training_job(job: dict[str, Any], *, queue_actor: tuple[str, str], data_dir: str | None,
                     train_overrides: dict[str, Any] | None = None, num_workers: int | None = None,
                     cpus_per_worker: float | None = None) -> dict[str, Any]:
    """Train one queued job with Ray Train and register the model if the queue still wants it.

    Returns {"registered": bool, ...summary}. Errors propagate (the queue retries or fails the job).
    """
    from actors.trainer import run_torch_trainer
    from ml.training.config import TrainConfig

    settings = _settings()
    data_dir = data_dir or str(settings.data_dir)
    overrides: dict[str, Any] = {}
    overrides.update(train_overrides or {})
    overrides.update(job.get("config_overrides") or {})
    overrides.update({k: v for k, v in (job.get("params") or {}).items() if v is not None})
    cfg = TrainConfig.from_settings(job["pair"], job["model_type"], settings=settings, **overrides)
    job_id, run_id = job["job_id"], job["run_id"]
    result = run_torch_trainer(
        cfg, data_dir=data_dir, run_name=f"{job_id}-{run_id}", job_id=f"{job_id}{RUN_SEP}{run_id}",
        progress_actor=tuple(queue_actor), num_workers=num_workers, cpus_per_worker=cpus_per_worker,
        settings=settings,
    )
    name, namespace = queue_actor
    queue = ray.get_actor(name, namespace=namespace)
    if not ray.get(queue.begin_finalize.remote(job_id, run_id)):
        return {"registered": False, "reason": "job is no longer active (cancelled)"}

    from actors.storage_client import RemoteStorage
    from ml.registry.versions import Registry

    storage = _storage_handle(namespace, data_dir)
    meta = Registry(RemoteStorage(storage)).register(job["pair"], result, job_id=job_id)
    return {"registered": True, **result_summary(meta, result)}


class TrainingQueueActor:
    """Async actor: every method runs on one event loop, so QueueState needs no locks."""

    def __init__(self, *, namespace: str, name: str = QUEUE_ACTOR_NAME, data_dir: str | None = None,
                 settings_overrides: dict[str, Any] | None = None) -> None:
        overrides = dict(settings_overrides or {})
        unknown = set(overrides) - QUEUE_KEYS - ACTOR_KEYS
        if unknown:
            raise ValueError(f"unknown queue actor settings: {', '.join(sorted(unknown))}")
        settings = _settings()
        self._namespace = namespace
        self._name = name
        self._state_name = DEFAULT_STATE_NAME if name == QUEUE_ACTOR_NAME else f"state-{name}"
        self._data_dir = str(data_dir or settings.data_dir)
        self._config = QueueConfig.from_settings(settings.queue, **{k: v for k, v in overrides.items() if k in QUEUE_KEYS})
        self._retrain_ms = self._config.retrain_interval_ms
        self._tick_s = float(overrides.get("tick_s", 0.25))
        self._train_overrides = dict(overrides.get("train_overrides") or {})
        self._num_workers = overrides.get("num_workers")
        self._cpus_per_worker = overrides.get("cpus_per_worker")
        self._task_num_cpus = float(overrides.get("task_num_cpus", 0))
        self._cancel_grace_s = float(overrides.get("cancel_grace_s", CANCEL_GRACE_S))
        self._pairs = [str(p) for p in overrides.get("pairs") or settings.pairs]  # periodic retraining's
        self._model_types = list(settings.model.enabled_types)
        self._state = QueueState(self._config)
        self._storage = None
        self._refs: dict[str, ray.ObjectRef] = {}  # job id -> task of its current run
        self._stopping: dict[str, ray.ObjectRef] = {}  # cancelled runs whose work is shutting down
        self._placement_groups: dict[str, str] = {}  # job id -> hex id of its Train run's placement group
        self._runners: set[asyncio.Task] = set()
        self._persisted_revision = -1
        self._persist_lock: asyncio.Lock | None = None
        self._persist_error: str | None = None
        self._started_at = now_ms()
        self._restored_jobs = 0
        self._ready: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        try:  # Ray runs an async actor's __init__ on its running event loop
            asyncio.get_running_loop()
            self._start_loop()
        except RuntimeError:
            pass  # started by the first method call instead

    # ------------------------------------------------------------------ lifecycle
    def _start_loop(self) -> None:
        if self._loop_task is None:
            self._ready = asyncio.Event()
            self._wake = asyncio.Event()
            self._persist_lock = asyncio.Lock()
            self._loop_task = asyncio.get_running_loop().create_task(self._scheduler())

    async def _ensure_ready(self) -> None:
        self._start_loop()
        await self._ready.wait()

    async def _boot(self) -> None:
        while True:
            try:
                self._storage = await asyncio.to_thread(_storage_handle, self._namespace, self._data_dir)
                snap = await self._storage.get_document.remote(STATE_CATEGORY, self._state_name, None)
                break
            except Exception as exc:  # storage not up yet: keep trying (the queue is useless without it)
                log.warning("queue: cannot read its state yet (%s); retrying", _describe_error(exc))
                await asyncio.sleep(1.0)
        if snap:
            self._state = QueueState.restore(snap, self._config)
            self._restored_jobs = len(snap.get("active", []))
            log.info("queue restored: %d queued (%d interrupted jobs back at the head), paused=%s",
                     len(self._state.queued), self._restored_jobs, self._state.paused)
        if self._retrain_ms > 0 and self._state.last_retrain_at is None:
            self._state.mark_retrain(now_ms())  # the first periodic retraining comes one interval after start
        self._state.revision += 1  # write once after a (re)start: the restored form is the truth now
        await self._persist()
        self._ready.set()

    async def _scheduler(self) -> None:
        await self._boot()
        while True:
            try:
                await self._tick()
            except Exception:  # never let the loop die
                log.exception("queue scheduler tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._tick_s)
            self._wake.clear()

    async def _tick(self) -> None:
        now = now_ms()
        await self._maybe_retrain(now)
        busy = len(self._stopping)  # a stopping run still holds its slot (and its Ray resources)
        for job in self._state.runnable(now, busy=busy):
            self._state.start(job.job_id, now, busy=busy)
            ref = run_training_job.options(
                name=f"train:{job.job_id}", num_cpus=self._task_num_cpus,
            ).remote(
                job.to_dict(), queue_actor=(self._name, self._namespace), data_dir=self._data_dir,
                train_overrides=self._train_overrides, num_workers=self._num_workers,
                cpus_per_worker=self._cpus_per_worker,
            )
            self._refs[job.job_id] = ref
            runner = asyncio.get_running_loop().create_task(self._await_job(job.job_id, job.run_id, ref))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        await self._persist()

    async def _await_job(self, job_id: str, run_id: str, ref: ray.ObjectRef) -> None:
        try:
            out = await ref
            error = None
        except Exception as exc:  # RayTaskError, TaskCancelledError, WorkerCrashedError, ...
            out, error = None, _describe_error(exc)
        if self._refs.get(job_id) is ref:
            del self._refs[job_id]
        if self._stopping.get(job_id) is ref:
            # a stopped run keeps its slot until its placement group (its CPUs) is really free
            await self._release_placement_group(job_id)
            if self._stopping.get(job_id) is ref:
                del self._stopping[job_id]
            self._wake.set()  # its slot is free now
        else:
            self._placement_groups.pop(job_id, None)
        if self._state.active_run(job_id, run_id) is None:
            return  # cancelled (or a stale run): its result is ignored
        now = now_ms()
        if error is not None:
            job = self._state.fail(job_id, error, now)
        elif out and out.get("registered"):
            job = self._state.succeed(job_id, {k: v for k, v in out.items() if k != "registered"}, now)
        else:
            job = self._state.fail(job_id, (out or {}).get("reason", "training returned no result"), now)
        await self._persist()
        self._wake.set()
        if job is not None and job.status in FINISHED:
            await self._record([job])

    async def _persist(self) -> None:
        """Write the newest snapshot if anything changed since the last write (one writer at a time)."""
        async with self._persist_lock:
            if self._storage is None or self._state.revision == self._persisted_revision:
                return
            revision, snap = self._state.revision, self._state.snapshot()
            try:
                await self._storage.put_document.remote(STATE_CATEGORY, self._state_name, snap)
                self._persisted_revision = revision
                self._persist_error = None
            except Exception as exc:  # the next change or tick tries again
                self._persist_error = _describe_error(exc)
                log.error("queue: persisting state failed: %s", self._persist_error)

    async def _record(self, jobs: list) -> None:
        """Add finished jobs to the training history of the Storage actor (upserted by jobId)."""
        now = now_ms()
        for job in jobs:
            try:
                await self._storage.append_training_record.remote(job_view(job, now))
            except Exception as exc:  # the queue's own history still has it
                log.warning("queue: training record of %s not stored: %s", job.job_id, _describe_error(exc))

    def _stop_work(self, job_id: str) -> bool:
        """Stop a cancelled job's Ray task: graceful abort, then a kill after `cancel_grace_s`.

        `ray.cancel(force=False)` interrupts the task's main thread; TorchTrainer.fit handles that
        interrupt by aborting its controller, which stops the workers and removes the placement
        group. If the task is still alive after the grace period, `force=True` kills its worker
        process (the controller and workers it owns die with it). Either way the job was already
        marked cancelled, so nothing it returns is registered.
        """
        ref = self._refs.pop(job_id, None)
        if ref is None:
            return False
        self._stopping[job_id] = ref
        try:
            ray.cancel(ref, force=False, recursive=False)
        except Exception as exc:
            log.warning("queue: ray.cancel of %s failed: %s", job_id, exc)
        killer = asyncio.get_running_loop().create_task(self._kill_after_grace(job_id, ref))
        self._runners.add(killer)
        killer.add_done_callback(self._runners.discard)
        return True

    async def _release_placement_group(self, job_id: str) -> None:
        """Remove a stopped run's placement group if Ray Train has not done so itself.

        Ray Train's graceful abort removes it, and its detached cleaner does after a crash, but
        the cleaner polls the state API and can lag by minutes on a busy node; meanwhile the CPUs
        stay reserved and no other job could use them. The rank-0 worker told us the group's id.
        """
        pg_hex = self._placement_groups.pop(job_id, None)
        if not pg_hex:
            return
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
        deadline = time.monotonic() + PG_RELEASE_WAIT_S
        try:
            while True:
                state = (await asyncio.to_thread(placement_group_table, pg)).get("state")
                if state in (None, "REMOVED"):
                    return
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.2)
            log.warning("queue: %s stopped but its placement group %s is still %s; removing it",
                        job_id, pg_hex, state)
            await asyncio.to_thread(remove_placement_group, pg)
        except Exception as exc:  # best effort: Ray Train's own cleaner remains the fallback
            log.warning("queue: releasing placement group %s of %s failed: %s", pg_hex, job_id, exc)

    async def _kill_after_grace(self, job_id: str, ref: ray.ObjectRef) -> None:
        deadline = time.monotonic() + self._cancel_grace_s
        while self._stopping.get(job_id) is ref and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self._stopping.get(job_id) is ref:
            log.warning("queue: %s did not stop within %.0fs; killing its task", job_id, self._cancel_grace_s)
            try:
                ray.cancel(ref, force=True, recursive=True)
            except Exception as exc:
                log.warning("queue: force cancel of %s failed: %s", job_id, exc)

    # ------------------------------------------------------------------ periodic retraining
    async def _maybe_retrain(self, now: int) -> None:
        if not self._state.retrain_due(self._retrain_ms, now) or self._state.paused:
            return
        self._state.mark_retrain(now)
        candidates = []
        for pair in self._pairs:
            for model in self._model_types:
                try:
                    production = await self._production(pair, model)
                except Exception as exc:
                    log.warning("queue: production lookup %s/%s failed: %s", pair, model, exc)
                    continue
                candidates.append((pair, model, production))
        target = self._state.pick_retrain_target(candidates, now)
        if target is not None:
            outcome = self._state.submit(TrainRequest(pair=target[0], model_type=target[1],
                                                      priority=RETRAIN_PRIORITY, source="retrain"), now)
            log.info("queue: periodic retraining of %s/%s: %s", *target, outcome.status)

    async def _production(self, pair: str, model: str) -> Production | None:
        """The production version of pair/model (read through the Storage actor); None without one."""
        pointer = await self._storage.get_production.remote(pair, model)
        if not pointer or not pointer.get("version"):
            return None
        meta = await self._storage.get_version_meta.remote(pair, model, pointer["version"])
        return production_from(pointer, meta)

    # ------------------------------------------------------------------ public API
    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """request: TrainRequest fields (snake_case). Returns SubmitOutcome.to_dict() or an error."""
        await self._ensure_ready()
        try:
            req = TrainRequest.from_dict(request).validate(self._model_types)
        except (InvalidRequest, TypeError) as exc:
            return {"status": "invalid", "accepted": False, "httpStatus": 400, "error": "invalid_request",
                    "message": str(exc)}
        now = now_ms()
        outcome = self._state.submit(req, now)
        await self._persist()
        self._wake.set()
        out = outcome.to_dict(now)
        out["queueStatus"] = self._state.summary(now)
        return out

    async def cancel(self, job_id: str, reason: str | None = None) -> dict[str, Any]:
        await self._ensure_ready()
        try:
            job = self._state.cancel(job_id, reason, now_ms())
        except JobNotFound as exc:
            return {"ok": False, "error": "not_found", "message": str(exc), "jobId": job_id}
        except JobNotCancellable as exc:
            return {"ok": False, "error": "not_cancellable", "message": str(exc), "jobId": job_id}
        stopped = self._stop_work(job_id)
        await self._persist()
        self._wake.set()
        await self._record([job])
        return {"ok": True, "jobId": job_id, "wasRunning": stopped or job.started_at is not None,
                "stopped": stopped, "job": job_view(job, now_ms())}

    async def emergency_stop(self, reason: str | None = None) -> dict[str, Any]:
        await self._ensure_ready()
        now = now_ms()
        queued = list(self._state.queued)
        active_ids = self._state.emergency_stop(now, reason or "emergency stop")
        stopped = [job_id for job_id in active_ids if self._stop_work(job_id)]
        await self._persist()
        await self._record([self._state.get(job_id) for job_id in [*queued, *active_ids]])
        return {"ok": True, "paused": True, "cancelledQueued": len(queued), "stoppedActive": active_ids,
                "killedTasks": stopped, "timestamp": now}

    async def resume(self) -> dict[str, Any]:
        await self._ensure_ready()
        was = self._state.resume()
        await self._persist()
        self._wake.set()
        return {"ok": True, "paused": False, "wasPaused": was, "timestamp": now_ms()}

    async def clear_cooldowns(self, pair: str | None = None, model_type: str | None = None) -> dict[str, Any]:
        await self._ensure_ready()
        cleared = self._state.clear_cooldowns(pair, model_type)
        await self._persist()
        return {"ok": True, "cleared": cleared, "pair": pair, "modelType": model_type, "timestamp": now_ms()}

    async def report_progress(self, job_id: str, progress: dict[str, Any]) -> dict[str, Any]:
        """Called by the rank-0 training worker every epoch with "{job_id}#{run_id}".

        {"cancel": True} tells a run that is no longer wanted (cancelled, stale) to stop.
        """
        await self._ensure_ready()
        job_id, _, run_id = job_id.partition(RUN_SEP)
        job = self._state.progress(job_id, progress, now_ms(), run_id=run_id or None)
        return {"cancel": job is None}

    async def report_resources(self, job_id: str, resources: dict[str, Any]) -> bool:
        """Called by the rank-0 training worker at start: the run's placement group id (hex).

        Lets a cancel release the run's reserved CPUs even when Ray Train's own cleanup lags.
        """
        await self._ensure_ready()
        job_id, _, run_id = job_id.partition(RUN_SEP)
        if self._state.active_run(job_id, run_id or None) is None and job_id not in self._stopping:
            return False
        pg_hex = resources.get("placementGroup")
        if isinstance(pg_hex, str) and pg_hex:
            self._placement_groups[job_id] = pg_hex
        return True

    async def begin_finalize(self, job_id: str, run_id: str | None = None) -> bool:
        """Asked by a job's task before it registers its model: True = go ahead (no cancel after)."""
        await self._ensure_ready()
        ok = self._state.begin_finalize(job_id, run_id)
        await self._persist()
        return ok

    async def view(self, recent: int = 20) -> dict[str, Any]:
        await self._ensure_ready()
        out = self._state.view(now_ms(), recent=recent)
        if self._persist_error:
            out["storageError"] = self._persist_error
        return out

    async def job(self, job_id: str) -> dict[str, Any] | None:
        await self._ensure_ready()
        return self._state.job_view(job_id, now_ms())

    async def can_train(self, pair: str, model_type: str) -> dict[str, Any]:
        await self._ensure_ready()
        return self._state.can_train(pair, model_type, now_ms())

    async def summary(self) -> dict[str, Any]:
        await self._ensure_ready()
        return self._state.summary(now_ms())

    async def info(self) -> dict[str, Any]:
        """Diagnostics: configuration, start time, restore count, running Ray tasks."""
        await self._ensure_ready()
        return {"name": self._name, "namespace": self._namespace, "dataDir": self._data_dir,
                "stateDocument": f"{STATE_CATEGORY}/{self._state_name}",
                "config": {**self._config.model_dump(), "retrainIntervalMinutes": self._retrain_ms / 60_000},
                "startedAt": self._started_at, "restoredJobs": self._restored_jobs,
                "runningTasks": sorted(self._refs), "stoppingTasks": sorted(self._stopping),
                "placementGroups": dict(self._placement_groups),
                "revision": self._state.revision,
                "persistedRevision": self._persisted_revision, "pid": _pid()}

    async def ping(self) -> bool:
        await self._ensure_ready()
        return True


def _pid() -> int:
    import os

    return os.getpid()


TrainingQueue = ray.remote(TrainingQueueActor)


def get_or_create_queue_actor(namespace: str | None = None, data_dir: str | None = None,
                              settings_overrides: dict[str, Any] | None = None, *,
                              name: str = QUEUE_ACTOR_NAME):
    """The detached singleton of `namespace` (default: settings.namespace); created when missing.

    Overrides (queue settings, tick_s, train_overrides, num_workers, cpus_per_worker, task_num_cpus,
    cancel_grace_s, pairs: what periodic retraining considers) apply only when this call creates the actor.
    """
    settings = _settings()
    ns = namespace or settings.namespace
    return TrainingQueue.options(
        name=name, namespace=ns, lifetime="detached", get_if_exists=True, max_restarts=-1,
        max_task_retries=-1, max_concurrency=256, num_cpus=0,
    ).remote(namespace=ns, name=name, data_dir=str(data_dir or settings.data_dir),
             settings_overrides=settings_overrides)


def get_queue_actor(namespace: str | None = None, name: str = QUEUE_ACTOR_NAME):
    """The running queue actor; raises ValueError if it does not exist."""
    return ray.get_actor(name, namespace=namespace or _settings().namespace)


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m actors.training_queue",
                                     description="create (or find) the Storage and TrainingQueue actors")
    parser.add_argument("--address", default="auto", help="Ray address (default: auto)")
    parser.add_argument("--namespace", default=None, help="Ray namespace (default: settings.namespace)")
    parser.add_argument("--data-dir", default=None, help="shared data directory (default: TBML_DATA_DIR)")
    args = parser.parse_args(argv)
    ns = args.namespace or _settings().namespace
    ray.init(address=args.address, namespace=ns, log_to_driver=False)
    _storage_handle(ns, args.data_dir)
    queue = get_or_create_queue_actor(ns, args.data_dir)
    print(json.dumps({"namespace": ns, "queue": ray.get(queue.info.remote(), timeout=120)}))
    return 0


if __name__ == "__main__":
    import sys

    # Use the module's importable twin, so Ray ships `actors.training_queue.*` by reference, not
    # copies of `__main__`.
    from actors.training_queue import _main as main

    sys.exit(main())


__all__ = ["QUEUE_ACTOR_NAME", "TrainingQueue", "TrainingQueueActor", "get_or_create_queue_actor",
           "get_queue_actor", "run_training_job", "ACTIVE"]
