"""Ray Train tier: the TorchTrainer wrapper trains, checkpoints every epoch and reports progress."""

from pathlib import Path

import numpy as np
import pytest
import ray

from actors.trainer import CHECKPOINT_FILE, run_torch_trainer
from ml.data.synthetic import ORIGIN_TS, generate_candles
from ml.training.config import TrainConfig
from ml.training.loop import TrainingCancelled
from ml.training.result import TrainResult

pytestmark = pytest.mark.ray

N_BARS = 2000


@ray.remote(num_cpus=0)
class ProgressRecorder:
    def __init__(self, cancel_after: int | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.cancel_after = cancel_after

    def report_progress(self, job_id: str, progress: dict):
        self.calls.append((job_id, progress))
        if self.cancel_after is not None and progress["epoch"] >= self.cancel_after:
            return {"cancel": True}
        return {"ok": True}

    def get_calls(self):
        return self.calls


def small_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"pair": "BTC", "epochs": 2, "patience": 5, "batch_size": 128, "seq_len": 16,
                          "hidden": 16, "seed": 7, "threads": 1, **kw})


@pytest.fixture(scope="module")
def candles():
    return generate_candles("BTC", N_BARS, seed=5, signal_strength=0.12, end_ts=ORIGIN_TS + (N_BARS + 10) * 300_000)


def test_torch_trainer_run_with_ddp_checkpoints_and_progress(ray_cluster, candles, tmp_path):
    ns = ray_cluster["namespace"]
    recorder = ProgressRecorder.options(name="progress-ok", namespace=ns).remote()
    result = run_torch_trainer(small_cfg(), data_dir=tmp_path, run_name="BTC_lstm_test", job_id="BTC_lstm_1",
                               progress_actor=("progress-ok", ns), num_workers=2, cpus_per_worker=0.5,
                               candles=candles)
    assert isinstance(result, TrainResult)
    m = result.metrics
    assert {"model", "baseline"} <= set(m) and 0 < m["model"]["brier"] < 0.5 and m["n"]["test"] > 100
    assert result.epochs_run == 2 and len(result.history) == 2
    assert result.run_info["runner"] == "ray_train" and result.run_info["num_workers"] == 2
    n_h = len(small_cfg().horizons)  # every horizon of the default labels.horizons
    assert result.test_probs.shape == (m["n"]["test"], n_h) and np.isfinite(result.test_probs).all()

    run_path = Path(result.run_info["run_path"])
    assert run_path.is_relative_to((tmp_path / "ray_results").resolve())
    checkpoints = sorted(p for p in run_path.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # one per epoch
    assert all((c / CHECKPOINT_FILE).is_file() for c in checkpoints)

    calls = ray.get(recorder.get_calls.remote())
    assert [c[1]["epoch"] for c in calls] == [1, 2]  # rank 0 only, once per epoch
    assert all(job == "BTC_lstm_1" for job, _ in calls)
    assert {"epoch", "total", "loss", "val_loss", "eta_s"} == set(calls[0][1])
    assert calls[-1][1]["total"] == 2 and calls[-1][1]["eta_s"] == 0
    ray.kill(recorder)


def test_cancel_through_the_progress_actor_stops_the_run(ray_cluster, candles, tmp_path):
    ns = ray_cluster["namespace"]
    recorder = ProgressRecorder.options(name="progress-cancel", namespace=ns).remote(cancel_after=1)
    with pytest.raises(TrainingCancelled):
        run_torch_trainer(small_cfg(epochs=20), data_dir=tmp_path, run_name="BTC_lstm_cancel", job_id="j2",
                          progress_actor=("progress-cancel", ns), num_workers=1, cpus_per_worker=1,
                          candles=candles)
    assert [c[1]["epoch"] for c in ray.get(recorder.get_calls.remote())] == [1]
    ray.kill(recorder)


def test_single_worker_job_matches_train_local(ray_cluster, candles, tmp_path):
    """One training loop: the Ray Train job and the in-process run give the same probabilities."""
    from ml.training.local import train_local

    cfg = small_cfg()
    via_ray = run_torch_trainer(cfg, data_dir=tmp_path, run_name="BTC_lstm_same", num_workers=1,
                                cpus_per_worker=1, candles=candles)
    local = train_local(cfg, candles)
    np.testing.assert_array_equal(via_ray.test_probs, local.test_probs)
    assert via_ray.metrics["model"] == local.metrics["model"]
