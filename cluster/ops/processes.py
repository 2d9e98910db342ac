"""Processes and ports through Linux /proc (no third-party dependency).

A process is named by its PID *and* its kernel start time, so a recycled PID is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.ops.errors import UpError


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


def process_table() -> dict[int, tuple[int, str]]:
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
    table = process_table()
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


def port_or_free(preferred: int, taken: set[int]) -> int:
    """`preferred` when it is free and not `taken`, else any free port (for internal ports)."""
    if preferred not in taken and port_free(preferred):
        return preferred
    while True:
        p = free_port()
        if p not in taken:
            return p


def http_get(url: str, timeout: float = 3.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answers."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - local URLs only
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def tail(path: Path, n: int = 15) -> str:
    """The last `n` lines of a log file (for error messages), or "" when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def venv_bin(name: str) -> str:
    """A console script of this environment (`ray`, `serve`), else the one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise UpError(f"the `{name}` command is missing: run `make setup`")
    return found
