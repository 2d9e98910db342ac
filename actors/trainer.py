"""Training as a Ray Train job: a TorchTrainer around the Ray-free loop of ml.training.loop.

run_torch_trainer() does, on the driver:
  1. load the candles (the configured source; `files` reads the candle store under data_dir) and
     build the Dataset once (ml.training.dataset.prepare_dataset),
  2. put its compact form (ml.training.dataset.pack_dataset: train + validation only) in the object store,
  3. start a TorchTrainer with ScalingConfig(num_workers, CPU only, resources_per_worker) and
     RunConfig(name=run_name, storage_path=data_dir/"ray_results"). Each worker runs
     ml.training.loop.fit on its shard of every epoch (DDP via ray.train.torch.prepare_model when there
     are several workers) and calls ray.train.report every epoch with the epoch metrics; rank 0
     attaches a checkpoint (state.pt: weights, optimizer, best weights, counters) and, if a
     progress actor is named, sends it {epoch, total, loss, val_loss, eta_s},
  4. load the best weights from the last checkpoint and calibrate + evaluate on the driver with
     ml.training.result.build_result, exactly as train_local does.

Cancel: if the progress actor's report_progress returns "cancel"/"stop" or a dict with a true
"cancel" or "stop", every worker stops at that epoch boundary and run_torch_trainer raises
ml.training.loop.TrainingCancelled (nothing to register). Killing the task that runs run_torch_trainer
also stops the run (Ray tears the workers down with the controller).

Failures: FailureConfig(max_failures=settings.training.max_failures). A worker that dies mid-run
(its process killed, its node lost) makes Ray Train restart the worker group, and every worker
resumes from the run's latest epoch checkpoint (`ray.train.get_checkpoint()` in the train loop), so
the run goes on from its last finished epoch instead of from scratch. Start-up is bounded: Ray Train
waits `settings.training.start_timeout_s` for the workers' resources (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
and gives up after that one timeout (controller_failure_limit=0); the error reaches the caller,
which retries the attempt (the queue does, by its rule) instead of waiting for CPUs forever.

Resume: a run directory with the same run_name under storage_path holds Ray Train's checkpoint
snapshot. With resume=True training continues from its latest checkpoint (when the config and
data shape match); with resume=False (default) an existing name gets a unique suffix instead.

lightgbm (ml.training.gbm) runs through the same TorchTrainer, with ONE worker (the boosters are not
data-parallel here; the worker's CPUs are its LightGBM threads) and its own loop
(_gbm_loop_per_worker). Why a TorchTrainer rather than a plain Ray task: the queue's contract is the
run's — the placement group the rank-0 worker reports (what a cancel releases), the progress reports
whose reply cancels, Ray Train's bounded start-up and worker restarts from the last checkpoint — and
a plain task would have to re-implement each of them. Progress is reported per booster (epoch =
boosters done, total = 2 x horizons) and the cancel reply is asked every
ml.training.gbm.PROGRESS_EVERY boosting rounds; each finished booster is checkpointed (its text), so
a restarted worker fits only the boosters not done yet. The driver calibrates and evaluates exactly as
train_local does (ml.training.gbm.build_gbm_result).

run_training() is the one dispatch by model type that the queue's job task calls (networks and
lightgbm: run_torch_trainer).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ml.clock import now_ms
from ml.training.config import GBM_TYPE, TrainConfig
from ml.training.dataset import load_training_candles, pack_dataset, prepare_dataset, unpack_dataset
from ml.training.gbm import PROGRESS_EVERY, build_gbm_result, fit_gbm, model_from_done
from ml.training.loop import FitResult, TrainingCancelled, fit, new_model
from ml.training.nets import deterministic
from ml.training.result import TrainResult, build_result

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
GBM_CHECKPOINT_FILE = "boosters.json"  # a lightgbm run's finished boosters (text) and their fit records
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), which
# also paces start-up and shutdown of a run: a short job waits several intervals for nothing. The
# driver's value is propagated to the controller; we lower the default unless the operator set one.
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_HEALTH_CHECK_INTERVAL_S = "0.25"
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
RESULTS_DIR = "ray_results"
PROGRESS_TIMEOUT_S = 10.0


def is_cancel(reply: Any) -> bool:
    """Whether a progress actor's reply asks the run to stop."""
    if isinstance(reply, str):
        return reply.lower() in ("cancel", "cancelled", "stop")
    if isinstance(reply, dict):
        return bool(reply.get("cancel") or reply.get("stop"))
    return False


