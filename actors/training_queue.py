"""The TrainingQueue actor: a detached, named singleton that gates Ray Train jobs.

The rules live in `ml.queue` (pure Python: `ml.queue.state.QueueState`); this module is the shell:

* State: one QueueState, restored from the Storage actor (`queue/<state_name>` document) when the
  actor (re)starts, and written back after EVERY change, in order (one writer coroutine, newest
  snapshot wins). The actor is created with `max_restarts=-1`, so a crash, a SIGKILL or
  `ray.kill(..., no_restart=False)` brings it back with every queued job.
* Runs outlive the queue. Ray kills the tasks and non-detached actors an actor owns when it dies,
  so a run is not owned by the queue: each start of a job gets its own named, detached
  `RunSupervisor` actor (0 CPUs) that launches the run's Ray task (`run_training_job`) and owns it,
  and with it the TorchTrainer's controller and workers. After a restart the queue looks each run
  it had started up by name: a live one is adopted (its progress reports and its `begin_finalize`
  reach the new process, its result is collected once); a lost one (its supervisor is gone) gets
  what it reserved released (its placement group, known from the persisted job) and the attempt
  fails by the usual rule (backoff, attempts). Supervisors of runs the queue no longer wants
  (cancelled, finished, never persisted) are killed at start-up and their placement groups removed.
  A supervisor whose queue is gone for good stops its run and exits, so no CPU stays reserved by a
  run nobody owns.
* Start-up is bounded: a run whose training workers have not come up `start_timeout_s` after its
  start is stopped and its attempt fails (retried by the rule); Ray Train's own start-up timeout
  (settings.training.start_timeout_s, actors.trainer) normally ends such a run first.
* Scheduler: an asyncio task ticks every `tick_s` (and on every change), starts what
  `QueueState.runnable()` allows, and queues periodic retraining when `retrain_interval_minutes > 0`
  (of the pair/model type whose production model was trained longest ago: `ml.queue.retrain`).
* A run = one Ray task running `actors.trainer.run_training` (its dispatch by model type runs a TorchTrainer and owns
  its workers; a worker that dies mid-run is restarted by Ray Train from the last epoch checkpoint).
  Progress arrives through `report_progress` from the rank-0 worker; its reply tells a run that is
  no longer wanted to stop at the epoch boundary.
* Registration happens inside the job's task, after it asked the queue `begin_finalize(job_id,
  run_id)` (run_id names this start of the job). The queue answers True only while that run is the
  job's current one and the job is not cancelled, and from then on refuses to cancel it. So a job
  cancelled at any time before that answer registers nothing: its task is stopped (below), and even
  a task that outlived the stop would be told False. The task never writes files itself: the
  registry goes through the Storage actor.
* Cancel: a queued job leaves the queue; an active job's task is stopped (graceful Ray Train abort,
  then its supervisor is killed after `cancel_grace_s`, which takes the task and the Train actors
  with it) and its late result or error is ignored; until its Ray work has really ended and its
  placement group is gone it keeps its `max_concurrent` slot. Emergency stop does that for everything and
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
from dataclasses import dataclass
from typing import Any

import ray

from actors.metrics import record_queue, record_training_run
from ml.clock import now_ms
from ml.queue.jobs import ACTIVE, FINISHED
from ml.queue.requests import ENSEMBLE_TYPE, InvalidRequest, TrainRequest
from ml.queue.state import JobNotCancellable, JobNotFound, QueueConfig, QueueState
from ml.queue.views import job_view, result_summary
from ml.registry.production import Production, production_from

log = logging.getLogger(__name__)

QUEUE_ACTOR_NAME = "tbml-training-queue"
STATE_CATEGORY = "queue"
DEFAULT_STATE_NAME = "state"
RETRAIN_PRIORITY = 8
CANCEL_GRACE_S = 15.0  # graceful abort first (Ray Train releases its workers and placement group)
PG_RELEASE_WAIT_S = 5.0  # after a run ended: time Ray Train gets to free its placement group itself
PG_IN_USE_WAIT_S = 30.0  # ... or, while Ray Train actors still live in it, time their owner's death takes
RUN_SEP = "#"  # progress reports name "{job_id}#{run_id}", so a stale run's reports are recognised
RUN_ACTOR_PREFIX = "tbml-run:"  # run supervisors are named "tbml-run:{queue}:{job_id}#{run_id}@{started_at}"
ADOPT_PING_S = 10.0  # a supervisor that does not answer within this after a restart counts as lost
WATCH_S = 5.0  # how often a supervisor checks that its queue still exists
ORPHAN_S = 600.0  # a finished run's supervisor waits this long for a queue to collect its result
QUEUE_KEYS = frozenset(QueueConfig.model_fields)  # the `queue` settings section's keys
ACTOR_KEYS = {"tick_s", "train_overrides", "num_workers", "cpus_per_worker", "task_num_cpus", "cancel_grace_s",
              "pairs", "model_types"}


def run_actor_name(queue_name: str, job_id: str, run_id: str, started_at: int | None) -> str:
    """The supervisor of one start of a job: unique per start, found again from the persisted job."""
    return f"{RUN_ACTOR_PREFIX}{queue_name}:{job_id}{RUN_SEP}{run_id}@{started_at}"


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
    """Train one queued job with Ray Train (an `ensemble` job: build it, actors.ensemble) and register the
    model if the queue still wants it.

    Returns {"registered": bool, ...summary}. Errors propagate (the queue retries or fails the job).
    """
    from actors.trainer import run_training
    from ml.training.config import TrainConfig

    settings = _settings()
    data_dir = data_dir or str(settings.data_dir)
    overrides: dict[str, Any] = {}
    overrides.update(train_overrides or {})
    overrides.update(job.get("config_overrides") or {})
    overrides.update({k: v for k, v in (job.get("params") or {}).items() if v is not None})
    job_id, run_id = job["job_id"], job["run_id"]
    if job["model_type"] == ENSEMBLE_TYPE:  # built from the production models, nothing trained: no TrainConfig
        from actors.ensemble import run_ensemble_build

        result = run_ensemble_build(job["pair"], data_dir=data_dir, job_id=f"{job_id}{RUN_SEP}{run_id}",
                                    progress_actor=tuple(queue_actor), cpus=cpus_per_worker, settings=settings)
    else:
        cfg = TrainConfig.from_settings(job["pair"], job["model_type"], settings=settings, **overrides)
        result = run_training(
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


def _placement_group_in_use(pg_hex: str) -> bool | None:
    """Do live actors (Ray Train workers) still run in it? None when the state API cannot tell."""
    try:
        from ray.util.state import list_actors

        return bool(list_actors(filters=[("placement_group_id", "=", pg_hex), ("state", "=", "ALIVE")], limit=10))
    except Exception:
        return None


async def release_placement_group(pg_hex: str | None, label: str) -> None:
    """Remove an ended run's placement group once nothing of the run uses it any more.

    Ray Train removes it itself when a run ends normally or is aborted. When a run's owner was
    killed, its controller dies a little later (Ray propagates the owner's death): removing the
    group before that would make the still-living controller restart its workers in a NEW group,
    which nobody would ever remove. So wait while actors still live in it (bounded), then remove.
    """
    if not pg_hex:
        return
    from ray.util.placement_group import PlacementGroup, placement_group_table

    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
    start = time.monotonic()
    try:
        while True:
            state = (await asyncio.to_thread(placement_group_table, pg)).get("state")
            if state in (None, "REMOVED"):
                return
            waited = time.monotonic() - start
            in_use = await asyncio.to_thread(_placement_group_in_use, pg_hex)
            if waited >= PG_IN_USE_WAIT_S or (waited >= PG_RELEASE_WAIT_S and not in_use):
                break
            await asyncio.sleep(0.2)
        log.warning("%s ended but its placement group %s is still %s; removing it", label, pg_hex, state)
        await asyncio.to_thread(_remove_placement_group, pg_hex)
    except Exception as exc:  # best effort: Ray Train's own cleaner remains the fallback
        log.warning("releasing placement group %s of %s failed: %s", pg_hex, label, exc)


def _remove_placement_group(pg_hex: str | None) -> bool:
    """Remove a placement group by hex id unless it is already gone; True if it was removed here."""
    if not pg_hex:
        return False
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
    if placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


class RunSupervisor:
    """Owns one run's Ray task, so the run survives a restart of the queue that started it.

    Detached and named (run_actor_name); the queue kills it once it has recorded the result. If the
    queue actor is gone for good (its name no longer exists), it stops the run, removes the run's
    placement group and exits; a finished run's supervisor that nobody collects exits after ORPHAN_S.
    """

    def __init__(self, job: dict[str, Any], task_kwargs: dict[str, Any], task_num_cpus: float,
                 queue_actor: tuple[str, str]) -> None:
        self._queue_actor = tuple(queue_actor)
        self._placement_group: str | None = None
        self._ref = run_training_job.options(name=f"train:{job['job_id']}", num_cpus=task_num_cpus).remote(
            job, queue_actor=self._queue_actor, **task_kwargs)
        self._watcher: asyncio.Task | None = None
        with contextlib.suppress(RuntimeError):  # Ray runs an async actor's __init__ on its event loop
            self._start_watch()

    def _start_watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def result(self) -> dict[str, Any]:
        """{"out": the task's return value} or {"error": one line}; may be awaited any number of times."""
        self._start_watch()
        try:
            return {"out": await self._ref}
        except Exception as exc:  # RayTaskError, TaskCancelledError, WorkerCrashedError, ...
            return {"error": _describe_error(exc)}

    async def stop(self, force: bool = False) -> None:
        """Graceful: interrupt the task (TorchTrainer aborts its run). Force: kill the task's process."""
        ray.cancel(self._ref, force=force, recursive=force)

    async def note_placement_group(self, pg_hex: str) -> None:
        self._placement_group = pg_hex

    async def placement_group(self) -> str | None:
        return self._placement_group

    async def ping(self) -> bool:
        self._start_watch()
        return True

    async def _watch(self) -> None:
        name, namespace = self._queue_actor
        missing, done_since = 0, None
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await asyncio.to_thread(ray.get_actor, name, namespace)
                missing = 0
            except ValueError:  # no such named actor any more (a restarting one keeps its name)
                missing += 1
            except Exception:
                pass
            ready, _ = ray.wait([self._ref], timeout=0)
            if ready and done_since is None:
                done_since = time.monotonic()
            if missing >= 2 or (done_since is not None and time.monotonic() - done_since > ORPHAN_S):
                break
        log.warning("run supervisor: queue %s is gone (or never collected the result); stopping the run", name)
        if not ray.wait([self._ref], timeout=0)[0]:
            with contextlib.suppress(Exception):
                ray.cancel(self._ref, force=True, recursive=True)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(ray.wait, [self._ref], timeout=30)
        await release_placement_group(self._placement_group, f"the run of the vanished queue {name}")
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


Supervisor = ray.remote(num_cpus=0, max_restarts=0)(RunSupervisor)


@dataclass
class _Run:
    """One started run as the queue tracks it."""

    job_id: str
    run_id: str
    handle: Any
    name: str
    placement_group: str | None = None
    stopping: bool = False  # cancelled or timed out: its Ray work is shutting down, it keeps its slot


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
        # the model types it accepts and retrains (default: model.enabled_types)
        self._model_types = [str(t) for t in overrides.get("model_types") or settings.model.enabled_types]
        self._state = QueueState(self._config)
        self._storage = None
        self._start_timeout_ms = self._config.start_timeout_ms
        self._runs: dict[str, _Run] = {}  # supervisor name -> run (current and stopping ones)
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
            self._state = QueueState.restore(snap, self._config, keep_active=True)
            self._restored_jobs = len(snap.get("active", []))
            log.info("queue restored: %d queued, %d runs to adopt, paused=%s",
                     len(self._state.queued), self._restored_jobs, self._state.paused)
        await self._reconcile_runs()
        if self._retrain_ms > 0 and self._state.last_retrain_at is None:
            self._state.mark_retrain(now_ms())  # the first periodic retraining comes one interval after start
        self._state.revision += 1  # write once after a (re)start: the restored form is the truth now
        await self._persist()
        self._ready.set()

    async def _reconcile_runs(self) -> None:
        """After a (re)start: adopt the live runs of the restored active jobs, fail the lost ones
        (usual retry rule) after releasing what they reserved, and kill supervisors nobody wants."""
        try:
            named = await asyncio.to_thread(ray.util.list_named_actors, True)
        except Exception as exc:
            log.warning("queue: cannot list named actors (%s); treating restored runs as lost", exc)
            named = []
        prefix = f"{RUN_ACTOR_PREFIX}{self._name}:"
        ours = {a["name"] for a in named if a.get("namespace") == self._namespace and a["name"].startswith(prefix)}
        now = now_ms()
        lost = []
        for job in list(self._state.active.values()):
            name = run_actor_name(self._name, job.job_id, job.run_id, job.started_at)
            handle = await self._live_supervisor(name) if name in ours else None
            ours.discard(name)
            if handle is not None:
                log.info("queue: adopted the running %s (run %s)", job.job_id, job.run_id)
                self._follow(_Run(job.job_id, job.run_id, handle, name, job.placement_group))
                continue
            await self._discard_supervisor(name, job.placement_group)
            lost.append(self._state.fail(job.job_id, f"run lost: its supervisor {name} did not survive the "
                                                     "queue's restart", now))
        for name in ours:  # runs of jobs that are no longer active (cancelled, finished, never persisted)
            await self._discard_supervisor(name, None)
        await self._record([j for j in lost if j is not None and j.status in FINISHED])

    async def _live_supervisor(self, name: str):
        try:
            handle = await asyncio.to_thread(ray.get_actor, name, self._namespace)
            await asyncio.wait_for(handle.ping.remote(), timeout=ADOPT_PING_S)
            return handle
        except Exception as exc:
            log.warning("queue: run supervisor %s is not usable: %s", name, _describe_error(exc))
            return None

    async def _discard_supervisor(self, name: str, pg_hex: str | None) -> None:
        """Kill a run's supervisor (its task and Train actors die with it) and remove its placement group."""
        try:
            handle = await asyncio.to_thread(ray.get_actor, name, self._namespace)
        except Exception:
            handle = None
        if handle is not None:
            if pg_hex is None:
                with contextlib.suppress(Exception):
                    pg_hex = await asyncio.wait_for(handle.placement_group.remote(), timeout=ADOPT_PING_S)
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        await release_placement_group(pg_hex, f"queue: the discarded run {name}")

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
        await self._expire_overdue(now)
        busy = sum(1 for run in self._runs.values() if run.stopping)  # still holds its slot (and CPUs)
        started = []
        for job in self._state.runnable(now, busy=busy):
            started.append(self._state.start(job.job_id, now, busy=busy))
        if started:
            await self._persist()  # before launching: a restart then knows which supervisors to look for
        for job in started:
            self._launch(job)
        await self._persist()
        record_queue(self._state.summary(now))  # actors/metrics.py

    def _launch(self, job) -> None:
        name = run_actor_name(self._name, job.job_id, job.run_id, job.started_at)
        task_kwargs = {"data_dir": self._data_dir, "train_overrides": self._train_overrides,
                       "num_workers": self._num_workers, "cpus_per_worker": self._cpus_per_worker}
        handle = Supervisor.options(name=name, namespace=self._namespace, lifetime="detached").remote(
            job.to_dict(), task_kwargs, self._task_num_cpus, (self._name, self._namespace))
        self._follow(_Run(job.job_id, job.run_id, handle, name))

    def _follow(self, run: _Run) -> None:
        self._runs[run.name] = run
        runner = asyncio.get_running_loop().create_task(self._await_run(run))
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)

    async def _await_run(self, run: _Run) -> None:
        try:
            res = await run.handle.result.remote()
        except Exception as exc:  # the supervisor itself died (killed, node lost)
            res = {"error": f"run lost: {_describe_error(exc)}"}
        out, error = res.get("out"), res.get("error")
        # its Ray work has ended: make sure its CPUs are free (a killed run's placement group is not
        # removed by Ray Train) before its slot is; then its supervisor has done its job
        await self._release_placement_group(run)
        with contextlib.suppress(Exception):
            ray.kill(run.handle, no_restart=True)
        self._runs.pop(run.name, None)
        if run.stopping:
            self._wake.set()  # its slot is free now
        if run.stopping or self._state.active_run(run.job_id, run.run_id) is None:
            return  # cancelled, timed out (already failed) or a stale run: its result is ignored
        now = now_ms()
        if error is not None:
            job = self._state.fail(run.job_id, error, now)
        elif out and out.get("registered"):
            job = self._state.succeed(run.job_id, {k: v for k, v in out.items() if k != "registered"}, now)
        else:
            job = self._state.fail(run.job_id, (out or {}).get("reason", "training returned no result"), now)
        await self._persist()
        self._wake.set()
        if job is not None and job.status in FINISHED:
            await self._record([job])

    async def _expire_overdue(self, now: int) -> None:
        """Fail (and stop) the runs whose training workers did not come up within start_timeout_s."""
        failed = []
        for job in self._state.overdue(now):
            log.warning("queue: %s has no training worker %.0fs after its start; stopping it", job.job_id,
                        self._start_timeout_ms / 1000)
            self._stop_work(job.job_id)
            failed.append(self._state.fail(job.job_id, f"start-up timeout: no training worker within "
                                                       f"{self._start_timeout_ms / 1000:.0f} s", now))
        if failed:
            await self._persist()
            await self._record([j for j in failed if j is not None and j.status in FINISHED])

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
            record_training_run(job)  # actors/metrics.py
            try:
                await self._storage.append_training_record.remote(job_view(job, now))
            except Exception as exc:  # the queue's own history still has it
                log.warning("queue: training record of %s not stored: %s", job.job_id, _describe_error(exc))

    def _current_run(self, job_id: str) -> _Run | None:
        return next((r for r in self._runs.values() if r.job_id == job_id and not r.stopping), None)

    def _stop_work(self, job_id: str) -> bool:
        """Stop a job's current run: graceful abort, then kill its supervisor after `cancel_grace_s`.

        The supervisor's `stop()` interrupts the task's main thread; TorchTrainer.fit handles that
        interrupt by aborting its controller, which stops the workers and removes the placement
        group. If the run is still alive after the grace period, killing the supervisor takes the
        task, the controller and the workers with it (they are owned by it) and the queue removes the
        placement group. Either way the job was already marked cancelled/failed, so nothing it
        returns is registered.
        """
        run = self._current_run(job_id)
        if run is None:
            return False
        run.stopping = True
        try:
            run.handle.stop.remote(False)
        except Exception as exc:
            log.warning("queue: stopping %s failed: %s", job_id, exc)
        killer = asyncio.get_running_loop().create_task(self._kill_after_grace(run))
        self._runners.add(killer)
        killer.add_done_callback(self._runners.discard)
        return True

    async def _release_placement_group(self, run: _Run) -> None:
        """Remove an ended run's placement group if Ray Train has not done so itself.

        Ray Train's graceful end removes it, and its detached cleaner does after a crash, but the
        cleaner polls the state API and can lag by minutes on a busy node, and a run killed with its
        owner leaves it behind; meanwhile the CPUs stay reserved and no other job could use them.
        The rank-0 worker told us the group's id (persisted with the job).
        """
        pg_hex = run.placement_group
        job = self._state.active_run(run.job_id, run.run_id)
        if not pg_hex and job is not None:
            pg_hex = job.placement_group
        await release_placement_group(pg_hex, f"queue: run {run.run_id} of {run.job_id}")

    async def _kill_after_grace(self, run: _Run) -> None:
        deadline = time.monotonic() + self._cancel_grace_s
        while self._runs.get(run.name) is run and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self._runs.get(run.name) is run:
            log.warning("queue: %s did not stop within %.0fs; killing its run", run.job_id, self._cancel_grace_s)
            try:
                ray.kill(run.handle, no_restart=True)
            except Exception as exc:
                log.warning("queue: killing the run of %s failed: %s", run.job_id, exc)

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
        now = now_ms()
        job = self._state.progress(job_id, progress, now, run_id=run_id or None)
        if job is not None and job.running_at is None:  # an epoch done: its workers are up
            self._state.note_running(job_id, now, run_id=run_id or None)
            await self._persist()
        return {"cancel": job is None}

    async def report_resources(self, job_id: str, resources: dict[str, Any]) -> bool:
        """Called by the rank-0 training worker at start: the run's placement group id (hex).

        Lets a cancel release the run's reserved CPUs even when Ray Train's own cleanup lags.
        """
        await self._ensure_ready()
        job_id, _, run_id = job_id.partition(RUN_SEP)
        pg_hex = resources.get("placementGroup")
        pg_hex = pg_hex if isinstance(pg_hex, str) and pg_hex else None
        run = next((r for r in self._runs.values() if r.job_id == job_id and (not run_id or r.run_id == run_id)), None)
        if run is not None and pg_hex:
            run.placement_group = pg_hex
            with contextlib.suppress(Exception):  # so that it can release it if the queue is gone for good
                run.handle.note_placement_group.remote(pg_hex)
        job = self._state.note_running(job_id, now_ms(), run_id=run_id or None, placement_group=pg_hex)
        if job is not None:
            await self._persist()
        return job is not None or run is not None

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
                "runningTasks": sorted(r.job_id for r in self._runs.values() if not r.stopping),
                "stoppingTasks": sorted(r.job_id for r in self._runs.values() if r.stopping),
                "placementGroups": {r.job_id: r.placement_group for r in self._runs.values() if r.placement_group},
                "runActors": sorted(self._runs),
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


__all__ = ["QUEUE_ACTOR_NAME", "RUN_ACTOR_PREFIX", "RunSupervisor", "TrainingQueue", "TrainingQueueActor",
           "get_or_create_queue_actor", "get_queue_actor", "run_actor_name", "run_training_job", "ACTIVE"]
