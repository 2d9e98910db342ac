"""Simulated trading on a backtest's walk-forward predictions (`ml.simulation`, the simulator the live
service uses too), and the per-row export for vectorbt/freqtrade-style analysis.

Each test row is a forecast made at the close of its bar: the signal of its P(up)
(`ml.serving.signals.classify`, the served thresholds), and a volatility over the horizon: the
network's predicted one (`ml.training.volatility`) when it has a volatility head, else the naive
forecast (the backtest says which in `trading.config.volatility`). The simulator walks every bar
from the first test row to the end. `trailing_volatility` is that naive forecast from closes
(sqrt(h x mean of the last `labels.vol_window` squared one-bar log returns), `ml.training.volatility`),
for a live account whose model answer has no volatility.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.serving.signals import classify
from ml.simulation.stats import summary
from ml.simulation.trades import Bar, Forecast, SimConfig, Simulator, simulate


def trailing_volatility(close: np.ndarray, horizon: int, window: int) -> np.ndarray:
    """Per bar, the naive volatility forecast over `horizon` bars from the returns up to that bar: the
    one models are scored against (`ml.training.volatility`); NaN before `window` returns exist."""
    from ml.training.volatility import log_returns, served_volatility, trailing_variance

    nv = trailing_variance(log_returns(close), int(window))
    return served_volatility(nv[:, None], [int(horizon)])[:, 0]


def bars_from(candles: pd.DataFrame, start_ts: int) -> list[Bar]:
    rows = candles[candles["ts"] >= int(start_ts)]
    return [Bar(int(t), float(o), float(h), float(lo), float(c))
            for t, o, h, lo, c in zip(rows["ts"], rows["open"], rows["high"], rows["low"], rows["close"], strict=True)]


def forecasts_of(ts: np.ndarray, close: np.ndarray, probs: np.ndarray, volatility: np.ndarray, horizon: int,
                 strong: float, weak: float) -> dict[int, Forecast]:
    out = {}
    for t, c, p, v in zip(ts, close, probs, volatility, strict=True):
        signal = classify(float(p), strong, weak).signal
        out[int(t)] = Forecast(int(t), float(c), signal, float(v) if np.isfinite(v) else None, int(horizon),
                               probability=float(p))
    return out


def positions(sim: Simulator, ts: np.ndarray) -> np.ndarray:
    """+1 / -1 / 0: what the account holds after the close of each row's bar (its forecast included)."""
    pos = np.zeros(len(ts))
    for t in sim.trades:
        side = 1.0 if t.side == "LONG" else -1.0
        end = t.closed_ts if t.closed_ts is not None else np.iinfo(np.int64).max
        pos[(ts >= t.opened_ts) & (ts < end)] = side
    return pos


def simulated_trading(candles: pd.DataFrame, ts: np.ndarray, close: np.ndarray, probs: dict[str, np.ndarray],
                      volatility: np.ndarray, *, horizon: int, timeframe_ms: int, strong: float, weak: float,
                      config: SimConfig, volatility_source: str | None = None,
                      ) -> tuple[dict[str, Any], dict[str, Simulator]]:
    """({name: the simulator's summary, ..., "config": ...}, {name: simulator}) for every model of `probs`;
    every model trades with the same `volatility` (so their trades differ by their calls only)."""
    bars = bars_from(candles, int(ts[0])) if len(ts) else []
    bar_closes = np.array([b.close for b in bars])
    out: dict[str, Any] = {"config": {"tpMult": config.tp_mult, "slMult": config.sl_mult,
                                      "feeBps": config.fee_bps, "slippageBps": config.slippage_bps,
                                      "volatility": volatility_source or "naive trailing forecast"}}
    sims = {}
    for name, p in probs.items():
        sim = simulate(bars, forecasts_of(ts, close, p, volatility, horizon, strong, weak), config)
        sims[name] = sim
        out[name] = summary(sim, timeframe_ms, bar_closes)
    return out, sims


def export_rows(path: str | Path, ts: np.ndarray, close: np.ndarray, fold: np.ndarray,
                per_horizon: dict[int, dict[str, Any]], default_horizon: int) -> Path:
    """Every test row as Parquet, written atomically: ts, ts_ms, close, fold, then per horizon h:
    p_<model>_h<h> for every model, vol_h<h> (the volatility the simulator used), signal_h<h> and
    position_h<h> (the network's signal and its simulated account after that bar's close).
    `volatility`, `signal` and `position` repeat the default horizon's columns for older readers.

    per_horizon: {h: {"probs": {name: P(up)}, "volatility": (N,), "signal": (N,), "position": (N,)}}.
    """
    import io

    from ml.storage.atomic import atomic_write_bytes

    cols: dict[str, Any] = {"ts": pd.to_datetime(ts, unit="ms", utc=True), "ts_ms": ts.astype("int64"),
                            "close": close, "fold": fold.astype("int64")}
    for h, block in sorted(per_horizon.items()):
        for name, p in block["probs"].items():
            cols[f"p_{name}_h{h}"] = p
        cols[f"vol_h{h}"] = block["volatility"]
        cols[f"signal_h{h}"] = np.asarray(block["signal"], dtype=object).astype(str)
        cols[f"position_h{h}"] = np.asarray(block["position"]).astype("int8")
    d = int(default_horizon)
    cols["volatility"] = cols[f"vol_h{d}"]
    cols["signal"] = cols[f"signal_h{d}"]
    cols["position"] = cols[f"position_h{d}"]
    frame = pd.DataFrame(cols)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    target = Path(path)
    atomic_write_bytes(target, buf.getvalue())
    return target
