"""The training queue's rules on a fake clock: no Ray, no sleeping."""

from __future__ import annotations

import json
import random

import pytest

from ml.queue.jobs import ACTIVE, CANCELLED, COMPLETED, FAILED, QUEUED
from ml.queue.requests import InvalidRequest, QueueError, TrainRequest
from ml.queue.retrain import oldest
from ml.queue.state import JobNotCancellable, JobNotFound, QueueConfig, QueueState
from ml.queue.views import ACCEPTED, COOLDOWN, DUPLICATE, PAUSED
from ml.registry.production import production_from

T0 = 1_750_000_000_000
MIN = 60_000


def make(**config) -> QueueState:
    return QueueState(QueueConfig(**config))


def submit(q: QueueState, pair: str, *, model: str = "lstm", priority: int = 5, now: int = T0, **kw):
    return q.submit(TrainRequest(pair=pair, model_type=model, priority=priority, **kw), now)


def run_next(q: QueueState, now: int) -> list[str]:
    started = [q.start(j.job_id, now).job_id for j in q.runnable(now)]
    return started


def test_job_id_format_and_unique_in_same_ms():
    q = make(max_concurrent=5)
    a = submit(q, "BTC").job
    assert a.job_id == f"BTC_lstm_{T0}"
    q.cancel(a.job_id, "x", T0)
    b = submit(q, "BTC").job  # same PAIR+model, same millisecond: still a new id
    assert b.job_id == f"BTC_lstm_{T0 + 1}"
    assert submit(q, "ETH", model="gru").job.job_id == f"ETH_gru_{T0}"


def test_priority_order_and_fifo_among_equals():
    q = make(max_concurrent=1)
    submit(q, "AAA", priority=5, now=T0)
    submit(q, "BBB", priority=2, now=T0 + 1)
    submit(q, "CCC", priority=5, now=T0 + 2)
    submit(q, "DDD", priority=2, now=T0 + 3)
    submit(q, "EEE", priority=10, now=T0 + 4)
    order = [j.pair for j in q.ordered_queue()]
    assert order == ["BBB", "DDD", "AAA", "CCC", "EEE"]
    view = q.view(T0 + 10)["queued"]["jobs"]
    assert [(j["pair"], j["queuePosition"]) for j in view] == [
        ("BBB", 1), ("DDD", 2), ("AAA", 3), ("CCC", 4), ("EEE", 5)]
    assert view[0]["queuedFor"] == 9
    ran, now = [], T0 + 100
    while q.queued:
        (job_id,) = run_next(q, now)
        ran.append(q.active[job_id].pair)
        q.succeed(job_id, {}, now)
        now += 1
    assert ran == order


def test_max_concurrent_never_exceeded_under_interleaved_submissions():
    rng = random.Random(3)
    q = make(max_concurrent=2, cooldown_minutes=0, retry_base_s=1, max_attempts=2)
    pairs = [f"P{i:02d}" for i in range(30)]
    now, peak = T0, 0
    for step in range(2000):
        now += rng.randint(0, 400)
        action = rng.random()
        if action < 0.45:
            submit(q, rng.choice(pairs), model=rng.choice(["lstm", "gru"]), priority=rng.randint(1, 10), now=now)
        elif action < 0.7:
            run_next(q, now)
        elif action < 0.85 and q.active:
            q.succeed(rng.choice(list(q.active)), {}, now)
        elif action < 0.95 and q.active:
            q.fail(rng.choice(list(q.active)), "boom", now)
        elif q.queued or q.active:
            q.cancel(rng.choice(list(q.queued) + list(q.active)), "test", now)
        assert len(q.active) <= 2
        peak = max(peak, len(q.active))
        # a second job of one PAIR+model never exists
        keys = [j.key for j in (*q.queued.values(), *q.active.values())]
        assert len(keys) == len(set(keys)), step
    assert peak == 2


