"""`args` of the Serve application, validated once per replica (unknown keys are errors). Ray-free."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DEPLOYMENT_NAMES = ("Ingress", "Features", "Predictor")


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
