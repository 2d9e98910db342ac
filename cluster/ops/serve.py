"""The Serve application of `serve_config.yaml`, deployed by `tbml up` through the dashboard
(`serve deploy`), with the HTTP port overridable. The config file is the only place the
deployment options live; this module only sets the port."""

from __future__ import annotations

import importlib.util
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.ops.errors import UpError
from cluster.ops.options import DEFAULT_HTTP_PORT, Printer
from cluster.ops.processes import http_get, tail, venv_bin


@dataclass(frozen=True)
class ServePlan:
    """The Serve config as it will be deployed, and whether its application code exists."""

    config: dict[str, Any]
    port: int
    host: str
    available: bool
    reason: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def plan_serve(path: Path, http_port: int | None) -> ServePlan:
    config, port, host = load_serve_config(path, http_port)
    ok, reason = serve_app_available(config)
    return ServePlan(config, port, host, ok, reason)


def serve_app_available(config: dict[str, Any]) -> tuple[bool, str]:
    """Whether the Serve config names applications whose code exists (the app may land later)."""
    apps = config.get("applications") or []
    if not apps:
        return False, "serve_config.yaml lists no applications yet"
    for app in apps:
        import_path = str(app.get("import_path", ""))
        module = import_path.split(":", 1)[0] if ":" in import_path else import_path.rsplit(".", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return False, f"module {module!r} of application {app.get('name', '?')!r} does not exist yet"
    return True, ""


def load_serve_config(path: Path, http_port: int | None) -> tuple[dict[str, Any], int, str]:
    """The Serve config with the HTTP port overridden; returns (config, port, host)."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UpError(f"cannot read the Serve config {path}: {exc}") from exc
    http = dict(config.get("http_options") or {})
    port = int(http_port if http_port is not None else http.get("port", DEFAULT_HTTP_PORT))
    host = str(http.get("host", "127.0.0.1"))
    http["port"] = port
    http.setdefault("host", host)
    config["http_options"] = http
    return config, port, host


def wait_serve_running(timeout_s: float, out: Printer) -> dict[str, str]:
    """Poll serve.status() until every application runs; UpError on a failed deployment."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    messages: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            apps = serve.status().applications
        except Exception:  # noqa: BLE001 - the controller may still be starting
            apps = {}
        last = {name: str(getattr(a.status, "value", a.status)) for name, a in apps.items()}
        messages = {n: (a.message or "")[:800] for n, a in apps.items() if a.message}
        # DEPLOY_FAILED is final for this config; UNHEALTHY (health checks missed, e.g. on a loaded
        # machine) may recover, so it only fails the start when it lasts until the deadline.
        failed = [n for n, st in last.items() if st == "DEPLOY_FAILED"]
        if failed:
            details = "; ".join(f"{n}: {messages.get(n) or last[n]}" for n in failed)
            raise UpError(f"the Serve application failed to deploy: {details}")
        if apps and all(st == "RUNNING" for st in last.values()):
            return last
        time.sleep(1.0)
    raise UpError(f"the Serve application was not running after {timeout_s:.0f}s (status {last or 'none'}"
                  + (f"; {messages}" if messages else "") + ")")


def deploy_serve(config: dict[str, Any], run: Path, dashboard_url: str, env: dict[str, str],
                 timeout_s: float, out: Printer) -> dict[str, str]:
    """`serve deploy` of `config` (written to `run/serve_config.yaml`), then wait until it runs."""
    path = run / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = run / "serve-deploy.log"
    with open(log_path, "ab") as log:
        proc = subprocess.run([venv_bin("serve"), "deploy", str(path), "--address", dashboard_url], env=env,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=120)
    if proc.returncode != 0:
        raise UpError(f"`serve deploy` failed (exit {proc.returncode}):\n{tail(log_path)}")
    return wait_serve_running(timeout_s, out)


def wait_api_ping(api_url: str, timeout_s: float = 60.0) -> int:
    """Poll `/api/ping` until it answers 200 or the deadline passes; returns the last status (0: none)."""
    code = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code, _body = http_get(f"{api_url}/api/ping")
        if code == 200:
            break
        time.sleep(0.5)
    return code


def app_statuses() -> dict[str, str]:
    """{application: status} of the connected cluster's Serve (needs a Ray driver)."""
    from ray import serve

    return {n: str(getattr(a.status, "value", a.status)) for n, a in serve.status().applications.items()}


def shutdown_serve() -> str:
    """Shut Serve down on the connected cluster (needs a Ray driver)."""
    from ray import serve

    serve.shutdown()
    return "shut down"