def test_start_refuses_beyond_max_concurrent():
    q = make(max_concurrent=1)
    a, b = submit(q, "AAA").job, submit(q, "BBB").job
    q.start(a.job_id, T0)
    assert q.runnable(T0) == []
    with pytest.raises(QueueError, match="max_concurrent"):
        q.start(b.job_id, T0)
    q.cancel(a.job_id, "x", T0)
    # work that is still shutting down keeps its slot busy
    assert q.runnable(T0, busy=1) == []
    with pytest.raises(QueueError, match="max_concurrent"):
        q.start(b.job_id, T0, busy=1)
    assert [j.job_id for j in q.runnable(T0, busy=0)] == [b.job_id]


def test_duplicate_refused_with_existing_id_queued_and_active():
    q = make()
    first = submit(q, "BTC")
    assert first.status == ACCEPTED and first.queue_position == 1
    dup = submit(q, "BTC", priority=1, now=T0 + 5)
    assert dup.status == DUPLICATE and dup.existing_job_id == first.job.job_id
    out = dup.to_dict(T0 + 5)
    assert out["httpStatus"] == 409 and out["jobId"] == first.job.job_id
    q.start(first.job.job_id, T0 + 10)
    dup2 = submit(q, "BTC", now=T0 + 20)
    assert dup2.status == DUPLICATE and dup2.existing_job_id == first.job.job_id
    assert "training" in dup2.message
    assert submit(q, "BTC", model="gru").status == ACCEPTED  # another model of the pair is fine
    assert q.can_train("BTC", "lstm", T0)["jobId"] == first.job.job_id


def test_cooldown_after_success_refuses_with_remaining_time_and_clear_lifts_it():
    q = make(cooldown_minutes=30)
    job = submit(q, "BTC").job
    q.start(job.job_id, T0)
    q.succeed(job.job_id, {"version": "v1"}, T0 + MIN)
    refused = submit(q, "BTC", now=T0 + 11 * MIN)
    assert refused.status == COOLDOWN
    assert refused.retry_after_s == pytest.approx(20 * 60)
    assert refused.to_dict(T0)["httpStatus"] == 429
    can = q.can_train("BTC", "lstm", T0 + 11 * MIN)
    assert can == {"allowed": False, "reason": "Cooldown active", "cooldownRemainingMinutes": 20,
                   "cooldownRemainingSeconds": 1200.0}
    assert q.view(T0 + 11 * MIN)["cooldowns"][0]["cooldownRemainingMinutes"] == 20
    # other PAIR+models are not affected
    assert submit(q, "BTC", model="gru", now=T0 + 11 * MIN).status == ACCEPTED
    assert submit(q, "ETH", now=T0 + 11 * MIN).status == ACCEPTED
    # clear only another pair: still refused; clear this one: accepted
    assert q.clear_cooldowns("ETH", "lstm") == 0
    assert submit(q, "BTC", now=T0 + 12 * MIN).status == COOLDOWN
    assert q.clear_cooldowns("BTC", "lstm") == 1
    assert submit(q, "BTC", now=T0 + 12 * MIN).status == ACCEPTED


def test_cooldown_expires_and_clear_all():
    q = make(cooldown_minutes=1)
    for pair, done_at in (("AAA", T0), ("BBB", T0 + 30_000)):
        job = submit(q, pair).job
        q.start(job.job_id, T0)
        q.succeed(job.job_id, {}, done_at)
    assert submit(q, "AAA", now=T0 + MIN - 1).status == COOLDOWN
    assert submit(q, "AAA", now=T0 + MIN).status == ACCEPTED  # expired exactly at the end
    assert [c["pair"] for c in q.view(T0 + MIN)["cooldowns"]] == ["BBB"]
    assert q.clear_cooldowns() == 1  # only BBB's left (AAA's expired)
    assert q.cooldown_view(T0) == []
    assert "AAA:lstm" not in q.snapshot()["cooldowns"]


