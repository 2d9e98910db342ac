"""The Redis `tbml up` starts when no `TBML_REDIS_URL` / `redis.url` is set: `redis-server` on
127.0.0.1 (port `redis.port`, 6380: Ray's GCS would clash on 6379), no persistence, in its own session."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from cluster.ops.errors import UpError
from cluster.ops.processes import proc_alive, proc_start_time, tail, terminate

LOG_NAME = "redis.log"


def redis_ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(port: int, workdir: Path, timeout_s: float = 15.0) -> subprocess.Popen:
    """Start redis-server and wait until it answers PING; its log is `workdir/redis.log`."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise UpError("redis-server not found: run `make setup` (or `sudo apt-get install redis-server`), "
                      "or set TBML_REDIS_URL to use an existing Redis")
    log_path = workdir / LOG_NAME
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(workdir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if redis_ping(port):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with contextlib.suppress(Exception):
        proc.kill()
        proc.wait(5)
    raise UpError(f"redis-server did not start on port {port}:\n{tail(log_path)}")


def managed_record(proc: subprocess.Popen, port: int, workdir: Path) -> dict[str, Any]:
    """The run-state entry of a Redis started here."""
    return {"managed": True, "pid": proc.pid, "start": proc_start_time(proc.pid), "port": port,
            "url": f"redis://127.0.0.1:{port}/0", "log": str(workdir / LOG_NAME)}


def stop_redis(record: dict[str, Any] | None, grace_s: float = 10.0) -> int | None:
    """Stop the Redis of a run-state entry if this service started it; returns its PID if signalled."""
    record = record or {}
    if not (record.get("managed") and record.get("pid")):
        return None
    pid = int(record["pid"])
    if not proc_alive(pid, record.get("start")):
        return None
    terminate({pid: record.get("start")}, grace_s)
    return pid
