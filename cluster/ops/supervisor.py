"""Supervision of a foreground `tbml up`: restart what dies, keep serving, end only with the Ray head.

Two loops share one `Ledger` (restart counts, the last failure, what is down):
- the process loop (the `up` process's main thread, every `supervisor.check_interval_s`) watches the
  Ray head's GCS and raylet -- their loss ends the run, nothing can serve without them -- and the
  redis-server `up` started, which it starts again with the same arguments on the same port after an
  exponential backoff (`supervisor.backoff_*`); the new PID goes into the run state, so `tbml down`
  stops the new one;
- the actor thread (every `supervisor.actor_check_interval_s`) asks the dashboard's state API whether
  the market feed and the accuracy monitor actors live (this process stays no Ray driver: a driver is
  killed when its GCS goes) and, through a short-lived driver, recreates one that is gone or dead
  (`actors.feed.get_or_create_feed`, `actors.accuracy_monitor.get_or_create_monitor_actor`, the same
  arguments as at start) and publishes the ledger through the Storage actor as the document
  `ml.serving.views.SUPERVISOR_DOCUMENT`, which `/api/health` reads.

Meanwhile the Serve replicas keep answering: without Redis their caches serve from process memory
(`ml.cache.client`) and reconnect by themselves. The ledger is also in the run state
(`state["supervisor"]`), which `tbml status` shows.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.ops.driver import run_as_driver
from cluster.ops.errors import UpError
from cluster.ops.options import Printer
from cluster.ops.processes import proc_alive, tail
from cluster.ops.redis import LOG_NAME, managed_record, start_redis
from cluster.ops.state import write_state
from ml.clock import now_ms

HEAD_PROCESSES = ("gcs", "raylet")
LIVE_ACTOR_STATES = frozenset({"ALIVE", "PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY"})
DRIVER_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Backoff:
    """Delay before restart attempt `n` (1 = the first after a failure): initial * factor^(n-1), capped."""

    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.initial_s * self.factor ** max(0, attempt - 1))

    @classmethod
    def from_settings(cls, sup: Any) -> Backoff:
        return cls(sup.backoff_initial_s, sup.backoff_factor, sup.backoff_max_s)


@dataclass
class Piece:
    """One supervised piece: how often it was restarted and when the next attempt is due."""

    name: str
    restarts: int = 0            # successful restarts this run
    attempts: int = 0            # restart attempts this run (successful or not)
    consecutive: int = 0         # failures since it last stayed up `stable_s`
    up_since: float = field(default_factory=time.monotonic)
    down: bool = False
    due: float = 0.0             # monotonic time of the next restart attempt
    delay_s: float = 0.0         # the backoff chosen at the last failure
    gave_up: bool = False


class Ledger:
    """Restarts per piece and the last failure, shared by the two loops; mirrored into the run state
    (written here) and, by the actor thread, into the Storage document."""

    def __init__(self, state: dict[str, Any], data_dir: Path, pieces: list[str], sup: Any, out: Printer) -> None:
        self.state = state
        self.data_dir = data_dir
        self.sup = sup
        self.backoff = Backoff.from_settings(sup)
        self.out = out
        self.lock = threading.RLock()
        self.pieces = {n: Piece(n) for n in pieces}
        self.last_failure: dict[str, Any] | None = None
        self.version = 0           # bumped on every change; the actor thread publishes what it has not
        self.on_change: Callable[[], None] = lambda: None
        self.record()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"active": True, "mode": "foreground",
                    "restarts": {n: p.restarts for n, p in self.pieces.items()},
                    "attempts": {n: p.attempts for n, p in self.pieces.items()},
                    "down": sorted(n for n, p in self.pieces.items() if p.down),
                    "gaveUp": sorted(n for n, p in self.pieces.items() if p.gave_up),
                    "lastFailure": self.last_failure, "updatedAt": now_ms()}

    def record(self) -> None:
        """The ledger into the run state, on disk now."""
        with self.lock:
            self.version += 1
            self.state["supervisor"] = self.snapshot()
            write_state(self.data_dir, self.state)
        self.on_change()

    def failed(self, name: str, reason: str) -> None:
        """`name` died (or a restart of it failed): schedule the next attempt after the backoff."""
        with self.lock:
            p = self.pieces[name]
            now = time.monotonic()
            if not p.down and now - p.up_since >= self.sup.stable_s:
                p.consecutive = 0  # it had been up long enough: start the backoff anew
            p.down = True
            p.consecutive += 1
            p.delay_s = self.backoff.delay(p.consecutive)
            p.due = now + p.delay_s
            limit = self.sup.max_restarts
            if limit and p.attempts >= limit:
                p.gave_up = True
            self.last_failure = {"piece": name, "at": now_ms(), "reason": reason[:500]}
            if p.gave_up:
                self.out(f"supervisor: {name} failed ({reason}); {p.attempts} restart attempt(s) made, the "
                         f"limit (supervisor.max_restarts={limit}): no more restarts, serving without it")
            else:
                self.out(f"supervisor: {name} failed ({reason}); restarting it in {p.delay_s:.1f}s "
                         f"(attempt {p.attempts + 1})")
            self.record()

    def due(self, name: str) -> bool:
        """Whether a restart of the dead piece `name` should be tried now (counts the attempt)."""
        with self.lock:
            p = self.pieces[name]
            if not p.down or p.gave_up or time.monotonic() < p.due:
                return False
            p.attempts += 1
            return True

    def restarted(self, name: str, detail: str) -> None:
        with self.lock:
            p = self.pieces[name]
            p.down = False
            p.restarts += 1
            p.up_since = time.monotonic()
            self.out(f"supervisor: {name} restarted ({detail}); {p.restarts} restart(s) so far")
            self.record()

    def is_down(self, name: str) -> bool:
        with self.lock:
            return self.pieces[name].down


def exit_reason(returncode: int | None) -> str:
    if returncode is None:
        return "gone"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class RedisWatch:
    """The redis-server `up` started: notice its exit, start it again (same port, same arguments)."""

    NAME = "redis"

    def __init__(self, proc: subprocess.Popen, port: int, run: Path, ledger: Ledger) -> None:
        self.proc = proc
        self.port = port
        self.run = run
        self.ledger = ledger

    def check(self) -> None:
        if not self.ledger.is_down(self.NAME):
            code = self.proc.poll()
            if code is None:
                return
            # an exit of its own says why in its log; a killed process wrote nothing about it
            last = tail(self.run / LOG_NAME, 1).strip() if code > 0 else ""
            self.ledger.failed(self.NAME, exit_reason(code) + (f"; last log line: {last}" if last else ""))
        if not self.ledger.due(self.NAME):
            return
        try:
            proc = start_redis(self.port, self.run)
        except UpError as exc:
            self.ledger.failed(self.NAME, f"restart failed: {exc}")
            return
        self.proc = proc
        with self.ledger.lock:  # `tbml down` must stop the new process, not look for the old one
            self.ledger.state["redis"] = managed_record(proc, self.port, self.run)
        self.ledger.restarted(self.NAME, f"pid {proc.pid}, port {self.port}")

    def stop_watching(self) -> None:
        """Reap a restarted process we no longer watch (stop() signals it by the run state)."""
        with contextlib.suppress(Exception):
            self.proc.poll()


@dataclass(frozen=True)
class ActorSpec:
    """A detached actor the supervisor keeps alive, and how `up` created it."""

    piece: str            # name in the ledger
    actor_name: str       # Ray actor name
    kind: str             # "feed" | "monitor"


def _actor_specs() -> list[ActorSpec]:
    from actors.accuracy_monitor import MONITOR_ACTOR_NAME
    from actors.feed import FEED_ACTOR_NAME

    return [ActorSpec("feed", FEED_ACTOR_NAME, "feed"), ActorSpec("monitor", MONITOR_ACTOR_NAME, "monitor")]


def actor_alive(dashboard_url: str, name: str, namespace: str, timeout_s: float = 10.0) -> bool | None:
    """Whether an actor `name` of `namespace` lives (or is being created/restarted), asked through the
    dashboard's state API (no driver needed); None when the API does not answer."""
    from ray.util.state import list_actors

    try:
        actors = list_actors(address=dashboard_url, filters=[("name", "=", name)], timeout=int(timeout_s),
                             raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - the dashboard is busy or restarting: ask again later
        return None
    mine = [a for a in actors if getattr(a, "ray_namespace", namespace) == namespace]
    return any(getattr(a, "state", None) in LIVE_ACTOR_STATES for a in mine)


class ActorWatch(threading.Thread):
    """Keeps the feed and the accuracy monitor alive and publishes the ledger (see the module doc)."""

    def __init__(self, state: dict[str, Any], ledger: Ledger, *, feed_args: dict[str, Any], sup: Any,
                 out: Printer) -> None:
        super().__init__(name="tbml-supervisor-actors", daemon=True)
        self.state = state
        self.ledger = ledger
        self.feed_args = feed_args
        self.sup = sup
        self.out = out
        self.specs = _actor_specs()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.published = 0

    def run(self) -> None:
        next_check = 0.0
        while not self.stopping.is_set():
            if time.monotonic() >= next_check:
                self._check_actors()
                next_check = time.monotonic() + self.sup.actor_check_interval_s
            todo = [s for s in self.specs if self.ledger.due(s.piece)]
            if todo or self.ledger.version != self.published:
                self._driver_pass(todo)
            self.wake.wait(min(self.sup.check_interval_s, max(0.05, next_check - time.monotonic())))
            self.wake.clear()

    def _check_actors(self) -> None:
        ray_state = self.state.get("ray") or {}
        for spec in self.specs:
            if self.stopping.is_set() or self.ledger.is_down(spec.piece):
                continue
            alive = actor_alive(ray_state.get("dashboardUrl", ""), spec.actor_name, self.state["namespace"])
            if alive is False:
                self.ledger.failed(spec.piece, f"actor {spec.actor_name} is gone or dead")

    def _driver_pass(self, todo: list[ActorSpec]) -> None:
        """One short-lived driver: recreate the actors in `todo`, then publish the ledger."""
        settled: set[str] = set()
        published: dict[str, int] = {}

        def work() -> None:
            import ray

            for spec in todo:
                try:
                    detail = self._recreate(spec)
                except Exception as exc:  # noqa: BLE001 - counted as a failed restart
                    self.ledger.failed(spec.piece, f"recreating failed: {type(exc).__name__}: {exc}"[:300])
                else:
                    self.ledger.restarted(spec.piece, detail)
                settled.add(spec.piece)
            version = self.ledger.version
            publish_document(ray, self.state["namespace"], self.feed_args["data_dir"], self.ledger.snapshot())
            published["version"] = version

        finished, error = run_as_driver(self.state, work, DRIVER_TIMEOUT_S, reuse=True)
        problem = None if finished and error is None else (
            "no answer from the cluster in time" if not finished else f"{type(error).__name__}: {error}"[:300])
        for spec in todo:
            if spec.piece not in settled:
                self.ledger.failed(spec.piece, f"recreating failed: {problem}")
        if "version" in published:
            self.published = published["version"]
        elif problem is not None:
            self.out(f"supervisor: could not publish the supervisor document ({problem})")

    def _recreate(self, spec: ActorSpec) -> str:
        import ray

        ns = self.state["namespace"]
        if spec.kind == "feed":
            from actors.feed import get_or_create_feed

            feed = get_or_create_feed(ns, self.feed_args["data_dir"], self.feed_args["pairs"],
                                      self.feed_args["interval_s"])
            ray.get(feed.status.remote(), timeout=60)
        else:
            from actors.accuracy_monitor import get_or_create_monitor_actor

            monitor = get_or_create_monitor_actor(ns, self.feed_args["data_dir"])
            ray.get(monitor.ping.remote(), timeout=60)
        return f"actor {spec.actor_name} recreated"

    def stop(self, timeout_s: float = DRIVER_TIMEOUT_S + 15.0) -> None:
        """Let a driver pass finish: the teardown connects as a driver too, and Ray has one connection
        per process (a pass still running would disconnect it)."""
        self.stopping.set()
        self.wake.set()
        self.join(timeout_s)


def publish_document(ray, namespace: str, data_dir: str, doc: dict[str, Any]) -> None:
    """The supervisor document through the Storage actor (the single writer of the data dir)."""
    from actors.storage import get_or_create_storage_actor
    from ml.serving.views import SUPERVISOR_DOCUMENT

    storage = get_or_create_storage_actor(data_dir, namespace)
    ray.get(storage.put_document.remote(*SUPERVISOR_DOCUMENT, doc), timeout=60)


def initial_document(detach: bool, *, managed_redis: bool) -> dict[str, Any]:
    """The document of a run that has restarted nothing: inactive when detached (nothing supervises)."""
    pieces = ([] if detach else (["redis"] if managed_redis else []) + [s.piece for s in _actor_specs()])
    return {"active": not detach, "mode": "detached" if detach else "foreground",
            "restarts": dict.fromkeys(pieces, 0), "attempts": dict.fromkeys(pieces, 0), "down": [],
            "gaveUp": [], "lastFailure": None, "updatedAt": now_ms()}


def head_lost(state: dict[str, Any]) -> list[str]:
    """The Ray head's core processes (GCS, raylet) that are gone."""
    core = (state.get("ray") or {}).get("core") or {}
    return [n for n in HEAD_PROCESSES if n in core and not proc_alive(core[n]["pid"], core[n].get("start"))]


def supervise(launch: Any, stop_event: threading.Event, out: Printer) -> int:
    """Watch and restart until `stop_event` (0) or the loss of the Ray head (1)."""
    sup = launch.settings.supervisor
    state = launch.state
    pieces = (["redis"] if launch.redis_proc is not None else []) + [s.piece for s in _actor_specs()]
    ledger = Ledger(state, launch.data_dir, pieces, sup, out)
    redis = RedisWatch(launch.redis_proc, launch.redis_port, launch.run, ledger) \
        if launch.redis_proc is not None else None
    feed = state.get("feed") or {}
    actors = ActorWatch(state, ledger, sup=sup, out=out, feed_args={
        "data_dir": str(launch.data_dir), "pairs": list(launch.settings.pairs),
        "interval_s": feed.get("intervalS", launch.opts.feed_interval_s)})
    ledger.on_change = actors.wake.set
    actors.start()
    code = 0
    try:
        while not stop_event.wait(sup.check_interval_s):
            lost = head_lost(state)
            if lost:
                names = " and ".join({"gcs": "GCS (gcs_server)", "raylet": "raylet"}[n] for n in lost)
                out(f"error: the Ray head is gone: its {names} exited. Nothing can serve without it and "
                    "the supervisor does not restart a head; stopping the rest")
                code = 1
                break
            if redis is not None:
                redis.check()
    finally:
        actors.stop()
        if redis is not None:
            redis.stop_watching()
            launch.redis_proc = redis.proc
    return code