def test_no_cooldown_after_failure_or_cancel():
    q = make(max_attempts=1)
    job = submit(q, "AAA").job
    q.start(job.job_id, T0)
    q.fail(job.job_id, "boom", T0)
    job2 = submit(q, "AAA", now=T0 + 1).job
    q.start(job2.job_id, T0 + 1)
    q.cancel(job2.job_id, "stop", T0 + 2)
    assert submit(q, "AAA", now=T0 + 3).status == ACCEPTED


def test_failure_retries_with_exponential_backoff_and_priority_then_fails():
    q = make(max_attempts=3, retry_base_s=30)
    job = submit(q, "BTC", priority=5).job
    jid = job.job_id
    q.start(jid, T0)
    j = q.fail(jid, "first", T0 + 1000)
    assert j.status == QUEUED and j.attempts == 1 and j.priority == 7
    assert j.not_before == T0 + 1000 + 30_000
    assert q.runnable(T0 + 30_999) == []  # backing off
    assert [x.job_id for x in q.runnable(T0 + 31_000)] == [jid]
    q.start(jid, T0 + 31_000)
    j = q.fail(jid, "second", T0 + 32_000)
    assert j.status == QUEUED and j.attempts == 2 and j.priority == 9
    assert j.not_before == T0 + 32_000 + 60_000  # x2
    assert q.next_wakeup(T0 + 32_000) == T0 + 92_000
    q.start(jid, T0 + 92_000)
    j = q.fail(jid, "third", T0 + 93_000)
    assert j.status == FAILED and j.attempts == 3 and j.error == "third"
    assert [e["error"] for e in j.errors] == ["first", "second", "third"]
    assert q.view(T0)["history"]["recent"][0]["status"] == FAILED
    assert not q.queued and not q.active


def test_retry_priority_capped_and_backoff_does_not_block_others():
    q = make(max_attempts=2, retry_base_s=10)
    jid = submit(q, "AAA", priority=9).job.job_id
    other = submit(q, "BBB", priority=10, now=T0 + 1).job.job_id
    q.start(jid, T0)
    assert q.fail(jid, "x", T0).priority == 10
    # AAA has priority 10 now and is backing off: BBB runs meanwhile
    assert [j.job_id for j in q.runnable(T0 + 1)] == [other]
    # request-level max_attempts wins over the default
    one = submit(q, "CCC", max_attempts=1).job.job_id
    q.start(one, T0) if q.free_slots() else None
    assert q.get(one).max_attempts == 1


def test_cancel_queued_and_active_and_late_results_ignored():
    q = make(max_concurrent=1)
    a = submit(q, "AAA").job.job_id
    b = submit(q, "BBB").job.job_id
    q.start(a, T0)
    cancelled = q.cancel(b, "not needed", T0 + 1)
    assert cancelled.status == CANCELLED and cancelled.started_at is None
    assert b not in q.queued
    running = q.cancel(a, "user", T0 + 2)
    assert running.status == CANCELLED and running.started_at == T0 and running.cancel_reason == "user"
    assert not q.active
    # the stopped work's late result changes nothing and may not register
    assert q.begin_finalize(a) is False
    assert q.succeed(a, {"version": "v9"}, T0 + 3) is None
    assert q.fail(a, "killed", T0 + 3) is None
    assert q.get(a).status == CANCELLED
    assert q.cooldown_view(T0 + 3) == []
    with pytest.raises(JobNotCancellable):
        q.cancel(a, "again", T0 + 4)
    with pytest.raises(JobNotFound):
        q.cancel("NOPE_lstm_1", None, T0)


