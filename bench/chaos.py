"""`make chaos`: SIGKILL the service's real processes one at a time under load; write docs/reliability.md.

What it does, all on this machine, loopback only, torn down at the end:

1. A temporary data directory with a production lstm per pair (trained in-process), then the service
   as `tbml up --no-train` starts it (bench.chaos_service; in the foreground when `tbml up` has a
   supervisor, cluster.ops.supervisor, else `--detach`): Redis, a Ray head, the Storage, TrainingQueue,
   accuracy monitor and feed actors, the Serve app of serve_config.yaml.
2. Per fault: a save and the history counts, a light load (bench.chaos_load: a few client threads on
   `GET /api/predictions/{pair}` and `GET /api/predictions`) and a poller of `/api/health`; the
   SIGKILL; the load goes on until the service has recovered (or a deadline), then a save, the
   history counts again, and `tbml storage doctor`. Faults: Redis (restarted by `tbml up`'s
   supervisor when there is one, else by the harness, which says so), the Storage actor, a Predictor
   replica, an Ingress replica, the TrainingQueue actor in the middle of a training run, a Ray Train
   worker in the middle of a run; and first, without the cluster, a writer SIGKILLed during 50+
   storage writes (bench.chaos_writer).
3. docs/reliability.md (bench.chaos_report): one row per fault.

Every wait has a deadline; a fault that cannot be injected or measured is recorded as a missing
number with the reason, never a crash, and the next fault runs.
Run: `python -m bench.chaos [--quick] [--only redis,storage,...] [--out FILE]` (or `make chaos`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.chaos_load import HealthPoller, Load, http_json
from bench.chaos_report import FaultResult, WriteRound, doctor_counts, healthy_again, render, summarize
from bench.chaos_service import ChaosService, pretrain, sigkill

OUT = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
PAIRS = ["BTC", "ETH"]
WORKER_ALIVE_S = 20.0
FAULTS = ("redis", "storage", "predictor", "ingress", "queue", "train-worker", "writes")
# the service's settings for the run (recorded in the report): two pairs keep the 2-core machine's
# feed and training light; no cooldown and a short retry backoff let a killed run be retried in time
ENV = {"TBML_PAIRS": "[" + ", ".join(PAIRS) + "]", "TBML_QUEUE__COOLDOWN_MINUTES": "0",
       "TBML_QUEUE__RETRY_BASE_S": "2"}


@dataclass
class Budget:
    """The run's durations (seconds), --quick or not."""

    pre_s: float           # load before the kill
    settle_s: float        # load after the service looks recovered
    recover_s: float       # longest wait for recovery after a kill
    supervisor_s: float    # how long Redis may take to come back by itself before the harness restarts it
    train_epochs: int
    train_s: float         # longest wait for a training to complete
    write_rounds: int
    clients: int
    max_requests: int
    total_s: float         # faults not started after this are recorded as not run

    @classmethod
    def of(cls, quick: bool) -> Budget:
        if quick:
            return cls(2, 3, 30, 15, 4, 150, 3, 2, 3000, 900)
        return cls(3, 4, 45, 20, 6, 150, 6, 3, 6000, 600)


