"""`tbml up` / `tbml down` / `tbml status`: run the whole service on this machine (SPEC §2).

`up` starts, in this order, and records each piece in `{data_dir}/run/state.json` as soon as it runs
(so `down` can clean up after a start that failed half-way):

1. Redis (unless `TBML_REDIS_URL` / `redis.url` is set): `redis-server` on 127.0.0.1:`redis.port`
   (6380; Ray's GCS would clash on 6379), no persistence, in its own session.
2. A Ray head: `ray start --head` on its own GCS port (default 6390), dashboard on 127.0.0.1:8265,
   with its own `--temp-dir` (/tmp/tbml-ray-<port>). The TBML_* settings (data dir made absolute,
   the Redis URL) are in the head's environment, which every Ray worker on this node inherits.
3. The detached actors in the service's namespace: Storage, TrainingQueue, the accuracy monitor
   (`actors.accuracy_monitor`: resolves served predictions, flags degraded models) and the market
   feed (`actors.feed.MarketFeed`), whose first tick makes the embedded synthetic history current.
4. The Serve application of `serve_config.yaml` (`serve deploy` through the dashboard), with the
   HTTP port overridable.
5. First training for every configured pair that has no production model yet.

Stopping only what was started: the state file holds the PIDs (with their kernel start times, so
a recycled PID is never signalled) of Redis and of the Ray head. The head's processes are found by
its private temp dir in their command lines, plus all their descendants (workers), so `down`
never touches another Ray cluster on the machine -- unlike plain `ray stop`, which kills every
Ray process of the user.

Token auth: unless `RAY_AUTH_MODE` is set (e.g. `disabled` in tests), the head runs with
`RAY_AUTH_MODE=token`, as Ray does for new local clusters. The token is Ray's usual one
(`RAY_AUTH_TOKEN`, else the file `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`); when there is none
it is generated (`ray get-auth-token --generate`). See docs/operations.md for clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ml.storage.atomic import BACKUP_SUFFIX, ChecksumError, atomic_write_json, read_json_document

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"
RUN_DIR = "run"
STATE_NAME = "state.json"
STATE_VERSION = 1
DEFAULT_RAY_PORT = 6390
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_HTTP_PORT = 8000
DEFAULT_CLIENT_PORT = 10001
DEFAULT_AGENT_PORT = 52365
DEFAULT_OBJECT_STORE_MB = 1024
TEMP_ROOT = Path("/tmp")
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"

Printer = Callable[[str], None]


class UpError(RuntimeError):
    """Starting or stopping failed (exit 1)."""


class UsageProblem(UpError):
    """The request cannot be carried out as asked: a busy port, already running (exit 2)."""


@dataclass
class UpOptions:
    http_port: int | None = None          # None: the port in serve_config.yaml
    dashboard_port: int = DEFAULT_DASHBOARD_PORT
    dashboard_host: str = "127.0.0.1"
    ray_port: int = DEFAULT_RAY_PORT
    redis_port: int | None = None         # None: settings.redis.port
    train: bool = True
    detach: bool = False
    feed_interval_s: float = 5.0
    num_cpus: int | None = None           # None: the CPUs this process may use
    object_store_mb: int = DEFAULT_OBJECT_STORE_MB
    serve_config: Path = SERVE_CONFIG
    temp_dir: Path | None = None          # None: /tmp/tbml-ray-<ray_port>
    timeout_s: float = 240.0
    extra_env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# processes and ports (Linux /proc; no third-party dependency)

def proc_start_time(pid: int) -> int | None:
    """The kernel start time (clock ticks since boot) of a live, non-zombie process; None otherwise."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    if not rest or rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def proc_alive(pid: int | None, start: int | None = None) -> bool:
    if not pid:
        return False
    st = proc_start_time(int(pid))
    return st is not None and (start is None or st == start)


