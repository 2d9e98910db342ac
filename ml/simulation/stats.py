"""What a simulated account did, in the numbers a trader reads: trades, win rate, return, Sharpe
(annualised for the timeframe: crypto trades every bar of the year), maximum drawdown, exposure,
turnover and fees; and the same for buying and holding over the same bars."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from ml.simulation.trades import EXIT_REASONS, Simulator

YEAR_MS = 365 * 24 * 3600 * 1000


def bars_per_year(timeframe_ms: int) -> float:
    return YEAR_MS / float(timeframe_ms)


def max_drawdown(equity: np.ndarray) -> float:
    """The largest fall from a running peak, as a fraction of the peak (0 when it never fell)."""
    if len(equity) == 0:
        return 0.0
    peaks = np.maximum.accumulate(equity)
    return float(np.max((peaks - equity) / peaks))


def sharpe(equity: np.ndarray, timeframe_ms: int) -> float | None:
    """Mean over standard deviation of the per-bar returns, times sqrt(bars per year); None when it
    is undefined (fewer than two returns, or no variation)."""
    if len(equity) < 3:
        return None
    r = np.diff(equity) / equity[:-1]
    sd = float(np.std(r, ddof=1))
    if not math.isfinite(sd) or sd == 0.0:
        return None
    return float(np.mean(r) / sd * math.sqrt(bars_per_year(timeframe_ms)))


def curve_stats(equity: np.ndarray, timeframe_ms: int) -> dict[str, Any]:
    return {"totalReturn": float(equity[-1] / equity[0] - 1.0) if len(equity) else 0.0,
            "sharpe": sharpe(equity, timeframe_ms), "maxDrawdown": max_drawdown(equity)}


def summary(sim: Simulator, timeframe_ms: int, closes: np.ndarray | None = None) -> dict[str, Any]:
    """The account's numbers; with the bars' `closes`, buy-and-hold over them beside it."""
    closed = [t for t in sim.trades if not t.open]
    wins = [t for t in closed if (t.net_return or 0.0) > 0]
    equity = np.array([1.0] + [v for _, v in sim.curve], dtype=np.float64)
    out: dict[str, Any] = {
        "trades": len(closed), "open": sim.position.to_dict() if sim.position else None,
        "wins": len(wins), "winRate": len(wins) / len(closed) if closed else None,
        "long": sum(t.side == "LONG" for t in closed), "short": sum(t.side == "SHORT" for t in closed),
        "exits": {r: n for r, n in Counter(t.reason for t in closed).items() if r in EXIT_REASONS},
        "equity": sim.equity, **curve_stats(equity, timeframe_ms),
        "exposure": sim.bars_in_position / sim.bars if sim.bars else 0.0,
        "turnover": 2 * len(closed) / sim.bars if sim.bars else 0.0,   # sides traded per bar
        "feesPaid": sim.fees_paid, "bars": sim.bars,
        "avgNetReturn": float(np.mean([t.net_return for t in closed])) if closed else None,
        "peakReturn": max((t.peak_return for t in sim.trades), default=None),
        "worstReturn": min((t.worst_return for t in sim.trades), default=None),
    }
    if closes is not None and len(closes):
        c = np.asarray(closes, dtype=np.float64)
        out["buyAndHold"] = curve_stats(c / c[0], timeframe_ms)
    return out
