"""A lightgbm job through the real TrainingQueue actor and Ray Train on the session's cluster.

The job trains for real on a small synthetic history (3,000 bars, at most 60 rounds per booster) in
its one TorchTrainer worker, registers a version through the Storage actor, and the loaded version
forecasts from raw feature rows. The dispatch (actors.trainer.run_training) gives the same boosters as
an in-process run, and a cancel reply to its progress report stops it between boosters.
"""

from __future__ import annotations

import contextlib
import uuid

import numpy as np
import pytest
import ray
from polling import wait_for

pytestmark = pytest.mark.ray

SMALL = {"bars": 3000, "lightgbm": {"n_estimators": 60, "early_stopping_rounds": 10}}


@ray.remote(num_cpus=0)
class ProgressRecorder:
    def __init__(self, cancel_after: int | None = None):
        self.calls: list[dict] = []
        self.cancel_after = cancel_after

    def report_progress(self, job_id: str, progress: dict):
        self.calls.append(progress)
        if self.cancel_after is not None and progress["epoch"] >= self.cancel_after:
            return {"cancel": True}
        return {"ok": True}

    def get_calls(self):
        return self.calls


@pytest.fixture
def queue(ray_cluster):
    import ray

    from actors.training_queue import get_or_create_queue_actor

    settings = {"tick_s": 0.1, "cooldown_minutes": 0, "retry_base_s": 0.5, "train_overrides": SMALL,
                "num_workers": 1, "cpus_per_worker": 1.0}
    handle = get_or_create_queue_actor(ray_cluster["namespace"], str(ray_cluster["data_dir"]), settings,
                                       name=f"tq-gbm-{uuid.uuid4().hex[:10]}")
    assert ray.get(handle.ping.remote(), timeout=120)
    yield handle
    with contextlib.suppress(Exception):
        ray.get(handle.emergency_stop.remote("test teardown"), timeout=60)
    ray.kill(handle, no_restart=True)


def test_lightgbm_job_registers_a_version_that_forecasts(queue, ray_cluster):
    import ray

    from ml.data.synthetic import ORIGIN_TS, generate_candles
    from ml.features import feature_matrix
    from ml.registry.loader import LoadedGbm, load_model
    from ml.storage.store import Storage

    out = ray.get(queue.submit.remote({"pair": "GBMQ", "model_type": "lightgbm", "priority": 5}))
    assert out["accepted"], out
    seen: dict = {}

    def finished():
        job = ray.get(queue.job.remote(out["jobId"]))
        if (job.get("progress") or {}).get("epoch"):
            seen["progress"] = job["progress"]
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    job = wait_for(finished, 240, what="the lightgbm job to finish")
    assert job["status"] == "completed", job.get("error")
    assert seen["progress"]["totalEpochs"] == 8  # one booster per horizon and kind, reported as they finish

    reader = Storage.reader(ray_cluster["data_dir"])
    version = job["result"]["version"]
    meta = reader.get_version_meta("GBMQ", "lightgbm", version)
    assert meta["modelType"] == "lightgbm" and meta["run"]["runner"] == "ray_train"
    assert meta["run"]["num_workers"] == 1 and sorted(meta["files"]) == ["model.lgb.json", "scaler.json"]
    m = meta["metrics"]
    assert set(m["horizons"]) == {"1", "3", "6", "12"} and set(m["volatility"]) == {"1", "3", "6", "12"}
    assert "brier" in m["model"] and "brier" in m["baseline"]

    model = load_model(reader, "GBMQ", "lightgbm", version)
    assert isinstance(model, LoadedGbm) and model.seq_len == 20  # max(lag 4 + 1, vol window 20)
    candles = generate_candles("GBMQ", 600, seed=3, end_ts=ORIGIN_TS + 700 * 300_000)
    feats = feature_matrix(candles)[model.feature_names]
    fc = model.forecast(feats.to_numpy()[-model.seq_len:])
    assert fc.shape == (8,) and np.isfinite(fc).all()
    assert ((fc[:4] > 0) & (fc[:4] < 1)).all() and (fc[4:] > 0).all()
    np.testing.assert_allclose(fc[:4], model.predict_proba(feats))


def small_run():
    from ml.data.synthetic import ORIGIN_TS, generate_candles
    from ml.training.config import TrainConfig

    cfg = TrainConfig.from_settings("BTC", "lightgbm", horizons=[1, 6], threads=1, lightgbm=SMALL["lightgbm"])
    return cfg, generate_candles("BTC", 2500, seed=5, end_ts=ORIGIN_TS + 2600 * 300_000)


def test_ray_train_run_equals_the_in_process_run_and_cancels(ray_cluster, tmp_path):
    from actors.trainer import run_training
    from ml.training.local import train_local
    from ml.training.loop import TrainingCancelled

    ns = ray_cluster["namespace"]
    cfg, candles = small_run()
    recorder = ProgressRecorder.options(name="gbm-progress", namespace=ns).remote()
    via_ray = run_training(cfg, data_dir=tmp_path, run_name="BTC_gbm_same", job_id="j1",
                           progress_actor=("gbm-progress", ns), cpus_per_worker=1, candles=candles)
    local = train_local(cfg, candles)
    assert via_ray.state_dict == local.state_dict and via_ray.run_info["runner"] == "ray_train"
    np.testing.assert_array_equal(via_ray.test_probs, local.test_probs)
    assert via_ray.metrics["model"] == local.metrics["model"]
    ends = [c["epoch"] for c in ray.get(recorder.get_calls.remote())]
    assert ends[-1] == 4 and all(c["total"] == 4 for c in ray.get(recorder.get_calls.remote()))
    ray.kill(recorder)

    canceller = ProgressRecorder.options(name="gbm-cancel", namespace=ns).remote(cancel_after=1)
    with pytest.raises(TrainingCancelled):
        run_training(cfg, data_dir=tmp_path, run_name="BTC_gbm_cancel", job_id="j2",
                     progress_actor=("gbm-cancel", ns), cpus_per_worker=1, candles=candles)
    assert max(c["epoch"] for c in ray.get(canceller.get_calls.remote())) == 1  # stopped after booster 1
    ray.kill(canceller)
