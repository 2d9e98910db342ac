"""What the three deployments share: the application arguments, the replica environment, the
feature-window codec (the value cached in Redis under the features key) and model ids.

Ray-free (imports no Ray), so it is cheap to import in every replica and in tests.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ml.config import PAIR_PATTERN

MODEL_ID_SEP = ":"
DEPLOYMENT_NAMES = ("Ingress", "Features", "Predictor")


def now_ms() -> int:
    return int(time.time() * 1000)


class AppArgs(BaseModel):
    """`args` of the application (serve_config.yaml `applications[].args`, or `build_app(args)`).

    Everything is optional: the defaults come from the settings (configs/default.yaml + TBML_*
    environment of the cluster). The first five are shortcuts for settings overrides that every
    replica applies to its environment before it reads the settings, so all replicas agree.
    """

    model_config = ConfigDict(extra="forbid")

    data_dir: str | None = Field(None, description="shared data directory (TBML_DATA_DIR); absolute")
    namespace: str | None = Field(None, description="Ray namespace of the Storage/TrainingQueue actors")
    redis_url: str | None = Field(None, description="Redis for the cache (TBML_REDIS_URL)")
    api_token: str | None = Field(None, description="bearer token for mutating endpoints (TBML_API_TOKEN)")
    pairs: list[str] | None = Field(None, description="configured pairs (TBML_PAIRS)")
    env: dict[str, str] = Field(default_factory=dict, description="more TBML_* variables for every replica")

    snapshot_interval_s: float = Field(1.0, ge=0.0, le=60.0,
                                       description="how stale (candle ts, production version) may be per replica")
    history_flush_s: float = Field(0.25, gt=0.0, le=30.0, description="history records are sent this often")
    history_max_batch: int = Field(500, ge=1, le=10_000)
    history_max_buffer: int = Field(20_000, ge=100)
    actor_timeout_s: float = Field(15.0, gt=0.0, description="timeout of calls to Storage/TrainingQueue actors")
    queue_name: str = Field("tbml-training-queue", min_length=1, max_length=100)
    queue_overrides: dict[str, Any] | None = Field(
        None, description="settings of the TrainingQueue actor when the ingress has to create it")
    monitor: bool = Field(True, description="create the accuracy monitor actor (live accuracy, degraded "
                                            "models) when it is missing; off: leave that to `tbml up`")
    monitor_name: str = Field("tbml-accuracy-monitor", min_length=1, max_length=100)
    monitor_overrides: dict[str, Any] | None = Field(
        None, description="settings of the accuracy monitor when the ingress has to create it (`live` keys, "
                          "pairs, scan_limit); it submits retrains to `queue_name`")

    max_batch_size: int = Field(16, ge=1, le=1024, description="predictor @serve.batch size")
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0,
                                        description="extra wait for a batch to fill (0: batch what is queued)")
    max_models_per_replica: int = Field(8, ge=1, le=256, description="multiplexed models kept per replica (LRU)")
    feature_tail_bars: int = Field(2000, ge=300, le=100_000, description="candles read to compute a window")
    torch_threads: int = Field(1, ge=1, le=64)
    handle_grpc: bool = Field(True, description="deployment-to-deployment calls over Serve's direct gRPC "
                                                "channel instead of Ray actor calls (~40 % less latency per hop)")

    deployments: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-deployment .options() overrides when deploying from Python (serve.run); "
                    "with `serve deploy` put them in the config file's `deployments` list instead")

    def replica_env(self) -> dict[str, str]:
        env = dict(self.env)
        if self.data_dir is not None:
            env["TBML_DATA_DIR"] = self.data_dir
        if self.namespace is not None:
            env["TBML_NAMESPACE"] = self.namespace
        if self.redis_url is not None:
            env["TBML_REDIS_URL"] = self.redis_url
        if self.api_token is not None:
            env["TBML_API_TOKEN"] = self.api_token
        if self.pairs is not None:
            env["TBML_PAIRS"] = json.dumps(list(self.pairs))
        return env


def apply_env(env: dict[str, str]):
    """Set the replica's environment, reload the settings, return them (call first in __init__)."""
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    from ml.config import get_settings

    get_settings.cache_clear()
    return get_settings()


def direct(handle, enabled: bool = True):
    """`handle` set to pass requests by value over the replicas' direct gRPC channel (every Serve
    replica runs that server; `_by_reference=False` is the per-handle switch of Ray 2.5x/2.60 behind
    RAY_SERVE_THROUGHPUT_OPTIMIZED). The handle as it is when disabled or unsupported."""
    if not enabled or handle is None:
        return handle
    try:
        return handle.options(_by_reference=False)
    except (TypeError, ValueError):  # an older/newer Serve without the option
        return handle


def replica_tag() -> str:
    """`<deployment>#<replica id>` of the current replica (or the pid outside Serve)."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return str(ctx.replica_tag if hasattr(ctx, "replica_tag") else ctx.replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a replica
        return f"pid{os.getpid()}"


# --------------------------------------------------------------------------------------- model ids


def model_id(pair: str, model_type: str, version: str) -> str:
    return MODEL_ID_SEP.join((pair, model_type, version))


def parse_model_id(mid: str) -> tuple[str, str, str]:
    parts = mid.split(MODEL_ID_SEP)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"model id must be PAIR:model:version, got {mid!r}")
    import re

    if not re.fullmatch(PAIR_PATTERN, parts[0]):
        raise ValueError(f"invalid pair in model id {mid!r}")
    return parts[0], parts[1], parts[2]


# --------------------------------------------------------------------------------------- windows


def encode_window(frame, *, pair: str, bars: int, feature_hash: str) -> dict[str, Any]:
    """A feature window (DataFrame rows x features, index ts) as a compact JSON value.

    Values travel as base64 of float32 (what the models consume), so a 30 x 136 window is ~22 KB
    of JSON instead of ~100 KB of numbers.
    """
    values = np.ascontiguousarray(frame.to_numpy(dtype=np.float32))
    ts = [int(t) for t in frame.index.to_numpy()]
    return {
        "pair": pair,
        "ts": ts,
        "shape": list(values.shape),
        "dtype": "float32",
        "b64": base64.b64encode(values.tobytes()).decode("ascii"),
        "featureHash": feature_hash,
        "bars": int(bars),
        "extractedAt": now_ms(),
    }


def decode_window(payload: dict[str, Any]) -> np.ndarray:
    rows, cols = (int(x) for x in payload["shape"])
    data = base64.b64decode(payload["b64"])
    return np.frombuffer(data, dtype=np.float32).reshape(rows, cols)


def last_row(payload: dict[str, Any]) -> np.ndarray:
    return decode_window(payload)[-1]


def finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
