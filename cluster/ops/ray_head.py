"""The Ray head `tbml up` starts: `ray start --head` on its own GCS port, the dashboard, and a
private `--temp-dir` by which `down` finds exactly this head's processes (unlike plain `ray stop`,
which kills every Ray process of the user)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cluster.ops.auth import auth_env
from cluster.ops.errors import UpError
from cluster.ops.options import REPO_ROOT, UpOptions
from cluster.ops.processes import head_processes, proc_start_time, process_table, tail, terminate, venv_bin


def head_env(opts: UpOptions, data_dir: Path, redis_url: str, auth: dict[str, Any]) -> dict[str, str]:
    """The head's environment, which every Ray worker on this node inherits: the TBML_* settings
    (data dir made absolute, the Redis URL), this venv first on PATH, this checkout first on
    PYTHONPATH, and the auth mode."""
    env = dict(os.environ)
    env.update(opts.extra_env)
    env["TBML_DATA_DIR"] = str(data_dir)
    env["TBML_REDIS_URL"] = redis_url
    if env.get("TBML_CONFIG"):
        env["TBML_CONFIG"] = str(Path(env["TBML_CONFIG"]).expanduser().resolve())
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # `python` in `ray job submit` entrypoints is this venv's interpreter (make run does not activate it).
    venv = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv])
    # Workers import this checkout's code, whatever else the venv points to.
    repo = str(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                  if p and p != repo])
    auth_env(env, auth)
    return env


def ray_start(opts: UpOptions, temp_dir: Path, env: dict[str, str], log_path: Path, *,
              client_port: int, agent_port: int, metrics_port: int | None = None) -> str:
    """`ray start --head`; returns the GCS address (host:port)."""
    num_cpus = opts.num_cpus or len(os.sched_getaffinity(0))
    cmd = [
        venv_bin("ray"), "start", "--head", f"--port={opts.ray_port}",
        f"--dashboard-host={opts.dashboard_host}", f"--dashboard-port={opts.dashboard_port}",
        "--include-dashboard=true", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
        f"--object-store-memory={int(opts.object_store_mb) * 1024 * 1024}", "--disable-usage-stats",
        "--log-style=record", "--log-color=false",
    ]
    if metrics_port:  # Prometheus format on a fixed port (docs/metrics.md)
        cmd.append(f"--metrics-export-port={metrics_port}")
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, timeout=max(60.0, opts.timeout_s / 2))
        except subprocess.TimeoutExpired as exc:
            raise UpError(f"`ray start` did not finish in time; see {log_path}") from exc
    if proc.returncode != 0:
        raise UpError(f"`ray start` failed (exit {proc.returncode}):\n{tail(log_path)}")
    address_file = temp_dir / "ray_current_cluster"
    try:
        address = address_file.read_text().strip()
    except OSError:
        address = ""
    return address or f"127.0.0.1:{opts.ray_port}"


def core_ray_processes(temp_dir: Path) -> dict[str, dict[str, int]]:
    """PIDs of the head's gcs_server and raylet (found by the temp dir in their command lines)."""
    out: dict[str, dict[str, int]] = {}
    marker = f"{str(temp_dir).rstrip('/')}/"
    for pid, (_ppid, cmd) in process_table().items():
        if marker not in cmd:
            continue
        exe = cmd.split("\0", 1)[0]
        for name, suffix in (("gcs", "/gcs_server"), ("raylet", "/raylet")):
            if exe.endswith(suffix):
                st = proc_start_time(pid)
                if st is not None:
                    out[name] = {"pid": pid, "start": st}
    return out


def head_record(opts: UpOptions, temp_dir: Path, dashboard_url: str, client_port: int,
                metrics_port: int | None = None) -> dict[str, Any]:
    """The run-state entry of a head about to start (written before `ray start`, so a crash in it
    is still cleaned up by `down`)."""
    return {"port": opts.ray_port, "tempDir": str(temp_dir), "dashboardPort": opts.dashboard_port,
            "dashboardHost": opts.dashboard_host, "dashboardUrl": dashboard_url,
            "clientPort": client_port, "metricsPort": metrics_port,
            "metricsUrl": f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None, "address": None, "core": {}, "pids": {}}


def started_record(temp_dir: Path, address: str) -> dict[str, Any]:
    """What the entry learns once the head runs: its address and processes."""
    return {"address": address, "core": core_ray_processes(temp_dir),
            "pids": {str(p): s for p, s in head_processes(temp_dir).items()},
            "logs": str(temp_dir / "session_latest" / "logs")}


def stop_head(temp_dir: str | Path, seeds: dict[int, int | None] | None = None,
              grace_s: float = 10.0) -> list[int]:
    """Stop one Ray head (and everything under it) the way `ray stop` orders it, but only that head:
    the raylet first (its workers and agents follow it), then every other process of the head, then
    the GCS last. Each step: SIGTERM, up to a third of `grace_s`, then SIGKILL."""
    procs = head_processes(temp_dir, seeds)
    core = core_ray_processes(Path(temp_dir))
    raylet = {c["pid"]: c["start"] for n, c in core.items() if n == "raylet"}
    gcs = {c["pid"]: c["start"] for n, c in core.items() if n == "gcs"}
    rest = {p: st for p, st in procs.items() if p not in raylet and p not in gcs}
    step = max(1.0, grace_s / 3)
    stopped = terminate(raylet, step)
    stopped += terminate(rest, step)
    stopped += terminate(gcs, step)
    late = head_processes(temp_dir)  # workers orphaned while their raylet died
    if late:
        stopped += terminate(late, 2.0)
    return sorted(set(stopped))


def recorded_seeds(record: dict[str, Any]) -> dict[int, int | None]:
    """The head's processes as the run state recorded them (found again even if renamed)."""
    seeds: dict[int, int | None] = {int(p): s for p, s in (record.get("pids") or {}).items()}
    for info in (record.get("core") or {}).values():
        seeds[int(info["pid"])] = info.get("start")
    return seeds