def _process_table() -> dict[int, tuple[int, str]]:
    """{pid: (ppid, NUL-joined command line)} of every visible process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(raw[raw.rfind(")") + 2:].split()[1])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        table[pid] = (ppid, cmd)
    return table


def head_processes(temp_dir: str | Path, seeds: dict[int, int] | None = None) -> dict[int, int]:
    """{pid: start time} of the Ray head that uses `temp_dir`: every process whose command line
    names that directory (gcs_server, raylet, dashboard, agents, monitors), the recorded `seeds`
    that are still the same processes, and all their descendants (workers rename themselves to
    `ray::...`, so they are found through their parent)."""
    temp_dir = str(temp_dir).rstrip("/")
    table = _process_table()
    me = os.getpid()
    roots = set()
    for pid, (_ppid, cmd) in table.items():
        if pid == me:
            continue
        text = cmd if cmd.endswith("\0") else cmd + "\0"
        if f"{temp_dir}/" in text or f"{temp_dir}\0" in text:
            roots.add(pid)
    for pid, start in (seeds or {}).items():
        if proc_alive(int(pid), start):
            roots.add(int(pid))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cmd) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in found or pid == me:
            continue
        found.add(pid)
        stack.extend(children.get(pid, []))
    out = {}
    for pid in found:
        st = proc_start_time(pid)
        if st is not None:
            out[pid] = st
    return out


def terminate(procs: dict[int, int | None], grace_s: float = 10.0) -> list[int]:
    """SIGTERM every still-identical process, SIGKILL what is left after `grace_s`; returns those
    that were signalled."""
    signalled = []
    for pid, start in procs.items():
        if proc_alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(proc_alive(p, procs[p]) for p in signalled):
        _reap()
        time.sleep(0.1)
    for pid in signalled:
        if proc_alive(pid, procs[pid]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(proc_alive(p, procs[p]) for p in signalled):
        _reap()
        time.sleep(0.05)
    return signalled


def _reap() -> None:
    """Collect exited children of this process (Redis when started by a foreground `up`)."""
    with contextlib.suppress(ChildProcessError, OSError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def port_free(port: int) -> bool:
    """True when nothing listens on `port` (any address) and it can be bound."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_or_free(preferred: int, taken: set[int]) -> int:
    if preferred not in taken and port_free(preferred):
        return preferred
    while True:
        p = free_port()
        if p not in taken:
            return p


