"""`tbml up|down|status`: the whole service on this machine (what `make run` / `make stop` call).

    tbml up [--detach] [--http-port P] [--dashboard-port P] [--ray-port P] [--redis-port P] [--no-train]
            [--dashboard-host H] [--feed-interval S] [--num-cpus N] [--object-store-mb M] [--data-dir D]
        Starts Redis (unless TBML_REDIS_URL), a Ray head with its dashboard, the Storage,
        TrainingQueue and market-feed actors, the Serve app of serve_config.yaml, queues the first
        training per pair, prints the URLs. Runs in the foreground until Ctrl-C / SIGTERM, then stops
        everything it started; meanwhile it restarts its Redis, the market feed and the accuracy
        monitor when they die, and ends (exit 1) only when the Ray head is gone. --detach returns
        once it is up (and supervises nothing).
    tbml down [--data-dir D]
        Stops exactly what `tbml up` recorded in {data_dir}/run/state.json ("nothing to stop" otherwise).
    tbml status [--json] [--data-dir D]
        The recorded processes, whether they live, the supervisor's restarts and last failure, and the
        feed, Serve and queue as the cluster sees them.

Exit codes: 0 success; 2 bad input (a port in use, already running); 1 failure. See docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cli import UsageError


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {port}")
    return port


def _positive(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {value}")
    return x


def register(subparsers) -> None:
    up = subparsers.add_parser("up", help="start the service locally (Ray head, Redis, actors, Serve)")
    up.add_argument("--detach", action="store_true", help="return once everything runs (stop with `tbml down`)")
    up.add_argument("--http-port", type=_port, default=None, help="Serve HTTP port (default: serve_config.yaml, 8000)")
    up.add_argument("--dashboard-port", type=_port, default=8265, help="Ray dashboard port (default 8265)")
    up.add_argument("--dashboard-host", default="127.0.0.1",
                    help="address the dashboard binds to (default 127.0.0.1; 0.0.0.0 exposes it)")
    up.add_argument("--ray-port", type=_port, default=6390, help="Ray GCS port (default 6390; not Redis' 6379/6380)")
    up.add_argument("--redis-port", type=_port, default=None, help="port of the Redis started here (default: redis.port, 6380)")
    up.add_argument("--no-train", dest="train", action="store_false", help="do not queue the first training")
    up.add_argument("--feed-interval", type=_positive, default=5.0, help="seconds between market-feed ticks (default 5)")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all available)")
    up.add_argument("--object-store-mb", type=int, default=1024, help="Ray object store size in MB (default 1024)")
    up.add_argument("--serve-config", default=None, help="Serve config file (default: the repo's serve_config.yaml)")
    up.add_argument("--timeout", type=_positive, default=240.0, help="seconds to wait for each start step (default 240)")
    up.add_argument("--data-dir", default=None, help="data directory (default: TBML_DATA_DIR / settings)")
    up.set_defaults(handler=cmd_up)

    down = subparsers.add_parser("down", help="stop what `tbml up` started")
    down.add_argument("--data-dir", default=None, help="data directory (default: TBML_DATA_DIR / settings)")
    down.set_defaults(handler=cmd_down)

    st = subparsers.add_parser("status", help="show what `tbml up` started, whether it runs, what was restarted")
    st.add_argument("--json", action="store_true", help="print the full report as JSON")
    st.add_argument("--no-live", dest="live", action="store_false", help="do not connect to the cluster")
    st.add_argument("--data-dir", default=None, help="data directory (default: TBML_DATA_DIR / settings)")
    st.set_defaults(handler=cmd_status)


def _say(message: str) -> None:
    print(message, flush=True)


def _data_dir(args: argparse.Namespace) -> None:
    if args.data_dir:
        os.environ["TBML_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())


def cmd_up(args: argparse.Namespace) -> int:
    from cluster.ops.errors import UpError, UsageProblem
    from cluster.ops.options import SERVE_CONFIG, UpOptions
    from cluster.ops.up import up

    _data_dir(args)
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UsageError("--num-cpus must be >= 1")
    if args.object_store_mb < 80:
        raise UsageError("--object-store-mb must be >= 80")
    serve_config = Path(args.serve_config) if args.serve_config else SERVE_CONFIG
    if not serve_config.is_file():
        raise UsageError(f"no Serve config at {serve_config}")
    opts = UpOptions(http_port=args.http_port, dashboard_port=args.dashboard_port,
                     dashboard_host=args.dashboard_host, ray_port=args.ray_port, redis_port=args.redis_port,
                     train=args.train, detach=args.detach, feed_interval_s=args.feed_interval,
                     num_cpus=args.num_cpus, object_store_mb=args.object_store_mb, serve_config=serve_config,
                     timeout_s=args.timeout)
    try:
        return up(opts, out=_say)
    except UsageProblem as exc:
        raise UsageError(str(exc)) from None
    except UpError as exc:
        print(f"tbml: failed: {exc}", file=sys.stderr, flush=True)
        return 1


def cmd_down(args: argparse.Namespace) -> int:
    from cluster.ops.down import down
    from cluster.ops.errors import UpError

    _data_dir(args)
    try:
        return down(out=_say)
    except UpError as exc:
        print(f"tbml: failed: {exc}", file=sys.stderr, flush=True)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.ops.errors import UpError
    from cluster.ops.status import format_status, status

    _data_dir(args)
    try:
        report = status(live=args.live)
    except UpError as exc:
        print(f"tbml: failed: {exc}", file=sys.stderr, flush=True)
        return 1
    if args.json:
        print(json.dumps(report, indent=2, default=str), flush=True)
    else:
        print(format_status(report), flush=True)
    return 0
