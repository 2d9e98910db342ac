"""The market-data feed's domain logic: new closed candles on the wall clock (no Ray).

One `CandleFeed.tick()` brings the candle store of every configured pair up to the last closed bar
(`ml.data.sources.ensure_synthetic_history` decides what is missing and appends only the new bars).
Only the `synthetic` source produces candles here: with `files` the candles are what
`tbml data import` put in the store, and `core` is read live by the serving code, so for both the
feed stays idle and says so in `status()`. `actors.feed` runs it periodically in the service.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ml.clock import now_ms as wall_now_ms
from ml.config import get_settings
from ml.data.sources import ensure_synthetic_history
from ml.data.store import CandleStore

log = logging.getLogger(__name__)


class CandleFeed:
    """Keeps the candle store of `pairs` current and counts what it did."""

    def __init__(self, data_dir: str | Path | None = None, pairs: list[str] | None = None,
                 settings=None) -> None:
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

    def tick(self, now_ms: int | None = None) -> dict[str, int]:
        """One pass over the pairs; returns {pair: bars added}. A failing pair does not stop the others."""
        added: dict[str, int] = {}
        if self.active:
            for pair in self.pairs:
                try:
                    added[pair] = self._extend(pair, now_ms)
                except Exception as exc:  # noqa: BLE001 - one bad pair must not starve the others
                    self.errors += 1
                    self.last_error = f"{pair}: {type(exc).__name__}: {exc}"
                    log.error("market feed: %s", self.last_error)
        self.ticks += 1
        self.last_tick_ms = wall_now_ms()
        return added

    def _extend(self, pair: str, now_ms: int | None) -> int:
        """Append the bars of `pair` closed since the store's last one; returns how many."""
        n = ensure_synthetic_history(pair, self.settings, self.store, now_ms=now_ms)
        cov = self.store.coverage(pair) or {}
        self.bars_added += n
        self.per_pair[pair] = {"bars": cov.get("bars"), "start": cov.get("start"), "end": cov.get("end"),
                               "lastAdded": n}
        return n

    def status(self) -> dict[str, Any]:
        return {"source": self.source, "active": self.active, "dataDir": str(self.data_dir),
                "timeframe": self.settings.timeframe, "pairs": self.pairs, "ticks": self.ticks,
                "barsAdded": self.bars_added, "errors": self.errors, "lastError": self.last_error,
                "lastTick": self.last_tick_ms, "coverage": dict(self.per_pair)}