class Run:
    def __init__(self, svc: ChaosService, budget: Budget) -> None:
        self.svc = svc
        self.b = budget
        self.port = svc.ports["http"]
        # one uncached request in the cycle: cached answers alone would never reach a Predictor replica
        self.paths = [f"/api/predictions/{p}" for p in PAIRS] + ["/api/predictions",
                                                                 f"/api/predictions/{PAIRS[0]}?bypassCache=true"]
        self.t_kill: float | None = None  # set by a fault's inject right before its SIGKILL

    # ---- measurement pieces ---------------------------------------------------------------------
    def save_and_count(self, deadline_s: float) -> dict[str, int] | None:
        """POST /api/storage/save, then every pair's history count; None when that fails until the deadline."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline_s:
            code, _ = http_json(self.port, "POST", "/api/storage/save", {}, timeout=30)
            if code == 200:
                counts = {}
                for pair in PAIRS:
                    c, body = http_json(self.port, "GET", f"/api/predictions/{pair}/history?limit=1", timeout=30)
                    if c != 200 or not isinstance(body, dict):
                        break
                    counts[pair] = int(body.get("totalCount", 0))
                if len(counts) == len(PAIRS):
                    return counts
            time.sleep(1.0)
        return None

    def wait_healthy(self, deadline_s: float) -> bool:
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline_s:
            code, body = http_json(self.port, "GET", "/api/health", timeout=5)
            if code == 200 and isinstance(body, dict) and body.get("status") == "healthy":
                return True
            time.sleep(1.0)
        return False

    def serving_fault(self, res: FaultResult, inject: Callable[[FaultResult], Callable[[], bool] | None],
                      before: Callable[[], None] | None = None) -> float | None:
        """Load, kill (inject returns a 'back yet?' check, None when nothing was killed), load until
        recovered, then count, doctor. Returns the monotonic time of the kill."""
        if not self.wait_healthy(self.b.recover_s):
            res.notes.append(f"the service was not healthy within {self.b.recover_s:.0f} s before the fault")
        counts0 = self.save_and_count(self.b.recover_s)
        if before is not None:
            before()
        load = Load(self.port, self.paths, clients=self.b.clients, max_requests=self.b.max_requests,
                    pace_s=0.05).start()
        health = HealthPoller(self.port).start()
        t_fault = None
        try:
            time.sleep(self.b.pre_s)
            self.t_kill = None
            back = inject(res)
            t_fault = self.t_kill if back is not None else None
            if t_fault is not None:
                end = t_fault + self.b.recover_s
                while time.monotonic() < end:
                    if res.back_s is None and back():
                        res.back_s = time.monotonic() - t_fault
                    recent = [r for r in list(load.reqs)[-20:] if r.t0 > t_fault]
                    if res.back_s is not None and health.latest() == "healthy" and recent and recent[-1].good:
                        break
                    time.sleep(0.25)
                time.sleep(self.b.settle_s)
        finally:
            reqs = load.stop()
            polls = health.stop()
        res.summary = summarize(reqs, t_fault)
        if t_fault is not None:
            res.health_left, res.health_back_s = healthy_again(polls, t_fault)
        counts1 = self.save_and_count(self.b.recover_s)
        if counts0 is not None and counts1 is not None:
            res.lost = res.summary.served_records - sum(counts1[p] - counts0[p] for p in PAIRS)
        else:
            res.notes.append("history counts unavailable (save or history endpoint failed until the deadline)")
        res.corrupt, res.leftovers, paths = doctor_counts(self.svc.doctor())
        if paths:
            res.notes.append("doctor: " + ", ".join(paths))
        if res.corrupt is None:
            res.notes.append("tbml storage doctor gave no report")
        return t_fault

    # ---- the faults -----------------------------------------------------------------------------
    def redis(self, res: FaultResult) -> None:
        from cluster.ops.redis import redis_ping, start_redis

        rec = self.svc.redis_record()
        port = int(rec.get("port") or self.svc.ports["redis"])

        def inject(r: FaultResult) -> Callable[[], bool] | None:
            pid = rec.get("pid")
            self.t_kill = t_kill = time.monotonic()
            if not pid or not sigkill(int(pid)):
                r.error = f"no live Redis in the run state ({rec})"
                return None
            r.target = f"redis-server pid {pid} (run state)"
            by = {"who": ""}

            def back() -> bool:
                if not redis_ping(port, timeout=0.3):
                    if time.monotonic() - t_kill < self.b.supervisor_s or by["who"]:
                        return False
                    # no supervisor brought it back: the harness restarts it the way `tbml up` does
                    by["who"] = "harness"
                    try:
                        self.svc.own_redis = start_redis(port, self.svc.data_dir / "run")
                    except Exception as exc:  # noqa: BLE001 - recorded; the fault's numbers say the rest
                        r.notes.append(f"the harness could not start redis-server: {exc}"[:300])
                        return False
                    r.restarted_by = f"harness, after {self.b.supervisor_s:.0f} s without a supervisor restart"
                    r.notes.append("no supervisor restarted Redis within "
                                   f"{self.b.supervisor_s:.0f} s; the harness started redis-server on the same port")
                    return redis_ping(port, timeout=0.3)
                if not by["who"]:
                    now = self.svc.redis_record()
                    by["who"] = "supervisor"
                    r.restarted_by = "supervisor of `tbml up`"
                    if now.get("pid") and int(now["pid"]) != int(pid):
                        r.notes.append(f"new redis-server pid {now['pid']} recorded in the run state")
                return True

            return back

        self.serving_fault(res, inject)
        code, body = http_json(self.port, "GET", "/api/health", timeout=10)
        sup = body.get("supervisor") if isinstance(body, dict) else None
        if isinstance(sup, dict):
            res.notes.append(f"/api/health afterwards: supervisor active={sup.get('active')}, "
                             f"restarts={sup.get('restarts')}, down={sup.get('down')}")

    def _actor_fault(self, res: FaultResult, what: str, **match: str) -> None:
        def inject(r: FaultResult) -> Callable[[], bool] | None:
            found = self.svc.find(**match)
            if not found:
                r.error = f"no alive {what} in Ray's state API"
                return None
            pid, desc = found[0]
            r.target = f"{what}, {desc}"
            self.t_kill = time.monotonic()
            if not sigkill(pid):
                r.error = f"pid {pid} was gone before the kill"
                return None
            r.restarted_by = "Ray (actor restart)" if "name" in match else "Serve controller (new replica)"

            def back() -> bool:
                return any(p != pid for p, _ in self.svc.find(**match))

            return back

        self.serving_fault(res, inject)

    def storage(self, res: FaultResult) -> None:
        self._actor_fault(res, "Storage actor", name="tbml-storage")

    def predictor(self, res: FaultResult) -> None:
        self._actor_fault(res, "Predictor replica", class_contains=":Predictor")

    def ingress(self, res: FaultResult) -> None:
        self._actor_fault(res, "Ingress replica", class_contains=":Ingress")

    # ---- training faults ------------------------------------------------------------------------
    def submit_training(self, pair: str, res: FaultResult | None = None) -> tuple[str | None, str]:
        """Queue a training; a duplicate left by an earlier fault (still queued or training) is
        cancelled first (noted in `res`)."""
        for _ in range(2):
            code, body = http_json(self.port, "POST", f"/api/train/{pair}/lstm",
                                   {"epochs": self.b.train_epochs, "priority": 1}, timeout=30)
            if code == 202 and isinstance(body, dict):
                return body.get("jobId"), ""
            old = body.get("existingJobId") if code == 409 and isinstance(body, dict) else None
            if not old:
                break
            c, _ = http_json(self.port, "DELETE", f"/api/training/job/{old}", {"reason": "chaos: next fault"},
                             timeout=30)
            if res is not None:
                res.notes.append(f"{old} of an earlier fault was still pending: cancelled it (answer {c})")
            time.sleep(2.0)
        return None, f"POST /api/train answered {code}: {str(body)[:200]}"

    def job(self, job_id: str) -> dict | None:
        code, body = http_json(self.port, "GET", f"/api/training/job/{job_id}", timeout=10)
        return body.get("job", body) if code == 200 and isinstance(body, dict) else None

    def wait_mid_run(self, job_id: str, deadline_s: float, res: FaultResult) -> dict | None:
        """The job once it trains, a Ray Train worker is alive, and it has reported an epoch -- or, when
        no epoch comes, after the worker has been alive for WORKER_ALIVE_S (noted). None: not in time."""
        t0 = time.monotonic()
        worker_since = None
        while time.monotonic() - t0 < deadline_s:
            j = self.job(job_id)
            if j and j.get("status") in ("completed", "failed", "cancelled"):
                res.notes.append(f"{job_id} was {j.get('status')} before the kill")
                return None
            if j and j.get("status") == "training":
                if worker_since is None and self.svc.find(class_contains="RayTrainWorker"):
                    worker_since = time.monotonic()
                if worker_since is not None:
                    if ((j.get("progress") or {}).get("epoch") or 0) >= 1:
                        return j
                    if time.monotonic() - worker_since >= WORKER_ALIVE_S:
                        res.notes.append(f"no epoch reported {WORKER_ALIVE_S:.0f} s after the Ray Train worker "
                                         "started: killed then")
                        return j
            time.sleep(0.5)
        return None

    def training_diagnosis(self, job_id: str) -> str:
        """What the job and the cluster's training actors looked like (for a fault that could not run)."""
        j = self.job(job_id) or {}
        keys = ("status", "attempts", "restored", "progress", "error", "startedAt")
        job = {k: j.get(k) for k in keys if j.get(k) is not None}
        classes = sorted({a.class_name for a in self.svc.actors()
                          if any(x in (a.class_name or "") for x in ("Train", "Supervisor", "Queue"))})
        return f"job {job or 'not found'}; alive training actors: {', '.join(classes) or 'none'}"

    def wait_trained(self, job_id: str, t_fault: float, res: FaultResult) -> None:
        """Until the job completes (or fails: then a new one is queued and waited for), within train_s."""
        end = t_fault + self.b.train_s
        current, seen, last = job_id, [], None
        while time.monotonic() < end:
            j = self.job(current)
            if j is not None:
                last = j
                status = j.get("status")
                if status == "completed":
                    res.training_s = time.monotonic() - t_fault
                    restored = f", restored {j['restored']}x after a queue restart" if j.get("restored") else ""
                    seen.append(f"{current}: completed after {j.get('attempts')} attempt(s){restored}")
                    break
                if status in ("failed", "cancelled"):
                    seen.append(f"{current}: {status} ({str(j.get('error') or j.get('cancelReason') or '')[:120]})")
                    new, err = self.submit_training(PAIRS[0], res)
                    if new is None:
                        seen.append(f"a new training was refused: {err}")
                        break
                    seen.append(f"queued {new}")
                    current = new
            time.sleep(1.0)
        else:
            seen.append(f"{current}: still {last.get('status') if last else 'not found'} after "
                        f"{self.b.train_s:.0f} s")
        res.training = "; ".join(seen) or "–"

    def _training_fault(self, res: FaultResult, what: str, **match: str) -> None:
        http_json(self.port, "POST", "/api/training/clear-cooldowns", {"pair": PAIRS[0]}, timeout=10)
        job_id, err = self.submit_training(PAIRS[0], res)
        if job_id is None:
            res.error = err
            return

        def inject(r: FaultResult) -> Callable[[], bool] | None:
            j = self.wait_mid_run(job_id, self.b.train_s * 0.6, r)
            if j is None:
                r.error = f"{job_id} was not seen mid-run within {self.b.train_s * 0.6:.0f} s: " \
                          + self.training_diagnosis(job_id)
                return None
            found = self.svc.find(**match)
            if not found:
                r.error = f"no alive {what} in Ray's state API while {job_id} trained"
                return None
            pid, desc = found[0]
            prog = j.get("progress") or {}
            r.target = f"{what}, {desc} (epoch {prog.get('epoch', 0)}/{prog.get('totalEpochs', '?')})"
            self.t_kill = time.monotonic()
            if not sigkill(pid):
                r.error = f"pid {pid} was gone before the kill"
                return None
            if "name" in match:
                r.restarted_by = "Ray (actor restart)"

            def back() -> bool:
                if "name" in match:
                    return any(p != pid for p, _ in self.svc.find(**match))
                return True  # the worker is not replaced by itself: the run's outcome says what happened

            return back

        t_fault = self.serving_fault(res, inject)
        if "name" not in match:
            res.back_s, res.replaced = None, False  # no process replaces a Train worker; the run's outcome says
        if t_fault is None:
            res.training = f"{job_id}: no fault injected"
            return
        self.wait_trained(job_id, t_fault, res)

    def queue(self, res: FaultResult) -> None:
        self._training_fault(res, "TrainingQueue actor", name="tbml-training-queue")

    def train_worker(self, res: FaultResult) -> None:
        self._training_fault(res, "Ray Train worker", class_contains="RayTrainWorker")

    # ---- writes ---------------------------------------------------------------------------------
    def writes(self, rng: random.Random) -> list[WriteRound]:
        data_dir = self.svc.tmp / "writes"
        data_dir.mkdir(exist_ok=True)
        from bench.chaos_writer import one_round

        return [one_round(data_dir, rng, self.svc.doctor) for _ in range(self.b.write_rounds)]


