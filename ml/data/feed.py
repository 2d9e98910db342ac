"""The market-data feed's domain logic: every source's newly closed candles, on the clock (no Ray).

`CandleFeed` keeps the candle store of every configured pair current, whatever `data.source` is, so
the serving side reads the store for every source (docs/data.md, "The market feed"):

- `synthetic`: the embedded market's bars up to the last closed one (`ensure_synthetic_history`).
- `exchange`: one kept `ml.data.exchange.ExchangeClient` (markets loaded once); a pair is brought up
  to the last closed bar with `ensure_exchange_history`: the first pass backfills `history_bars`,
  after downtime the span after the stored end is fetched first (the gap backfill). The still-open
  candle is never stored.
- `core`: core's candles (`ml.data.core_client.CoreClient`), validated like imports, closed bars only,
  appended to the store; so core's reachability is known here.
- `files`: nothing is fetched (the store is what `tbml data import` wrote); the status still says how
  old the newest candle is.

Scheduling: a pair is due when its newest stored candle is older than the last bar closed at
`now - data.feed.close_delay_s` (an exchange prints a closed candle a moment later; the synthetic
market needs no delay). A pass that leaves a pair behind (a failure, or the exchange has not printed
the bar yet) makes it due again `data.feed.retry_s` later; a pair that is caught up is not fetched
until the next close + delay. `next_due_ms()` says when the next pair is due, so the actor loop
(`actors.feed`) sleeps until then instead of polling. The clock and the sleep are injected.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.clock import last_closed_bar_ts
from ml.clock import now_ms as wall_now_ms
from ml.config import get_settings
from ml.data.candles import validate_candles
from ml.data.sources import ensure_synthetic_history
from ml.data.store import CandleStore

log = logging.getLogger(__name__)

FETCHING_SOURCES = ("synthetic", "exchange", "core")
FEED_CLIENT_RETRIES = 1  # the feed retries on its own schedule (retry_s); a client retry covers a blip


@dataclass
class PairState:
    """What the feed knows about one pair (the newest stored candle and the last attempts)."""

    last_candle: int | None = None     # open ts of the newest stored candle
    bars: int = 0
    start: int | None = None
    retry_at: int = 0                  # behind after an attempt: not due again before this (epoch ms)
    last_error: str | None = None
    last_error_at: int | None = None
    last_success_at: int | None = None
    bars_added: int = 0
    failures: int = 0                  # failed attempts in a row
    rejected: int = 0                  # rows refused by the candle validation (exchange, core)
    last_added: int = 0


class CandleFeed:
    """Keeps the candle store of `pairs` current from the configured source and says how current it is."""

    def __init__(self, data_dir: str | Path | None = None, pairs: list[str] | None = None,
                 settings=None, *, clock: Callable[[], int] = wall_now_ms,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings or get_settings()
        self.data_dir = Path(data_dir or self.settings.data_dir).expanduser().resolve()
        self.pairs = list(pairs or self.settings.pairs)
        self.source = self.settings.data.source
        self.store = CandleStore(self.data_dir, self.settings.timeframe)
        self.tf = self.store.timeframe_ms
        self.clock = clock
        self.sleep = sleep
        feed = self.settings.data.feed
        self.delay_ms = 0 if self.source == "synthetic" else int(feed.close_delay_s * 1000)
        self.retry_ms = int(feed.retry_s * 1000)
        self.max_lag_bars = int(self.settings.data.max_lag_bars)
        self.ticks = 0
        self.errors = 0
        self.bars_added = 0
        self.last_tick_ms: int | None = None
        self.last_error: str | None = None
        self.state: dict[str, PairState] = {}
        self._exchange = None
        self._core = None
        for pair in self.pairs:
            self.state[pair] = PairState()
            self._read_coverage(pair)

    @property
    def active(self) -> bool:
        """Whether this source's candles are fetched (files: the store is what was imported)."""
        return self.source in FETCHING_SOURCES

    # -- scheduling --------------------------------------------------------------------------
    def target(self, now: int) -> int:
        """Open ts of the newest bar the store should hold at `now` (closed at now - close delay)."""
        return last_closed_bar_ts(self.tf, now - self.delay_ms)

    def is_due(self, pair: str, now: int) -> bool:
        st = self.state[pair]
        if not self.active:
            return False
        behind = st.last_candle is None or st.last_candle < self.target(now)
        return behind and now >= st.retry_at

    def next_due_ms(self, now: int | None = None) -> int | None:
        """When the next pair is due (epoch ms; `now` if one is due already); None: never (files)."""
        if not self.active or not self.pairs:
            return None
        now = int(self.clock()) if now is None else int(now)
        # the next bar closes when now - delay reaches the next multiple of tf
        next_close = ((now - self.delay_ms) // self.tf + 1) * self.tf + self.delay_ms
        due = next_close
        for pair in self.pairs:
            st = self.state[pair]
            if st.last_candle is None or st.last_candle < self.target(now):
                due = min(due, max(now, st.retry_at))
        return due

    # -- one pass ----------------------------------------------------------------------------
    def tick(self, now_ms: int | None = None, *, force: bool = False) -> dict[str, int]:
        """Fetch every due pair (every behind pair with `force`); returns {pair: bars added} of the
        pairs whose newest stored candle advanced. A failing pair does not stop the others."""
        now = int(self.clock()) if now_ms is None else int(now_ms)
        advanced: dict[str, int] = {}
        if self.active:
            for pair in self.pairs:
                st = self.state[pair]
                behind = st.last_candle is None or st.last_candle < self.target(now)
                if not (self.is_due(pair, now) or (force and behind)):
                    continue
                before = st.last_candle
                try:
                    added = self._fetch(pair, now)
                except Exception as exc:  # noqa: BLE001 - one bad pair must not starve the others
                    self._failed(pair, exc, now)
                    continue
                self._read_coverage(pair)
                st.bars_added += added
                st.last_added = added
                self.bars_added += added
                st.failures = 0
                st.last_success_at = now
                behind = st.last_candle is None or st.last_candle < self.target(now)
                st.retry_at = now + self.retry_ms if behind else 0
                if st.last_candle is not None and (before is None or st.last_candle > before):
                    advanced[pair] = added
        else:
            for pair in self.pairs:  # files: the store may have been imported into meanwhile
                self._read_coverage(pair)
        self.ticks += 1
        self.last_tick_ms = now
        return advanced

    def _failed(self, pair: str, exc: BaseException, now: int) -> None:
        st = self.state[pair]
        text = str(exc).strip().splitlines()
        st.last_error = f"{type(exc).__name__}: {text[0][:300] if text else ''}"
        st.last_error_at = now
        st.failures += 1
        st.retry_at = now + self.retry_ms
        self.errors += 1
        self.last_error = f"{pair}: {st.last_error}"
        log.error("market feed: %s (attempt %d in a row; again in %.1fs)", self.last_error, st.failures,
                  self.retry_ms / 1000)

    def _read_coverage(self, pair: str) -> None:
        st = self.state[pair]
        try:
            cov = self.store.coverage(pair)
        except Exception as exc:  # noqa: BLE001 - an unreadable file: reported, not fatal
            log.warning("market feed: coverage of %s unreadable: %s", pair, exc)
            cov = None
        if cov and cov.get("bars"):
            st.last_candle, st.bars, st.start = int(cov["end"]), int(cov["bars"]), int(cov["start"])
        else:
            st.last_candle, st.bars, st.start = None, 0, None

    # -- the sources -------------------------------------------------------------------------
    def _fetch(self, pair: str, now: int) -> int:
        """Bring `pair` up to `target(now)` (the last bar closed before the close delay); returns the bars
        added to the store."""
        if self.source == "synthetic":
            return ensure_synthetic_history(pair, self.settings, self.store, now_ms=now)
        if self.source == "exchange":
            from ml.data.exchange import ensure_exchange_history

            # up to the target, not to `now`: a bar inside the close delay may not be printed yet
            report = ensure_exchange_history(pair, self.settings, self.store, client=self.exchange_client(),
                                             now_ms=now - self.delay_ms)
            if report.rejected:
                n = sum(report.rejected.values())
                self.state[pair].rejected += n
                log.warning("market feed: %s: %d exchange row(s) rejected %s", pair, n, dict(report.rejected))
            return report.added
        if self.source == "core":
            return self._fetch_core(pair, now)
        raise ValueError(f"unknown data source {self.source!r}")

    def exchange_client(self):
        """The one ExchangeClient of this feed (its markets are loaded once, on first success)."""
        if self._exchange is None:
            from ml.data.exchange import ExchangeClient

            retries = min(self.settings.data.exchange.retries, FEED_CLIENT_RETRIES)
            self._exchange = ExchangeClient.from_settings(self.settings, clock=self.clock, sleep=self.sleep,
                                                          retries=retries)
        return self._exchange

    def core_client(self):
        if self._core is None:
            from ml.data.core_client import CoreClient

            core = self.settings.data.core
            self._core = CoreClient(core.url, core.timeout_s, min(core.retries, FEED_CLIENT_RETRIES),
                                    core.backoff_s, sleep=self.sleep)
        return self._core

    def _fetch_core(self, pair: str, now: int) -> int:
        """core's candles of `pair`, validated like an import; closed bars only, merged into the store."""
        raw = self.core_client().fetch_candles(pair)
        result = validate_candles(raw, self.tf)
        if result.rejected_total:
            self.state[pair].rejected += result.rejected_total
            log.warning("market feed: %s: %d core row(s) rejected %s", pair, result.rejected_total,
                        result.summary()["rejected"])
        candles = result.candles
        candles = candles[candles["ts"] <= self.target(now)]
        return self.store.append(pair, candles) if len(candles) else 0

    def close(self) -> None:
        for client in (self._exchange, self._core):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._exchange = self._core = None

    # -- what it says ------------------------------------------------------------------------
    def pair_status(self, pair: str, now: int) -> dict[str, Any]:
        """source, lastCandle (open ts), lastClose, lagBars (bars closed since, at now), stale
        (lagBars > data.max_lag_bars; no candle at all is stale too), the last attempts."""
        st = self.state[pair]
        lag = None
        if st.last_candle is not None:
            lag = max(0, (last_closed_bar_ts(self.tf, now) - st.last_candle) // self.tf)
        stale = st.last_candle is None or (self.max_lag_bars > 0 and lag is not None and lag > self.max_lag_bars)
        return {"source": self.source, "lastCandle": st.last_candle,
                "lastClose": st.last_candle + self.tf if st.last_candle is not None else None,
                "lagBars": lag, "stale": stale, "bars": st.bars, "lastError": st.last_error,
                "lastErrorAt": st.last_error_at, "lastSuccessAt": st.last_success_at, "barsAdded": st.bars_added,
                "failures": st.failures, "rejected": st.rejected}

    def status(self, now_ms: int | None = None) -> dict[str, Any]:
        now = int(self.clock()) if now_ms is None else int(now_ms)
        if not self.active:
            for pair in self.pairs:
                self._read_coverage(pair)
        coverage = {p: {"bars": st.bars, "start": st.start, "end": st.last_candle, "lastAdded": st.last_added}
                    for p, st in self.state.items()}
        return {"source": self.source, "active": self.active, "dataDir": str(self.data_dir),
                "timeframe": self.settings.timeframe, "pairs": self.pairs, "ticks": self.ticks,
                "barsAdded": self.bars_added, "errors": self.errors, "lastError": self.last_error,
                "lastTick": self.last_tick_ms, "at": now, "maxLagBars": self.max_lag_bars,
                "closeDelayS": self.delay_ms / 1000, "retryS": self.retry_ms / 1000,
                "nextDueAt": self.next_due_ms(now), "coverage": coverage,
                "byPair": {p: self.pair_status(p, now) for p in self.pairs}}