def test_finalizing_job_cannot_be_cancelled():
    q = make()
    a = submit(q, "AAA").job.job_id
    q.start(a, T0)
    run = q.get(a).run_id
    assert run == "a1r0"
    assert q.begin_finalize(a, "a0r0") is False  # a stale run may not finalize
    assert q.progress(a, {"epoch": 1, "total": 2}, T0, run_id="a0r0") is None  # nor report progress
    assert q.begin_finalize(a, run) is True
    assert q.begin_finalize(a, run) is False  # only once
    with pytest.raises(JobNotCancellable, match="registering"):
        q.cancel(a, "late", T0 + 1)
    assert q.emergency_stop(T0 + 1) == []  # left to finish its short write
    assert q.succeed(a, {}, T0 + 2).status == COMPLETED


def test_emergency_stop_cancels_everything_and_refuses_until_resume():
    q = make(max_concurrent=2)
    ids = [submit(q, p, now=T0 + i).job.job_id for i, p in enumerate(["AAA", "BBB", "CCC", "DDD"])]
    started = run_next(q, T0 + 10)
    assert started == ids[:2]
    stopped = q.emergency_stop(T0 + 20)
    assert sorted(stopped) == sorted(ids[:2])
    assert not q.queued and not q.active and q.paused
    assert all(q.get(i).status == CANCELLED for i in ids)
    refused = submit(q, "EEE", now=T0 + 30)
    assert refused.status == PAUSED and refused.to_dict(T0)["httpStatus"] == 503
    assert q.can_train("EEE", "lstm", T0)["allowed"] is False
    assert q.runnable(T0 + 40) == []
    assert q.resume() is True
    ok = submit(q, "EEE", now=T0 + 50)
    assert ok.status == ACCEPTED
    assert [j.job_id for j in q.runnable(T0 + 50)] == [ok.job.job_id]


def test_progress_and_eta_from_epoch_rate():
    q = make()
    jid = submit(q, "BTC").job.job_id
    assert q.progress(jid, {"epoch": 1, "total": 10}, T0) is None  # not active: ignored
    q.start(jid, T0)
    q.progress(jid, {"epoch": 1, "total": 10, "loss": 0.7, "val_loss": 0.69, "eta_s": 99}, T0 + 20_000)
    p = q.get(jid).progress
    assert (p["epoch"], p["totalEpochs"], p["loss"], p["valLoss"], p["etaSeconds"]) == (1, 10, 0.7, 0.69, 99)
    q.progress(jid, {"epoch": 3, "total": 10, "loss": 0.6, "val_loss": 0.68}, T0 + 24_000)
    p = q.get(jid).progress
    assert p["etaSeconds"] == pytest.approx(2.0 * 7)  # 2 s per epoch since the first report, 7 to go
    rev = q.revision
    q.progress(jid, {"epoch": 4, "total": 10, "val_loss": 0.68}, T0 + 25_000)
    assert q.revision == rev  # transient: not worth a state write
    assert p["percent"] == 30.0
    view = q.view(T0 + 25_000)["active"]
    assert view["count"] == 1 and view["maxConcurrent"] == 1
    assert view["jobs"][0]["progress"]["valLoss"] == 0.68
    assert view["jobs"][0]["duration"] == 25_000


def test_history_is_bounded_newest_kept():
    q = make(history_limit=5, cooldown_minutes=0)
    ids = []
    for i in range(12):
        jid = submit(q, f"P{i:02d}", now=T0 + i).job.job_id
        q.start(jid, T0 + i)
        q.succeed(jid, {}, T0 + i)
        ids.append(jid)
    assert [j.job_id for j in q.history] == ids[-5:]
    hist = q.view(T0 + 100, recent=3)["history"]
    assert hist["total"] == 12 and hist["kept"] == 5
    assert [j["jobId"] for j in hist["recent"]] == ids[::-1][:3]


