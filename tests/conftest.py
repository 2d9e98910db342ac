"""Shared fixtures: a real redis-server on a free port, and one local Ray cluster per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from polling import free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@dataclass
class RedisServer:
    """A real redis-server process the tests can stop and start again on the same port."""

    port: int
    workdir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found: run `make setup` (installs Debian's redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A running, empty Redis (restarted if a previous test stopped it)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One local Ray cluster for the whole session (2 CPUs, small object store, no auth), exporting its
    metrics in Prometheus format on a free port (as `tbml up` does on metrics.export_port), reported
    every 2 s instead of Ray's 10 s so a test sees a value soon."""
    import ray

    data_dir = tmp_path_factory.mktemp("ray-data")
    metrics_port = free_port()
    os.environ["TBML_DATA_DIR"] = str(data_dir)
    ctx = ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        # As in `make run`: Ray Train reclaims a cancelled run's placement group through the dashboard's
        # services, so a cluster without it keeps a stopped run's CPU reserved.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        namespace="tbml-test",
        runtime_env={"env_vars": {"TBML_DATA_DIR": str(data_dir), "RAY_AUTH_MODE": "disabled"}},
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 2000},
    )
    yield {"context": ctx, "data_dir": data_dir, "namespace": "tbml-test", "metrics_port": metrics_port}
    ray.shutdown()
