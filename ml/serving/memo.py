"""The replica's L1 memo in front of Redis: answers this replica already got, under keys whose value
never changes (they name the candle and the model version), each kept exactly until its Redis entry
expires. Ray-free: `cache` is an `ml.cache.client.Cache`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

L1_MAX_ITEMS = 4096


@dataclass(frozen=True)
class LocalHit:
    """A hit on the replica's L1 (shaped like ml.cache.local.CacheHit)."""

    age_s: float
    source: str = "replica"


class ReplicaMemo:
    """L1 in front of Redis for keys whose value never changes (they name the candle and the model
    version), each kept exactly until its Redis entry expires.

    A hit answers without any await: no Redis round trip, and no extra proxy round trip (Ray Serve
    asks the proxy for the request's messages whenever an HTTP handler suspends). Hits are added to
    the shared Redis hit counters once a second, in one call per kind.
    """

    def __init__(self, cache, max_items: int = L1_MAX_ITEMS) -> None:
        self.cache = cache
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[float, Any, float]] = OrderedDict()
        self._unflushed: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._items)

    def get(self, kind: str, key: str) -> tuple[Any, LocalHit] | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value, stored_at = item
        if time.monotonic() >= expires:
            del self._items[key]
            return None
        self.hits[kind] = self.hits.get(kind, 0) + 1
        self._unflushed[kind] = self._unflushed.get(kind, 0) + 1
        task = self._task
        if task is None or task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())
        return value, LocalHit(max(0.0, time.time() - stored_at))

    def put(self, kind: str, key: str, value: Any, hit) -> None:
        """Keep `value` (just computed: hit None; or read from Redis: its age) until its TTL ends."""
        age = hit.age_s if hit is not None else 0.0
        left = self.cache.ttl_for(kind) - age
        if left <= 0:
            return
        self._items[key] = (time.monotonic() + left, value, time.time() - age)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    async def _flush(self) -> None:
        from ml.cache.keys import CacheKind

        await asyncio.sleep(1.0)
        counts, self._unflushed = self._unflushed, {}
        add = getattr(self.cache, "_count", None)  # ml.cache.client's own counting path (Redis, or pending)
        if add is None:
            return
        for kind, n in counts.items():
            try:
                await add(CacheKind(kind), True, n)
            except Exception as exc:  # noqa: BLE001 - counters are best effort
                log.warning("adding %d local %s hits to the shared counters failed: %s", n, kind, exc)