def test_view_shape_is_camel_case_and_json():
    q = make()
    submit(q, "BTC", epochs=5, batch_size=64, learning_rate=0.01, horizon=5)
    v = q.view(T0 + 1)
    assert set(v) >= {"active", "queued", "history", "cooldowns", "paused"}
    job = v["queued"]["jobs"][0]
    assert job["params"] == {"epochs": 5, "batchSize": 64, "learningRate": 0.01, "horizon": 5}
    assert job["queuePosition"] == 1 and job["status"] == QUEUED
    json.dumps(v)
    assert q.job_view(job["jobId"], T0)["jobId"] == job["jobId"]
    assert q.job_view("nope", T0) is None


def test_snapshot_restore_round_trip_keeps_queue_order_and_puts_active_first():
    q = make(max_concurrent=1, cooldown_minutes=5)
    done = submit(q, "OLD").job.job_id
    q.start(done, T0)
    q.succeed(done, {"version": "v1"}, T0 + 1)
    ids = [submit(q, p, priority=pr, now=T0 + 10 + i).job.job_id
           for i, (p, pr) in enumerate([("AAA", 5), ("BBB", 3), ("CCC", 5), ("DDD", 3)])]
    (running,) = run_next(q, T0 + 100)  # BBB
    q.progress(running, {"epoch": 1, "total": 3}, T0 + 200)
    before = [j.job_id for j in q.ordered_queue()]
    snap = json.loads(json.dumps(q.snapshot()))  # survives JSON

    r = QueueState.restore(snap, QueueConfig(max_concurrent=1, cooldown_minutes=5))
    assert [j.job_id for j in r.ordered_queue()] == [running, *before]
    assert r.get(running).status == QUEUED and r.get(running).attempts == 0 and r.get(running).restored == 1
    assert not r.active
    assert set(r.queued) == set(ids)
    assert r.history_total == 1 and r.get(done).status == COMPLETED
    old_run = q.get(running).run_id
    r.start(running, T0 + 300)
    assert r.get(running).run_id != old_run  # the dead actor's run can never finalize this start
    assert r.begin_finalize(running, old_run) is False
    r.cancel(running, "x", T0 + 301)
    assert submit(r, "OLD", now=T0 + 300).status == COOLDOWN
    assert submit(r, "AAA", now=T0 + 300).status == DUPLICATE
    # ids stay unique after a restore
    assert r.submit(TrainRequest("AAA", "gru"), T0 + 10).job.job_id == f"AAA_gru_{T0 + 10}"
    r.cancel(ids[0], "x", T0 + 11)
    assert submit(r, "AAA", now=T0 + 10).job.job_id == f"AAA_lstm_{T0 + 11}"
    # paused state survives too
    q.emergency_stop(T0 + 500)
    assert QueueState.restore(q.snapshot(), q.config).paused is True


def test_restore_puts_interrupted_jobs_before_better_priorities():
    q = make(max_concurrent=2)
    slow = submit(q, "LOW", priority=9).job.job_id
    other = submit(q, "LOW2", priority=8, now=T0 + 1).job.job_id
    run_next(q, T0 + 2)  # both start (8 first, then 9)
    urgent = submit(q, "URG", priority=1, now=T0 + 3).job.job_id
    r = QueueState.restore(q.snapshot(), q.config)
    assert [j.job_id for j in r.ordered_queue()] == [other, slow, urgent]  # by start time, then the rest
    assert r.get(slow).priority == 9  # the priority itself is kept
    started = run_next(r, T0 + 10)
    assert started == [other, slow]
    assert r.get(slow).head is False


def test_restore_empty_and_bad_version():
    assert not QueueState.restore(None).queued
    with pytest.raises(ValueError):
        QueueState.restore({"version": 99})


