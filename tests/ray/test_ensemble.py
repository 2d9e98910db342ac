"""An ensemble built through the real TrainingQueue on the session's Ray cluster.

The members (the default enabled types, lstm and lightgbm) are trained by real, small queue jobs on
the synthetic history of one pair; then an `ensemble` job builds the stack of their production
versions (ml.training.ensemble) through the same queue, and its registry document is checked against
the registry's own numbers. A member the Brier rule kept out is promoted by hand first (an operator's
choice): the ensemble combines whatever is production.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import numpy as np
import pytest
from polling import wait_for

pytestmark = pytest.mark.ray

PAIR = "ENSQ"
SMALL = {"bars": 2500, "seq_len": 20, "hidden": 8, "batch_size": 256, "patience": 500,
         "lightgbm": {"n_estimators": 60, "early_stopping_rounds": 10}}
ENSEMBLE = "ensemble"


@pytest.fixture
def queue(ray_cluster):
    import ray

    from actors.training_queue import get_or_create_queue_actor

    settings = {"tick_s": 0.1, "cooldown_minutes": 10, "retry_base_s": 0.5, "train_overrides": SMALL, "max_concurrent": 2,
                "num_workers": 1, "cpus_per_worker": 0.5}
    handle = get_or_create_queue_actor(ray_cluster["namespace"], str(ray_cluster["data_dir"]), settings,
                                       name=f"tq-ens-{uuid.uuid4().hex[:8]}")
    assert ray.get(handle.ping.remote(), timeout=120)
    yield handle
    with contextlib.suppress(Exception):
        ray.get(handle.emergency_stop.remote("test teardown"), timeout=60)
    ray.kill(handle, no_restart=True)


def finished(q, job_id: str, timeout: float = 240) -> dict:
    import ray

    job = wait_for(lambda: (lambda j: j if j and j["status"] in ("completed", "failed", "cancelled") else None)(
        ray.get(q.job.remote(job_id))), timeout, what=f"{job_id} to finish")
    assert job["status"] == "completed", job.get("error")
    return job


def test_ensemble_job_builds_a_correct_registry_document(queue, ray_cluster):
    import ray

    from actors.storage import get_or_create_storage_actor
    from actors.storage_client import RemoteStorage
    from ml.config import get_settings
    from ml.registry.loader import load_model
    from ml.registry.versions import Registry, ensemble_promotion_decision
    from ml.serving.ensemble import combine, members_of
    from ml.storage.store import Storage

    types = list(get_settings().model.enabled_types)
    assert len(types) >= 2 and ENSEMBLE not in types
    refused = ray.get(queue.submit.remote({"pair": PAIR, "model_type": ENSEMBLE, "epochs": 3}))
    assert refused["status"] == "invalid" and "built, not trained" in refused["message"]
    # without production members the build fails with the reason, and registers nothing
    lonely = ray.get(queue.submit.remote({"pair": "ENSNONE", "model_type": ENSEMBLE, "max_attempts": 1}))
    failed = wait_for(lambda: (lambda j: j if j["status"] in ("failed", "completed") else None)(
        ray.get(queue.job.remote(lonely["jobId"]))), 60, what="the member-less ensemble job to fail")
    assert failed["status"] == "failed" and "no production model of ENSNONE" in failed["error"], failed

    t0 = time.monotonic()
    jobs = [ray.get(queue.submit.remote({"pair": PAIR, "model_type": t, "epochs": 1, "priority": 2})) for t in types]
    assert all(j["accepted"] for j in jobs), jobs
    for j in jobs:
        finished(queue, j["jobId"])
    assert Storage.reader(ray_cluster["data_dir"]).list_versions("ENSNONE", ENSEMBLE) == []
    t_members = time.monotonic() - t0

    registry = Registry(RemoteStorage(get_or_create_storage_actor(data_dir=str(ray_cluster["data_dir"]),
                                                                  namespace=ray_cluster["namespace"])))
    reader = Storage.reader(ray_cluster["data_dir"])
    for t in types:
        if registry.production(PAIR, t) is None:
            registry.promote(PAIR, t, registry.versions(PAIR, t)[0]["version"], "test: ensemble member")
    production = {t: registry.production(PAIR, t)["version"] for t in types}

    out = ray.get(queue.submit.remote({"pair": PAIR, "model_type": ENSEMBLE, "priority": 1}))
    assert out["accepted"], out
    again = ray.get(queue.submit.remote({"pair": PAIR, "model_type": ENSEMBLE}))
    assert again["status"] in ("duplicate", "cooldown")  # queued/active: duplicate; already built: cooldown
    job = finished(queue, out["jobId"], timeout=120)
    print(f"\nmembers trained in {t_members:.1f} s, ensemble job queued to done in "
          f"{(job['finishedAt'] - job['createdAt']) / 1000:.1f} s (its build {job['result']['trainSeconds']} s)")
    version = job["result"]["version"]
    meta = reader.get_version_meta(PAIR, ENSEMBLE, version)
    print(f"ensemble {version}: promoted {meta['promotion']['promoted']} ({meta['promotion']['reason']})")
    m = meta["metrics"]
    for name, r in [("ensemble", m["model"]), ("base rate", m["baseline"])] + list(m["members"].items()):
        print(f"  {name:9s} brier {r['brier']:.5f} acc {r['accuracy']:.4f} log loss {r['log_loss']:.5f} n {r['n']}")
    print("  weights", meta["weights"])

    assert meta["modelType"] == ENSEMBLE and meta["jobId"] == out["jobId"]
    assert meta["members"] == production == members_of(meta)
    horizons = [str(h) for h in meta["horizons"]]
    assert horizons == [str(h) for h in get_settings().labels.horizons]
    assert set(meta["weights"]) == set(horizons) == set(meta["bias"])
    assert all(set(w) == set(types) and min(w.values()) >= 0 for w in meta["weights"].values())
    assert set(m["members"]) == set(types)
    assert m["model"]["n"] == m["baseline"]["n"] == m["n"]["test"] == min(r["n"] for r in m["members"].values()) > 50
    assert meta["bestMember"] == min(types, key=lambda t: m["members"][t]["brier"])
    assert meta["promotion"]["promoted"] is ensemble_promotion_decision(m)["promoted"]
    assert meta["promotion"]["promoted"] is (m["model"]["brier"] < min(r["brier"] for r in m["members"].values())
                                             and m["model"]["brier"] <= m["baseline"]["brier"])
    pointer = reader.get_production(PAIR, ENSEMBLE)
    assert (pointer is not None and pointer["version"] == version) is meta["promotion"]["promoted"]
    # the members' production pointers are untouched by the build
    assert {t: registry.production(PAIR, t)["version"] for t in types} == production

    # what serving does with the document: the member versions it names, combined
    from ml.data.sources import load_candles
    from ml.features import feature_matrix

    features = feature_matrix(load_candles(PAIR, bars=1500))
    outputs = {t: load_model(reader, PAIR, t, v).forecast(features.to_numpy()) for t, v in meta["members"].items()}
    combined = combine(meta, outputs)
    n_h = len(horizons)
    assert combined.shape == (2 * n_h,) and np.all((combined[:n_h] > 0) & (combined[:n_h] < 1))
    assert np.all(combined[n_h:] > 0)
