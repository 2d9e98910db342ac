"""The market feed of a running service: the Ray shell around `ml.data.feed.CandleFeed`.

`MarketFeed` is a detached, named actor (`tbml-market-feed` in the service's namespace, 0 CPUs)
that ticks every `interval_s` seconds in a background task. `tbml up` creates it, runs one tick
synchronously (so the embedded history exists before the first training is queued) and
`tbml down` kills it.

Single writer: the Storage actor has no candle API, so this actor is the only process of the
running service that writes `candles/` (through `ml.data.store.CandleStore`, atomic file
replacement; readers never see a partial file).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from ml.data.feed import CandleFeed

log = logging.getLogger(__name__)

FEED_ACTOR_NAME = "tbml-market-feed"
DEFAULT_INTERVAL_S = 5.0


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


__all__ = ["DEFAULT_INTERVAL_S", "FEED_ACTOR_NAME", "MarketFeed", "get_or_create_feed"]
