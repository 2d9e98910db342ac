"""Fifty pairs from configuration, served by one Predictor replica whose multiplexed LRU keeps at most
`deployments.predictor.MAX_MODELS_PER_REPLICA` models, with its memory bounded.

The pairs are not a hard-coded four: `pairs` (TBML_PAIRS) names 50 synthetic ones, MP00..MP49. One
small LSTM is trained once and its files are registered under every pair through the Storage actor
(the single writer), each pair's copy in production, so every answer below is a real model answer.
The module deploys its own application on the session's Ray cluster, as tests/ray/test_api_fuzz.py
does: a throwaway data directory and namespace (its own Storage actor, no training queue work, no
accuracy monitor) and exactly one Predictor replica, so the replica measured is the one that served.

Memory: the replica's resident set (VmRSS of its process, read from /proc: the replica runs on this
machine) after one pass over the 50 pairs and again after three more. Every pass asks with
`bypassCache=true` in pair order, so with 50 models and an LRU of 8 every request is an LRU miss: a
model load and an eviction (150 loads between the two readings). The growth must stay below
`RSS_GROWTH_BOUND_MB` (32 MB). The model is made large enough (`HIDDEN` units, ~1.5 MB of weights)
that the bound means something: a replica that kept every model it loaded (or their tensors) would
grow by 150 x the weights (~230 MB), several times the bound (the test checks that too), instead of
staying flat. Measured on 2 cores: ~457 MB after the first pass, +6 MB over the next three.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import pytest
from polling import free_port, wait_for

pytestmark = pytest.mark.ray

N_PAIRS = 50
PAIRS = [f"MP{i:02d}" for i in range(N_PAIRS)]
APP = "tbml-many-pairs-test"
BARS = 1200
MORE_PASSES = 3
HIDDEN = 256  # ~1.5 MB of weights per model: keeping the models an LRU should drop would show in RSS
RSS_GROWTH_BOUND_MB = 32.0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def many(ray_cluster, redis_server, tmp_path_factory):
    import httpx
    import ray
    from ray import serve

    from actors.storage import get_or_create_storage_actor
    from deployments.app import app_from_config
    from ml.data.sources import synthetic_candles
    from ml.data.store import CandleStore
    from ml.training.config import TrainConfig
    from ml.training.local import train_local

    data_dir = tmp_path_factory.mktemp("many-pairs-data")
    ns = f"tbml-many-{uuid.uuid4().hex[:8]}"
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    store = CandleStore(data_dir, "5m")
    candles = synthetic_candles(PAIRS[0], bars=BARS)
    for pair in PAIRS:  # the same candles under every name: the pairs differ by name and model only
        store.write(pair, candles)

    cfg = TrainConfig.from_settings(PAIRS[0], "lstm", epochs=1, bars=BARS, seed=7, threads=1, hidden=HIDDEN)
    result = train_local(cfg, candles)
    storage = get_or_create_storage_actor(data_dir=str(data_dir), namespace=ns)
    from ml.registry.versions import Registry

    class _Remote:
        def __getattr__(self, name):
            return lambda *a, **k: ray.get(getattr(storage, name).remote(*a, **k), timeout=120)

    version = Registry(_Remote()).register(PAIRS[0], result)["version"]
    meta = ray.get(storage.get_version_meta.remote(PAIRS[0], "lstm", version), timeout=60)
    files = {name: ray.get(storage.read_model_file.remote(PAIRS[0], "lstm", version, name), timeout=60)
             for name in meta["files"]}
    meta = {k: v for k, v in meta.items() if k not in ("files", "version", "pair", "modelType", "savedAt")}
    ray.get([storage.save_model_version.remote(p, "lstm", version, meta, files) for p in PAIRS[1:]], timeout=120)
    ray.get([storage.set_production.remote(p, "lstm", version, "test: 50 pairs") for p in PAIRS], timeout=120)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from ray.serve.context import _get_global_client

    port = int(_get_global_client().get_serve_details().get("http_options", {}).get("port") or port)
    tiny = {"ray_actor_options": {"num_cpus": 0.05}}
    spec = app_from_config(
        args={"data_dir": str(data_dir), "namespace": ns, "redis_url": redis_server.url, "pairs": PAIRS,
              "snapshot_interval_s": 0.5, "actor_timeout_s": 60, "monitor": False},
        deployments={"Ingress": tiny, "Features": tiny,
                     "Predictor": {**tiny, "autoscaling_config": None, "num_replicas": 1}},
    )
    serve.run(spec["app"], name=APP, route_prefix="/", logging_config=spec["logging_config"])
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=60)
    wait_for(lambda: client.get("/api/ping").status_code == 200, 120, "the HTTP proxy", retry_errors=True)
    try:
        yield {"client": client, "version": version, "namespace": ns, "storage": storage,
               "weights_mb": len(files["weights.pt"]) / 2**20}
    finally:
        client.close()
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.kill(storage, no_restart=True)


def _predictor_pid() -> int:
    from ray.util.state import list_actors

    rows = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name == f"ServeReplica:{APP}:Predictor"]
    assert len(rows) == 1, [(a.class_name, a.pid) for a in rows]
    return int(rows[0].pid)


def _predictor_stats() -> dict:
    from ray import serve

    handle = serve.get_deployment_handle("Predictor", app_name=APP)
    return handle.stats.remote().result(timeout_s=60)


def _one_pass(client) -> None:
    """Every pair once, recomputed (no prediction cache): each must be a real answer of its model."""
    for pair in PAIRS:
        r = client.get(f"/api/predictions/{pair}", params={"bypassCache": "true"})
        assert r.status_code == 200, (pair, r.status_code, r.text[:300])
        pred = r.json()["prediction"]
        assert not pred["fallback"], (pair, pred)


def test_fifty_configured_pairs_are_served_by_real_models_with_a_bounded_lru_and_memory(many):
    from deployments.predictor import MAX_MODELS_PER_REPLICA

    c, version = many["client"], many["version"]
    pairs = c.get("/api/pairs").json()["pairs"]
    assert sorted(p["pair"] for p in pairs) == PAIRS

    # every configured pair at once: 50 models through an LRU of 8 on one replica
    r = c.get("/api/predictions")
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert body["count"] == N_PAIRS and sorted(body["predictions"]) == PAIRS
    for pair, pred in body["predictions"].items():
        assert not pred["fallback"] and pred["modelVersion"] == version, (pair, pred)

    pid = _predictor_pid()
    _one_pass(c)
    rss_first = _rss_mb(pid)
    loads_first = _predictor_stats()["modelLoads"]
    for _ in range(MORE_PASSES):
        _one_pass(c)
        stats = _predictor_stats()
        assert len(stats["models"]) <= MAX_MODELS_PER_REPLICA, stats["models"]
    rss_after = _rss_mb(pid)
    assert _predictor_pid() == pid  # the same replica served every pass
    # 50 models in pair order through an LRU of 8: every request of every pass loaded its model
    assert stats["modelLoads"] - loads_first >= MORE_PASSES * N_PAIRS, stats
    assert stats["loadErrors"] == 0, stats
    growth = rss_after - rss_first
    loads = stats["modelLoads"] - loads_first
    assert loads * many["weights_mb"] > 4 * RSS_GROWTH_BOUND_MB, "the model is too small for the bound to mean much"
    print(f"predictor RSS {rss_first:.1f} MB after one pass, {rss_after:.1f} MB after {MORE_PASSES} more "
          f"({growth:+.1f} MB over {loads} model loads of {many['weights_mb']:.2f} MB weights); "
          f"models held: {len(stats['models'])}")
    assert growth < RSS_GROWTH_BOUND_MB, (rss_first, rss_after)
