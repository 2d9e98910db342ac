"""One entry point for candles, whatever `data.source` is configured.

- `synthetic`: generated on demand (deterministic per pair and seed; `ml.data.synthetic`).
- `files`: what `tbml data import` put in the candle store.
- `core`: fetched from trading-bot-core and validated; rejected rows are logged with their reasons.
- `exchange`: a crypto exchange through ccxt (`ml.data.exchange`): the store is brought up to the last
  closed bar (only the missing bars are fetched, validated, rejections logged) and read like `files`.
- In a running service the market feed (`ml.data.feed`) keeps the store current for every source and
  the serving side reads the store; `load_candles(refresh=False)` reads it for training there too.

`ensure_synthetic_history` keeps the store's synthetic candles up to the last closed bar; the
streaming service calls it on every new bar and it appends only the bars that are new.
"""

from __future__ import annotations

import logging

import pandas as pd

from ml.clock import last_closed_bar_ts
from ml.data.candles import validate_candles
from ml.data.store import CandleStore
from ml.pairs import validate_pair

log = logging.getLogger(__name__)


def _settings(settings):
    if settings is None:
        from ml.config import get_settings

        settings = get_settings()
    return settings


def _synthetic_bars_available(end_ts: int, timeframe_ms: int) -> int:
    """How many synthetic bars exist up to end_ts (the synthetic history starts at its origin)."""
    from ml.data.synthetic import ORIGIN_TS

    return max(0, (end_ts - ORIGIN_TS) // timeframe_ms + 1)


def synthetic_candles(pair: str, settings=None, *, bars: int | None = None, end_ts: int | None = None,
                      timeframe_ms: int | None = None) -> pd.DataFrame:
    """`bars` (default history_bars) synthetic candles ending at end_ts (default: the last closed
    bar), fewer if the synthetic history does not reach back that far."""
    from ml.data.synthetic import generate_candles

    settings = _settings(settings)
    syn = settings.data.synthetic
    tf = timeframe_ms or settings.timeframe_ms
    end = last_closed_bar_ts(tf) if end_ts is None else int(end_ts)
    n = min(bars or syn.history_bars, _synthetic_bars_available(end, tf))
    return generate_candles(pair, n, seed=syn.seed, signal_strength=syn.signal_strength,
                            lookback=syn.signal_lookback, end_ts=end, timeframe_ms=tf)


def load_candles(pair: str, settings=None, *, bars: int | None = None,
                 store: CandleStore | None = None, refresh: bool = True) -> pd.DataFrame:
    """Validated candles of `pair` from the configured source; the newest `bars` if given.

    `refresh=False` reads the candle store as it is for `exchange` and `core` (like `files`): inside a
    running service the market feed (`ml.data.feed`) is the store's only writer and keeps it current,
    so a training run reads what the feed stored instead of fetching (and writing) itself.

    Raises InvalidPairError for a bad pair, NoCandlesError (files, or a store not fed yet) when there
    are no candles, the CoreError family (core) when core cannot deliver, and the ExchangeSourceError
    family (exchange) when the exchange cannot (ExchangeInputError for an unknown exchange or symbol).
    """
    validate_pair(pair)
    if bars is not None and bars < 1:
        raise ValueError(f"bars must be >= 1, got {bars}")
    settings = _settings(settings)
    source = settings.data.source
    if source == "synthetic":
        return synthetic_candles(pair, settings, bars=bars)
    if source == "files" or (source in ("core", "exchange") and not refresh):
        store = store or CandleStore(settings.data_dir, settings.timeframe)
        return store.tail(pair, bars) if bars else store.read(pair)
    if source == "core":
        from ml.data.core_client import CoreClient

        with CoreClient.from_settings(settings) as client:
            raw = client.fetch_candles(pair)
        result = validate_candles(raw, settings.timeframe_ms)
        if result.rejected_total or result.gaps:
            s = result.summary()
            log.warning("core candles for %s: %d rejected %s, %d gap(s) (%d missing bars)",
                        pair, s["rejectedTotal"], s["rejected"], s["gaps"], s["missingBars"])
        candles = result.candles
        return candles.iloc[-bars:].reset_index(drop=True) if bars else candles
    if source == "exchange":
        from ml.data.exchange import exchange_candles

        store = store or CandleStore(settings.data_dir, settings.timeframe)
        return exchange_candles(pair, settings, bars=bars, store=store)
    raise ValueError(f"unknown data source {source!r}")


def ensure_synthetic_history(pair: str, settings=None, store: CandleStore | None = None, *,
                             now_ms: int | None = None) -> int:
    """Make the store hold the synthetic candles up to the last closed bar; returns bars added.

    An empty store gets `history_bars` bars; afterwards only the bars after the stored end are
    generated and appended (synthetic values depend only on the bar's timestamp, so they join on).
    """
    validate_pair(pair)
    settings = _settings(settings)
    store = store or CandleStore(settings.data_dir, settings.timeframe)
    tf = store.timeframe_ms
    end = last_closed_bar_ts(tf, now_ms)
    cov = store.coverage(pair)
    if cov is None or not cov["bars"]:
        candles = synthetic_candles(pair, settings, end_ts=end, timeframe_ms=tf)
    else:
        if cov["end"] >= end:
            return 0
        missing = (end - cov["end"]) // tf
        candles = synthetic_candles(pair, settings, bars=missing, end_ts=end, timeframe_ms=tf)
    if candles.empty:
        return 0
    return store.append(pair, candles)