def test_request_validation():
    q = make()
    for bad in (
        TrainRequest("btc"),
        TrainRequest("BTC", priority=0),
        TrainRequest("BTC", priority=11),
        TrainRequest("BTC", epochs=0),
        TrainRequest("BTC", epochs=501),
        TrainRequest("BTC", learning_rate=-1.0),
        TrainRequest("BTC", batch_size=True),
    ):
        with pytest.raises(InvalidRequest):
            q.submit(bad, T0)
    with pytest.raises(InvalidRequest, match="model type"):
        TrainRequest("BTC", "xgb").validate(["lstm", "gru"])
    req = TrainRequest.from_api("ETH", "gru", {"epochs": 3, "batchSize": 32, "priority": 2})
    assert (req.epochs, req.batch_size, req.priority) == (3, 32, 2)
    with pytest.raises(InvalidRequest, match="unknown"):
        TrainRequest.from_api("ETH", "gru", {"epoch": 3})
    assert TrainRequest.from_dict(req.to_dict()) == req
    assert TrainRequest.from_dict({"pair": "BTC", "priority": None, "model_type": None}).priority == 5


def test_http_body_and_queue_accept_the_same_limits():
    import pydantic

    from deployments.schemas import TrainBody
    from ml.queue import requests as rq

    assert set(TrainBody.model_fields) == set(rq.API_FIELDS)
    edges = {"epochs": (rq.EPOCHS_MIN, rq.EPOCHS_MAX), "batchSize": (rq.BATCH_SIZE_MIN, rq.BATCH_SIZE_MAX),
             "priority": (rq.PRIORITY_MIN, rq.PRIORITY_MAX), "horizon": (rq.HORIZON_MIN, rq.HORIZON_MAX),
             "maxAttempts": (rq.MAX_ATTEMPTS_MIN, rq.MAX_ATTEMPTS_MAX)}
    for name, (lo, hi) in edges.items():
        for value, ok in ((lo, True), (hi, True), (lo - 1, False), (hi + 1, False)):
            queue_ok = True
            try:
                TrainRequest.from_api("BTC", "lstm", {name: value}).validate()
            except InvalidRequest:
                queue_ok = False
            body_ok = True
            try:
                TrainBody(**{name: value})
            except pydantic.ValidationError:
                body_ok = False
            assert queue_ok == body_ok == ok, (name, value)
    assert rq.MAX_ATTEMPTS_MAX == 100


def production(trained_at: int | None, promoted_at: int | None = None):
    """A Production as ml.registry.production reads it (the registry writes meta key `trainedAt`)."""
    meta = {} if trained_at is None else {"trainedAt": trained_at}
    return production_from({"version": "v1", "promotedAt": promoted_at}, meta)


def test_periodic_retrain_picks_oldest_skipping_cooldowns_and_duplicates():
    q = make(cooldown_minutes=10)
    cands = [("BTC", "lstm", production(T0 - 5000)), ("ETH", "lstm", production(T0 - 9000)),
             ("XMR", "lstm", production(T0 - 1000))]
    assert q.pick_retrain_target(cands, T0) == ("ETH", "lstm")
    assert q.pick_retrain_target([*cands, ("RVN", "lstm", None)], T0) == ("RVN", "lstm")  # no model yet
    submit(q, "ETH")
    assert q.pick_retrain_target(cands, T0) == ("BTC", "lstm")
    jid = submit(q, "BTC").job.job_id
    q.queued[jid].not_before = 0
    q.cancel(q.pending_for("ETH", "lstm").job_id, "x", T0)
    q.start(jid, T0)
    q.succeed(jid, {}, T0)
    assert q.pick_retrain_target(cands, T0) == ("ETH", "lstm")
    assert q.pick_retrain_target([("BTC", "lstm", production(0))], T0) is None  # cooling down
    assert q.retrain_due(0, T0) is False
    assert q.retrain_due(MIN, T0) is True
    q.mark_retrain(T0)
    assert q.retrain_due(MIN, T0 + MIN - 1) is False
    assert q.retrain_due(MIN, T0 + MIN) is True


