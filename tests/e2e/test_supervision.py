"""Supervision of a foreground `tbml up` with real processes: one `tbml up --no-train` for the module,
clients asking for predictions in a thread the whole time.

- SIGKILL of the redis-server `up` started: no request fails, /api/health turns `degraded`, the
  supervisor starts Redis again (same port), health is `healthy` again, and `tbml status --json` and
  /api/health count one Redis restart with the last failure;
- `ray.kill` of the market feed and accuracy monitor actors: the supervisor recreates them and the
  feed ticks again;
- afterwards the service still serves; then the loss of the Ray head (SIGKILL of its GCS) ends the
  run with exit 1 and a clear message, and everything is stopped, the restarted Redis included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from polling import wait_for  # noqa: E402
from test_up_down import Service, _alive, _get, _port_free  # noqa: E402 - the shared `tbml` harness

PAIR = "BTC"
PATHS = (f"/api/predictions/{PAIR}", f"/api/features/{PAIR}", "/api/predictions")
SUPERVISOR_ENV = {  # a Redis outage long enough to be seen; actors checked often (limits, not timings)
    "TBML_SUPERVISOR__CHECK_INTERVAL_S": "0.5",
    "TBML_SUPERVISOR__BACKOFF_INITIAL_S": "4",
    "TBML_SUPERVISOR__ACTOR_CHECK_INTERVAL_S": "2",
}


def _pretrain(data_dir: Path) -> str:
    """A production model of PAIR before the service starts, so predictions run the real model path."""
    from ml.data.sources import synthetic_candles
    from ml.registry.versions import Registry
    from ml.storage.store import Storage
    from ml.training.config import TrainConfig
    from ml.training.local import train_local

    cfg = TrainConfig.from_settings(PAIR, "lstm", epochs=1, bars=1500, seed=7, threads=1)
    result = train_local(cfg, synthetic_candles(PAIR, bars=1500))
    with Storage(data_dir) as storage:
        version = Registry(storage).register(PAIR, result)["version"]
        storage.set_production(PAIR, "lstm", version, "test fixture")
    return version


class Clients(threading.Thread):
    """Prediction requests in a loop; every answer that is not a 200 (or no answer at all) is kept."""

    def __init__(self, base: str) -> None:
        super().__init__(name="prediction-clients", daemon=True)
        self.base = base
        self.stopping = threading.Event()
        self.ok = 0
        self.failures: list[tuple[str, int, str]] = []
        self.fallbacks: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            for path in PATHS:
                code, body = _get(self.base + path, timeout=30)
                if code != 200:
                    self.failures.append((path, code, body[:300].decode(errors="replace")))
                    continue
                self.ok += 1
                if path == PATHS[0]:
                    pred = json.loads(body)["prediction"]
                    if pred.get("fallback"):
                        self.fallbacks.append(str(pred.get("reason"))[:200])
            self.stopping.wait(0.05)

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)


class Foreground:
    """`tbml up --no-train` in the foreground (the supervised mode) and its log."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.log_path = svc.data_dir.parent / "fg.log"
        p = svc.ports
        self.base = f"http://127.0.0.1:{p['http']}"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "up", "--no-train", "--http-port", str(p["http"]),
                 "--dashboard-port", str(p["dashboard"]), "--ray-port", str(p["ray"]),
                 "--redis-port", str(p["redis"]), "--object-store-mb", "150", "--feed-interval", "1"],
                cwd=REPO, env=dict(svc.env, **SUPERVISOR_ENV), stdout=log, stderr=subprocess.STDOUT, text=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        code, body = _get(f"{self.base}/api/health", timeout=30)
        if code not in (200, 503):
            return {"status": f"http {code}"}
        return json.loads(body)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return None
        return self.proc.returncode


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("supervision"), auth=False)
    svc.data_dir.mkdir(parents=True, exist_ok=True)
    _pretrain(svc.data_dir)
    fg = Foreground(svc)
    clients = None
    try:
        wait_for(lambda: fg.proc.poll() is not None or "Press Ctrl-C" in fg.log(), 400, "tbml up started")
        assert fg.proc.poll() is None, fg.log()
        state = svc.state()
        assert state["mode"] == "foreground" and state["serve"]["deployed"], state
        assert _get(f"{fg.base}/api/ping")[0] == 200
        wait_for(lambda: fg.health().get("status") == "healthy", 120, "health healthy after the start")
        clients = Clients(fg.base)
        clients.start()
        yield svc, fg, clients
    finally:
        if clients is not None:
            clients.stop()
        fg.stop()
        svc.cleanup()


