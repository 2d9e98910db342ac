"""The market-data feed of a running service (SPEC §3): new closed candles on the wall clock.

`CandleFeed` is plain Python: one `tick()` brings the candle store of every configured pair up to
the last closed bar (`ml.data.sources.ensure_synthetic_history`, which appends only the new bars).
`MarketFeed` is the thin Ray shell: a detached, named actor (`tbml-market-feed` in the service's
namespace, 0 CPUs) that ticks every `interval_s` seconds in a background task. `tbml up` creates
it, runs one tick synchronously (so the embedded history exists before the first training is
queued) and `tbml down` kills it.

Single writer: the Storage actor has no candle API, so this actor is the only process of the
running service that writes `candles/` (through `ml.data.store.CandleStore`, atomic file
replacement; readers never see a partial file).

Sources: only `synthetic` produces candles here. With `files` the candles are what
`tbml data import` put in the store, and `core` is read live by the serving code, so for both
the feed stays idle and says so in `status()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger(__name__)

FEED_ACTOR_NAME = "tbml-market-feed"
DEFAULT_INTERVAL_S = 5.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class CandleFeed:
    """Keeps the candle store of `pairs` current (plain Python, testable without Ray)."""

    def __init__(self, data_dir: str | Path | None = None, pairs: list[str] | None = None,
                 settings=None) -> None:
        from ml.config import get_settings
        from ml.data.store import CandleStore

        self.settings = settings or get_settings()
        self.data_dir = Path(data_dir or self.settings.data_dir).expanduser().resolve()
        self.pairs = list(pairs or self.settings.pairs)
        self.source = self.settings.data.source
        self.store = CandleStore(self.data_dir, self.settings.timeframe)
        self.ticks = 0
        self.errors = 0
        self.bars_added = 0
        self.last_tick_ms: int | None = None
        self.last_error: str | None = None
        self.per_pair: dict[str, dict[str, Any]] = {}

    @property
    def active(self) -> bool:
        return self.source == "synthetic"

    def tick(self, now_ms: int | None = None) -> dict[str, Any]:
        """One pass over the pairs; returns {pair: bars added}. A failing pair does not stop the others."""
        from ml.data.sources import ensure_synthetic_history

        added: dict[str, int] = {}
        if self.active:
            for pair in self.pairs:
                try:
                    n = ensure_synthetic_history(pair, self.settings, self.store, now_ms=now_ms)
                    cov = self.store.coverage(pair) or {}
                    added[pair] = n
                    self.bars_added += n
                    self.per_pair[pair] = {"bars": cov.get("bars"), "start": cov.get("start"),
                                           "end": cov.get("end"), "lastAdded": n}
                except Exception as exc:  # noqa: BLE001 - one bad pair must not starve the others
                    self.errors += 1
                    self.last_error = f"{pair}: {type(exc).__name__}: {exc}"
                    log.error("market feed: %s", self.last_error)
        self.ticks += 1
        self.last_tick_ms = _now_ms()
        return added

    def status(self) -> dict[str, Any]:
        return {"source": self.source, "active": self.active, "dataDir": str(self.data_dir),
                "timeframe": self.settings.timeframe, "pairs": self.pairs, "ticks": self.ticks,
                "barsAdded": self.bars_added, "errors": self.errors, "lastError": self.last_error,
                "lastTick": self.last_tick_ms, "coverage": dict(self.per_pair)}


@ray.remote(num_cpus=0)
class MarketFeed:
    """Detached actor around CandleFeed: ticks every `interval_s` seconds until killed."""

    def __init__(self, data_dir: str | None = None, pairs: list[str] | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._feed = CandleFeed(data_dir, pairs)
        self._interval_s = max(0.5, float(interval_s))
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        try:  # Ray runs an async actor's __init__ on its event loop
            asyncio.get_running_loop()
            self._start()
        except RuntimeError:
            pass

    def _start(self) -> None:
        if self._task is None:
            self._lock = asyncio.Lock()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # never let the loop die
                log.exception("market feed tick failed")
            await asyncio.sleep(self._interval_s)

    async def tick(self) -> dict[str, Any]:
        """Bring every pair up to the last closed bar now; returns {pair: bars added}."""
        self._start()
        async with self._lock:  # the loop and explicit calls never write concurrently
            return await asyncio.to_thread(self._feed.tick)

    async def status(self) -> dict[str, Any]:
        self._start()
        return {**self._feed.status(), "intervalS": self._interval_s}


def get_or_create_feed(namespace: str, data_dir: str | None = None, pairs: list[str] | None = None,
                       interval_s: float = DEFAULT_INTERVAL_S, *, name: str = FEED_ACTOR_NAME):
    """The feed actor of `namespace`, created (detached) when missing."""
    return MarketFeed.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
        max_restarts=-1, num_cpus=0,
    ).remote(data_dir, pairs, interval_s)


__all__ = ["FEED_ACTOR_NAME", "CandleFeed", "MarketFeed", "get_or_create_feed"]
