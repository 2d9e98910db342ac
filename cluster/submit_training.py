"""Queue a training job on a running cluster and follow it: the `ray job submit` entrypoint.

    python -m cluster.submit_training --pair BTC [--model lstm] [--epochs 5] [--priority 5]
        [--batch-size N] [--learning-rate X] [--horizon H] [--max-attempts K]
        [--address auto] [--namespace tbml] [--no-wait] [--timeout S]

The request goes through the cluster's TrainingQueue actor, the same gate as the HTTP API: priority,
max_concurrent, cooldowns and duplicates apply. While following, one line is printed per change
(queued position, start, every epoch, retry, end).

Exit codes: 0 completed (or queued, with --no-wait); 1 failed or cancelled (or --timeout reached);
2 refused (duplicate, cooldown, paused), bad input, or no queue actor in the namespace.

From a workstation, through the dashboard's job API (the namespace is always named explicitly):

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": ["/.git/", "/.venv/", "/data/"]}' \
        -- python -m cluster.submit_training --pair BTC --model lstm --epochs 5 --namespace tbml

`tbml train` shares this code (cli/train.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ml.queue.jobs import CANCELLED, COMPLETED, FAILED
from ml.queue.requests import InvalidRequest, TrainRequest

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
POLL_S = 0.5
TERMINAL = {COMPLETED: EXIT_OK, FAILED: EXIT_FAILED, CANCELLED: EXIT_FAILED}


class QueueNotRunning(RuntimeError):
    """No TrainingQueue actor in the namespace (the cluster was not started with `tbml up`)."""


def add_request_arguments(parser: argparse.ArgumentParser, *, pair_required: bool = True) -> None:
    """The request options shared by this entrypoint and `tbml train`."""
    parser.add_argument("--pair", required=pair_required, help="pair, e.g. BTC")
    parser.add_argument("--model", default=None, help="model type (default: settings.model.default_type)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs 1-500 (default: settings.training.epochs)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: settings)")
    parser.add_argument("--learning-rate", type=float, default=None, help="learning rate (default: settings)")
    parser.add_argument("--horizon", type=int, default=None, help="label horizon in bars (default: settings)")
    parser.add_argument("--priority", type=int, default=5, help="1 (first) .. 10 (last), default 5")
    parser.add_argument("--max-attempts", type=int, default=None, help="attempts before `failed` (default: settings)")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="auto", help="Ray address (default: auto = the local cluster)")
    parser.add_argument("--namespace", default=None, help="Ray namespace of the service (default: settings, tbml)")
    parser.add_argument("--queue-name", default=None, help=argparse.SUPPRESS)  # tests: a non-default actor
    parser.add_argument("--timeout", type=float, default=None, help="stop following after S seconds (exit 1)")


def request_from_args(args: argparse.Namespace) -> TrainRequest:
    """A validated TrainRequest; raises InvalidRequest with a one-line message."""
    from ml.config import get_settings

    settings = get_settings()
    model = args.model or settings.model.default_type
    req = TrainRequest(pair=(args.pair or "").strip(), model_type=model, epochs=args.epochs,
                       batch_size=args.batch_size, learning_rate=args.learning_rate, horizon=args.horizon,
                       priority=args.priority, max_attempts=args.max_attempts, source="cli")
    return req.validate(settings.model.enabled_types)


def connect(address: str, namespace: str | None) -> str:
    """ray.init against a running cluster in the service's namespace; returns the namespace."""
    import ray

    from ml.config import get_settings

    ns = namespace or get_settings().namespace
    if not ray.is_initialized():
        ray.init(address=address, namespace=ns, log_to_driver=False, logging_level="ERROR")
    return ns


def find_queue(namespace: str, name: str | None = None):
    """The named queue actor; QueueNotRunning when it does not exist."""
    import ray

    from actors.training_queue import QUEUE_ACTOR_NAME

    try:
        return ray.get_actor(name or QUEUE_ACTOR_NAME, namespace=namespace)
    except ValueError:
        raise QueueNotRunning(
            f"no TrainingQueue actor {name or QUEUE_ACTOR_NAME!r} in Ray namespace {namespace!r}: "
            "start the service first (`tbml up` / `make run`) or pass --namespace") from None


