"""The Storage actor: concurrent callers lose nothing, state survives a restart, shutdown flushes."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

CALLERS = 20
APPENDS = 500


# Its own name and directory: other tests' Storage actor (on the session's data dir) is left alone.
ACTOR = f"tbml-storage-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def actor_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage-actor")


@pytest.fixture(scope="module")
def storage_actor(ray_cluster, actor_dir):
    import ray

    from actors.storage import get_or_create_storage_actor

    handle = get_or_create_storage_actor(actor_dir, ray_cluster["namespace"], name=ACTOR)
    yield handle
    ray.kill(ray.get_actor(ACTOR, namespace=ray_cluster["namespace"]), no_restart=True)


def test_get_or_create_returns_the_one_named_detached_actor(ray_cluster, storage_actor, actor_dir):
    import ray

    from actors.storage import get_or_create_storage_actor

    again = get_or_create_storage_actor(actor_dir, ray_cluster["namespace"], name=ACTOR)
    assert again._actor_id == storage_actor._actor_id
    assert ray.get(again.data_dir.remote()) == str(actor_dir.resolve())
    assert (actor_dir / ".writer.lock").exists() and (actor_dir / "predictions").is_dir()
    with pytest.raises(RuntimeError, match="serves"):
        get_or_create_storage_actor("/tmp/some-other-dir", ray_cluster["namespace"], name=ACTOR)


def test_concurrent_appends_lose_and_duplicate_nothing(storage_actor):
    import ray

    pairs = ["TSTA", "TSTB"]

    async def caller(c: int) -> None:
        for i in range(APPENDS):
            rec = {"pair": pairs[c % 2], "timestamp": 1_000_000 + i * CALLERS + c, "caller": c, "i": i}
            stored = await storage_actor.append_prediction.remote(rec)
            assert stored["id"]

    async def history_writer(c: int) -> None:
        await storage_actor.append_training_record.remote({"jobId": f"TSTA_lstm_{c}", "status": "done"})

    async def main() -> None:
        await asyncio.gather(*(caller(c) for c in range(CALLERS)), *(history_writer(c) for c in range(CALLERS)))

    asyncio.run(main())
    counts = [ray.get(storage_actor.count_predictions.remote(p)) for p in pairs]
    assert sum(counts) == CALLERS * APPENDS
    records = [r for p in pairs for r in ray.get(storage_actor.query_predictions.remote(p, None))]
    assert len(records) == CALLERS * APPENDS
    assert len({r["id"] for r in records}) == CALLERS * APPENDS
    assert sorted((r["caller"], r["i"]) for r in records) == [(c, i) for c in range(CALLERS) for i in range(APPENDS)]
    # Concurrent read-modify-writes of the training history lose nothing either.
    jobs = {r["jobId"] for r in ray.get(storage_actor.training_history.remote())}
    assert {f"TSTA_lstm_{c}" for c in range(CALLERS)} <= jobs

    newest = ray.get(storage_actor.query_predictions.remote("TSTA", 10))
    ts = [r["timestamp"] for r in newest]
    assert len(ts) == 10 and ts == sorted(ts, reverse=True)
    assert ts[0] == max(r["timestamp"] for r in records if r["pair"] == "TSTA")
    since = ts[4]
    assert ray.get(storage_actor.query_predictions.remote("TSTA", 100, since)) == newest[:5]


def test_retried_appends_with_ids_are_not_duplicated(storage_actor):
    import ray

    rec = {"pair": "TSTC", "timestamp": 5, "id": uuid.uuid4().hex}
    assert ray.get(storage_actor.append_prediction.remote(rec))["id"] == rec["id"]
    assert ray.get(storage_actor.append_prediction.remote(rec)) is None
    assert ray.get(storage_actor.count_predictions.remote("TSTC")) == 1


def test_state_survives_a_restart_and_age_flush_runs_in_the_background(storage_actor):
    import ray

    ray.get(storage_actor.save.remote())
    ray.get(storage_actor.put_document.remote("queue", "tst-state", {"queued": ["x"]}))
    # Buffered only (far below flush_count): the background task must flush them by age.
    ray.get(storage_actor.append_predictions.remote([{"pair": "TSTD", "timestamp": i} for i in range(7)]))
    assert ray.get(storage_actor.stats.remote())["bufferedPredictions"] >= 7
    from ml.config import get_settings

    deadline = time.monotonic() + get_settings().storage.prediction_flush_seconds + 30
    while ray.get(storage_actor.stats.remote())["bufferedPredictions"] != 0:
        assert time.monotonic() < deadline, "buffered predictions were not flushed by age"
        time.sleep(0.2)
    assert ray.get(storage_actor.stats.remote())["bufferedPredictions"] == 0

    def pid() -> int:
        return ray.get(storage_actor.__ray_call__.remote(lambda self: __import__("os").getpid()), timeout=30)

    old_pid = pid()
    ray.kill(storage_actor, no_restart=False)  # a crash: the actor is restarted by Ray
    deadline = time.monotonic() + 90
    while True:  # ray.kill is asynchronous: wait until a new process answers
        try:
            if pid() != old_pid:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "the Storage actor was not restarted"
        time.sleep(0.3)
    assert ray.get(storage_actor.count_predictions.remote("TSTA"), timeout=60) + \
        ray.get(storage_actor.count_predictions.remote("TSTB")) == CALLERS * APPENDS
    assert ray.get(storage_actor.count_predictions.remote("TSTD")) == 7
    assert ray.get(storage_actor.get_document.remote("queue", "tst-state")) == {"queued": ["x"]}
    # The restarted actor holds the writer lock again and keeps serving writes.
    assert ray.get(storage_actor.append_prediction.remote({"pair": "TSTD", "timestamp": 99}))


@pytest.mark.parametrize("how", ["stop_storage_actor", "__ray_terminate__"])
def test_graceful_shutdown_flushes_the_buffer(ray_cluster, tmp_path: Path, how: str):
    import ray

    from actors.storage import get_or_create_storage_actor, stop_storage_actor
    from ml.storage.store import Storage

    name = f"tbml-storage-test-{uuid.uuid4().hex[:8]}"
    handle = get_or_create_storage_actor(tmp_path, ray_cluster["namespace"], name=name,
                                         flush_count=10**6, flush_seconds=3600)
    ray.get(handle.append_predictions.remote([{"pair": "TSTE", "timestamp": i} for i in range(50)]))
    assert Storage.reader(tmp_path).count_predictions("TSTE") == 0  # all still buffered
    if how == "stop_storage_actor":
        assert stop_storage_actor(handle)["savedCount"] == 50
    else:
        handle.__ray_terminate__.remote()  # Ray's graceful exit: the atexit hook flushes
    deadline = time.monotonic() + 60
    while True:  # the actor is gone for good (an intentional exit is not restarted)
        try:
            ray.get_actor(name, namespace=ray_cluster["namespace"])
        except ValueError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert Storage.reader(tmp_path).count_predictions("TSTE") == 50
    # A new actor on the same directory (it gets the writer lock back) sees everything.
    again = get_or_create_storage_actor(tmp_path, ray_cluster["namespace"], name=name)
    try:
        assert ray.get(again.count_predictions.remote("TSTE")) == 50
    finally:
        ray.kill(again, no_restart=True)


def test_retention_schedule_removes_old_records_keeps_recent_ones_and_survives_sigkill(ray_cluster, tmp_path):
    """storage.retention_hours on a short storage.retention_interval_s: the actor's own schedule removes
    the records past the cutoff (predictions on disk and buffered, training records), keeps the recent
    ones and every model version, reports it in stats, and carries on after its process is SIGKILLed."""
    import os
    import signal

    import ray

    from actors.storage import get_or_create_storage_actor
    from ml.clock import now_ms
    from ml.storage.retention import HOUR_MS
    from ml.storage.store import TRAINING_HISTORY

    name = f"tbml-storage-test-{uuid.uuid4().hex[:8]}"
    handle = get_or_create_storage_actor(tmp_path, ray_cluster["namespace"], name=name,
                                         retention_hours=168, retention_interval_s=0.3)

    def retention() -> dict:
        return ray.get(handle.stats.remote(), timeout=60)["retention"]

    def wait_removed(predictions: int, training: int) -> dict:
        deadline = time.monotonic() + 90
        while True:
            state = retention()
            if state["totalRemoved"] == {"predictions": predictions, "trainingRecords": training}:
                return state
            assert state["totalRemoved"]["predictions"] <= predictions, state  # never more than the old ones
            assert time.monotonic() < deadline, f"the schedule did not remove the old records: {state}"
            time.sleep(0.2)

    try:
        first = retention()
        assert first["enabled"] and first["intervalS"] == 0.3 and first["runs"] >= 1  # ran at start
        now = now_ms()
        old, recent = now - 200 * HOUR_MS, now - HOUR_MS
        ray.get(handle.save_model_version.remote("TSTR", "lstm", "v1", {}, {"weights.pt": b"w"}))
        ray.get(handle.set_production.remote("TSTR", "lstm", "v1", "test"))
        ray.get(handle.put_document.remote("training", TRAINING_HISTORY, [
            {"jobId": "old", "recordedAt": old}, {"jobId": "recent", "recordedAt": recent}]))
        ray.get(handle.append_predictions.remote(
            [{"pair": "TSTR", "timestamp": old + i, "age": "old"} for i in range(30)]
            + [{"pair": "TSTR", "timestamp": recent + i, "age": "recent"} for i in range(20)]))
        ray.get(handle.save.remote())  # these on disk, the next ones still in the buffer
        ray.get(handle.append_predictions.remote([{"pair": "TSTS", "timestamp": old, "age": "old"},
                                                  {"pair": "TSTS", "timestamp": now, "age": "recent"}]))

        state = wait_removed(31, 1)
        assert state["lastRun"]["retentionHours"] == 168 and state["lastError"] is None
        assert state["lastRun"]["cutoff"] > old and state["lastRun"]["cutoff"] < recent
        left = [r["age"] for p in ("TSTR", "TSTS") for r in ray.get(handle.query_predictions.remote(p, None))]
        assert left == ["recent"] * 21
        assert [r["jobId"] for r in ray.get(handle.training_history.remote())] == ["recent"]
        assert [m["version"] for m in ray.get(handle.list_versions.remote("TSTR", "lstm"))] == ["v1"]

        # SIGKILL the actor's process: Ray restarts it, the schedule carries on where it was (the last
        # run and the totals are on disk) and removes what is old from then on.
        old_pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        runs_before = state["runs"]
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:
            try:
                if ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30) != old_pid:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() < deadline, "the Storage actor was not restarted"
            time.sleep(0.3)
        ray.get(handle.append_predictions.remote([{"pair": "TSTR", "timestamp": old + 100 + i, "age": "old"}
                                                  for i in range(5)]))
        state = wait_removed(36, 1)
        assert state["runs"] > runs_before
        assert ray.get(handle.count_predictions.remote("TSTR")) == 20
        assert ray.get(handle.get_production.remote("TSTR", "lstm"))["version"] == "v1"
    finally:
        ray.kill(handle, no_restart=True)
