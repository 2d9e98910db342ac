"""`tbml down`: stop exactly what the run state says `tbml up` started, then remove the state.

Serve and the detached actors go first, through a short-lived driver (the Storage flushes), then
the Ray head's processes (found by its private temp dir), then the Redis started here. A
foreground `tbml up` still running is asked to do the teardown itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from cluster.ops.driver import run_as_driver
from cluster.ops.options import Printer, settings_fresh
from cluster.ops.processes import proc_alive
from cluster.ops.ray_head import recorded_seeds, stop_head
from cluster.ops.redis import stop_redis
from cluster.ops.state import gcs_alive, read_state, remove_state, run_dir


def graceful_cluster_stop(state: dict[str, Any], out: Printer, timeout_s: float = 60.0) -> None:
    """Serve shutdown and the detached actors (Storage flushes), through a short-lived driver."""
    if not (state.get("ray") or {}).get("address") or not gcs_alive(state):
        return
    result: dict[str, str] = {}

    def work() -> None:
        from cluster.ops.serve import shutdown_serve
        from cluster.ops.service_actors import stop_actors

        if (state.get("serve") or {}).get("deployed"):
            result["serve"] = shutdown_serve()
        result.update(stop_actors(state.get("namespace")))

    finished, error = run_as_driver(state, work, timeout_s, reuse=True)
    if not finished:
        out("  (graceful Serve/actor shutdown timed out; stopping the processes)")
    elif error is not None:
        out(f"  (graceful shutdown incomplete: {f'{type(error).__name__}: {error}'[:300]})")
    else:
        for k, v in result.items():
            out(f"  {k}: {v}")


def stop(state: dict[str, Any], out: Printer = print, grace_s: float = 10.0) -> dict[str, Any]:
    """Stop exactly what `state` says was started; remove the state file. Returns a summary."""
    summary: dict[str, Any] = {"ray": [], "redis": None}
    data_dir = state.get("dataDir")
    graceful_cluster_stop(state, out)
    ray_state = state.get("ray") or {}
    if ray_state.get("tempDir"):
        summary["ray"] = stop_head(ray_state["tempDir"], recorded_seeds(ray_state), grace_s)
        out(f"  ray head: stopped {len(summary['ray'])} process(es)")
        with contextlib.suppress(OSError):
            Path(ray_state["tempDir"], "ray_current_cluster").unlink(missing_ok=True)
    pid = stop_redis(state.get("redis"), grace_s)
    if pid is not None:
        summary["redis"] = pid
        out(f"  redis: stopped (pid {pid})")
    if data_dir:
        remove_state(data_dir)
    return summary


def _ask_owner_to_stop(owner: dict[str, Any], out: Printer, wait_s: float) -> None:
    """SIGTERM the foreground `tbml up` and wait until it has exited (or `wait_s` passed)."""
    out(f"asking the foreground `tbml up` (pid {owner['pid']}) to stop ...")
    with contextlib.suppress(ProcessLookupError):
        os.kill(owner["pid"], signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc_alive(owner["pid"], owner.get("start")):
        time.sleep(0.2)


def down(out: Printer = print, wait_owner_s: float = 180.0) -> int:
    settings = settings_fresh()
    data_dir = Path(settings.data_dir).expanduser().resolve()
    state = read_state(data_dir)
    if state is None:
        out(f"nothing to stop (no run state in {run_dir(data_dir)})")
        return 0
    owner = state.get("owner") or {}
    if owner.get("pid") and owner["pid"] != os.getpid() and proc_alive(owner["pid"], owner.get("start")):
        _ask_owner_to_stop(owner, out, wait_owner_s)
        state = read_state(data_dir)
        if state is None:
            out("stopped")
            return 0
        out("the foreground process did not finish the teardown; stopping the rest here")
    out(f"stopping the service started from {data_dir}")
    stop(state, out=out)
    out("stopped")
    return 0
