"""A short-lived Ray driver for `down` and `status`: connect to the recorded head in a thread,
do some work, disconnect; the caller gets control back after `timeout_s` whatever the cluster does."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from cluster.ops.auth import apply_client_auth


def connect(address: str, namespace: str | None, *, reuse: bool = False) -> None:
    """ray.init to `address` as a quiet driver (`reuse`: keep a connection this process already has)."""
    import ray

    if reuse and ray.is_initialized():
        return
    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")


def disconnect() -> None:
    """ray.shutdown, if connected, ignoring any error."""
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            ray.shutdown()


def run_as_driver(state: dict[str, Any], work: Callable[[], None], timeout_s: float, *,
                  reuse: bool = False) -> tuple[bool, BaseException | None]:
    """Run `work` connected to the head of `state`; returns (finished in time, the error it raised)."""
    result: dict[str, BaseException] = {}

    def target() -> None:
        try:
            apply_client_auth(state.get("auth") or {})  # before Ray reads its config (on import)
            connect(state["ray"]["address"], state.get("namespace"), reuse=reuse)
            work()
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            result["error"] = exc
        finally:
            disconnect()

    t = threading.Thread(target=target, name="tbml-driver", daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive(), result.get("error")
