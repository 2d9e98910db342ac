"""The HTTP `Retry-After` header as seconds to wait, for the clients of remote candle sources."""

from __future__ import annotations

from email.utils import parsedate_to_datetime

from ml.clock import now_ms as wall_ms


def parse_retry_after(value: str | None, now_ms: int | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds, or an HTTP date against `now_ms`, default the wall
    clock); None when absent or unreadable."""
    if not value:
        return None
    value = str(value).strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = wall_ms() if now_ms is None else now_ms
    return max(when.timestamp() - now / 1000.0, 0.0)