def test_sigkill_of_redis_degrades_then_the_supervisor_restarts_it(running):
    svc, fg, clients = running
    state = svc.state()
    old = state["redis"]
    assert state["supervisor"]["active"] and state["supervisor"]["restarts"]["redis"] == 0
    wait_for(lambda: clients.ok >= 6, 120, "clients served before the fault")
    served_before = clients.ok

    t_kill = time.monotonic()
    os.kill(old["pid"], signal.SIGKILL)
    degraded = wait_for(lambda: (h := fg.health()).get("status") == "degraded" and h, 30,
                     "health degraded without Redis", interval=0.1)
    assert degraded["components"]["redis"]["status"] == "degraded", degraded["components"]["redis"]
    assert degraded["supervisor"]["active"], degraded["supervisor"]
    t_degraded = time.monotonic()
    wait_for(lambda: clients.ok >= served_before + 6, 60, "clients served while Redis is down")

    new = wait_for(lambda: (r := (svc.state() or {}).get("redis") or {}).get("pid") not in (None, old["pid"])
                and r, 120, "the supervisor restarted Redis")
    t_restarted = time.monotonic()
    assert new["port"] == old["port"] == svc.ports["redis"] and _alive(new["pid"], new["start"])
    assert not _alive(old["pid"], old["start"])
    healthy = wait_for(lambda: (h := fg.health()).get("status") == "healthy" and h, 60,
                    "health healthy again once Redis is back")
    t_healthy = time.monotonic()
    print(f"\nredis outage (observed, not asserted): degraded after {t_degraded - t_kill:.1f}s, restarted after "
          f"{t_restarted - t_kill:.1f}s (backoff {SUPERVISOR_ENV['TBML_SUPERVISOR__BACKOFF_INITIAL_S']}s), "
          f"healthy after {t_healthy - t_kill:.1f}s; {clients.ok - served_before} answers since the kill")
    assert healthy["components"]["redis"]["status"] in ("healthy", "connected"), healthy["components"]["redis"]
    assert healthy["components"]["redis"]["degraded"] is False, healthy["components"]["redis"]
    # the replicas reconnected by themselves: the new (empty) redis-server gets their cache entries
    import redis as redis_client

    fresh = redis_client.Redis(host="127.0.0.1", port=new["port"], socket_timeout=2)
    wait_for(lambda: fresh.dbsize() > 0, 60, "cache entries in the restarted Redis")
    sup = wait_for(lambda: (s := fg.health()["supervisor"])["restarts"].get("redis") == 1 and s, 60,
                "health counts the Redis restart")
    assert sup["lastFailure"]["piece"] == "redis" and "SIGKILL" in sup["lastFailure"]["reason"], sup

    report = svc.status()
    rsup = report["supervisor"]
    assert rsup["restarts"]["redis"] == 1, rsup
    assert rsup["lastFailure"]["piece"] == "redis" and "SIGKILL" in rsup["lastFailure"]["reason"], rsup
    assert isinstance(rsup["lastFailure"]["at"], int) and rsup["down"] == [], rsup
    assert report["processes"]["redis"], report["processes"]
    assert "supervisor: redis failed (killed by SIGKILL" in fg.log() and "supervisor: redis restarted" in fg.log()

    wait_for(lambda: clients.ok >= served_before + 12, 60, "clients served after the restart")
    assert not clients.failures, clients.failures[:10]
    assert not clients.fallbacks, clients.fallbacks[:10]


def test_killed_feed_and_monitor_actors_are_recreated(running):
    svc, fg, clients = running
    before = svc.status()
    assert "ticks" in before["live"]["feed"] and "error" not in before["live"]["monitor"], before["live"]
    restarts = before["supervisor"]["restarts"]
    address = svc.state()["ray"]["address"]
    kill = subprocess.run(
        [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], namespace='tbml', "
         "log_to_driver=False); [ray.kill(ray.get_actor(n)) for n in sys.argv[2:]]; print('KILLED')",
         address, "tbml-market-feed", "tbml-accuracy-monitor"],
        cwd="/tmp", env=svc.env, capture_output=True, text=True, timeout=180)
    assert kill.returncode == 0 and "KILLED" in kill.stdout, kill.stderr[-2000:]

    def recreated():
        r = svc.status()
        now = r["supervisor"]["restarts"]
        return now["feed"] == restarts["feed"] + 1 and now["monitor"] == restarts["monitor"] + 1 and r

    after = wait_for(recreated, 120, "the supervisor recreated the feed and the monitor")
    assert after["supervisor"]["lastFailure"]["piece"] in ("feed", "monitor"), after["supervisor"]
    assert "error" not in after["live"]["monitor"], after["live"]["monitor"]
    # the new feed actor answers and ticks
    wait_for(lambda: (svc.status()["live"].get("feed") or {}).get("ticks", 0) >= 1, 60, "the recreated feed ticks")
    log = fg.log()
    assert "supervisor: feed restarted" in log and "supervisor: monitor restarted" in log, log[-3000:]
    assert not clients.failures, clients.failures[:10]


def test_still_serving_then_the_loss_of_the_ray_head_ends_the_run(running):
    svc, fg, clients = running
    assert fg.proc.poll() is None, fg.log()
    served = clients.ok
    wait_for(lambda: clients.ok >= served + 3, 60, "clients still served")
    assert _get(f"{fg.base}/api/ping")[0] == 200
    assert fg.health()["status"] == "healthy"
    clients.stop()
    assert not clients.failures, clients.failures[:10]
    print(f"\nsupervision: {clients.ok} answers, none failed; supervisor lines:\n"
          + "\n".join(line for line in fg.log().splitlines() if "supervisor:" in line))

    # the one loss the supervisor does not repair: the run ends (exit 1) and stops the rest
    state = svc.state()
    redis = state["redis"]
    from cluster.ops.processes import head_processes

    procs = head_processes(state["ray"]["tempDir"]) | {redis["pid"]: redis["start"]}
    os.kill(state["ray"]["core"]["gcs"]["pid"], signal.SIGKILL)
    code = fg.proc.wait(timeout=240)
    assert code == 1, fg.log()[-3000:]
    assert "the Ray head is gone: its GCS (gcs_server) exited" in fg.log()
    assert svc.state() is None
    wait_for(lambda: not any(_alive(p, s) for p, s in procs.items()), 30, "every process stopped")
    for name, port in svc.ports.items():
        assert _port_free(port), f"{name} port {port} still answers after the run ended"
