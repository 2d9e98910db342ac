"""Live simulated trading per pair (`ml.simulation.live`, docs/evaluation.md "Simulated trading").

After each candle close the ingress has computed (`deployments.stream`), the pair's account moves on
that close's bars and opens a trade on its prediction (default model type and horizon) if the signal
says so, with take-profit and stop-loss sized from the prediction's served `volatility` for that
horizon; only a model answer without one uses the naive trailing forecast
(`ml.evaluation.trading.trailing_volatility`). The account records which one it used. The account is the
document `training/{PAIR}/simulation.json`, read and written through the Storage actor (the single
writer; closes are computed one at a time by the events hub, so one account is never written by two
closes at once), so it survives a restart of anything. `GET /api/simulations/{pair}` reads it from
the shared volume.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from ml.clock import now_ms
from ml.evaluation.trading import bars_from, trailing_volatility
from ml.simulation.live import DOCUMENT, NAIVE, advance, served_volatility, view
from ml.simulation.trades import SimConfig

log = logging.getLogger(__name__)

MAX_BACKLOG = 2000  # bars read after downtime to bring an account up to the close


class Simulations:
    def __init__(self, settings: Any, store: Any, reader: Any, actors: Any) -> None:
        self.config = SimConfig.from_settings(settings)
        self.tf = settings.timeframe_ms
        self.vol_window = int(settings.labels.vol_window)
        self.store = store
        self.reader = reader
        self.actors = actors
        self.advanced = 0
        self.failures = 0

    async def on_close(self, pair: str, candle_ts: int, prediction: dict[str, Any]) -> dict[str, Any]:
        """Move the account of `pair` to the close of the candle that opened at `candle_ts`."""
        category, name = DOCUMENT
        doc = await self.actors.storage_call("get_document", category, name, None, pair)
        last = (doc or {}).get("state", {}).get("lastTs")
        horizon = int(prediction.get("horizon") or 1)
        back = self.vol_window + 2 + (MAX_BACKLOG if last is not None else 0)
        candles = await asyncio.to_thread(self.store.tail, pair, back)
        candles = candles[candles["ts"] <= int(candle_ts)]
        if candles.empty:
            return {"closed": [], "opened": None}
        bars = bars_from(candles, int(last) + 1 if last is not None else int(candles["ts"].iloc[-1]))
        vol, source = served_volatility(prediction)
        if vol is None:  # a model answer without a volatility: the naive trailing forecast
            naive = trailing_volatility(candles["close"].to_numpy(), horizon, self.vol_window)[-1]
            vol, source = (float(naive), NAIVE) if np.isfinite(naive) else (None, None)
        doc, did = advance(doc, pair, bars, prediction, vol, self.config, now_ms(), volatility_source=source)
        await self.actors.storage_call("put_document", category, name, doc, pair)
        self.advanced += 1
        return did

    async def view(self, pair: str) -> dict[str, Any]:
        category, name = DOCUMENT
        doc = await asyncio.to_thread(self.reader.get_document, category, name, None, pair=pair)
        return view(doc, pair, self.tf, self.config) | {"timestamp": now_ms()}