def _progress_handle(progress_actor: tuple[str, str] | None):
    if not progress_actor:
        return None
    import ray

    name, namespace = progress_actor
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        log.warning("progress actor %s (namespace %s) not found; progress is not reported", name, namespace)
        return None


def _report_placement_group(actor, job_id: str | None) -> bool:
    """Tell the progress actor which placement group holds this run's CPUs (best effort).

    A progress actor without `report_resources` (it is optional) simply does not get it. False when
    the report did not arrive (e.g. the queue actor is restarting): the caller tries again next epoch.
    """
    import ray
    from ray.util import get_current_placement_group

    try:
        method = actor.report_resources
    except AttributeError:
        return True
    pg = get_current_placement_group()
    try:
        ray.get(method.remote(job_id, {"placementGroup": pg.id.hex() if pg is not None else None}),
                timeout=PROGRESS_TIMEOUT_S)
    except Exception as exc:
        log.info("placement group not reported: %s", exc)
        return False
    return True


def _train_loop_per_worker(config: dict) -> dict:
    """The function every Ray Train worker runs (rank 0's return value reaches the driver)."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dataset = unpack_dataset(ray.get(config["data_ref"]))
    model = new_model(cfg, dataset.n_inputs)  # same seed -> same initial weights everywhere

    start_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == config["fingerprint"]:
            start_state = state
        else:
            log.warning("checkpoint of another config/data found in run %s: starting fresh", ctx.get_experiment_name())
    if world > 1:
        model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU)

    actor = _progress_handle(config.get("progress_actor")) if rank == 0 else None
    job_id = config.get("job_id")
    stop = {"flag": False, "resources_told": actor is None or _report_placement_group(actor, job_id)}
    last_state: dict = {}

    def on_checkpoint(state: dict) -> None:
        last_state.clear()
        last_state.update(state)

    def on_epoch(info: dict) -> None:
        metrics = {k: info[k] for k in ("epoch", "total", "loss", "val_loss", "best_val_loss", "best_epoch",
                                        "elapsed_s", "epoch_s", "samples_per_s", "eta_s")}
        cancel = False
        if actor is not None and not stop["resources_told"]:
            stop["resources_told"] = _report_placement_group(actor, job_id)
        if actor is not None:
            progress = {k: info[k] for k in ("epoch", "total", "loss", "val_loss", "eta_s")}
            try:
                cancel = is_cancel(ray.get(actor.report_progress.remote(job_id, progress),
                                            timeout=PROGRESS_TIMEOUT_S))
            except Exception as exc:  # progress is best effort; training goes on
                log.warning("progress report failed: %s", exc)
        if world > 1:  # rank 0's decision reaches every rank before the next batch
            import torch.distributed as dist

            flag = torch.tensor([1 if cancel else 0], dtype=torch.int64)
            dist.broadcast(flag, src=0)
            cancel = bool(flag.item())
        metrics["cancelled"] = cancel
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({**last_state, "fingerprint": config["fingerprint"]}, Path(tmp) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        if cancel:
            stop["flag"] = True

    result = fit(model, dataset, cfg, on_epoch=on_epoch, on_checkpoint=on_checkpoint,
                 should_stop=lambda: stop["flag"], start_state=start_state, shard=(rank, world))
    return {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss, "stopped": result.stopped, "history": result.history,
            "elapsed_s": result.elapsed_s, "train_samples": result.train_samples}


def _gbm_loop_per_worker(config: dict) -> dict:
    """The lightgbm run's single Ray Train worker: every booster, checkpointed one by one."""
    import json

    import ray
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainConfig(**config["cfg"])
    dataset = unpack_dataset(ray.get(config["data_ref"]))
    done: dict = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / GBM_CHECKPOINT_FILE).read_text())
        if state.get("fingerprint") == config["fingerprint"]:
            done = dict(state.get("done") or {})
        else:
            log.warning("checkpoint of another config/data found in run %s: starting fresh",
                        ray.train.get_context().get_experiment_name())
    actor = _progress_handle(config.get("progress_actor"))
    job_id = config.get("job_id")
    told = {"resources": actor is None or _report_placement_group(actor, job_id), "at": 0.0}
    status = {"epoch": len(done), "total": 2 * len(dataset.horizons), "loss": None, "val_loss": None,
              "cancel": False}
    t0 = time.monotonic()

    def ask(force: bool = False) -> bool:
        """Report progress (throttled to one a second between boosters' ends); True = cancel."""
        if actor is None or (not force and time.monotonic() - told["at"] < 1.0):
            return status["cancel"]
        if not told["resources"]:
            told["resources"] = _report_placement_group(actor, job_id)
        told["at"] = time.monotonic()
        epoch, total = status["epoch"], status["total"]
        elapsed = time.monotonic() - t0
        eta = elapsed / epoch * (total - epoch) if epoch else None
        progress = {"epoch": epoch, "total": total, "loss": status["loss"], "val_loss": status["val_loss"],
                    "eta_s": eta}
        try:
            status["cancel"] = status["cancel"] or is_cancel(
                ray.get(actor.report_progress.remote(job_id, progress), timeout=PROGRESS_TIMEOUT_S))
        except Exception as exc:  # progress is best effort; training goes on
            log.warning("progress report failed: %s", exc)
        return status["cancel"]

    def on_booster(info: dict, finished: dict) -> None:
        status.update(epoch=info["index"], loss=info.get("train_loss"), val_loss=info.get("val_loss"))
        cancel = ask(force=True)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / GBM_CHECKPOINT_FILE).write_text(
                json.dumps({"fingerprint": config["fingerprint"], "done": finished}))
            ray.train.report({"epoch": info["index"], "total": info["total"], "booster": info["booster"],
                              "loss": info.get("train_loss"), "val_loss": info.get("val_loss"),
                              "cancelled": cancel}, checkpoint=Checkpoint.from_directory(tmp))

    try:
        _, history = fit_gbm(cfg, dataset, done=done, on_booster=on_booster, should_stop=ask)
    except TrainingCancelled:
        return {"stopped": "cancelled", "boosters": status["epoch"]}
    return {"stopped": "completed", "history": history, "elapsed_s": time.monotonic() - t0,
            "every": PROGRESS_EVERY}


