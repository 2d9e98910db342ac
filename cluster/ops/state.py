"""The run state, `{data_dir}/run/state.json`: what `tbml up` started, written as each piece starts.

It is the list `down` (and a start that fails half-way) stops, and nothing else: the PIDs with
their start times of Redis and of the Ray head's core processes, the head's private temp dir, and
whether Serve was deployed. Keys (version 1): version, startedAt, dataDir, namespace, mode, owner,
auth, redis, ray, serve, feed, training, supervisor (restarts per piece and the last failure, kept
current by `cluster.ops.supervisor`; a restarted Redis replaces the `redis` entry).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cluster.ops.errors import UpError
from cluster.ops.processes import head_processes, proc_alive, proc_start_time
from ml.clock import now_ms
from ml.storage.atomic import BACKUP_SUFFIX, ChecksumError, atomic_write_json, read_json_document

RUN_DIR = "run"
STATE_NAME = "state.json"
STATE_VERSION = 1


def run_dir(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser().resolve() / RUN_DIR


def state_path(data_dir: str | Path) -> Path:
    return run_dir(data_dir) / STATE_NAME


def new_state(data_dir: Path, namespace: str, auth: dict[str, Any], *, detach: bool) -> dict[str, Any]:
    """The run state of a start that has started nothing yet."""
    return {
        "version": STATE_VERSION, "startedAt": now_ms(), "dataDir": str(data_dir),
        "namespace": namespace, "mode": "detached" if detach else "foreground",
        "owner": None if detach else {"pid": os.getpid(), "start": proc_start_time(os.getpid())},
        "auth": auth, "redis": None, "ray": None, "serve": None, "feed": None, "training": [],
        "supervisor": None,
    }


def read_state(data_dir: str | Path) -> dict[str, Any] | None:
    path = state_path(data_dir)
    try:
        state = read_json_document(path, restore=False)
    except FileNotFoundError:
        return None
    except ChecksumError as exc:
        raise UpError(f"the run state {path} is damaged ({exc}); stop the service's processes by hand "
                      f"and delete {path}") from exc
    return state if isinstance(state, dict) else None


def write_state(data_dir: str | Path, state: dict[str, Any]) -> None:
    atomic_write_json(state_path(data_dir), state)


def remove_state(data_dir: str | Path) -> None:
    path = state_path(data_dir)
    Path(str(path) + BACKUP_SUFFIX).unlink(missing_ok=True)  # first: a backup alone would resurrect it
    path.unlink(missing_ok=True)

def state_processes(state: dict[str, Any]) -> dict[str, bool]:
    """Which recorded processes are still alive (by PID and start time)."""
    out = {}
    owner = state.get("owner") or {}
    if owner.get("pid"):
        out["owner"] = proc_alive(owner["pid"], owner.get("start"))
    redis = state.get("redis") or {}
    if redis.get("pid"):
        out["redis"] = proc_alive(redis["pid"], redis.get("start"))
    ray_state = state.get("ray") or {}
    for name in ("gcs", "raylet"):
        info = (ray_state.get("core") or {}).get(name)
        if info:
            out[name] = proc_alive(info["pid"], info.get("start"))
    if ray_state.get("tempDir") and "gcs" not in out:
        out["ray"] = bool(head_processes(ray_state["tempDir"]))
    return out


def is_running(state: dict[str, Any] | None) -> bool:
    return bool(state) and any(state_processes(state).values())


def gcs_alive(state: dict[str, Any]) -> bool:
    """Whether the recorded GCS still runs (a driver can then connect to the head)."""
    gcs = ((state.get("ray") or {}).get("core") or {}).get("gcs")
    return bool(gcs) and proc_alive(gcs["pid"], gcs.get("start"))