def describe(job: dict[str, Any]) -> str:
    """One line for a job's state (what is printed on every change)."""
    status = job.get("status")
    parts = [job.get("jobId", "?"), str(status)]
    if status == "queued":
        parts.append(f"position={job.get('queuePosition')}")
        if job.get("attempts"):
            parts.append(f"retry {job['attempts'] + 1}/{job.get('maxAttempts')} "
                         f"in {job.get('retryInSeconds', 0):.0f}s")
    prog = job.get("progress") or {}
    if status == "training":
        parts.append(f"attempt={job.get('attempts')}/{job.get('maxAttempts')}")
        if prog.get("epoch") is not None:
            parts.append(f"epoch={prog['epoch']}/{prog.get('totalEpochs')}")
            for key, label in (("loss", "loss"), ("valLoss", "val_loss")):
                if prog.get(key) is not None:
                    parts.append(f"{label}={prog[key]:.4f}")
            if prog.get("etaSeconds") is not None:
                parts.append(f"eta={prog['etaSeconds']:.0f}s")
        if job.get("finalizing"):
            parts.append("registering")
    if status == COMPLETED:
        res = job.get("result") or {}
        m = res.get("metrics") or {}
        parts.append(f"version={res.get('version')}")
        if res.get("production") is not None:
            parts.append(f"production={res.get('production')}")
        for key in ("accuracy", "brier", "baselineBrier"):
            if m.get(key) is not None:
                parts.append(f"{key}={m[key]:.4f}")
    if status in (FAILED, CANCELLED) or (status == "queued" and job.get("error")):
        if job.get("cancelReason"):
            parts.append(f"reason={job['cancelReason']}")
        if job.get("error"):
            parts.append(f"error={job['error']}")
    return " ".join(str(p) for p in parts)


def follow(get_job: Callable[[], dict[str, Any] | None], *, out: TextIO = sys.stdout, poll_s: float = POLL_S,
           timeout_s: float | None = None, sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> tuple[int, dict[str, Any] | None]:
    """Poll a job until it ends, printing one line per change. Returns (exit code, last job view)."""
    deadline = None if timeout_s is None else clock() + timeout_s
    last_line, job = None, None
    while True:
        job = get_job()
        if job is None:
            print("job disappeared from the queue", file=out, flush=True)
            return EXIT_FAILED, None
        line = describe(job)
        if line != last_line:
            print(line, file=out, flush=True)
            last_line = line
        if job.get("status") in TERMINAL:
            return TERMINAL[job["status"]], job
        if deadline is not None and clock() >= deadline:
            print(f"timed out after {timeout_s:.0f}s following {job.get('jobId')} (it keeps its place in the queue)",
                  file=out, flush=True)
            return EXIT_FAILED, job
        sleep(poll_s)


def submit_and_follow(queue, request: TrainRequest, *, wait: bool = True, out: TextIO = sys.stdout,
                      err: TextIO = sys.stderr, poll_s: float = POLL_S, timeout_s: float | None = None) -> int:
    """Send the request to the queue actor, print the outcome, follow the job if `wait`."""
    import ray

    outcome = ray.get(queue.submit.remote(request.to_dict()))
    if not outcome.get("accepted"):
        status = outcome.get("status")
        extra = ""
        if outcome.get("existingJobId"):
            extra = f" (existing job {outcome['existingJobId']})"
        elif outcome.get("retryAfterSeconds") is not None:
            extra = f" (retry after {outcome['retryAfterSeconds']:.0f}s)"
        print(f"refused: {status}: {outcome.get('message')}{extra}", file=err, flush=True)
        return EXIT_REFUSED
    job_id = outcome["jobId"]
    print(f"{job_id} queued position={outcome.get('queuePosition')} ({outcome.get('message')})", file=out,
          flush=True)
    if not wait:
        return EXIT_OK
    code, job = follow(lambda: _job_surviving_restarts(queue, job_id, out), out=out, poll_s=poll_s,
                       timeout_s=timeout_s)
    return code


RESTART_WAIT_S = 120.0  # how long a follower waits for a restarting queue actor before giving up


def _job_surviving_restarts(queue, job_id: str, out: TextIO) -> dict[str, Any] | None:
    """The job's view; while the queue actor restarts (it keeps its jobs and adopts its runs), wait
    for it instead of failing the follower."""
    import ray

    deadline = time.monotonic() + RESTART_WAIT_S
    while True:
        try:
            return ray.get(queue.job.remote(job_id), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise
            print(f"queue actor unavailable ({type(exc).__name__}); waiting for its restart", file=out, flush=True)
            time.sleep(1.0)


def run(args: argparse.Namespace, *, wait: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Validate, connect, submit, follow. Raises InvalidRequest / QueueNotRunning for the caller to map."""
    request = request_from_args(args)
    ns = connect(args.address, args.namespace)
    queue = find_queue(ns, getattr(args, "queue_name", None))
    return submit_and_follow(queue, request, wait=wait, out=out, err=err, timeout_s=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.submit_training",
                                     description="queue a training job on the running cluster and follow it")
    add_request_arguments(parser)
    add_cluster_arguments(parser)
    parser.add_argument("--no-wait", action="store_true", help="exit once the job is queued")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse exits 2 on bad usage
    try:
        return run(args, wait=not args.no_wait)
    except InvalidRequest as exc:
        print(f"submit_training: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except QueueNotRunning as exc:
        print(f"submit_training: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ConnectionError as exc:
        print(f"submit_training: error: cannot connect to Ray at {args.address}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("submit_training: interrupted (the job stays queued)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - e.g. the queue actor was killed while we followed
        last = (str(exc).strip().splitlines() or [""])[-1]
        print(f"submit_training: failed: {type(exc).__name__}: {last}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