def _gbm_result(cfg: TrainConfig, dataset, result, summary: dict, seconds: float) -> TrainResult:
    """The lightgbm run's TrainResult from its last checkpoint (every booster's text)."""
    import json

    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / GBM_CHECKPOINT_FILE).read_text())
    done = state.get("done") or {}
    model = model_from_done(cfg, dataset, done)
    history = list(summary.get("history") or [
        {"booster": k, "kind": k.split("/")[0], "horizon": int(k.split("/")[1]), **v.get("info", {})}
        for k, v in done.items()])
    return build_gbm_result(cfg, dataset, model, history, seconds)


def _unique_run_name(storage_path: Path, run_name: str) -> str:
    if not (storage_path / run_name).exists():
        return run_name
    return f"{run_name}-{now_ms()}"


def run_torch_trainer(
    cfg: TrainConfig,
    *,
    data_dir: str | Path,
    run_name: str,
    job_id: str | None = None,
    progress_actor: tuple[str, str] | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float | None = None,
    candles=None,
    settings=None,
    resume: bool = False,
    keep_checkpoints: int | None = None,
    max_failures: int | None = None,
) -> TrainResult:
    """Train `cfg` as a Ray Train TorchTrainer job and return the same TrainResult as train_local.

    Needs a connected Ray (ray.init or running inside a Ray task/actor). `candles` skips loading
    (tests, benchmarks). num_workers / cpus_per_worker default to settings.training. Raises
    TrainingCancelled when cancelled through the progress actor; any worker error propagates once
    `max_failures` (default settings.training.max_failures) worker-group restarts are used up.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if settings is None:
        from ml.config import get_settings

        settings = get_settings()
    t0 = time.perf_counter()
    gbm = cfg.model_type == GBM_TYPE
    workers = int(num_workers or settings.training.num_workers)
    cpus = float(cpus_per_worker or settings.training.cpus_per_worker)
    if workers < 1 or cpus <= 0:
        raise ValueError(f"num_workers must be >= 1 and cpus_per_worker > 0, got {workers}, {cpus}")
    if gbm:
        workers = 1  # one booster at a time on one worker; its reserved CPUs are LightGBM's threads
        keep_checkpoints = keep_checkpoints or 1  # each checkpoint holds every booster finished so far
    if cfg.threads == 0:  # one torch thread per reserved CPU (at least one)
        cfg = cfg.model_copy(update={"threads": max(1, int(cpus))})

    data_dir = Path(data_dir)
    if candles is None:
        from ml.data.store import CandleStore

        candles = load_training_candles(cfg, settings, CandleStore(data_dir, settings.timeframe), refresh=False)
    elif cfg.bars and len(candles) > cfg.bars:
        candles = candles.iloc[-cfg.bars:].reset_index(drop=True)
    dataset = prepare_dataset(candles, cfg)
    data_ref = ray.put(pack_dataset(dataset, splits=("train", "val")))

    storage_path = (data_dir / RESULTS_DIR).resolve()
    storage_path.mkdir(parents=True, exist_ok=True)
    name = run_name if resume else _unique_run_name(storage_path, run_name)
    fingerprint = f"{cfg.model_dump_json()}|{len(dataset.feature_names)}|{len(dataset.y_train)}"

    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, DEFAULT_HEALTH_CHECK_INTERVAL_S)
    os.environ[START_TIMEOUT_ENV] = str(float(settings.training.start_timeout_s))  # propagated to the controller
    failures = int(settings.training.max_failures if max_failures is None else max_failures)
    trainer = TorchTrainer(
        _gbm_loop_per_worker if gbm else _train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "data_ref": data_ref, "job_id": job_id,
                           "progress_actor": tuple(progress_actor) if progress_actor else None,
                           "fingerprint": fingerprint},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=FailureConfig(max_failures=failures, controller_failure_limit=0),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.threads)}},
        ),
    )
    # fit() installs a SIGINT handler (graceful abort on Ctrl-C) that holds the controller's handle;
    # left in place it keeps the finished run's controller alive in this (pooled) worker process
    on_main = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if on_main else None
    try:
        result = trainer.fit()  # raises the worker's error if the run failed
    finally:
        if on_main and previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
    summary = result.return_value or {}
    if summary.get("stopped") == "cancelled" or (result.metrics or {}).get("cancelled"):
        raise TrainingCancelled(f"training of {cfg.pair}/{cfg.model_type} cancelled (run {name})")
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    if gbm:
        out = _gbm_result(cfg, dataset, result, summary, time.perf_counter() - t0)
    else:
        out = _network_result(cfg, dataset, result, summary, t0)
    out.run_info = {"runner": "ray_train", "run_name": name, "storage_path": str(storage_path),
                    "run_path": result.path, "num_workers": workers, "cpus_per_worker": cpus,
                    "job_id": job_id, "checkpoint": result.checkpoint.path}
    return out


def _network_result(cfg: TrainConfig, dataset, result, summary: dict, t0: float) -> TrainResult:
    """A network run's TrainResult: the best weights of its last checkpoint, calibrated and evaluated."""
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)

    model = new_model(cfg, dataset.n_inputs)
    model.load_state_dict(state["best_state"])
    fit_result = FitResult(
        epochs_run=int(summary.get("epochs_run", state["epoch"])),
        best_epoch=int(summary.get("best_epoch", state["best_epoch"])),
        best_val_loss=float(summary.get("best_val_loss", state["best_val_loss"])),
        stopped=str(summary.get("stopped", "completed")),
        history=list(summary.get("history", state.get("history", []))),
        elapsed_s=float(summary.get("elapsed_s", 0.0)),
        train_samples=int(summary.get("train_samples", 0)),
    )
    with deterministic(cfg.seed, cfg.torch_threads()):
        return build_result(cfg, dataset, model, fit_result, time.perf_counter() - t0)


def run_training(cfg: TrainConfig, **kwargs: Any) -> TrainResult:
    """Train one job's config on the cluster: THE dispatch by model type (the queue's job task calls it).

    Networks and lightgbm run as a Ray Train TorchTrainer job (run_torch_trainer, same keyword
    arguments); a model type with another runner gets its branch here. An `ensemble` job has no
    TrainConfig (nothing is trained): the queue's job task builds it with actors.ensemble instead.
    """
    return run_torch_trainer(cfg, **kwargs)


def run_dir(data_dir: str | Path, run_name: str) -> Path:
    """Where a run's Ray Train results and checkpoints live."""
    return Path(data_dir).resolve() / RESULTS_DIR / run_name


__all__ = ["run_training", "run_torch_trainer", "run_dir", "TrainingCancelled", "CHECKPOINT_FILE",
           "GBM_CHECKPOINT_FILE"]