NAMES = {"redis": "1. redis-server SIGKILL + restart", "storage": "2. Storage actor SIGKILL",
         "predictor": "3a. Predictor replica SIGKILL", "ingress": "3b. Ingress replica SIGKILL",
         "queue": "4. TrainingQueue actor SIGKILL mid-run", "train-worker": "5. Ray Train worker SIGKILL mid-run"}


def supervised() -> bool:
    """Whether `tbml up` supervises what it started (cluster.ops.supervisor): then the harness runs it
    in the foreground, where the supervisor restarts Redis; else detached, and the harness restarts it."""
    return importlib.util.find_spec("cluster.ops.supervisor") is not None


def _say(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:6.0f} s] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases, fewer write rounds (smoke run)")
    ap.add_argument("--only", default="", help=f"comma-separated faults of {','.join(FAULTS)}")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--note", default="", help="run conditions to record in the report")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    wanted = [f for f in FAULTS if not args.only or f in args.only.split(",")]
    budget = Budget.of(args.quick)
    t0 = time.monotonic()
    load_before = os.getloadavg()[0]
    os.environ.update(ENV)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ml.config import get_settings

    get_settings.cache_clear()
    foreground = supervised()
    results: list[FaultResult] = []
    rounds: list[WriteRound] = []
    config = {"service": ("`tbml up --no-train` in the foreground (where its supervisor, cluster.ops.supervisor, "
                          "restarts what dies)" if foreground else "`tbml up --detach --no-train` (no supervisor in this checkout)")
                         + " on free loopback ports, serve_config.yaml as it is, a production lstm per pair "
                           "trained in-process before the start (2 epochs, 3,000 bars)",
              "settings": ", ".join(f"{k}={v}" for k, v in ENV.items()),
              "load": f"{budget.clients} client threads, keep-alive, 50 ms between requests each, cycling "
                      f"/api/predictions/{{{','.join(PAIRS)}}}, /api/predictions and "
                      f"/api/predictions/{PAIRS[0]}?bypassCache=true; at most {budget.max_requests} requests per "
                      "fault, 10 s client timeout",
              "phases": f"{budget.pre_s:g} s of load before each kill, at most {budget.recover_s:g} s to recover, "
                        f"{budget.settle_s:g} s more after; training faults: {budget.train_epochs} epochs, at most "
                        f"{budget.train_s:g} s to complete",
              "commit": _commit()}
    svc = ChaosService(ENV)
    status = 0
    try:
        if "writes" in wanted:  # no cluster needed: first, so it is measured whatever the cluster does
            _say(t0, "6. SIGKILL during storage writes")
            try:
                rounds = Run(svc, budget).writes(random.Random(args.seed))
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                results.append(FaultResult("6. SIGKILL during storage writes", error=f"{type(exc).__name__}: {exc}"))
            for w in rounds:
                print(f"   {w}", flush=True)
        serving = [f for f in wanted if f != "writes"]
        if serving:
            _say(t0, "pre-training a production lstm per pair")
            pretrain(svc.data_dir, PAIRS, epochs=2, bars=3000)
            _say(t0, f"tbml up ({'foreground, supervised' if foreground else 'detached'})")
            try:
                svc.up(timeout_s=420, foreground=foreground)
            except Exception as exc:  # noqa: BLE001 - a supervisor being built may not start yet
                if not foreground:
                    raise
                traceback.print_exc()
                svc.stop()
                foreground = False
                config["service"] = "`tbml up --detach --no-train` (the foreground, supervised start failed: " \
                                    f"{str(exc)[-200:]!r}) on free loopback ports, serve_config.yaml as it is"
                _say(t0, "tbml up (detached, after the foreground start failed)")
                svc.up(timeout_s=420, foreground=False)
        run = Run(svc, budget)
        for name in serving:
            res = FaultResult(NAMES[name])
            if time.monotonic() - t0 > budget.total_s:
                res.error = f"not run: the run's {budget.total_s:.0f} s budget was used up"
                results.append(res)
                continue
            if svc.foreground is not None and svc.foreground.poll() is not None:
                tail = (svc.up_log.read_text()[-300:] if svc.up_log else "").replace("\n", " | ")
                res.error = f"not run: `tbml up` had exited ({svc.foreground.returncode}): {tail}"
                results.append(res)
                continue
            _say(t0, res.name)
            try:
                getattr(run, name.replace("-", "_"))(res)
            except Exception as exc:  # noqa: BLE001 - one fault's harness error must not hide the others
                traceback.print_exc()
                res.error = f"{type(exc).__name__}: {exc}"[:300]
            print(f"   {res}", flush=True)
            results.append(res)
    except Exception as exc:  # noqa: BLE001 - the report says what did not start
        traceback.print_exc()
        results.append(FaultResult("service start", error=f"{type(exc).__name__}: {exc}"[:600]))
        status = 1
    finally:
        _say(t0, "stopping the service")
        with contextlib.suppress(Exception):
            svc.down()
    note = args.note or f"1-min load average {load_before:.1f} at the start (2 cores: above ~2, other processes " \
                        "compete with the service, its training and the load)"
    Path(args.out).write_text(render(results, rounds, quick=args.quick, elapsed_s=time.monotonic() - t0,
                                     config=config, note=note))
    _say(t0, f"wrote {args.out}")
    return status


def _commit() -> str:
    """The checkout's commit, and whether files differ from it (the report is of this code)."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}" + (f" with {len(dirty.splitlines())} modified files" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
