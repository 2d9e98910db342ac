"""Waiting with deadlines for the Ray and end-to-end tiers: tests poll for what they expect instead of
sleeping for a fixed time, and a deadline is a limit, never a timing that is asserted."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.2, *,
             retry_errors: bool = False) -> Any:
    """Poll `predicate` until it returns something truthy and return that; fail the test at the
    deadline naming `what` and the last value. With `retry_errors` an exception means "not yet" (the
    last one is reported), for services that are still starting."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - only with retry_errors: keep polling, report it
            if not retry_errors:
                raise
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s (last: {str(last)[:800]})")
        time.sleep(interval)
