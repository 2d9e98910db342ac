"""Cached values as stored (JSON with the wall time they were stored) and the in-process TTL + LRU map.

Each stored value carries its wall time, so `CacheHit.age_s` (the API's `cacheAge`) is real across
replicas. The clocks are arguments so tests can drive time without sleeping.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheHit:
    value: Any
    age_s: float
    source: str  # "redis" | "local"


def encode_value(value: Any, stored_at: float) -> str:
    """The payload kept in Redis or the local cache: `value` (JSON) and its wall time `stored_at` (s)."""
    return json.dumps({"t": stored_at, "v": value}, separators=(",", ":"))


def decode_value(raw: bytes | str | None, source: str, now: float) -> CacheHit | None:
    """The hit a payload stands for at wall time `now` (s), or None (absent or undecodable)."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        stored_at = float(doc["t"])
        value = doc["v"]
    except (ValueError, TypeError, KeyError):
        log.warning("cache: ignoring an undecodable %s entry", source)
        return None
    return CacheHit(value=value, age_s=max(0.0, now - stored_at), source=source)


class LocalTTLCache:
    """Bounded in-process TTL + LRU map of encoded payloads (one per replica, degraded mode only).

    `clock` is a monotonic clock in seconds (expiry times are measured on it).
    """

    def __init__(self, max_items: int = 10_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.max_items = max_items
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def get(self, key: str) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires_at, payload = item
        if self._clock() >= expires_at:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return payload

    def set(self, key: str, payload: str, ttl_s: float) -> None:
        self._data[key] = (self._clock() + ttl_s, payload)
        self._data.move_to_end(key)
        while len(self._data) > self.max_items:
            self._data.popitem(last=False)

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
