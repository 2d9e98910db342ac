"""One `tbml up` in progress: what was asked, what was planned, and the run state that records
each piece the moment it starts (so a failure part-way stops exactly those pieces)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.ops.options import Printer, UpOptions
from cluster.ops.serve import ServePlan
from cluster.ops.state import write_state


@dataclass
class Launch:
    opts: UpOptions
    out: Printer
    settings: Any
    data_dir: Path
    run: Path                      # {data_dir}/run: the state file, logs, the deployed Serve config
    state: dict[str, Any]
    serve: ServePlan
    redis_port: int
    redis_url_given: str | None    # TBML_REDIS_URL / redis.url: use that Redis, start none
    client_port: int
    agent_port: int
    temp_dir: Path
    auth: dict[str, Any]
    dashboard_url: str
    metrics_port: int = 0          # the head's --metrics-export-port (Prometheus; docs/metrics.md); 0: none
    # filled in by the steps
    redis_proc: subprocess.Popen | None = None
    redis_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    storage: Any = None
    queue: Any = None

    @property
    def namespace(self) -> str:
        return self.state["namespace"]

    def record(self, key: str | None = None, value: Any = None) -> None:
        """Set `state[key]` (when given) and write the run state to disk now."""
        if key is not None:
            self.state[key] = value
        write_state(self.data_dir, self.state)
