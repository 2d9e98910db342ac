"""The service `make chaos` runs its faults against: `tbml up` in a temporary data directory on free
loopback ports (as tests/e2e/test_up_down.py starts it: detached, or in the foreground when `tbml up`
has a supervisor that restarts what dies, cluster.ops.supervisor), a production model per pair trained
in-process beforehand, and the ways to find a process to kill: the run state for Redis, Ray's state
API (through the head's dashboard) for actors, Serve replicas and Ray Train workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_http import _free_port, _wait_http

REPO = Path(__file__).resolve().parent.parent


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = _free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    return ports


def pretrain(data_dir: Path, pairs: list[str], *, epochs: int, bars: int) -> dict[str, str]:
    """A production lstm per pair, trained in-process and registered with ml.registry (promoted, or
    set as production when the promotion rule says no: the faults need a model to serve)."""
    from ml.data.sources import synthetic_candles
    from ml.registry.versions import Registry
    from ml.storage.store import Storage
    from ml.training.config import TrainConfig
    from ml.training.local import train_local

    versions = {}
    storage = Storage(data_dir, writer_lock=True)
    try:
        registry = Registry(storage)
        for pair in pairs:
            cfg = TrainConfig.from_settings(pair, "lstm", epochs=epochs, bars=bars, threads=1)
            meta = registry.register(pair, train_local(cfg, synthetic_candles(pair, bars=bars)))
            if not meta["promotion"]["promoted"]:
                storage.set_production(pair, "lstm", meta["version"], "chaos: forced")
            versions[pair] = meta["version"]
    finally:
        storage.close()
    return versions


class ChaosService:
    """One `tbml up --detach` of the harness: environment, ports, data directory, and teardown."""

    def __init__(self, env_overrides: dict[str, str]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="tbml-chaos-"))
        self.data_dir = self.tmp / "data"
        self.data_dir.mkdir()
        self.ports = free_ports(("http", "dashboard", "ray", "redis"))
        self.temp_dir = Path(f"/tmp/tbml-ray-{self.ports['ray']}")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TBML_") and k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env.update({"TBML_DATA_DIR": str(self.data_dir), "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "disabled"})
        env.update(env_overrides)
        self.env = env
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard']}"
        self.own_redis: subprocess.Popen | None = None   # a Redis the harness had to restart itself
        self.up_output = ""
        self.foreground: subprocess.Popen | None = None
        self.up_log: Path | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def tbml(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def _up_args(self) -> list[str]:
        p = self.ports
        return ["up", "--no-train", "--http-port", str(p["http"]), "--dashboard-port", str(p["dashboard"]),
                "--ray-port", str(p["ray"]), "--redis-port", str(p["redis"]), "--object-store-mb", "200",
                "--feed-interval", "5"]

    def up(self, timeout_s: float, *, foreground: bool) -> None:
        """`tbml up --detach`, or (`foreground`: when `tbml up` supervises what it started) `tbml up` in
        the foreground as a child process, as `make run` runs it; returns once the API answers."""
        if foreground:
            self.up_log = self.tmp / "up.log"
            with open(self.up_log, "w") as log:
                self.foreground = subprocess.Popen([sys.executable, "-m", "cli", *self._up_args()], cwd=REPO,
                                                   env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.foreground.poll() is None:
                if "Press Ctrl-C" in self.up_log.read_text():
                    break
                time.sleep(0.5)
            self.up_output = self.up_log.read_text()
            if self.foreground.poll() is not None or "Press Ctrl-C" not in self.up_output:
                raise RuntimeError(f"tbml up (foreground) did not start: {self.up_output[-1500:]}")
        else:
            proc = self.tbml(*self._up_args(), "--detach", timeout=timeout_s)
            self.up_output = proc.stdout + proc.stderr
            if proc.returncode != 0:
                raise RuntimeError(f"tbml up failed ({proc.returncode}): {self.up_output[-1500:]}")
        state = self.state() or {}
        if not (state.get("serve") or {}).get("deployed"):
            raise RuntimeError(f"tbml up did not deploy Serve: {(state.get('serve') or {}).get('reason')}")
        _wait_http(self.ports["http"], timeout=120)

    def down(self) -> str:
        """stop(), then remove the temp dirs."""
        out = self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return out

    def stop(self) -> str:
        """Ctrl-C to a foreground `tbml up`, `tbml down`, whatever of the head is left, the Redis the
        harness started; the data directory stays."""
        from cluster.ops.processes import head_processes, terminate

        out = ""
        if self.foreground is not None and self.foreground.poll() is None:
            self.foreground.send_signal(signal.SIGINT)  # Ctrl-C: `tbml up` stops what it started
            try:
                self.foreground.wait(180)
            except subprocess.TimeoutExpired:
                self.foreground.kill()
                self.foreground.wait(10)
        with contextlib.suppress(Exception):
            if self.state() is not None:
                proc = self.tbml("down", timeout=240)
                out = (proc.stdout + proc.stderr)[-600:]
        with contextlib.suppress(Exception):
            leftovers = head_processes(self.temp_dir)
            if leftovers:
                terminate(leftovers, 5.0)
        if self.own_redis is not None and self.own_redis.poll() is None:
            self.own_redis.terminate()
            try:
                self.own_redis.wait(10)
            except subprocess.TimeoutExpired:
                self.own_redis.kill()
        self.foreground = self.own_redis = None
        return out

    # ---- what runs ------------------------------------------------------------------------------
    def state(self) -> dict | None:
        from cluster.ops.state import read_state

        with contextlib.suppress(Exception):
            return read_state(self.data_dir)
        return None

    def redis_record(self) -> dict[str, Any]:
        return (self.state() or {}).get("redis") or {}

    def actors(self) -> list[Any]:
        """Every ALIVE actor of the head (Ray's state API through the dashboard); [] when it does not
        answer in time."""
        from ray.util.state import list_actors

        with contextlib.suppress(Exception):
            return list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000,
                               timeout=10, raise_on_missing_output=False)
        return []

    def find(self, *, name: str | None = None, class_contains: str | None = None) -> list[tuple[int, str]]:
        """(pid, description) of the alive actors with that name or whose class name contains the text."""
        out = []
        for a in self.actors():
            if name is not None and a.name != name:
                continue
            if class_contains is not None and class_contains not in (a.class_name or ""):
                continue
            if a.pid:
                out.append((int(a.pid), f"{a.name or a.class_name} pid {a.pid}"))
        return out

    def wait_replaced(self, old_pid: int, deadline_s: float, **match: str) -> float | None:
        """Seconds until an alive actor matching `match` runs under another PID (None: not in time)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline_s:
            if any(pid != old_pid for pid, _ in self.find(**match)):
                return time.monotonic() - t0
            time.sleep(0.5)
        return None

    def doctor(self, data_dir: Path | None = None, timeout_s: float = 90) -> dict | None:
        """`tbml storage doctor` (no repair; reading is safe while the Storage actor runs); every
        temp file counts (grace 0), the report separates leftovers from damage."""
        try:
            proc = self.tbml("storage", "doctor", "--data-dir", str(data_dir or self.data_dir),
                             "--temp-grace-seconds", "0", timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        with contextlib.suppress(ValueError):
            return json.loads(proc.stdout)
        return None


def sigkill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
