"""The live simulated account of a pair: the simulator of `ml.simulation.trades`, fed by the prediction
made at each candle close, its state a JSON document (`training/{PAIR}/simulation.json`, written
through the Storage actor after every close, so it survives any restart).

`advance(document, bars, prediction, volatility)` is one close: the bars closed since the last one the
account saw (older or repeated bars are ignored, so a replay after a restart moves nothing twice),
then the forecast made at the close of the newest bar. Its volatility is the one the prediction
serves for its horizon (`served_volatility`, source `model`); the caller passes the naive trailing
forecast (source `naive`) only for a model answer without one, and the document says which was used. A fallback prediction (no model answer)
opens nothing; its bar still moves an open trade. The document keeps the newest `MAX_TRADES` trades
and `MAX_CURVE` equity points; `view` reports the numbers over what is kept, beside buying and
holding over the same bars.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ml.simulation.stats import summary
from ml.simulation.trades import Bar, Forecast, SimConfig, Simulator

DOCUMENT = ("training", "simulation")  # category, name; one per pair
MODEL, NAIVE = "model", "naive"  # where a forecast's volatility came from
MAX_TRADES = 500
MAX_CURVE = 2000
RECENT_TRADES = 50


def new_document(pair: str, config: SimConfig) -> dict[str, Any]:
    return {"pair": pair, "state": Simulator(config).to_state(), "closes": [], "updatedAt": None,
            "forecasts": 0}


def served_volatility(prediction: dict[str, Any] | None) -> tuple[float | None, str | None]:
    """(volatility, MODEL) of a model answer that serves a positive finite `volatility`, else (None, None)."""
    if not prediction or prediction.get("fallback"):
        return None, None
    v = prediction.get("volatility")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
        return None, None
    return float(v), MODEL


def advance(doc: dict[str, Any] | None, pair: str, bars: list[Bar], prediction: dict[str, Any] | None,
            volatility: float | None, config: SimConfig, now: int, *, volatility_source: str | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the new document, what happened: {"closed": [...], "opened": trade | None}) for one close.
    `volatility_source` (MODEL or NAIVE) is recorded with the forecast (`lastForecast`, and counted
    per source in `volatilitySources`)."""
    doc = dict(doc) if doc else new_document(pair, config)
    sim = Simulator.from_state(doc["state"], config)
    closes = [list(c) for c in doc.get("closes", [])]
    closed = []
    for bar in sorted(bars, key=lambda b: b.ts):
        if sim.last_ts is not None and bar.ts <= sim.last_ts:
            continue
        t = sim.on_candle(bar)
        closes.append([int(bar.ts), float(bar.close)])
        if t is not None:
            closed.append(t.to_dict())
    opened = None
    newest = max(bars, key=lambda b: b.ts) if bars else None
    if prediction and newest is not None and not prediction.get("fallback") and prediction.get("signal"):
        f = Forecast(ts=newest.ts, close=newest.close, signal=str(prediction["signal"]), volatility=volatility,
                     horizon=int(prediction.get("horizon") or 1), probability=prediction.get("probability"))
        t = sim.on_forecast(f)
        source = volatility_source if volatility is not None else None
        doc["lastForecast"] = {"ts": int(newest.ts), "signal": f.signal, "horizon": f.horizon,
                               "probability": f.probability, "volatility": volatility, "volatilitySource": source}
        if source is not None:
            counts = dict(doc.get("volatilitySources") or {})
            counts[source] = int(counts.get(source, 0)) + 1
            doc["volatilitySources"] = counts
        if t is not None:
            opened = t.to_dict() | {"volatilitySource": source}
            doc["forecasts"] = int(doc.get("forecasts", 0)) + 1
    kept = [t for t in sim.trades if not t.open][-MAX_TRADES:]
    sim.trades = kept + ([sim.position] if sim.position is not None else [])
    sim.curve = sim.curve[-MAX_CURVE:]
    doc.update(state=sim.to_state(), closes=closes[-MAX_CURVE:], updatedAt=int(now))
    return doc, {"closed": closed, "opened": opened}


def view(doc: dict[str, Any] | None, pair: str, timeframe_ms: int, config: SimConfig) -> dict[str, Any]:
    """The body of `GET /api/simulations/{pair}`: the open trade, recent closed trades, the numbers."""
    doc = doc or new_document(pair, config)
    sim = Simulator.from_state(doc["state"], config)
    closes = np.array([c for _, c in doc.get("closes", [])], dtype=np.float64)
    stats = summary(sim, timeframe_ms, closes if len(closes) else None)
    closed = [t.to_dict() for t in sim.trades if not t.open]
    curve = sim.curve
    return {"pair": pair, "open": stats.pop("open"), "trades": list(reversed(closed[-RECENT_TRADES:])),
            "stats": stats, "buyAndHold": stats.pop("buyAndHold", None),
            "equityCurve": [{"ts": ts, "equity": v} for ts, v in curve[-500:]],
            "since": doc["closes"][0][0] if doc.get("closes") else None, "updatedAt": doc.get("updatedAt"),
            "lastForecast": doc.get("lastForecast"), "volatilitySources": dict(doc.get("volatilitySources") or {}),
            "config": {"tpMult": config.tp_mult, "slMult": config.sl_mult, "feeBps": config.fee_bps,
                       "slippageBps": config.slippage_bps}}
