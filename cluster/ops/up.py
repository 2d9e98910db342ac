"""`tbml up`: run the whole service on this machine.

It checks that nothing runs from the same data dir and that the asked-for ports are free, then
runs the steps of `cluster.ops.steps` in order (Redis, Ray head, actors, market feed, Serve, first
training), each recording what it started in `{data_dir}/run/state.json`. A failure or a signal
part-way stops exactly what was recorded. Detached, it returns once everything runs; in the
foreground it supervises (`cluster.ops.supervisor`: a dead Redis, market feed or accuracy monitor is
started again) until Ctrl-C / SIGTERM or the loss of the Ray head, and then stops everything.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from cluster.ops.auth import apply_client_auth, resolve_auth
from cluster.ops.down import stop
from cluster.ops.driver import disconnect
from cluster.ops.errors import UsageProblem
from cluster.ops.launch import Launch
from cluster.ops.options import DEFAULT_AGENT_PORT, DEFAULT_CLIENT_PORT, Printer, UpOptions, settings_fresh
from cluster.ops.processes import port_free, port_or_free
from cluster.ops.serve import ServePlan, plan_serve
from cluster.ops.state import is_running, new_state, read_state, run_dir, state_path, state_processes
from cluster.ops.steps import STEPS
from cluster.ops.summary import print_summary
from cluster.ops.supervisor import supervise

PORT_FLAGS = {"ray (GCS)": "--ray-port", "dashboard": "--dashboard-port", "HTTP": "--http-port",
              "redis": "--redis-port"}


class _Stop(Exception):
    """SIGTERM/SIGINT/SIGHUP while starting."""


def _raise_stop(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


class _Signals:
    """Starting: SIGINT/SIGTERM/SIGHUP abort the start (and stop what runs). Running in the
    foreground: they only set `stop_event`, installed before the start returns, so none is lost."""

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.previous = {s: signal.getsignal(s) for s in self.HANDLED}
        self.stop_event = threading.Event()
        self.received: list[str] = []

    def _install(self, handler) -> None:
        for s in self.HANDLED:
            signal.signal(s, handler)

    def abort_start(self) -> None:
        self._install(_raise_stop)

    def request_stop(self) -> None:
        def on_signal(signum, _frame):
            self.received.append(signal.Signals(signum).name)
            self.stop_event.set()

        self._install(on_signal)

    def ignore(self) -> None:  # a second Ctrl-C must not interrupt a teardown half-way
        self._install(signal.SIG_IGN)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _clear_previous_run(data_dir: Path, out: Printer) -> None:
    """Refuse when a service runs from `data_dir`; clean up after one that died."""
    old = read_state(data_dir)
    if old is None:
        return
    if is_running(old):
        alive = ", ".join(k for k, v in state_processes(old).items() if v)
        raise UsageProblem(f"the service is already running from {data_dir} ({alive} alive); "
                           "stop it with `tbml down` (or `make stop`) first")
    out(f"removing the stale run state of a previous start ({state_path(data_dir)})")
    stop(old, out=lambda _m: None)


def _check_ports(opts: UpOptions, serve: ServePlan, redis_port: int, managed_redis: bool) -> set[int]:
    """The ports asked for must be free (UsageProblem naming the flag otherwise); returns them."""
    wanted = {"ray (GCS)": opts.ray_port, "dashboard": opts.dashboard_port}
    if serve.available:
        wanted["HTTP"] = serve.port
    if managed_redis:
        wanted["redis"] = redis_port
    if len(set(wanted.values())) != len(wanted):
        raise UsageProblem(f"two services on one port: {wanted}")
    for what, port in wanted.items():
        if not port_free(port):
            raise UsageProblem(f"port {port} ({what}) is in use; free it or choose another with {PORT_FLAGS[what]}")
    return set(wanted.values())


def prepare(opts: UpOptions, out: Printer) -> Launch:
    """Everything decided before anything starts: settings, ports, auth, the empty run state."""
    settings = settings_fresh()
    data_dir = Path(settings.data_dir).expanduser().resolve()
    run = run_dir(data_dir)
    run.mkdir(parents=True, exist_ok=True)
    _clear_previous_run(data_dir, out)

    # the ports asked for must be free; internal ones are moved when taken
    redis_url_given = settings.redis.url
    redis_port = int(opts.redis_port or settings.redis.port)
    serve = plan_serve(opts.serve_config, opts.http_port)
    taken = _check_ports(opts, serve, redis_port, managed_redis=not redis_url_given)
    client_port = port_or_free(DEFAULT_CLIENT_PORT, taken)
    taken.add(client_port)
    agent_port = port_or_free(DEFAULT_AGENT_PORT, taken)
    taken.add(agent_port)
    metrics_port = port_or_free(int(settings.metrics.export_port), taken)  # docs/metrics.md
    if metrics_port != settings.metrics.export_port:
        out(f"metrics export port {settings.metrics.export_port} is in use; Ray exports on {metrics_port} "
            "(choose one with TBML_METRICS__EXPORT_PORT)")

    auth = resolve_auth()
    apply_client_auth(auth)  # Ray reads RAY_AUTH_MODE once, when it is imported: set it first
    return Launch(
        opts=opts, out=out, settings=settings, data_dir=data_dir, run=run,
        state=new_state(data_dir, settings.namespace, auth, detach=opts.detach), serve=serve,
        redis_port=redis_port, redis_url_given=redis_url_given, client_port=client_port,
        agent_port=agent_port, metrics_port=metrics_port, temp_dir=opts.head_temp_dir(), auth=auth,
        dashboard_url=f"http://127.0.0.1:{opts.dashboard_port}",
    )


def up(opts: UpOptions, out: Printer = print) -> int:
    launch = prepare(opts, out)
    signals = _Signals()
    signals.abort_start()
    try:
        for step in STEPS:
            step(launch)
        disconnect()  # this process is not a driver while the service runs
        if not opts.detach:
            signals.request_stop()
    except (_Stop, KeyboardInterrupt) as exc:
        signals.ignore()
        out(f"interrupted while starting ({exc or 'SIGINT'}); stopping what was started")
        disconnect()
        try:
            stop(launch.state, out=out)
        finally:
            signals.restore()
        return 130
    except BaseException:
        signals.ignore()
        disconnect()
        out("start failed; stopping what was started")
        try:
            with contextlib.suppress(Exception):
                stop(launch.state, out=out)
        finally:
            signals.restore()
        raise

    if opts.detach:
        signals.restore()
        print_summary(launch.state, out)
        out("running in the background: `tbml down` (or `make stop`) stops it")
        return 0
    try:
        print_summary(launch.state, out)
        return _foreground(launch, out, signals)
    finally:
        signals.restore()


def _foreground(launch: Launch, out: Printer, signals: _Signals) -> int:
    """Supervise (restart what dies, `cluster.ops.supervisor`) until a signal or the loss of the Ray
    head, then stop everything."""
    out("Press Ctrl-C to stop everything (or run `tbml down` in another shell).")
    code = supervise(launch, signals.stop_event, out)
    signals.ignore()
    out(f"stopping ({signals.received[0] if signals.received else 'failure'}) ...")
    stop(launch.state, out=out)
    out("stopped")
    return code
