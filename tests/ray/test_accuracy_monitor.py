"""The accuracy monitor actor on the session's Ray cluster, with the real Storage actor, candle store
and a private TrainingQueue actor.

Two private pairs get past synthetic candles, a production version (registered through the Storage
actor; the monitor never loads weights) and served-prediction records whose outcomes the test knows
from the candles: the one on LVG is right every time (Brier 0.04), the one on LVB is wrong every time
(Brier 0.64 against a base-rate Brier near 0.25). One `tick()` must resolve them in place, flag LVB
degraded and queue exactly one retrain of it (priority and source from the monitor's settings), and
leave LVG alone. Passes are driven with `tick()`, never by waiting for the interval.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest

pytestmark = pytest.mark.ray

TF = 300_000
H = 5
N = 30  # distinct predictions per pair (each recorded twice: served again from the cache)
PRIORITY = 4
TINY = {"bars": 1500, "seq_len": 8, "hidden": 8, "batch_size": 256, "patience": 500}
META = {"model": {"horizons": [H], "seq_len": 8, "layers": 1, "hidden": 8},
        "metrics": {"model": {"accuracy": 0.56, "brier": 0.245, "n": 500}, "baseline": {"brier": 0.25}}}


def _records(pair: str, candles, *, right: bool) -> list[dict]:
    """Records as the ingress writes them for predictions on windows ending with bars 100..100+N."""
    close = candles["close"].tolist()
    ts = candles["ts"].tolist()
    now = int(time.time() * 1000)
    out = []
    for i in range(N):
        t = 100 + i
        up = close[t + H] > close[t]
        says_up = up if right else not up
        as_of = ts[t] + TF
        rec = {"pair": pair, "timestamp": now - (N - i) * 1000, "direction": "up" if says_up else "down",
               "probability": 0.8 if says_up else 0.2, "modelType": "lstm", "modelVersion": "v1",
               "horizon": H, "asOf": as_of, "targetTime": as_of + H * TF, "fallback": False}
        out += [dict(rec, id=uuid.uuid4().hex), dict(rec, id=uuid.uuid4().hex, timestamp=rec["timestamp"] + 1)]
    last = ts[-1] + TF
    out.append({"pair": pair, "id": "fallback-" + pair, "timestamp": now, "direction": "neutral",
                "probability": 0.5, "modelType": "lstm", "modelVersion": None, "horizon": H, "asOf": last,
                "targetTime": last + H * TF, "fallback": True})
    # target bar closed on the clock but not in the store (the feed is behind): stays unresolved
    out.append({"pair": pair, "id": "ahead-" + pair, "timestamp": now, "direction": "up", "probability": 0.8,
                "modelType": "lstm", "modelVersion": "v1", "horizon": H, "asOf": last,
                "targetTime": last + H * TF, "fallback": False})
    return out


@pytest.fixture
def live(ray_cluster):
    import ray

    from actors.accuracy_monitor import get_or_create_monitor_actor
    from actors.storage import get_or_create_storage_actor
    from actors.training_queue import get_or_create_queue_actor
    from ml.clock import last_closed_bar_ts
    from ml.data.sources import synthetic_candles
    from ml.data.store import CandleStore

    data_dir, ns = ray_cluster["data_dir"], ray_cluster["namespace"]
    tag = uuid.uuid4().hex[:6].upper()
    good, bad = f"LVG{tag}", f"LVB{tag}"
    storage = get_or_create_storage_actor(str(data_dir), ns)
    store = CandleStore(data_dir, "5m")
    end = last_closed_bar_ts(TF) - 20 * TF
    frames = {}
    for pair in (good, bad):
        frames[pair] = synthetic_candles(pair, bars=300, end_ts=end)
        store.write(pair, frames[pair])
        ray.get(storage.save_model_version.remote(pair, "lstm", "v1", META, {"weights.pt": b"unused"}))
        ray.get(storage.set_production.remote(pair, "lstm", "v1", "test fixture"))
        ray.get(storage.append_predictions.remote(_records(pair, frames[pair], right=pair == good)))

    queue_name = f"tq-live-{tag.lower()}"
    queue = get_or_create_queue_actor(ns, str(data_dir), {
        "tick_s": 0.1, "cooldown_minutes": 0, "train_overrides": TINY, "num_workers": 1, "cpus_per_worker": 0.5,
        "max_attempts": 1}, name=queue_name)
    assert ray.get(queue.ping.remote(), timeout=120)
    name = f"mon-{tag.lower()}"
    overrides = {"pairs": [good, bad], "queue_name": queue_name, "window": 50, "degraded_min_n": 20,
                 "degraded_margin": 0.01, "retrain_priority": PRIORITY, "resolve_interval_s": 3600}
    monitor = get_or_create_monitor_actor(ns, str(data_dir), overrides, name=name)
    assert ray.get(monitor.ping.remote(), timeout=120)
    try:
        yield {"good": good, "bad": bad, "frames": frames, "storage": storage, "queue": queue, "monitor": monitor,
               "name": name, "namespace": ns, "data_dir": data_dir}
    finally:
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
        with contextlib.suppress(Exception):
            ray.get(queue.emergency_stop.remote("test teardown"), timeout=60)
        ray.kill(queue, no_restart=True)


def _jobs_of(queue, pair: str) -> list[dict]:
    import ray

    view = ray.get(queue.view.remote(1000))
    jobs = view["queued"]["jobs"] + view["active"]["jobs"] + view["history"]["recent"]
    return [j for j in jobs if j["pair"] == pair]


def test_degraded_model_is_flagged_and_retrained_once_a_good_one_is_not(live):
    import ray

    from ml.storage.store import Storage

    good, bad, monitor, queue, storage = live["good"], live["bad"], live["monitor"], live["queue"], live["storage"]
    summary = ray.get(monitor.tick.remote(), timeout=120)
    assert summary["errors"] == {} and set(summary["pairs"]) == {good, bad}, summary
    assert summary["resolved"] == {good: 2 * N, bad: 2 * N}  # every served record, duplicates included
    assert summary["degraded"] == [f"{bad}/lstm"]
    (retrain,) = summary["retrains"]
    assert (retrain["pair"], retrain["modelType"], retrain["version"], retrain["status"]) == (bad, "lstm", "v1",
                                                                                            "queued")

    # the resolution is in the stored records, by the bar convention: close at targetTime - tf vs asOf - tf
    close = dict(zip(live["frames"][bad]["ts"].tolist(), live["frames"][bad]["close"].tolist(), strict=True))
    records = {r["id"]: r for r in ray.get(storage.query_predictions.remote(bad, None))}
    resolved = [r for r in records.values() if r.get("resolvedAt") is not None]
    assert len(resolved) == 2 * N
    for r in resolved:
        c0, c1 = close[r["asOf"] - TF], close[r["targetTime"] - TF]
        assert r["realizedClose"] == c1 and r["realizedDirection"] == ("up" if c1 > c0 else "down")
        assert r["correct"] is False  # the bad model is wrong every time
    for rid in (f"fallback-{bad}", f"ahead-{bad}"):
        assert "realizedClose" not in records[rid] and "resolvedAt" not in records[rid]

    # the numbers: each prediction once; published in the status and in the live document
    st_bad = ray.get(monitor.status.remote(bad))["models"]["lstm"]
    st_good = ray.get(monitor.status.remote(good))["models"]["lstm"]
    assert st_bad["n"] == N and st_bad["accuracy"] == 0.0 and st_bad["brier"] == pytest.approx(0.64)
    assert st_bad["degraded"] is True and st_bad["flagged"] is True and "worse than the base rate" in st_bad["reason"]
    assert st_bad["testAccuracy"] == 0.56 and st_bad["retrain"]["jobId"] == retrain["jobId"]
    assert st_good["n"] == N and st_good["accuracy"] == 1.0 and st_good["brier"] == pytest.approx(0.04)
    assert st_good["degraded"] is False and st_good["flagged"] is False and st_good["retrain"] is None
    assert ray.get(monitor.status.remote(bad))["pending"] == 1  # the record whose target bar is not stored
    doc = Storage.reader(live["data_dir"]).get_document("training", "live", pair=bad)
    assert doc["models"]["lstm"]["degraded"] is True and doc["models"]["lstm"]["n"] == N

    # the queue got one retrain of the degraded model, with the configured priority; none of the good one
    job = ray.get(queue.job.remote(retrain["jobId"]))
    assert (job["pair"], job["modelType"], job["priority"], job["source"]) == (bad, "lstm", PRIORITY, "degraded")
    assert job["status"] in ("queued", "training"), job
    assert _jobs_of(queue, good) == []

    # the next pass: nothing new to resolve, and the flagged version is not queued again
    again = ray.get(monitor.tick.remote(), timeout=120)
    assert again["resolved"] == {} and again["retrains"] == [] and again["degraded"] == [f"{bad}/lstm"]
    assert [j["jobId"] for j in _jobs_of(queue, bad)] == [retrain["jobId"]]
    assert ray.get(queue.cancel.remote(retrain["jobId"], "test: the retrain itself is not under test"))["ok"]

    # a restarted monitor finds the flag in the document: still no second retrain
    ray.kill(monitor, no_restart=False)

    def restarted() -> bool:
        with contextlib.suppress(Exception):
            return ray.get(monitor.ping.remote(), timeout=10)
        return False

    deadline = time.monotonic() + 120
    while not restarted():
        assert time.monotonic() < deadline, "the monitor did not come back"
        time.sleep(0.5)
    after = ray.get(monitor.tick.remote(), timeout=120)
    assert after["retrains"] == [] and after["degraded"] == [f"{bad}/lstm"], after
    assert ray.get(monitor.status.remote(bad))["models"]["lstm"]["n"] == N  # rebuilt from the stored records

    # a new production version starts with a clean slate
    ray.get(storage.save_model_version.remote(bad, "lstm", "v2", META, {"weights.pt": b"unused too"}))
    ray.get(storage.set_production.remote(bad, "lstm", "v2", "test: retrained"))
    fresh = ray.get(monitor.tick.remote(), timeout=120)
    assert fresh["degraded"] == [] and fresh["retrains"] == []
    v2 = ray.get(monitor.status.remote(bad))["models"]["lstm"]
    assert (v2["version"], v2["n"], v2["degraded"], v2["flagged"]) == ("v2", 0, False, False)
