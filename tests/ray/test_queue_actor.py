"""The TrainingQueue actor on the session's Ray cluster, with real (tiny) Ray Train jobs.

Every test gets its own detached queue actor (unique name, so its own persisted state document) and
kills it at the end. Jobs train for real on small synthetic histories (1,500 bars, 8-step windows,
8 hidden units); the failing job is a real one too: 300 bars cannot fill a 500-step window.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest
from polling import wait_for

pytestmark = pytest.mark.ray

TINY = {"bars": 1500, "seq_len": 8, "hidden": 8, "batch_size": 256, "patience": 500}
FAILS = {"bars": 300, "seq_len": 500}  # "too few rows": raised by the real pipeline
LONG = 500  # epochs: far longer than any test waits, so only a cancel ends it


def holds_for(predicate, seconds: float, interval: float = 0.2, what: str = "condition") -> None:
    """Poll until the deadline: `predicate` must stay true the whole time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        time.sleep(interval)


def req(pair: str, *, epochs: int = 1, priority: int = 5, **extra) -> dict:
    return {"pair": pair, "model_type": "lstm", "epochs": epochs, "priority": priority, **extra}


@pytest.fixture
def make_queue(ray_cluster):
    import ray

    from actors.training_queue import get_or_create_queue_actor

    created = []

    def make(**overrides):
        settings = {"tick_s": 0.1, "cooldown_minutes": 0, "retry_base_s": 0.5, "train_overrides": TINY,
                    "num_workers": 1, "cpus_per_worker": 0.5}
        settings.update(overrides)
        handle = get_or_create_queue_actor(ray_cluster["namespace"], str(ray_cluster["data_dir"]), settings,
                                           name=f"tq-{uuid.uuid4().hex[:10]}")
        assert ray.get(handle.ping.remote(), timeout=120)
        created.append(handle)
        return handle

    yield make
    for handle in created:
        with contextlib.suppress(Exception):  # best effort; the kill below is what matters
            ray.get(handle.emergency_stop.remote("test teardown"), timeout=60)
        ray.kill(handle, no_restart=True)


def versions(ray_cluster, pair: str) -> list:
    from ml.storage.store import Storage

    return Storage.reader(ray_cluster["data_dir"]).list_versions(pair, "lstm")


def cpus_free() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def submit(q, pair: str, **kw) -> dict:
    import ray

    return ray.get(q.submit.remote(req(pair, **kw)))


def job(q, job_id: str) -> dict:
    import ray

    return ray.get(q.job.remote(job_id))


def wait_training(q, job_id: str, timeout: float = 180) -> dict:
    """Until the job's Ray Train workers reported at least one epoch."""
    return wait_for(lambda: (lambda j: j if (j.get("progress") or {}).get("epoch") else None)(job(q, job_id)),
                    timeout, what=f"{job_id} to report an epoch")


def test_max_concurrent_never_exceeded_and_duplicates_cooldowns(make_queue, ray_cluster):
    import ray

    q = make_queue(max_concurrent=2, cooldown_minutes=10)
    pairs = ["MCA", "MCB", "MCC", "MCD"]
    # every submission (each pair twice) in flight at once
    outs = ray.get([q.submit.remote(req(p)) for p in pairs for _ in range(2)])
    accepted = {o["jobId"] for o in outs if o["accepted"]}
    dups = [o for o in outs if o["status"] == "duplicate"]
    assert len(accepted) == 4 and len(dups) == 4
    assert {d["existingJobId"] for d in dups} == accepted and all(d["httpStatus"] == 409 for d in dups)

    peak, deadline = 0, time.monotonic() + 400
    while True:
        view = ray.get(q.view.remote(50))
        running = ray.get(q.info.remote())["runningTasks"]
        assert view["active"]["count"] <= 2 and len(running) <= 2, view["active"]
        peak = max(peak, view["active"]["count"])
        if view["active"]["count"] == 0 and view["queued"]["count"] == 0:
            break
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.1)
    done = view["history"]["recent"]
    assert sorted(j["jobId"] for j in done) == sorted(accepted)
    assert all(j["status"] == "completed" for j in done), [(j["jobId"], j.get("error")) for j in done]
    # never more than two runs overlapped in time
    edges = sorted([(j["startedAt"], 1) for j in done] + [(j["finishedAt"], -1) for j in done])
    overlap = max_overlap = 0
    for _, step in edges:
        overlap += step
        max_overlap = max(max_overlap, overlap)
    assert max_overlap <= 2 and peak == 2
    for j in done:
        assert j["result"]["version"] and [v for v in versions(ray_cluster, j["pair"])]

    # a success starts the PAIR+model's cooldown; clear-cooldowns lifts it
    refused = submit(q, "MCA")
    assert refused["status"] == "cooldown" and refused["httpStatus"] == 429
    assert 500 < refused["retryAfterSeconds"] <= 600
    assert ray.get(q.can_train.remote("MCA", "lstm"))["cooldownRemainingMinutes"] in (9, 10)
    assert ray.get(q.clear_cooldowns.remote("MCA", "lstm"))["cleared"] == 1
    again = submit(q, "MCA", priority=1)
    assert again["accepted"]
    assert ray.get(q.cancel.remote(again["jobId"], "done"))["ok"]


