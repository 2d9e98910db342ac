"""The block `tbml up` prints once the service runs: URLs, addresses, auth, logs, first training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.ops.options import Printer
from cluster.ops.state import RUN_DIR


def print_summary(state: dict[str, Any], out: Printer = print) -> None:
    ray_state = state.get("ray") or {}
    serve = state.get("serve") or {}
    redis = state.get("redis") or {}
    auth = state.get("auth") or {}
    dash = ray_state.get("dashboardUrl")
    ns = state.get("namespace")
    out("")
    out(f"trading-bot-ml is up  (namespace {ns}, data {state.get('dataDir')})")
    if serve.get("deployed"):
        api = serve["url"]
        out(f"  API        {api}/api/health   {api}/api/predictions")
        out(f"  API docs   {api}/docs")
    else:
        out(f"  API        not deployed ({serve.get('reason', 'unknown')})")
    out(f"  Dashboard  {dash}")
    if ray_state.get("metricsUrl"):
        out(f"  Metrics    {ray_state['metricsUrl']}   (Prometheus format, the service's as ray_tbml_*; "
            "docs/metrics.md)")
    out(f"  Ray        {ray_state.get('address')}   (ray.init(address=...), "
        f"`ray start --address={ray_state.get('address')}` adds a worker node)")
    out(f"  Jobs       ray job submit --address {dash} -- python -m cluster.submit_training "
        f"--pair BTC --namespace {ns}")
    out(f"  Redis      {redis.get('url')}" + ("  (started here)" if redis.get("managed") else ""))
    if auth.get("mode") == "token":
        where = auth.get("tokenPath") or "$RAY_AUTH_TOKEN"
        out(f"  Auth       Ray token auth ON; token: {where}; shell clients (ray job submit, serve): "
            "export RAY_AUTH_MODE=token")
    else:
        out(f"  Auth       Ray token auth {auth.get('mode', 'disabled')}")
    out(f"  Logs       {ray_state.get('logs')}  and {Path(state.get('dataDir', '.')) / RUN_DIR}")
    for job in state.get("training") or []:
        detail = job.get("jobId") or job.get("reason") or job.get("message") or ""
        out(f"  Training   {job['pair']}/{job['modelType']}: {job.get('status')} {detail}".rstrip())
    out("")
