"""The feature deployment: the latest window of a pair's feature matrix, for serving.

`window(pair, candle_ts, rows)` reads the newest candles up to the bar that opens at `candle_ts`
from the candle store on the shared volume, for every data source (the market feed, `actors.feed`,
keeps it current: synthetic, exchange and core candles are appended there as they close), computes
`ml.features.latest_window` in a worker thread (the event loop stays free) and returns the
JSON-able window of `ml.features.encode_window`.

Caching: callers (the predictor and the ingress's features endpoint) go through the Redis cache
under `cache_key(FEATURES, pair=, candle_ts=, extra="w<rows>")` and call this deployment only on a
miss, so a window is computed once per (pair, closed candle) for the whole cluster, and the key
changes by itself when a new candle closes. This deployment never touches Redis itself (counting
one lookup twice would skew the shared hit/miss counters).

Expected conditions come back as `{"error": code, "message": ...}` values (no data, too little
history), not exceptions; exceptions mean real failures.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from deployments.args import AppArgs
from deployments.replica import apply_env, replica_tag
from ml.clock import now_ms

log = logging.getLogger(__name__)

MAX_ROWS = 1024


class FeaturesImpl:
    """The feature replica; deployed as `FeatureDeployment` (end of module)."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        self.args = AppArgs.model_validate(args or {})
        self.settings = apply_env(self.args.replica_env())
        from ml.data.store import CandleStore

        self.store = CandleStore(self.settings.data_dir, self.settings.timeframe)
        self.tf = self.settings.timeframe_ms
        self.computed = 0
        self.errors = 0
        self.tag = replica_tag()

    async def window(self, pair: str, candle_ts: int | None, rows: int) -> dict[str, Any]:
        """The last `rows` feature rows of `pair` ending at the candle that opens at `candle_ts`
        (None: the newest candle available)."""
        return await asyncio.to_thread(self._window, pair, candle_ts, rows)

    def _window(self, pair: str, candle_ts: int | None, rows: int) -> dict[str, Any]:
        from ml.data.store import NoCandlesError
        from ml.features import LOOKBACK_BARS, WARMUP_BARS, encode_window, feature_names_hash, latest_window
        from ml.pairs import validate_pair

        validate_pair(pair)
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"rows must be an integer from 1 to {MAX_ROWS}, got {rows!r}")
        want = max(self.args.feature_tail_bars, LOOKBACK_BARS + rows + 1)
        try:
            candles = self._candles(pair, want, candle_ts)
        except NoCandlesError:
            self.errors += 1
            return {"error": "no_data", "message": f"no candles for {pair}"}
        if candle_ts is not None and len(candles):
            candles = candles[candles["ts"] <= int(candle_ts)].reset_index(drop=True)
        if len(candles) == 0:
            self.errors += 1
            return {"error": "no_data", "message": f"no candles for {pair}"}
        need = WARMUP_BARS + rows
        if len(candles) < need:
            self.errors += 1
            return {"error": "not_enough_data",
                    "message": f"{pair} has {len(candles)} candles; a window of {rows} rows needs {need}"}
        frame = latest_window(candles, rows)
        self.computed += 1
        return encode_window(frame, pair=pair, bars=len(candles), feature_hash=feature_names_hash())

    def _candles(self, pair: str, n: int, candle_ts: int | None):
        if candle_ts is None:
            return self.store.tail(pair, n)
        # Read a little beyond n so that a candle appended after the caller's snapshot is cut off
        # and the window still ends exactly at candle_ts.
        return self.store.tail(pair, n + 16)

    async def stats(self) -> dict[str, Any]:
        return {"replica": self.tag, "computed": self.computed, "errors": self.errors, "at": now_ms()}


# Decorated here (not with @): the class stays importable by name, so Serve pickles it by reference.
# Its options (replicas, autoscaling, resources) come from serve_config.yaml only.
FeatureDeployment = serve.deployment(name="Features")(FeaturesImpl)
