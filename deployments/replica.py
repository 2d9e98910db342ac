"""What every replica does first: apply the application's environment and read the settings, name
itself, and set its deployment handles to the direct gRPC channel."""

from __future__ import annotations

import os


def apply_env(env: dict[str, str]):
    """Set the replica's environment, reload the settings, return them (call first in __init__)."""
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    from ml.config import get_settings

    get_settings.cache_clear()
    return get_settings()


def direct(handle, enabled: bool = True):
    """`handle` set to pass requests by value over the replicas' direct gRPC channel (every Serve
    replica runs that server; `_by_reference=False` is the per-handle switch of Ray 2.5x/2.60 behind
    RAY_SERVE_THROUGHPUT_OPTIMIZED). The handle as it is when disabled or unsupported."""
    if not enabled or handle is None:
        return handle
    try:
        return handle.options(_by_reference=False)
    except (TypeError, ValueError):  # an older/newer Serve without the option
        return handle


def replica_tag() -> str:
    """`<deployment>#<replica id>` of the current replica (or the pid outside Serve)."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return str(ctx.replica_tag if hasattr(ctx, "replica_tag") else ctx.replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a replica
        return f"pid{os.getpid()}"
