"""Wall-clock helpers in the service's unit, epoch milliseconds (UTC), in one place.

Code that needs "now" takes it as an argument where it can (so tests inject a clock); the edges
call `now_ms()` once and pass the value down.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """The current wall time in epoch milliseconds."""
    return int(time.time() * 1000)


def last_closed_bar_ts(timeframe_ms: int, now: int | None = None) -> int:
    """Open time of the newest bar that has fully closed at `now` (epoch ms; default: the wall clock)."""
    t = now_ms() if now is None else int(now)
    return (t // timeframe_ms) * timeframe_ms - timeframe_ms
