"""`tbml up --detach` / `tbml down` like a user: a temporary data dir, free ports, a real Ray head.

Checks that the service comes up (Redis, Ray head, actors, market feed, Serve when the app exists),
that candles exist and are current and the feed keeps ticking, and that `tbml down` leaves nothing
behind that `up` started -- while the test session's own Ray cluster (a different cluster on the
same machine) survives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # this checkout's code, also when the venv's editable install points elsewhere
    sys.path.insert(0, str(REPO))


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _alive(pid: int, start: int | None) -> bool:
    from cluster.ops.processes import proc_alive

    return proc_alive(pid, start)


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


class Service:
    """One `tbml` installation under test: its environment, ports and data directory."""

    def __init__(self, tmp_path: Path, *, auth: bool) -> None:
        taken: set[int] = set()
        self.ports = {name: _free_port(taken) for name in ("http", "dashboard", "ray", "redis", "metrics")}
        self.data_dir = tmp_path / "data"
        self.temp_dir = Path(f"/tmp/tbml-ray-{self.ports['ray']}")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TBML_") and k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env["TBML_DATA_DIR"] = str(self.data_dir)
        env["PYTHONPATH"] = str(REPO)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["TBML_METRICS__EXPORT_PORT"] = str(self.ports["metrics"])  # Ray's Prometheus export (docs/metrics.md)
        self.token_path = None
        if auth:
            env.pop("RAY_AUTH_MODE", None)  # the default for `make run`: token auth on
            self.token_path = tmp_path / "ray_auth_token"  # not ~/.ray: a test must not touch $HOME
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        self.env = env

    def tbml(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def up(self) -> subprocess.CompletedProcess:
        p = self.ports
        return self.tbml("up", "--detach", "--no-train", "--http-port", str(p["http"]),
                         "--dashboard-port", str(p["dashboard"]), "--ray-port", str(p["ray"]),
                         "--redis-port", str(p["redis"]), "--object-store-mb", "150", "--feed-interval", "1")

    def state(self) -> dict | None:
        from ml.storage.atomic import read_json_document

        try:
            return read_json_document(self.data_dir / "run" / "state.json", restore=False)
        except FileNotFoundError:
            return None

    def status(self) -> dict:
        proc = self.tbml("status", "--json", timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def cleanup(self) -> None:
        """Whatever happened: stop what the state file names, then remove the head's temp dir."""
        if self.state() is not None:
            self.tbml("down", timeout=240)
        from cluster.ops.processes import head_processes, terminate

        leftovers = head_processes(self.temp_dir)
        if leftovers:
            terminate(leftovers, 5.0)
        logs = self.temp_dir / "session_latest" / "logs"
        if logs.is_dir():  # keep Ray's logs with the test's tmp dir (pytest keeps the last runs)
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(logs, self.data_dir.parent / "ray-logs", symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def service_factory(tmp_path):
    made: list[Service] = []

    def make(auth: bool = False) -> Service:
        svc = Service(tmp_path, auth=auth)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.cleanup()


def _assert_started(svc: Service, proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"tbml up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    state = svc.state()
    assert state is not None, "tbml up wrote no run state"
    assert state["mode"] == "detached" and state["namespace"] == "tbml"
    assert state["redis"]["managed"] and state["redis"]["port"] == svc.ports["redis"]
    assert state["ray"]["tempDir"] == str(svc.temp_dir)
    core = state["ray"]["core"]
    assert {"gcs", "raylet"} <= set(core), core
    for info in core.values():
        assert _alive(info["pid"], info["start"])
    out = proc.stdout
    assert f"http://127.0.0.1:{svc.ports['dashboard']}" in out  # dashboard URL (and the job-submit address)
    assert f"Metrics    http://127.0.0.1:{svc.ports['metrics']}/metrics" in out
    assert "ray job submit --address" in out
    return state


def _snapshot(state: dict) -> dict[int, int]:
    """Every process the started service consists of right now (Redis + the head's whole tree)."""
    from cluster.ops.processes import head_processes

    procs = head_processes(state["ray"]["tempDir"])
    procs[state["redis"]["pid"]] = state["redis"]["start"]
    return procs


def _assert_stopped(svc: Service, state: dict, procs: dict[int, int]) -> None:
    from cluster.ops.processes import head_processes

    down = svc.tbml("down", timeout=240)
    assert down.returncode == 0, f"tbml down failed:\n{down.stdout}\n{down.stderr}"
    assert svc.state() is None, "tbml down left the run state behind"
    assert not (svc.data_dir / "run" / "state.json.bak").exists()
    deadline = time.monotonic() + 30  # a slow machine reaps slowly; this is a limit, not a timing claim
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in procs.items()):
        time.sleep(0.2)
    left = [p for p, s in procs.items() if _alive(p, s)]
    assert not left, f"processes left behind: {left}"
    assert not _alive(state["redis"]["pid"], state["redis"]["start"])
    assert head_processes(svc.temp_dir) == {}
    for name, port in svc.ports.items():
        assert _port_free(port), f"{name} port {port} still answers after tbml down"
    again = svc.tbml("down", timeout=60)
    assert again.returncode == 0 and "nothing to stop" in again.stdout


def _wait_supervisor(svc: Service, timeout_s: float = 30.0) -> dict:
    """The supervisor's entry in the run state once the foreground `up` has handed over to it."""
    deadline = time.monotonic() + timeout_s
    sup = None
    while time.monotonic() < deadline:
        sup = (svc.state() or {}).get("supervisor") or {}
        if sup.get("active") and "attempts" in sup and sup.get("mode") == "foreground":
            return sup
        time.sleep(0.2)
    pytest.fail(f"no active supervisor in the run state: {sup}")


def test_up_serves_feeds_and_down_leaves_nothing(service_factory, ray_cluster):
    import ray

    from ml.clock import last_closed_bar_ts
    from ml.config import load_settings
    from ml.data.store import CandleStore

    svc = service_factory(auth=False)
    state = _assert_started(svc, svc.up())
    procs = _snapshot(state)

    # Redis answers on its port
    with socket.create_connection(("127.0.0.1", svc.ports["redis"]), timeout=2) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(16).startswith(b"+PONG")

    # HTTP: /api/ping then /api/health through Serve
    if state["serve"]["deployed"]:
        base = f"http://127.0.0.1:{svc.ports['http']}"
        code, body = _get(f"{base}/api/ping")
        assert code == 200 and json.loads(body) == {"ok": True}, (code, body[:300])
        deadline = time.monotonic() + 60
        while True:
            code, body = _get(f"{base}/api/health", timeout=30)
            if code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        health = json.loads(body)
        assert code == 200 and health["status"] in ("healthy", "degraded"), (code, body[:500])
        assert health["components"]["redis"]
        # detached: nothing supervises (docs/operations.md, Supervision), and health says so
        assert health["supervisor"]["active"] is False, health.get("supervisor")
        assert state["supervisor"]["active"] is False and state["supervisor"]["mode"] == "detached"
    serve_missing = None if state["serve"]["deployed"] else state["serve"].get("reason")

    # candles: the embedded history exists and is current; the feed keeps ticking
    settings = load_settings(environ={"TBML_DATA_DIR": str(svc.data_dir)})
    store = CandleStore(svc.data_dir, settings.timeframe)
    tf = settings.timeframe_ms
    for pair in settings.pairs:
        cov = store.coverage(pair)
        assert cov and cov["bars"] >= settings.data.synthetic.history_bars - 1, (pair, cov)
        assert cov["end"] >= last_closed_bar_ts(tf) - tf, (pair, cov)
    first = svc.status()
    assert first["running"] and all(first["processes"].values()), first["processes"]
    feed1 = first["live"]["feed"]
    assert feed1["source"] == "synthetic" and feed1["errors"] == 0, feed1
    deadline = time.monotonic() + 60  # the feed ticks every second; this is a limit, not a timing claim
    feed2 = svc.status()["live"]["feed"]
    while feed2.get("ticks", 0) <= feed1["ticks"] and time.monotonic() < deadline:
        time.sleep(0.5)
        feed2 = svc.status()["live"]["feed"]
    assert feed2["ticks"] > feed1["ticks"], (feed1, feed2)

    # Ray's metrics export on the configured port (printed, in the status), with the feed's numbers
    metrics_url = f"http://127.0.0.1:{svc.ports['metrics']}/metrics"
    assert state["ray"]["metricsPort"] == svc.ports["metrics"] and first["metrics"]["url"] == metrics_url
    deadline = time.monotonic() + 60  # Ray reports every 10 s by default; a limit, not a timing claim
    code, body = _get(metrics_url)
    while b"ray_tbml_feed_lag_bars{" not in body and time.monotonic() < deadline:
        time.sleep(1)
        code, body = _get(metrics_url)
    assert code == 200 and b"ray_tbml_feed_lag_bars{" in body, (code, body[-500:])
    now_last = last_closed_bar_ts(tf)
    for pair in settings.pairs:
        assert feed2["coverage"][pair]["end"] >= now_last - tf, feed2["coverage"][pair]

    # a second `up` on the same data dir is refused while the first one runs
    again = svc.tbml("up", "--detach", "--no-train", timeout=60)
    assert again.returncode == 2 and "already running" in again.stderr, (again.stdout, again.stderr)

    _assert_stopped(svc, state, _snapshot(state) | procs)

    # the test session's own Ray cluster is a different cluster: it must have survived
    assert ray.is_initialized()
    assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42
    if serve_missing:
        pytest.fail(f"Serve was not deployed: {serve_missing}")


def test_foreground_up_with_token_auth_stops_on_sigint(service_factory):
    """What `make run` does: `tbml up` in the foreground, RAY_AUTH_MODE unset (token auth on).

    The head requires Ray's token; tbml and `ray job submit` (with RAY_AUTH_MODE=token) use it;
    Ctrl-C (SIGINT) stops everything that was started.
    """
    svc = service_factory(auth=True)
    p = svc.ports
    log_path = svc.data_dir.parent / "fg.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--no-train", "--http-port", str(p["http"]),
             "--dashboard-port", str(p["dashboard"]), "--ray-port", str(p["ray"]), "--redis-port", str(p["redis"]),
             "--object-store-mb", "150"],
            cwd=REPO, env=svc.env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if "Press Ctrl-C" in log_path.read_text():
                break
            time.sleep(0.5)
        output = log_path.read_text()
        assert proc.poll() is None and "Press Ctrl-C" in output, output
        assert "token auth ON" in output
        state = svc.state()
        assert state["mode"] == "foreground" and state["owner"]["pid"] == proc.pid
        sup = _wait_supervisor(svc)
        assert sup["restarts"] == {"redis": 0, "feed": 0, "monitor": 0} and sup["lastFailure"] is None, sup
        assert state["auth"] == {"mode": "token", "tokenSource": "RAY_AUTH_TOKEN_PATH",
                                 "tokenPath": str(svc.token_path)}
        token = svc.token_path.read_text().strip()
        assert len(token) >= 32 and (svc.token_path.stat().st_mode & 0o077) == 0
        procs = _snapshot(state)

        dash = f"http://127.0.0.1:{p['dashboard']}"
        code, _ = _get(f"{dash}/api/version")
        assert code == 401, f"the dashboard answered {code} without a token"
        code, body = _get(f"{dash}/api/version", headers={"Authorization": f"Bearer {token}"})
        assert code == 200 and b"ray_version" in body

        # tbml connects with the token (status talks to the feed actor through Ray)
        report = svc.status()
        assert report["live"].get("feed", {}).get("source") == "synthetic", report["live"]

        # a shell client: RAY_AUTH_MODE=token + the token file; `python` in the job is the venv's
        env = dict(svc.env, RAY_AUTH_MODE="token")
        job = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", dash, "--", "python", "-c",
             "import ray, ml.config; ray.init(); print('JOB-OK', ray.get_runtime_context().namespace)"],
            env=env, capture_output=True, text=True, timeout=180, cwd="/tmp",
        )
        assert job.returncode == 0 and "JOB-OK" in job.stdout, (job.stdout[-2000:], job.stderr[-2000:])

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=180) == 0, log_path.read_text()
        assert svc.state() is None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid, st) for pid, st in procs.items()):
            time.sleep(0.2)
        left = [pid for pid, st in procs.items() if _alive(pid, st)]
        assert not left, f"left behind: {left}\n{log_path.read_text()}"
        for name, port in p.items():
            assert _port_free(port), f"{name} port {port} still answers after Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
