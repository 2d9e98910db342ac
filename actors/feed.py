"""The market feed of a running service: the Ray shell around `ml.data.feed.CandleFeed`.

`MarketFeed` is a detached, named actor (`tbml-market-feed` in the service's namespace, 0 CPUs)
whose background task wakes when the next pair is due (the next candle close + `data.feed.close_delay_s`,
or a retry after `data.feed.retry_s`; `CandleFeed.next_due_ms`), at the latest every `interval_s`
seconds. `tbml up` creates it, runs one tick synchronously (so the history exists before the first
training is queued) and `tbml down` kills it.

After a tick in which some pairs' newest stored candle advanced, it tells the prediction events hub
(`actors.prediction_events`, `closed({pair: open ts of the newest closed candle})`) without waiting
for it: the hub is optional, a failing call is logged and the feed goes on.

Single writer: the Storage actor has no candle API, so this actor is the only process of the
running service that writes `candles/` (through `ml.data.store.CandleStore`, atomic file
replacement; readers never see a partial file).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors.metrics import record_feed_of
from ml.data.feed import CandleFeed

log = logging.getLogger(__name__)

FEED_ACTOR_NAME = "tbml-market-feed"
DEFAULT_INTERVAL_S = 5.0
MIN_WAIT_S = 0.05
HUB_TIMEOUT_S = 10.0  # getting the hub's handle and its answer to closed(): bounded, never awaited long


@ray.remote(num_cpus=0)
class MarketFeed:
    """Detached actor around CandleFeed: ticks when a pair is due (at most `interval_s` apart) until killed."""

    def __init__(self, data_dir: str | None = None, pairs: list[str] | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._feed = CandleFeed(data_dir, pairs)
        self._interval_s = max(0.5, float(interval_s))
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self._hub = None
        self._hub_state: dict[str, Any] = {"notified": 0, "failed": 0, "lastError": None, "lastCloses": None}
        self._pending: set[asyncio.Task] = set()
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
                await self._tick(force=False)
            except Exception:  # never let the loop die
                log.exception("market feed tick failed")
            await asyncio.sleep(self._wait_s())

    def _wait_s(self) -> float:
        """Seconds until the next pair is due, bounded by the interval."""
        due = self._feed.next_due_ms()
        if due is None:
            return self._interval_s
        return min(self._interval_s, max(MIN_WAIT_S, (due - self._feed.clock()) / 1000))

    async def tick(self, force: bool = True) -> dict[str, int]:
        """Bring every pair that is behind up to the last closed bar now (also one waiting out a retry:
        `tbml up` calls this once before anything reads the store); returns {pair: bars added} of the
        pairs that advanced."""
        return await self._tick(force=force)

    async def _tick(self, *, force: bool) -> dict[str, int]:
        self._start()
        async with self._lock:  # the loop and explicit calls never write concurrently
            advanced = await asyncio.to_thread(self._feed.tick, None, force=force)
            await asyncio.to_thread(record_feed_of, self._feed)  # actors/metrics.py (never raises)
        if advanced:
            closes = {p: self._feed.state[p].last_candle for p in advanced}
            self._notify({p: int(ts) for p, ts in closes.items() if ts is not None})
        return advanced

    # -- the prediction events hub (optional) ------------------------------------------------
    def _notify(self, closes: dict[str, int]) -> None:
        """Tell the events hub which pairs' candles closed; in the background, bounded, failures logged."""
        task = asyncio.get_running_loop().create_task(self._call_hub(closes))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _call_hub(self, closes: dict[str, int]) -> None:
        try:
            if self._hub is None:
                try:
                    from actors.prediction_events import get_or_create_events_hub
                except ImportError as exc:
                    raise RuntimeError(f"no prediction events hub in this build ({exc})") from None
                namespace = ray.get_runtime_context().namespace
                self._hub = await asyncio.wait_for(asyncio.to_thread(get_or_create_events_hub, namespace),
                                                   HUB_TIMEOUT_S)
            await asyncio.wait_for(self._hub.closed.remote(closes), HUB_TIMEOUT_S)
            self._hub_state["notified"] += 1
            self._hub_state["lastCloses"] = closes
        except Exception as exc:  # noqa: BLE001 - the hub is optional: log and go on
            self._hub = None  # got again next time (it may have been restarted or not exist yet)
            self._hub_state["failed"] += 1
            self._hub_state["lastError"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("market feed: the prediction events hub was not told of %s: %s", closes,
                        self._hub_state["lastError"])

    async def status(self) -> dict[str, Any]:
        self._start()
        return {**self._feed.status(), "intervalS": self._interval_s, "eventsHub": dict(self._hub_state)}


def get_or_create_feed(namespace: str, data_dir: str | None = None, pairs: list[str] | None = None,
                       interval_s: float = DEFAULT_INTERVAL_S, *, name: str = FEED_ACTOR_NAME):
    """The feed actor of `namespace`, created (detached) when missing."""
    return MarketFeed.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
        max_restarts=-1, num_cpus=0,
    ).remote(data_dir, pairs, interval_s)


__all__ = ["DEFAULT_INTERVAL_S", "FEED_ACTOR_NAME", "MarketFeed", "get_or_create_feed"]