def test_periodic_retrain_ages_a_model_by_its_training_time_not_its_promotion():
    day = 24 * 60 * MIN
    # BTC's version was trained 10 days ago but promoted (e.g. a rollback) an hour ago; ETH's was
    # trained and promoted 2 days ago. By training time BTC's model is the older one.
    cands = [("ETH", "lstm", production(T0 - 2 * day, promoted_at=T0 - 2 * day)),
             ("BTC", "lstm", production(T0 - 10 * day, promoted_at=T0 - 60 * MIN))]
    assert oldest(cands, T0) == ("BTC", "lstm")
    assert make().pick_retrain_target(cands, T0) == ("BTC", "lstm")
    # a version written without trainedAt is aged by its promotion time
    legacy = [("ETH", "lstm", production(T0 - 2 * day)), ("XMR", "lstm", production(None, promoted_at=T0 - 5 * day))]
    assert oldest(legacy, T0) == ("XMR", "lstm")
    assert oldest([], T0) is None


def test_config_from_settings_and_overrides():
    from ml.config import load_settings

    cfg = QueueConfig.from_settings(load_settings(environ={}).queue, retry_base_s=0.5)
    assert (cfg.max_concurrent, cfg.cooldown_minutes, cfg.max_attempts, cfg.retry_base_s,
            cfg.history_limit) == (1, 30, 2, 0.5, 1000)
    with pytest.raises(ValueError, match="unknown"):
        QueueConfig.from_settings(load_settings(environ={}).queue, nope=1)
    assert cfg.backoff_ms(1) == 500 and cfg.backoff_ms(3) == 2000
    assert ACTIVE == "training"


def test_follow_prints_one_line_per_change_and_maps_exit_codes():
    import io

    from cluster.submit_training import EXIT_FAILED, EXIT_OK, follow

    q = make(max_attempts=2, retry_base_s=1)
    jid = submit(q, "BTC", epochs=2).job.job_id
    clock = {"now": T0}
    script = [
        lambda: None,
        lambda: q.start(jid, clock["now"]),
        lambda: q.progress(jid, {"epoch": 1, "total": 2, "loss": 0.7, "val_loss": 0.69}, clock["now"]),
        lambda: None,
        lambda: q.progress(jid, {"epoch": 2, "total": 2, "loss": 0.6, "val_loss": 0.68}, clock["now"]),
        lambda: q.succeed(jid, {"version": "v1", "metrics": {"brier": 0.24}}, clock["now"]),
    ]

    def get_job():
        if script:
            script.pop(0)()
        clock["now"] += 1000
        return q.job_view(jid, clock["now"])

    out = io.StringIO()
    code, job = follow(get_job, out=out, sleep=lambda s: None)
    lines = out.getvalue().splitlines()
    assert code == EXIT_OK and job["status"] == COMPLETED
    assert lines[0].startswith(f"{jid} queued position=1")
    assert "epoch=1/2" in lines[2] and "val_loss=0.6900" in lines[2]
    assert lines[-1].startswith(f"{jid} completed version=v1") and "brier=0.2400" in lines[-1]
    assert len(lines) == len(set(lines))  # one line per change, no repeats

    jid2 = submit(q, "ETH").job.job_id
    q.start(jid2, T0)
    q.cancel(jid2, "user", T0)
    out = io.StringIO()
    code, _ = follow(lambda: q.job_view(jid2, T0), out=out, sleep=lambda s: None)
    assert code == EXIT_FAILED and "reason=user" in out.getvalue()

    jid3 = submit(q, "XMR").job.job_id
    ticks = iter(range(100))
    code, _ = follow(lambda: q.job_view(jid3, T0), out=io.StringIO(), sleep=lambda s: None,
                     timeout_s=3, clock=lambda: next(ticks))
    assert code == EXIT_FAILED