def redis_ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def http_get(url: str, timeout: float = 3.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - local URLs only
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------
# state file

def run_dir(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser().resolve() / RUN_DIR


def state_path(data_dir: str | Path) -> Path:
    return run_dir(data_dir) / STATE_NAME


def read_state(data_dir: str | Path) -> dict[str, Any] | None:
    path = state_path(data_dir)
    try:
        state = read_json_document(path, restore=False)
    except FileNotFoundError:
        return None
    except ChecksumError as exc:
        raise UpError(f"the run state {path} is damaged ({exc}); stop the service's processes by hand "
                      f"and delete {path}") from exc
    return state if isinstance(state, dict) else None


def write_state(data_dir: str | Path, state: dict[str, Any]) -> None:
    atomic_write_json(state_path(data_dir), state)


def remove_state(data_dir: str | Path) -> None:
    path = state_path(data_dir)
    Path(str(path) + BACKUP_SUFFIX).unlink(missing_ok=True)  # first: a backup alone would resurrect it
    path.unlink(missing_ok=True)


def service_address(data_dir: str | Path | None = None) -> str | None:
    """The GCS address (host:port) of the service `tbml up` started from `data_dir` (default: the
    settings'), or None when none runs. For clients that would otherwise guess with address="auto"."""
    if data_dir is None:
        from ml.config import get_settings

        data_dir = get_settings().data_dir
    try:
        state = read_state(data_dir)
    except UpError:
        return None
    if not state or not is_running(state):
        return None
    return (state.get("ray") or {}).get("address")


def state_processes(state: dict[str, Any]) -> dict[str, bool]:
    """Which recorded processes are still alive (by PID and start time)."""
    out = {}
    owner = state.get("owner") or {}
    if owner.get("pid"):
        out["owner"] = proc_alive(owner["pid"], owner.get("start"))
    redis = state.get("redis") or {}
    if redis.get("pid"):
        out["redis"] = proc_alive(redis["pid"], redis.get("start"))
    ray_state = state.get("ray") or {}
    for name in ("gcs", "raylet"):
        info = (ray_state.get("core") or {}).get(name)
        if info:
            out[name] = proc_alive(info["pid"], info.get("start"))
    if ray_state.get("tempDir") and "gcs" not in out:
        out["ray"] = bool(head_processes(ray_state["tempDir"]))
    return out


def is_running(state: dict[str, Any] | None) -> bool:
    return bool(state) and any(state_processes(state).values())


# ---------------------------------------------------------------------------------------------------
# auth

def resolve_auth(environ: dict[str, str] | os._Environ | None = None, *, create: bool = True,
                 ray_bin: str | None = None) -> dict[str, Any]:
    """How the head authenticates: {"mode": "token"|"disabled"|..., "tokenPath"?, "tokenSource"?}.

    RAY_AUTH_MODE set: respected. Unset: token (Ray's default for new local clusters). The token
    comes from RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; a missing token file
    is created when `create` (Ray's own generator for the default path).
    """
    environ = os.environ if environ is None else environ
    mode = (environ.get("RAY_AUTH_MODE") or "token").strip().lower()
    if mode != "token":
        return {"mode": mode}
    if environ.get("RAY_AUTH_TOKEN"):
        return {"mode": "token", "tokenSource": "RAY_AUTH_TOKEN"}
    custom = environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(custom).expanduser() if custom else DEFAULT_TOKEN_PATH
    has = path.is_file() and path.read_text().strip() != ""
    if not has and create:
        if custom:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
        else:
            env = {k: v for k, v in environ.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
            proc = subprocess.run([ray_bin or _venv_bin("ray"), "get-auth-token", "--generate"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60)
            if proc.returncode != 0 or not path.is_file():
                raise UpError(f"could not create a Ray auth token: {proc.stderr.strip()[-300:]}")
        has = True
    if not has:
        raise UpError(f"token auth is on but there is no token at {path}")
    return {"mode": "token", "tokenSource": "RAY_AUTH_TOKEN_PATH" if custom else "default",
            "tokenPath": str(path.resolve())}


def apply_client_auth(auth: dict[str, Any]) -> None:
    """Make this process a client of a head with `auth` (before ray.init / dashboard calls)."""
    mode = auth.get("mode", "disabled")
    os.environ["RAY_AUTH_MODE"] = mode
    if mode == "token" and auth.get("tokenSource") == "RAY_AUTH_TOKEN_PATH" and auth.get("tokenPath"):
        os.environ["RAY_AUTH_TOKEN_PATH"] = auth["tokenPath"]


def auth_headers(auth: dict[str, Any]) -> dict[str, str]:
    """The dashboard's HTTP header for a token-auth head (for urllib calls of our own)."""
    if auth.get("mode") != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token and auth.get("tokenPath"):
        with contextlib.suppress(OSError):
            token = Path(auth["tokenPath"]).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------------------------------------
# pieces

def _venv_bin(name: str) -> str:
    """A console script of this environment (`ray`, `serve`), else the one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise UpError(f"the `{name}` command is missing: run `make setup`")
    return found


def start_redis(port: int, workdir: Path, timeout_s: float = 15.0) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        raise UpError("redis-server not found: run `make setup` (or `sudo apt-get install redis-server`), "
                      "or set TBML_REDIS_URL to use an existing Redis")
    log_path = workdir / "redis.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(workdir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if redis_ping(port):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with contextlib.suppress(Exception):
        proc.kill()
        proc.wait(5)
    raise UpError(f"redis-server did not start on port {port}:\n{_tail(log_path)}")


def ray_start(opts: UpOptions, temp_dir: Path, env: dict[str, str], log_path: Path, *,
              client_port: int, agent_port: int) -> str:
    """`ray start --head`; returns the GCS address (host:port)."""
    num_cpus = opts.num_cpus or len(os.sched_getaffinity(0))
    cmd = [
        _venv_bin("ray"), "start", "--head", f"--port={opts.ray_port}",
        f"--dashboard-host={opts.dashboard_host}", f"--dashboard-port={opts.dashboard_port}",
        "--include-dashboard=true", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
        f"--object-store-memory={int(opts.object_store_mb) * 1024 * 1024}", "--disable-usage-stats",
        "--log-style=record", "--log-color=false",
    ]
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, timeout=max(60.0, opts.timeout_s / 2))
        except subprocess.TimeoutExpired as exc:
            raise UpError(f"`ray start` did not finish in time; see {log_path}") from exc
    if proc.returncode != 0:
        raise UpError(f"`ray start` failed (exit {proc.returncode}):\n{_tail(log_path)}")
    address_file = temp_dir / "ray_current_cluster"
    try:
        address = address_file.read_text().strip()
    except OSError:
        address = ""
    return address or f"127.0.0.1:{opts.ray_port}"


def core_ray_processes(temp_dir: Path) -> dict[str, dict[str, int]]:
    """PIDs of the head's gcs_server and raylet (found by the temp dir in their command lines)."""
    out: dict[str, dict[str, int]] = {}
    marker = f"{str(temp_dir).rstrip('/')}/"
    for pid, (_ppid, cmd) in _process_table().items():
        if marker not in cmd:
            continue
        exe = cmd.split("\0", 1)[0]
        for name, suffix in (("gcs", "/gcs_server"), ("raylet", "/raylet")):
            if exe.endswith(suffix):
                st = proc_start_time(pid)
                if st is not None:
                    out[name] = {"pid": pid, "start": st}
    return out


def serve_app_available(config: dict[str, Any]) -> tuple[bool, str]:
    """Whether the Serve config names applications whose code exists (the app may land later)."""
    import importlib.util

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
    path = run / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = run / "serve-deploy.log"
    with open(log_path, "ab") as log:
        proc = subprocess.run([_venv_bin("serve"), "deploy", str(path), "--address", dashboard_url], env=env,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=120)
    if proc.returncode != 0:
        raise UpError(f"`serve deploy` failed (exit {proc.returncode}):\n{_tail(log_path)}")
    return wait_serve_running(timeout_s, out)


def queue_first_training(storage, queue, settings, out: Printer) -> list[dict[str, Any]]:
    import ray

    model = settings.model.default_type
    results = []
    for pair in settings.pairs:
        try:
            prod = ray.get(storage.get_production.remote(pair, model), timeout=60)
        except Exception as exc:  # noqa: BLE001 - report and queue anyway
            prod = None
            out(f"  (could not read the production model of {pair}/{model}: {exc})")
        if prod and prod.get("version"):
            results.append({"pair": pair, "modelType": model, "status": "skipped",
                            "reason": f"production version {prod['version']} exists"})
            continue
        outcome = ray.get(queue.submit.remote({"pair": pair, "model_type": model, "source": "startup"}),
                          timeout=60)
        results.append({"pair": pair, "modelType": model, "status": outcome.get("status"),
                        "jobId": outcome.get("jobId") or outcome.get("job_id"),
                        "message": outcome.get("message")})
    return results


# ---------------------------------------------------------------------------------------------------
# up

class _Stop(Exception):
    """SIGTERM/SIGINT while starting or running."""


def _raise_stop(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


def _settings_for(data_dir: Path | None = None):
    from ml.config import get_settings

    get_settings.cache_clear()
    return get_settings()


def up(opts: UpOptions, out: Printer = print) -> int:
    settings = _settings_for()
    data_dir = Path(settings.data_dir).expanduser().resolve()
    ns = settings.namespace
    run = run_dir(data_dir)
    run.mkdir(parents=True, exist_ok=True)

    old = read_state(data_dir)
    if old is not None:
        if is_running(old):
            alive = ", ".join(k for k, v in state_processes(old).items() if v)
            raise UsageProblem(f"the service is already running from {data_dir} ({alive} alive); "
                               "stop it with `tbml down` (or `make stop`) first")
        out(f"removing the stale run state of a previous start ({state_path(data_dir)})")
        stop(old, out=lambda _m: None)

    # ports: the ones asked for must be free; internal ones are moved when taken
    use_redis_url = settings.redis.url
    redis_port = int(opts.redis_port or settings.redis.port)
    serve_config, http_port, http_host = load_serve_config(opts.serve_config, opts.http_port)
    serve_ok, serve_reason = serve_app_available(serve_config)
    wanted = {"ray (GCS)": opts.ray_port, "dashboard": opts.dashboard_port}
    if serve_ok:
        wanted["HTTP"] = http_port
    if not use_redis_url:
        wanted["redis"] = redis_port
    if len(set(wanted.values())) != len(wanted):
        raise UsageProblem(f"two services on one port: {wanted}")
    for what, port in wanted.items():
        if not port_free(port):
            flag = {"ray (GCS)": "--ray-port", "dashboard": "--dashboard-port", "HTTP": "--http-port",
                    "redis": "--redis-port"}[what]
            raise UsageProblem(f"port {port} ({what}) is in use; free it or choose another with {flag}")
    taken = set(wanted.values())
    client_port = _port_or_free(DEFAULT_CLIENT_PORT, taken)
    taken.add(client_port)
    agent_port = _port_or_free(DEFAULT_AGENT_PORT, taken)

    temp_dir = Path(opts.temp_dir or TEMP_ROOT / f"tbml-ray-{opts.ray_port}")
    auth = resolve_auth()
    apply_client_auth(auth)  # Ray reads RAY_AUTH_MODE once, when it is imported: set it first
    dashboard_url = f"http://127.0.0.1:{opts.dashboard_port}"
    state: dict[str, Any] = {
        "version": STATE_VERSION, "startedAt": int(time.time() * 1000), "dataDir": str(data_dir),
        "namespace": ns, "mode": "detached" if opts.detach else "foreground",
        "owner": None if opts.detach else {"pid": os.getpid(), "start": proc_start_time(os.getpid())},
        "auth": auth, "redis": None, "ray": None, "serve": None, "feed": None, "training": [],
    }

    # Starting: SIGINT/SIGTERM/SIGHUP abort the start (and stop what runs). Running in the foreground:
    # they only set `stop_event`, installed before the start returns, so none is lost in between.
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.getsignal(s) for s in signals}
    stop_event = threading.Event()
    received: list[str] = []

    def on_signal(signum, _frame):
        received.append(signal.Signals(signum).name)
        stop_event.set()

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def ignore() -> None:  # a second Ctrl-C must not interrupt a teardown half-way
        for s in signals:
            signal.signal(s, signal.SIG_IGN)

    for s in signals:
        signal.signal(s, _raise_stop)
    redis_proc = None
    try:
        # 1. Redis
        if use_redis_url:
            redis_url = use_redis_url
            state["redis"] = {"managed": False, "url": redis_url}
            out(f"using the Redis at {redis_url} (TBML_REDIS_URL / redis.url)")
        else:
            out(f"starting Redis on 127.0.0.1:{redis_port}")
            redis_proc = start_redis(redis_port, run)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            state["redis"] = {"managed": True, "pid": redis_proc.pid, "start": proc_start_time(redis_proc.pid),
                              "port": redis_port, "url": redis_url, "log": str(run / "redis.log")}
        write_state(data_dir, state)

        # 2. Ray head, with the settings in its environment (inherited by every worker on this node)
        env = dict(os.environ)
        env.update(opts.extra_env)
        env["TBML_DATA_DIR"] = str(data_dir)
        env["TBML_REDIS_URL"] = redis_url
        if env.get("TBML_CONFIG"):
            env["TBML_CONFIG"] = str(Path(env["TBML_CONFIG"]).expanduser().resolve())
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # `python` in `ray job submit` entrypoints is this venv's interpreter (make run does not activate it).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent)] + [
            p for p in env.get("PATH", "").split(os.pathsep) if p and p != str(Path(sys.executable).parent)])
        # Workers import this checkout's code, whatever else the venv points to.
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                                 if p and p != str(REPO_ROOT)])
        env["RAY_AUTH_MODE"] = auth["mode"]
        if auth.get("tokenSource") == "RAY_AUTH_TOKEN_PATH":
            env["RAY_AUTH_TOKEN_PATH"] = auth["tokenPath"]
        os.environ["TBML_DATA_DIR"] = str(data_dir)
        os.environ["TBML_REDIS_URL"] = redis_url
        settings = _settings_for()

        out(f"starting the Ray head (GCS port {opts.ray_port}, dashboard {dashboard_url}, "
            f"auth {auth['mode']})")
        state["ray"] = {"port": opts.ray_port, "tempDir": str(temp_dir), "dashboardPort": opts.dashboard_port,
                        "dashboardHost": opts.dashboard_host, "dashboardUrl": dashboard_url,
                        "clientPort": client_port, "address": None, "core": {}, "pids": {}}
        write_state(data_dir, state)  # before ray start: a crash in it is still cleaned up by `down`
        address = ray_start(opts, temp_dir, env, run / "ray-start.log", client_port=client_port,
                            agent_port=agent_port)
        core = core_ray_processes(temp_dir)
        state["ray"].update({"address": address, "core": core,
                             "pids": {str(p): s for p, s in head_processes(temp_dir).items()},
                             "logs": str(temp_dir / "session_latest" / "logs")})
        write_state(data_dir, state)

        # 3. actors
        import ray

        ray.init(address=address, namespace=ns, log_to_driver=False, logging_level="ERROR")
        from actors.accuracy_monitor import get_or_create_monitor_actor
        from actors.feed import get_or_create_feed
        from actors.storage import get_or_create_storage_actor
        from actors.training_queue import get_or_create_queue_actor

        out("creating the Storage, TrainingQueue and accuracy monitor actors")
        storage = get_or_create_storage_actor(str(data_dir), ns)
        queue = get_or_create_queue_actor(ns, str(data_dir))
        ray.get(queue.ping.remote(), timeout=opts.timeout_s)
        monitor = get_or_create_monitor_actor(ns, str(data_dir))
        ray.get(monitor.ping.remote(), timeout=opts.timeout_s)

        out(f"starting the market feed ({settings.data.source}, every {opts.feed_interval_s:g}s) and "
            f"bringing the candles of {', '.join(settings.pairs)} up to date")
        feed = get_or_create_feed(ns, str(data_dir), list(settings.pairs), opts.feed_interval_s)
        added = ray.get(feed.tick.remote(), timeout=opts.timeout_s)
        feed_status = ray.get(feed.status.remote(), timeout=60)
        state["feed"] = {"source": feed_status["source"], "intervalS": opts.feed_interval_s,
                         "initialBarsAdded": added}
        write_state(data_dir, state)

        # 4. Serve
        api_url = f"http://{http_host}:{http_port}"
        if serve_ok:
            out(f"deploying {opts.serve_config.name} (HTTP {api_url})")
            state["serve"] = {"deployed": True, "httpPort": http_port, "url": api_url, "applications": None}
            write_state(data_dir, state)
            apps = deploy_serve(serve_config, run, dashboard_url, env, opts.timeout_s, out)
            state["serve"]["applications"] = apps
            code = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                code, _body = http_get(f"{api_url}/api/ping")
                if code == 200:
                    break
                time.sleep(0.5)
            if code != 200:
                out(f"warning: {api_url}/api/ping answers {code or 'nothing'} although Serve reports RUNNING")
        else:
            state["serve"] = {"deployed": False, "reason": serve_reason}
            out(f"warning: Serve not deployed: {serve_reason}")
        write_state(data_dir, state)

        # 5. first training
        if opts.train:
            state["training"] = queue_first_training(storage, queue, settings, out)
        write_state(data_dir, state)
        ray.shutdown()  # this process is not a driver while the service runs
        if not opts.detach:
            for s in signals:
                signal.signal(s, on_signal)
    except (_Stop, KeyboardInterrupt) as exc:
        ignore()
        out(f"interrupted while starting ({exc or 'SIGINT'}); stopping what was started")
        _shutdown_quietly()
        try:
            stop(state, out=out)
        finally:
            restore()
        return 130
    except BaseException:
        ignore()
        _shutdown_quietly()
        out("start failed; stopping what was started")
        try:
            with contextlib.suppress(Exception):
                stop(state, out=out)
        finally:
            restore()
        raise

    if opts.detach:
        restore()
        print_summary(state, out)
        out("running in the background: `tbml down` (or `make stop`) stops it")
        return 0
    try:
        print_summary(state, out)
        return _foreground(state, redis_proc, out, stop_event, received, ignore)
    finally:
        restore()


