"""Ray token auth of the head `tbml up` starts, and of this process as its client.

Unless `RAY_AUTH_MODE` is set (e.g. `disabled` in tests), the head runs with `RAY_AUTH_MODE=token`,
as Ray does for new local clusters. The token is Ray's usual one (`RAY_AUTH_TOKEN`, else the file
`RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`); when there is none it is generated. See
docs/operations.md for clients.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from cluster.ops.errors import UpError
from cluster.ops.processes import venv_bin

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


def resolve_auth(environ: Mapping[str, str] | None = None, *, create: bool = True,
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
            _write_token(path)
        else:
            _generate_default_token(path, environ, ray_bin)
        has = True
    if not has:
        raise UpError(f"token auth is on but there is no token at {path}")
    return {"mode": "token", "tokenSource": "RAY_AUTH_TOKEN_PATH" if custom else "default",
            "tokenPath": str(path.resolve())}


def _write_token(path: Path) -> None:
    """A new random token, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))


def _generate_default_token(path: Path, environ: Mapping[str, str], ray_bin: str | None) -> None:
    """Ray's own generator for its default token file."""
    env = {k: v for k, v in environ.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    proc = subprocess.run([ray_bin or venv_bin("ray"), "get-auth-token", "--generate"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60)
    if proc.returncode != 0 or not path.is_file():
        raise UpError(f"could not create a Ray auth token: {proc.stderr.strip()[-300:]}")


def auth_env(env: MutableMapping[str, str], auth: dict[str, Any]) -> None:
    """Put `auth` into a process environment (the head's: every worker inherits it)."""
    env["RAY_AUTH_MODE"] = auth["mode"]
    if auth.get("tokenSource") == "RAY_AUTH_TOKEN_PATH":
        env["RAY_AUTH_TOKEN_PATH"] = auth["tokenPath"]


def apply_client_auth(auth: dict[str, Any]) -> None:
    """Make this process a client of a head with `auth` (before ray.init / dashboard calls)."""
    mode = auth.get("mode", "disabled")
    os.environ["RAY_AUTH_MODE"] = mode
    if mode == "token" and auth.get("tokenSource") == "RAY_AUTH_TOKEN_PATH" and auth.get("tokenPath"):
        os.environ["RAY_AUTH_TOKEN_PATH"] = auth["tokenPath"]