def test_cancel_active_job_stops_its_ray_work_and_registers_nothing(make_queue, ray_cluster):
    import ray

    q = make_queue()
    free_before = cpus_free()
    pgs_before = live_placement_groups()
    job_id = submit(q, "QCANCEL", epochs=LONG)["jobId"]
    j = wait_training(q, job_id)
    assert j["status"] == "training" and j["progress"]["totalEpochs"] == LONG
    assert cpus_free() <= free_before - 0.5 + 1e-6  # the Ray Train worker holds its CPU share
    info = ray.get(q.info.remote())
    assert job_id in info["runningTasks"]
    # the run told the queue which placement group holds its CPUs, so a cancel can free them
    assert {info["placementGroups"][job_id]} == live_placement_groups() - pgs_before

    out = ray.get(q.cancel.remote(job_id, "user request"))
    assert out["ok"] and out["stopped"] and out["job"]["status"] == "cancelled"
    # the work really stops: the task ends, the trainer's resources (workers, placement group) come
    # back, and no progress arrives any more
    wait_for(lambda: not ray.get(q.info.remote())["stoppingTasks"], 60, what="the task to end")
    # the queue keeps the slot until the run's placement group is gone, so no waiting here
    assert live_placement_groups() - pgs_before == set()
    wait_for(lambda: cpus_free() >= free_before - 1e-6, 30, what="the trainer's CPU to be released")
    epoch = job(q, job_id)["progress"]["epoch"]
    holds_for(lambda: job(q, job_id)["progress"]["epoch"] == epoch, 3, what="no progress after the cancel")
    after = job(q, job_id)
    assert after["status"] == "cancelled" and after["progress"]["epoch"] == epoch
    assert after["cancelReason"] == "user request"
    assert ray.get(q.info.remote())["runningTasks"] == []
    assert versions(ray_cluster, "QCANCEL") == []
    assert ray.get(q.cancel.remote(job_id))["error"] == "not_cancellable"


def test_emergency_stop_cancels_all_and_refuses_until_resume(make_queue, ray_cluster):
    import ray

    q = make_queue(max_concurrent=1)
    free_before = cpus_free()
    running = submit(q, "ESA", epochs=LONG)["jobId"]
    queued = [submit(q, p)["jobId"] for p in ("ESB", "ESC")]
    wait_training(q, running)

    out = ray.get(q.emergency_stop.remote())
    assert out["paused"] and out["stoppedActive"] == [running] and out["cancelledQueued"] == 2
    view = ray.get(q.view.remote())
    assert view["paused"] and view["active"]["count"] == 0 and view["queued"]["count"] == 0
    assert all(job(q, i)["status"] == "cancelled" for i in [running, *queued])
    refused = submit(q, "ESD")
    assert refused["status"] == "paused" and refused["httpStatus"] == 503
    assert ray.get(q.can_train.remote("ESD", "lstm"))["allowed"] is False
    wait_for(lambda: cpus_free() >= free_before - 1e-6, 90, what="the trainer's CPU to be released")
    assert versions(ray_cluster, "ESA") == []

    assert ray.get(q.resume.remote())["wasPaused"] is True
    ok = submit(q, "ESD", priority=1)
    assert ok["accepted"]
    assert ray.get(q.cancel.remote(ok["jobId"]))["ok"]


