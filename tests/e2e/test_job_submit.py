"""`ray job submit` trains through the cluster's TrainingQueue, like an operator would do it.

A separate Ray head (`ray start --head --block`, its own free ports and temp dir, no auth) with a temp
TBML_DATA_DIR; the Storage and TrainingQueue actors are created as `tbml up` does
(`python -m actors.training_queue`); then the documented command uploads this checkout as the job's
working directory and runs `python -m cluster.submit_training`, which follows the job to the end.
The head is stopped by signalling the `ray start --block` process we started (which tears down the
processes it launched), never with `ray stop` (that would kill every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # this checkout's code, also when the venv's editable install points elsewhere
    sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
NAMESPACE = "tbml-e2e-jobs"
# Uploaded with the job: the code, not the VCS history, the venv or data (.gitignore covers the rest).
EXCLUDES = ["/.git/", "/.venv/", "/data/", "/.pytest_cache/", "/.ruff_cache/", "*.egg-info/"]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def job_submit_command(dashboard: str, *entrypoint_args: str) -> list[str]:
    """The documented `ray job submit` command (see the module docstring of cluster/submit_training.py)."""
    return [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
            "--", "python", "-m", "cluster.submit_training", *entrypoint_args]


@pytest.fixture
def ray_head(tmp_path):
    gcs, dash, client, agent, agent_grpc, metrics, rt_agent = _free_ports(7)
    temp_dir = Path(f"/tmp/tbml-js-{gcs}")  # short: Ray's socket paths must stay under 108 bytes
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TBML_") and k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update({
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "TBML_DATA_DIR": str(data_dir),
        "TBML_DATA__SYNTHETIC__HISTORY_BARS": "2500",  # a small history: a quick real training
        "PYTHONPATH": str(REPO),
        # `python` in the job's entrypoint is this venv's interpreter
        "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]),
    })
    log = (tmp_path / "ray-head.log").open("w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={rt_agent}", "--object-store-memory=150000000",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
               "data_dir": data_dir, "log": tmp_path / "ray-head.log"}
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait(timeout=10)
        from cluster.ops.processes import head_processes, terminate

        left = head_processes(temp_dir)  # anything left of *this* head (by temp dir)
        if left:
            terminate(left, 5.0)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(cmd: list[str], env: dict, timeout: float = 480) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_ray_job_submit_trains_through_the_queue(ray_head):
    env = ray_head["env"]
    setup = _run([str(BIN / "python"), "-m", "actors.training_queue", "--address", ray_head["address"],
                  "--namespace", NAMESPACE], env, timeout=180)
    assert setup.returncode == 0, f"{setup.stdout}\n{setup.stderr}"
    info = json.loads(setup.stdout.strip().splitlines()[-1])
    assert info["queue"]["namespace"] == NAMESPACE

    cmd = job_submit_command(ray_head["dashboard"], "--pair", "BTC", "--model", "lstm", "--epochs", "2",
                             "--priority", "5", "--namespace", NAMESPACE)
    proc = _run(cmd, env)
    out = proc.stdout + proc.stderr
    print(out[-4000:])  # shown with -s / on failure
    assert proc.returncode == 0, f"ray job submit failed ({proc.returncode}):\n{out[-6000:]}"
    assert "queued position=1" in out
    assert re.search(r"training attempt=1/2 epoch=[12]/2 loss=\S+ val_loss=\S+", out), out[-3000:]
    assert " completed version=" in out
    assert "succeeded" in out  # ray job submit's own verdict

    from ml.storage.store import Storage

    versions = Storage.reader(ray_head["data_dir"]).list_versions("BTC", "lstm")
    assert len(versions) == 1 and versions[0]["jobId"].startswith("BTC_lstm_")

    # the same gate: BTC/lstm is cooling down now -> refused, exit 2 (run directly: no upload needed)
    again = _run([str(BIN / "python"), "-m", "cluster.submit_training", "--address", ray_head["address"],
                  "--namespace", NAMESPACE, "--pair", "BTC"], env, timeout=120)
    assert again.returncode == 2 and "refused: cooldown" in again.stderr, again.stderr
    # no queue in that namespace -> a clear error, exit 2
    missing = _run([str(BIN / "python"), "-m", "cluster.submit_training", "--address", ray_head["address"],
                    "--namespace", "nobody-here", "--pair", "ETH"], env, timeout=120)
    assert missing.returncode == 2 and "no TrainingQueue actor" in missing.stderr, missing.stderr
