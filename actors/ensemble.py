"""The run of an `ensemble` job: nothing is trained, ml.training.ensemble builds the stack of the
production versions of the enabled types. A thin shell.

The build runs in its own Ray task that reserves `cpus` CPUs (the members' forecasts over their
validation and test rows are torch / LightGBM inference, with as many threads), so the queue's
`max_concurrent` and the cluster's CPU count mean for it what they mean for a training run. It reads
the registry and the candle store directly from the shared volume (read-only, like serving); the
job's task registers the result through the Storage actor after `begin_finalize`, like a trained
model. Progress: the task tells the queue it is running (`report_resources`, no placement group)
and reports each step (a member's forecasts on one split, the fit) as an epoch; a reply that asks
to stop ends the build (TrainingCancelled, nothing registered).
"""

from __future__ import annotations

import logging

import ray

from actors.trainer import PROGRESS_TIMEOUT_S, is_cancel

log = logging.getLogger(__name__)



@ray.remote(max_retries=0)
def _build_task(pair: str, data_dir: str, job_id: str | None, progress_actor: tuple[str, str] | None,
                threads: int):
    import torch

    from ml.config import get_settings
    from ml.data.store import CandleStore
    from ml.registry.versions import Registry
    from ml.storage.store import Storage

    torch.set_num_threads(max(1, threads))
    settings = get_settings()
    actor = None
    if progress_actor:
        try:
            actor = ray.get_actor(progress_actor[0], namespace=progress_actor[1])
        except ValueError:
            log.warning("progress actor %s not found; the ensemble build reports no progress", progress_actor)
    if actor is not None:
        try:  # the run is up: the queue's start-up timeout is for runs waiting for workers
            ray.get(actor.report_resources.remote(job_id, {"placementGroup": None}), timeout=PROGRESS_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - best effort, as for training runs
            log.info("ensemble build: running state not reported: %s", exc)

    def progress(done: int, total: int) -> bool:
        if actor is None:
            return False
        try:
            reply = ray.get(actor.report_progress.remote(job_id, {"epoch": done, "total": total, "loss": None,
                                                                  "val_loss": None, "eta_s": None}),
                            timeout=PROGRESS_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - progress is best effort; the build goes on
            log.warning("ensemble build: progress report failed: %s", exc)
            return False
        return is_cancel(reply)

    registry = Registry(Storage.reader(data_dir))
    return registry.build_ensemble(pair, settings, store=CandleStore(data_dir, settings.timeframe), progress=progress)


def run_ensemble_build(pair: str, *, data_dir: str, job_id: str | None = None,
                       progress_actor: tuple[str, str] | None = None, cpus: float | None = None, settings=None):
    """Build the ensemble of `pair` on the cluster and return the EnsembleResult (not registered).

    Raises ml.training.ensemble.EnsembleError when it cannot be built (the job fails with the reason)
    and ml.training.loop.TrainingCancelled when the queue asked it to stop.
    """
    from ml.training.ensemble import BuildCancelled
    from ml.training.loop import TrainingCancelled

    if settings is None:
        from ml.config import get_settings

        settings = get_settings()
    cpus = float(cpus or settings.training.cpus_per_worker)
    ref = _build_task.options(num_cpus=cpus).remote(pair, str(data_dir), job_id,
                                                     tuple(progress_actor) if progress_actor else None,
                                                     max(1, int(cpus)))
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BuildCancelled):
            raise TrainingCancelled(str(cause)) from None
        if cause is not None:
            raise cause from None
        raise
