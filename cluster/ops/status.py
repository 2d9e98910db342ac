"""`tbml status`: the run state, which of its processes live, what the supervisor restarted (restarts
per piece, the last failure), and (live) what the feed, the queue, the accuracy monitor and Serve
report through a short-lived driver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.ops.driver import run_as_driver
from cluster.ops.options import settings_fresh
from cluster.ops.processes import http_get
from cluster.ops.state import RUN_DIR, gcs_alive, read_state, state_processes
from ml.clock import now_ms


def status(*, live: bool = True, timeout_s: float = 30.0) -> dict[str, Any]:
    """The run state, which of its processes live, and (when `live`) the feed/Serve/queue as seen
    through a short-lived driver."""
    settings = settings_fresh()
    data_dir = Path(settings.data_dir).expanduser().resolve()
    state = read_state(data_dir)
    if state is None:
        return {"running": False, "dataDir": str(data_dir)}
    procs = state_processes(state)
    ray_state = state.get("ray") or {}
    report: dict[str, Any] = {"running": any(procs.values()), "processes": procs, "state": state,
                              "supervisor": state.get("supervisor"),
                              "metrics": {"port": ray_state.get("metricsPort"), "url": ray_state.get("metricsUrl")}}
    if live and gcs_alive(state):
        report["live"] = _live_status(state, timeout_s)
    serve = state.get("serve") or {}
    if serve.get("deployed"):
        code, _ = http_get(f"{serve['url']}/api/ping")
        report["apiPing"] = code
    return report


def _live_status(state: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def work() -> None:
        from cluster.ops.serve import app_statuses
        from cluster.ops.service_actors import actor_reports

        out.update(actor_reports(state.get("namespace")))
        if (state.get("serve") or {}).get("deployed"):
            try:
                out["serve"] = app_statuses()
            except Exception as exc:  # noqa: BLE001
                out["serve"] = {"error": str(exc)[:300]}

    finished, error = run_as_driver(state, work, timeout_s)
    if not finished:
        out["error"] = f"no answer from the cluster within {timeout_s:.0f}s"
    elif error is not None:
        out["error"] = f"{type(error).__name__}: {error}"[:400]
    return out


def format_status(report: dict[str, Any]) -> str:
    if not report.get("state"):
        return f"not running (no run state in {Path(report['dataDir']) / RUN_DIR})"
    state = report["state"]
    lines = [f"{'running' if report['running'] else 'NOT running (stale state)'}: data {state['dataDir']}, "
             f"namespace {state['namespace']}, {state.get('mode')}"]
    lines.append("  processes: " + ", ".join(f"{k} {'up' if v else 'DOWN'}" for k, v in report["processes"].items()))
    ray_state = state.get("ray") or {}
    lines.append(f"  ray: {ray_state.get('address')}  dashboard {ray_state.get('dashboardUrl')}")
    if ray_state.get("metricsUrl"):
        lines.append(f"  metrics: {ray_state['metricsUrl']}")
    serve = state.get("serve") or {}
    if serve.get("deployed"):
        lines.append(f"  api: {serve['url']}  (ping {report.get('apiPing')})")
    sup = report.get("supervisor") or {}
    if sup.get("active"):
        restarts = ", ".join(f"{k} {v}" for k, v in (sup.get("restarts") or {}).items()) or "none"
        line = f"  supervisor: restarts {restarts}"
        for key, label in (("down", "down now"), ("gaveUp", "gave up on")):
            if sup.get(key):
                line += f"; {label} {', '.join(sup[key])}"
        failure = sup.get("lastFailure")
        if failure:
            ago = max(0, now_ms() - int(failure["at"])) // 1000
            line += f"; last failure {failure['piece']} {ago}s ago: {failure['reason']}"
        lines.append(line)
    elif sup:
        lines.append(f"  supervisor: none ({sup.get('mode')}: nothing restarts a piece that dies)")
    live = report.get("live") or {}
    if "error" in live:
        lines.append(f"  cluster: {live['error']}")
    if isinstance(live.get("serve"), dict):
        lines.append("  serve: " + json.dumps(live["serve"]))
    feed = live.get("feed") or {}
    if "ticks" in feed:
        ends = {p: c.get("end") for p, c in (feed.get("coverage") or {}).items()}
        lines.append(f"  feed: {feed['source']}, {feed['ticks']} ticks, last {feed.get('lastTick')}, "
                     f"newest bar {ends}")
    if "queue" in live:
        lines.append("  queue: " + json.dumps(live["queue"])[:300])
    if "monitor" in live:
        lines.append("  accuracy monitor: " + json.dumps(live["monitor"])[:300])
    return "\n".join(lines)