def _shutdown_quietly() -> None:
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _foreground(state: dict[str, Any], redis_proc: subprocess.Popen | None, out: Printer,
                stop_event: threading.Event, received: list[str], ignore_signals: Callable[[], None]) -> int:
    """Wait for a signal (or for a piece of the service to die), then stop everything."""
    out("Press Ctrl-C to stop everything (or run `tbml down` in another shell).")
    code = 0
    while not stop_event.wait(2.0):
        alive = state_processes(state)
        dead = [k for k, v in alive.items() if not v and k != "owner"]
        if redis_proc is not None and redis_proc.poll() is not None:
            dead.append("redis")
        if dead:
            out(f"error: {', '.join(sorted(set(dead)))} exited unexpectedly; stopping the rest")
            code = 1
            break
    ignore_signals()
    out(f"stopping ({received[0] if received else 'failure'}) ...")
    stop(state, out=out)
    out("stopped")
    return code


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


# ---------------------------------------------------------------------------------------------------
# down

def _graceful_cluster_stop(state: dict[str, Any], out: Printer, timeout_s: float = 60.0) -> None:
    """Serve shutdown and the detached actors (Storage flushes), through a short-lived driver."""
    ray_state = state.get("ray") or {}
    address = ray_state.get("address")
    gcs = (ray_state.get("core") or {}).get("gcs")
    if not address or not gcs or not proc_alive(gcs["pid"], gcs.get("start")):
        return
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            apply_client_auth(state.get("auth") or {})  # before Ray reads its config (on import)
            import ray

            if not ray.is_initialized():
                ray.init(address=address, namespace=state.get("namespace"), log_to_driver=False,
                         logging_level="ERROR")
            if (state.get("serve") or {}).get("deployed"):
                from ray import serve

                serve.shutdown()
                result["serve"] = "shut down"
            from actors.accuracy_monitor import MONITOR_ACTOR_NAME
            from actors.feed import FEED_ACTOR_NAME
            from actors.storage import ACTOR_NAME as STORAGE_NAME
            from actors.training_queue import QUEUE_ACTOR_NAME

            ns = state.get("namespace")
            # the monitor first: it writes through the Storage and submits to the queue
            for name in (MONITOR_ACTOR_NAME, FEED_ACTOR_NAME, QUEUE_ACTOR_NAME):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
            with contextlib.suppress(ValueError):
                storage = ray.get_actor(STORAGE_NAME, namespace=ns)
                try:
                    saved = ray.get(storage.shutdown.remote(), timeout=30)
                    result["storage"] = f"flushed ({saved.get('savedCount', 0)} records)"
                except Exception:  # noqa: BLE001 - it exits while answering; the kill below is a no-op then
                    pass
                with contextlib.suppress(Exception):
                    ray.kill(storage, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - the processes are stopped next anyway
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                import ray

                ray.shutdown()

    t = threading.Thread(target=work, name="tbml-down", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        out("  (graceful Serve/actor shutdown timed out; stopping the processes)")
    elif "error" in result:
        out(f"  (graceful shutdown incomplete: {result['error'][:300]})")
    else:
        for k, v in result.items():
            out(f"  {k}: {v}")


def stop_head(temp_dir: str | Path, seeds: dict[int, int | None] | None = None,
              grace_s: float = 10.0) -> list[int]:
    """Stop one Ray head (and everything under it) the way `ray stop` orders it, but only that head:
    the raylet first (its workers and agents follow it), then every other process of the head, then
    the GCS last. Each step: SIGTERM, up to a third of `grace_s`, then SIGKILL."""
    procs = head_processes(temp_dir, seeds)
    core = core_ray_processes(Path(temp_dir))
    raylet = {c["pid"]: c["start"] for n, c in core.items() if n == "raylet"}
    gcs = {c["pid"]: c["start"] for n, c in core.items() if n == "gcs"}
    rest = {p: st for p, st in procs.items() if p not in raylet and p not in gcs}
    step = max(1.0, grace_s / 3)
    stopped = terminate(raylet, step)
    stopped += terminate(rest, step)
    stopped += terminate(gcs, step)
    late = head_processes(temp_dir)  # workers orphaned while their raylet died
    if late:
        stopped += terminate(late, 2.0)
    return sorted(set(stopped))


def stop(state: dict[str, Any], out: Printer = print, grace_s: float = 10.0) -> dict[str, Any]:
    """Stop exactly what `state` says was started; remove the state file. Returns a summary."""
    summary: dict[str, Any] = {"ray": [], "redis": None}
    data_dir = state.get("dataDir")
    _graceful_cluster_stop(state, out)
    ray_state = state.get("ray") or {}
    if ray_state.get("tempDir"):
        seeds = {int(p): s for p, s in (ray_state.get("pids") or {}).items()}
        for info in (ray_state.get("core") or {}).values():
            seeds[int(info["pid"])] = info.get("start")
        summary["ray"] = stop_head(ray_state["tempDir"], seeds, grace_s)
        out(f"  ray head: stopped {len(summary['ray'])} process(es)")
        with contextlib.suppress(OSError):
            Path(ray_state["tempDir"], "ray_current_cluster").unlink(missing_ok=True)
    redis = state.get("redis") or {}
    if redis.get("managed") and redis.get("pid"):
        pid = int(redis["pid"])
        if proc_alive(pid, redis.get("start")):
            terminate({pid: redis.get("start")}, grace_s)
            summary["redis"] = pid
            out(f"  redis: stopped (pid {pid})")
    if data_dir:
        remove_state(data_dir)
    return summary


def down(out: Printer = print, wait_owner_s: float = 180.0) -> int:
    settings = _settings_for()
    data_dir = Path(settings.data_dir).expanduser().resolve()
    state = read_state(data_dir)
    if state is None:
        out(f"nothing to stop (no run state in {run_dir(data_dir)})")
        return 0
    owner = state.get("owner") or {}
    if owner.get("pid") and owner["pid"] != os.getpid() and proc_alive(owner["pid"], owner.get("start")):
        out(f"asking the foreground `tbml up` (pid {owner['pid']}) to stop ...")
        with contextlib.suppress(ProcessLookupError):
            os.kill(owner["pid"], signal.SIGTERM)
        deadline = time.monotonic() + wait_owner_s
        while time.monotonic() < deadline and proc_alive(owner["pid"], owner.get("start")):
            time.sleep(0.2)
        state = read_state(data_dir)
        if state is None:
            out("stopped")
            return 0
        out("the foreground process did not finish the teardown; stopping the rest here")
    out(f"stopping the service started from {data_dir}")
    stop(state, out=out)
    out("stopped")
    return 0


# ---------------------------------------------------------------------------------------------------
# status

def status(*, live: bool = True, timeout_s: float = 30.0) -> dict[str, Any]:
    """The run state, which of its processes live, and (when `live`) the feed/Serve/queue as seen
    through a short-lived driver."""
    settings = _settings_for()
    data_dir = Path(settings.data_dir).expanduser().resolve()
    state = read_state(data_dir)
    if state is None:
        return {"running": False, "dataDir": str(data_dir)}
    procs = state_processes(state)
    report: dict[str, Any] = {"running": any(procs.values()), "processes": procs, "state": state}
    gcs = ((state.get("ray") or {}).get("core") or {}).get("gcs")
    if live and gcs and proc_alive(gcs["pid"], gcs.get("start")):
        report["live"] = _live_status(state, timeout_s)
    serve = state.get("serve") or {}
    if serve.get("deployed"):
        code, _ = http_get(f"{serve['url']}/api/ping")
        report["apiPing"] = code
    return report


def _live_status(state: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            apply_client_auth(state.get("auth") or {})  # before Ray reads its config (on import)
            import ray

            ray.init(address=state["ray"]["address"], namespace=state.get("namespace"), log_to_driver=False,
                     logging_level="ERROR")
            from actors.accuracy_monitor import MONITOR_ACTOR_NAME
            from actors.feed import FEED_ACTOR_NAME
            from actors.training_queue import QUEUE_ACTOR_NAME

            ns = state.get("namespace")
            try:
                out["feed"] = ray.get(ray.get_actor(FEED_ACTOR_NAME, namespace=ns).status.remote(), timeout=10)
            except Exception as exc:  # noqa: BLE001
                out["feed"] = {"error": str(exc)[:300]}
            try:
                out["queue"] = ray.get(ray.get_actor(QUEUE_ACTOR_NAME, namespace=ns).summary.remote(), timeout=10)
            except Exception as exc:  # noqa: BLE001
                out["queue"] = {"error": str(exc)[:300]}
            try:
                mon = ray.get(ray.get_actor(MONITOR_ACTOR_NAME, namespace=ns).status.remote(), timeout=10)
                out["monitor"] = {k: mon.get(k) for k in ("source", "intervalS", "ticks", "lastTick", "lastError")}
                out["monitor"]["degraded"] = sorted(
                    f"{p}/{mt}" for p, doc in (mon.get("pairs") or {}).items()
                    for mt, m in (doc.get("models") or {}).items() if m.get("degraded"))
            except Exception as exc:  # noqa: BLE001
                out["monitor"] = {"error": str(exc)[:300]}
            if (state.get("serve") or {}).get("deployed"):
                from ray import serve

                try:
                    apps = serve.status().applications
                    out["serve"] = {n: str(getattr(a.status, "value", a.status)) for n, a in apps.items()}
                except Exception as exc:  # noqa: BLE001
                    out["serve"] = {"error": str(exc)[:300]}
        except Exception as exc:  # noqa: BLE001
            out["error"] = f"{type(exc).__name__}: {exc}"[:400]
        finally:
            with contextlib.suppress(Exception):
                import ray

                ray.shutdown()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        out["error"] = f"no answer from the cluster within {timeout_s:.0f}s"
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
    serve = state.get("serve") or {}
    if serve.get("deployed"):
        lines.append(f"  api: {serve['url']}  (ping {report.get('apiPing')})")
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


__all__ = ["UpError", "UpOptions", "UsageProblem", "down", "format_status", "head_processes", "read_state",
           "resolve_auth", "service_address", "state_path", "status", "stop", "stop_head", "up"]
