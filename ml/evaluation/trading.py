"""Simulated trading on a backtest's walk-forward predictions (`ml.simulation`, the simulator the live
service uses too), and the per-row export for vectorbt/freqtrade-style analysis.

Each test row is a forecast made at the close of its bar: the signal of its P(up)
(`ml.serving.signals.classify`, the served thresholds), and a volatility. Until a model predicts
volatility, that is the naive forecast: the standard deviation of the last `VOL_WINDOW` one-bar log
returns, times sqrt(horizon). The simulator walks every bar from the first test row to the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.serving.signals import classify
from ml.simulation.stats import summary
from ml.simulation.trades import Bar, Forecast, SimConfig, Simulator, simulate

VOL_WINDOW = 50


def trailing_volatility(close: np.ndarray, horizon: int, window: int = VOL_WINDOW) -> np.ndarray:
    """Per bar, the naive volatility forecast over `horizon` bars from the returns up to that bar (NaN
    before `window` returns exist)."""
    logret = np.diff(np.log(np.asarray(close, dtype=np.float64)), prepend=np.nan)
    sd = pd.Series(logret).rolling(window, min_periods=window).std(ddof=1).to_numpy()
    return sd * np.sqrt(float(horizon))


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
                      config: SimConfig) -> tuple[dict[str, Any], dict[str, Simulator]]:
    """({name: the simulator's summary, ..., "config": ...}, {name: simulator}) for every model of `probs`."""
    bars = bars_from(candles, int(ts[0])) if len(ts) else []
    bar_closes = np.array([b.close for b in bars])
    out: dict[str, Any] = {"config": {"tpMult": config.tp_mult, "slMult": config.sl_mult,
                                      "feeBps": config.fee_bps, "slippageBps": config.slippage_bps,
                                      "volatility": f"trailing {VOL_WINDOW}-bar std of log returns x sqrt(h)"}}
    sims = {}
    for name, p in probs.items():
        sim = simulate(bars, forecasts_of(ts, close, p, volatility, horizon, strong, weak), config)
        sims[name] = sim
        out[name] = summary(sim, timeframe_ms, bar_closes)
    return out, sims


def export_rows(path: str | Path, ts: np.ndarray, close: np.ndarray, fold: np.ndarray, probs: dict[str, np.ndarray],
                volatility: np.ndarray, signals: np.ndarray, position: np.ndarray, horizon: int) -> Path:
    """Every test row as Parquet: ts, close, fold, p_<model>_h<h> per model, volatility, signal,
    position (the simulated account after that bar's close). Written atomically."""
    from ml.storage.atomic import atomic_write_bytes

    frame = pd.DataFrame({"ts": pd.to_datetime(ts, unit="ms", utc=True), "ts_ms": ts.astype("int64"),
                          "close": close, "fold": fold.astype("int64")})
    for name, p in probs.items():
        frame[f"p_{name}_h{horizon}"] = p
    frame["volatility"] = volatility
    frame["signal"] = signals
    frame["position"] = position.astype("int8")
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    target = Path(path)
    atomic_write_bytes(target, buf.getvalue())
    return target
