"""Faults during a training run, on the session's Ray cluster with real (tiny) Ray Train jobs.

* the TrainingQueue actor's process is SIGKILLed mid-run: the run (owned by its detached supervisor)
  is adopted by the restarted queue and registers exactly once; the job queued behind it runs next;
* the queue AND the run's supervisor are SIGKILLed: the run is lost, what it reserved (placement
  group, Ray Train actors) is released and the job is retried by the usual rule;
* a Ray Train worker process is SIGKILLed mid-run: Ray Train restarts the worker group from the last
  epoch checkpoint and the job completes with a registered version.

Every wait polls with a deadline; nothing asserts wall-clock times.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid

import pytest
from polling import wait_for

pytestmark = pytest.mark.ray

TINY = {"bars": 1500, "seq_len": 8, "hidden": 8, "batch_size": 256, "patience": 500}
EPOCHS = 120  # long enough for a kill mid-run, short enough to finish in seconds


@pytest.fixture
def make_queue(ray_cluster):
    import ray

    from actors.training_queue import get_or_create_queue_actor

    created = []

    def make(**overrides):
        settings = {"tick_s": 0.1, "cooldown_minutes": 0, "retry_base_s": 0.5, "train_overrides": TINY,
                    "num_workers": 1, "cpus_per_worker": 0.5, "max_concurrent": 1}
        settings.update(overrides)
        name = f"tq-{uuid.uuid4().hex[:10]}"
        handle = get_or_create_queue_actor(ray_cluster["namespace"], str(ray_cluster["data_dir"]), settings,
                                           name=name)
        assert ray.get(handle.ping.remote(), timeout=120)
        created.append(handle)
        return handle, name

    yield make
    for handle in created:
        with contextlib.suppress(Exception):
            ray.get(handle.emergency_stop.remote("test teardown"), timeout=60)
        ray.kill(handle, no_restart=True)


def call(q, method: str, *args, timeout: float = 60):
    import ray

    return ray.get(getattr(q, method).remote(*args), timeout=timeout)


def job(q, job_id: str) -> dict:
    return call(q, "job", job_id)


def submit(q, pair: str, epochs: int) -> str:
    out = call(q, "submit", {"pair": pair, "model_type": "lstm", "epochs": epochs, "priority": 5})
    assert out["accepted"], out
    return out["jobId"]


def versions(ray_cluster, pair: str) -> list:
    from ml.storage.store import Storage

    return Storage.reader(ray_cluster["data_dir"]).list_versions(pair, "lstm")


def live_placement_groups() -> set[str]:
    import ray.util

    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


STATE_API: dict[str, str] = {}


@pytest.fixture(autouse=True)
def state_api(ray_cluster):
    """The session cluster's dashboard, named explicitly: the state API would refuse to guess when
    another Ray instance runs on the machine."""
    STATE_API["address"] = f"http://{ray_cluster['context'].dashboard_url}"


def alive_actors(class_name: str, name: str | None = None) -> list:
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    if name is not None:
        filters.append(("name", "=", name))
    return list_actors(address=STATE_API["address"], filters=filters, limit=1000)


def run_supervisors(queue_name: str) -> list[str]:
    import ray.util

    prefix = f"tbml-run:{queue_name}:"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def epoch_of(q, job_id: str) -> int:
    return int(((job(q, job_id) or {}).get("progress") or {}).get("epoch") or 0)


def wait_done(q, job_id: str, timeout: float = 300) -> dict:
    return wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed", "cancelled") else None)(
        job(q, job_id)), timeout, interval=0.5, what=f"{job_id} to finish")


def sigkill_queue(q) -> int:
    """SIGKILL the queue actor's process (as an operator would); returns the old pid."""
    pid = call(q, "info")["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_restarted(q, old_pid: int) -> dict:
    import ray

    def restarted():
        try:
            info = ray.get(q.info.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None
        return info if info["pid"] != old_pid else None

    return wait_for(restarted, 120, interval=0.5, what="the queue actor to restart")


def assert_nothing_left(queue_name: str, pgs_before: set[str]) -> None:
    """No placement group, Ray Train actor or run supervisor of this queue's runs is left."""
    import ray.util

    def left():
        pgs = live_placement_groups() - pgs_before
        train = [(a["class_name"], a["pid"], a.get("name")) for c in ("RayTrainWorker", "TrainController")
                 for a in alive_actors(c)]
        return {"placementGroups": {p: ray.util.placement_group_table()[p] for p in pgs},
                "supervisors": run_supervisors(queue_name), "trainActors": train}

    deadline = time.monotonic() + 60
    while any((now := left()).values()):
        assert time.monotonic() < deadline, f"left behind after 60s: {now}"
        time.sleep(0.5)


def test_sigkill_of_the_queue_mid_run_adopts_the_run(make_queue, ray_cluster):
    q, name = make_queue()
    pgs_before = live_placement_groups()
    first = submit(q, "RCA", EPOCHS)
    second = submit(q, "RCB", 2)  # queued behind the first (max_concurrent=1)
    wait_for(lambda: epoch_of(q, first) >= 1, 180, what=f"{first} to report an epoch")
    assert run_supervisors(name), "a run is owned by its own named supervisor"

    old_pid = sigkill_queue(q)
    info = wait_restarted(q, old_pid)
    assert info["restoredJobs"] == 1
    # the restarted queue is training again: the same run, adopted (no retry), still reporting
    j = job(q, first)
    assert j["status"] in ("training", "completed"), j
    assert j["attempts"] == 1 and j["restored"] == 1 and not j.get("errors"), j
    if j["status"] == "training":
        assert info["runningTasks"] == [first]
        seen = epoch_of(q, first)
        wait_for(lambda: epoch_of(q, first) > seen or job(q, first)["status"] == "completed", 120,
                 what="progress from the adopted run")

    done = wait_done(q, first)
    assert done["status"] == "completed" and done["attempts"] == 1, done
    assert [v["version"] for v in versions(ray_cluster, "RCA")] == [done["result"]["version"]]  # exactly once
    behind = wait_done(q, second)
    assert behind["status"] == "completed" and len(versions(ray_cluster, "RCB")) == 1, behind
    assert_nothing_left(name, pgs_before)


def test_sigkill_of_the_queue_and_the_run_retries_and_frees_its_cpus(make_queue, ray_cluster):
    import ray

    q, name = make_queue()
    pgs_before = live_placement_groups()
    first = submit(q, "RLA", EPOCHS)
    second = submit(q, "RLB", 2)
    wait_for(lambda: epoch_of(q, first) >= 1, 180, what=f"{first} to report an epoch")
    run_pg = wait_for(lambda: call(q, "info")["placementGroups"].get(first), 30, what="the run's placement group")
    [sup_name] = run_supervisors(name)
    [sup] = alive_actors("RunSupervisor", sup_name)

    old_pid = sigkill_queue(q)
    os.kill(sup["pid"], signal.SIGKILL)  # the run's owner dies too: nothing left to adopt
    wait_restarted(q, old_pid)

    # the lost run's CPUs come back (its placement group is removed) and the job is retried
    wait_for(lambda: run_pg not in live_placement_groups(), 60, what="the lost run's placement group to go")
    done = wait_done(q, first)
    assert done["status"] == "completed", done
    assert done["attempts"] == 2 and done["errors"][0]["attempt"] == 1, done
    assert "run lost" in done["errors"][0]["error"], done["errors"]
    assert len(versions(ray_cluster, "RLA")) == 1
    behind = wait_done(q, second)
    assert behind["status"] == "completed" and len(versions(ray_cluster, "RLB")) == 1, behind
    assert ray.available_resources().get("CPU", 0) > 0
    assert_nothing_left(name, pgs_before)


def test_sigkill_of_a_ray_train_worker_resumes_from_the_last_checkpoint(make_queue, ray_cluster):
    q, name = make_queue()
    pgs_before = live_placement_groups()
    job_id = submit(q, "RWK", EPOCHS)
    wait_for(lambda: epoch_of(q, job_id) >= 2, 180, what=f"{job_id} to report two epochs")
    [worker] = wait_for(lambda: alive_actors("RayTrainWorker"), 30, what="the Ray Train worker")
    killed_at = epoch_of(q, job_id)
    os.kill(worker["pid"], signal.SIGKILL)

    done = wait_done(q, job_id)
    assert done["status"] == "completed", done
    # Ray Train's failure handling recovered inside the attempt: no queue retry was needed
    assert done["attempts"] == 1 and not done.get("errors"), done
    assert [v["version"] for v in versions(ray_cluster, "RWK")] == [done["result"]["version"]]
    assert done["progress"]["epoch"] == EPOCHS and killed_at < EPOCHS
    assert_nothing_left(name, pgs_before)


def test_a_run_that_cannot_get_its_cpus_times_out_and_retries(make_queue, ray_cluster):
    """The operator's case: CPUs held by something else. The run never waits forever: its attempt
    fails after start_timeout_s and is retried by the rule; once the CPUs are back, nothing of the
    timed-out runs grabs them (their pending placement groups are gone) and the next job runs."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    q, name = make_queue(start_timeout_s=3, cancel_grace_s=5, max_attempts=2, cpus_per_worker=1)
    total = ray.cluster_resources()["CPU"]
    blocker = placement_group([{"CPU": total - 0.5}])  # leaves 0.5 CPU: the run's 1-CPU worker cannot start
    ray.get(blocker.ready(), timeout=60)
    pgs_before = live_placement_groups()
    try:
        stuck = submit(q, "RST", 2)
        done = wait_done(q, stuck, timeout=180)
        assert done["status"] == "failed" and done["attempts"] == 2, done
        assert all("start-up timeout" in e["error"] for e in done["errors"]), done["errors"]
        wait_for(lambda: not run_supervisors(name), 60, what="the timed-out runs' supervisors to exit")
    finally:
        remove_placement_group(blocker)
    # the CPUs are free again and nothing of the timed-out runs takes them: a job (on a queue with
    # the default start-up timeout; 3 s is shorter than a normal run's start) gets them
    q2, name2 = make_queue()
    ok = submit(q2, "RSU", 2)
    assert wait_done(q2, ok)["status"] == "completed"
    assert_nothing_left(name, pgs_before - {blocker.id.hex()})