def live_placement_groups() -> set[str]:
    import ray.util

    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def test_killing_the_queue_actor_mid_queue_loses_no_job(make_queue):
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    q = make_queue(max_concurrent=1)
    pgs_before = live_placement_groups()
    running = submit(q, "KLA", epochs=LONG)["jobId"]
    wait_training(q, running)
    queued = [submit(q, p, priority=pr)["jobId"] for p, pr in (("KLB", 5), ("KLC", 3), ("KLD", 5))]
    order = [j["jobId"] for j in ray.get(q.view.remote())["queued"]["jobs"]]
    assert order == [queued[1], queued[0], queued[2]]  # priority, then FIFO
    pid = ray.get(q.info.remote())["pid"]
    killed_run_pgs = live_placement_groups() - pgs_before

    ray.kill(q, no_restart=False)  # crash it; max_restarts=-1 brings it back

    def restarted():
        try:
            info = ray.get(q.info.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None
        return info if info["pid"] != pid else None

    try:
        info = wait_for(restarted, 120, interval=0.5, what="the queue actor to restart")
        assert info["restoredJobs"] == 1
        view = ray.get(q.view.remote())
        active = [j["jobId"] for j in view["active"]["jobs"]]
        still_queued = [j["jobId"] for j in view["queued"]["jobs"]]
        # the interrupted job went back to the head of the queue (a slot being free, it may run again)
        assert active + still_queued == [running, *order]
        restored = job(q, running)
        assert restored["restored"] == 1 and restored["attempts"] <= 1
        assert all(job(q, i)["status"] == "queued" for i in order)
    finally:
        # The killed actor's Train run died with it; without the dashboard's state API, Ray Train's
        # own cleaner cannot see that, so its placement group would stay reserved until the session
        # ends. Stop the re-run, then release what the dead run left behind.
        with contextlib.suppress(Exception):
            ray.get(q.emergency_stop.remote(), timeout=60)
            wait_for(lambda: not ray.get(q.info.remote())["stoppingTasks"], 60, what="the re-run to stop")
        for pg_id in killed_run_pgs & live_placement_groups():
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def test_failing_job_retries_with_backoff_then_fails(make_queue):
    import ray

    q = make_queue(max_attempts=2, retry_base_s=1.0)
    job_id = ray.get(q.submit.remote(req("QFAIL", priority=4, config_overrides=FAILS)))["jobId"]
    final = wait_for(lambda: (lambda j: j if j["status"] in ("failed", "completed") else None)(job(q, job_id)),
                     180, what=f"{job_id} to fail")
    assert final["status"] == "failed" and final["attempts"] == 2
    errors = final["errors"]
    assert [e["attempt"] for e in errors] == [1, 2]
    assert all("too few rows" in e["error"] for e in errors), errors
    assert errors[1]["at"] - errors[0]["at"] >= 1000  # waited out the backoff (base 1 s)
    assert final["priority"] == 6  # +2 for the retry
    view = ray.get(q.view.remote())
    assert view["history"]["recent"][0]["jobId"] == job_id and view["active"]["count"] == 0


DAY_MS = 24 * 3_600_000


def register_productions(ray_cluster, trained_days_ago: dict[str, float]) -> None:
    """A real (tiny) run registered through ml.registry for every pair, trained `days` ago, then made
    production in the given order, so the last one is promoted most recently (its meta has the
    registry's own `trainedAt`)."""
    import dataclasses

    from actors.storage import get_or_create_storage_actor
    from actors.storage_client import RemoteStorage
    from ml.clock import now_ms
    from ml.registry.versions import Registry
    from ml.training.config import TrainConfig
    from ml.training.local import train_local

    cfg = TrainConfig(pair="RTA", epochs=1, threads=1, **{k: v for k, v in TINY.items() if k != "patience"})
    result = train_local(cfg)
    storage = get_or_create_storage_actor(data_dir=str(ray_cluster["data_dir"]), namespace=ray_cluster["namespace"])
    registry = Registry(RemoteStorage(storage))
    now = now_ms()
    for pair, days in trained_days_ago.items():
        trained = dataclasses.replace(result, pair=pair, trained_at=int(now - days * DAY_MS))
        meta = registry.register(pair, trained, job_id=f"{pair}-test")
        registry.promote(pair, "lstm", meta["version"], "test: an operator's promotion, long after training")


def test_periodic_retraining_queues_the_oldest_production_model(make_queue, ray_cluster):
    import ray

    from ml.registry.production import read_production
    from ml.storage.store import Storage

    # RTC's model is the oldest by training time but the newest by promotion time
    pairs = ["RTA", "RTB", "RTC", "RTD"]
    register_productions(ray_cluster, {"RTA": 1, "RTB": 2, "RTD": 3, "RTC": 30})
    # lstm only: an enabled type without any production model (lightgbm here) would be the oldest of all
    q = make_queue(max_concurrent=1, retrain_interval_minutes=0.05,  # every 3 s, first one 3 s after start
                   pairs=pairs, model_types=["lstm"])
    hold = submit(q, "RTHOLD", epochs=LONG)["jobId"]  # keeps the only slot busy: retrain jobs stay queued
    wait_training(q, hold)

    def retrain_jobs():
        jobs = ray.get(q.view.remote())["queued"]["jobs"]
        return [j for j in jobs if j["source"] == "retrain"]

    first = wait_for(retrain_jobs, 30, what="a periodic retraining job")[0]
    assert first["priority"] == 8 and first["modelType"] == "lstm"
    reader = Storage.reader(ray_cluster["data_dir"])

    def age(pair: str) -> int:
        prod = read_production(reader, pair, "lstm")
        if not prod:
            return -1
        return int(prod.trained_at or 0)

    assert first["pair"] == min(pairs, key=lambda p: (age(p), pairs.index(p)))
    assert first["pair"] == "RTC"  # aged by its training time, not by its (recent) promotion
    # later intervals skip what is already queued: never a second job for one PAIR+model
    wait_for(lambda: len(retrain_jobs()) >= 2, 30, what="a second periodic retraining job")
    keys = [(j["pair"], j["modelType"]) for j in ray.get(q.view.remote())["queued"]["jobs"]]
    assert len(keys) == len(set(keys))