def test_result_summary_tolerates_partial_records():
    from types import SimpleNamespace

    from ml.queue.views import result_summary

    res = SimpleNamespace(metrics={"model": {"accuracy": 0.55, "brier": 0.245}, "baseline": {"brier": 0.25}},
                          epochs_run=3, stopped="completed", train_seconds=1.234)
    s = result_summary({"version": "v3", "promotion": {"promoted": True, "reason": "brier 0.245 <= 0.25"}}, res)
    assert s["promotionReason"] == "brier 0.245 <= 0.25"
    assert s["version"] == "v3" and s["production"] is True and s["epochsRun"] == 3
    assert s["metrics"]["brier"] == 0.245 and s["metrics"]["baselineBrier"] == 0.25
    assert result_summary(None, None)["version"] is None
    json.dumps(s)


def test_tbml_train_bad_input_exits_2_without_touching_a_cluster(capsys):
    from cli import main

    assert main(["train", "--pair", "btc"]) == 2
    assert "invalid pair" in capsys.readouterr().err
    assert main(["train", "--pair", "BTC", "--priority", "11"]) == 2
    assert "priority" in capsys.readouterr().err
    assert main(["train", "--pair", "BTC", "--model", "xgb"]) == 2
    assert "model type" in capsys.readouterr().err
    assert main(["train", "--pair", "BTC", "--bars", "500"]) == 2
    assert "--local only" in capsys.readouterr().err


def test_restore_keep_active_adopts_the_run_or_fails_it_by_the_retry_rule():
    cfg = QueueConfig(max_concurrent=2, retry_base_s=10, max_attempts=2)
    q = QueueState(cfg)
    a, b = submit(q, "ADA").job.job_id, submit(q, "ADB").job.job_id
    run_next(q, T0)
    q.note_running(a, T0 + 5, placement_group="ab12")
    q.begin_finalize(b, q.get(b).run_id)  # b was registering when the old process died
    runs = {j: q.get(j).run_id for j in (a, b)}
    snap = json.loads(json.dumps(q.snapshot()))

    r = QueueState.restore(snap, cfg, keep_active=True)
    assert set(r.active) == {a, b} and not r.queued
    ra = r.get(a)
    assert ra.status == ACTIVE and ra.run_id == runs[a] and ra.restored == 1 and ra.attempts == 1
    assert ra.placement_group == "ab12" and ra.running_at == T0 + 5  # what to release if it is lost
    assert r.get(b).finalizing and r.begin_finalize(b, runs[b]) is False  # registers exactly once
    # adopted: the run's own reports and result still count
    assert r.progress(a, {"epoch": 2, "total": 5}, T0 + 50, run_id=runs[a]) is not None
    assert r.succeed(b, {"version": "v1"}, T0 + 60).status == COMPLETED
    # lost: the usual rule (the attempt counts, backoff, priority + 2)
    lost = r.fail(a, "run lost", T0 + 100)
    assert lost.status == QUEUED and lost.attempts == 1 and lost.not_before == T0 + 100 + 10_000
    assert lost.priority == 7 and lost.errors[-1]["error"] == "run lost"
    again = r.start(a, T0 + 100 + 10_000)
    assert again.run_id != runs[a] and again.placement_group is None and again.running_at is None
    # the default restore still puts them back at the head of the queue
    plain = QueueState.restore(snap, cfg)
    assert not plain.active and plain.get(a).status == QUEUED and plain.get(a).attempts == 0


def test_a_run_whose_workers_never_come_up_is_overdue():
    q = make(start_timeout_s=60)
    a = submit(q, "STA").job.job_id
    run_next(q, T0)
    run_id = q.get(a).run_id
    assert q.overdue(T0 + 59_999) == []
    assert [j.job_id for j in q.overdue(T0 + 60_000)] == [a]
    rev = q.revision
    assert q.note_running(a, T0 + 30_000, run_id="stale") is None  # another run's report: ignored
    assert q.note_running(a, T0 + 30_000, run_id=run_id, placement_group="cd34").placement_group == "cd34"
    assert q.revision > rev  # persisted: a restarted shell must know what to release
    assert q.overdue(T0 + 10 * MIN) == []
    with pytest.raises(ValueError):
        QueueConfig(start_timeout_s=0)
