"""Simulated trades that follow forecasts, one position at a time per pair (no Ray, no I/O).

The same `Simulator` runs over a backtest's walk-forward predictions and over the live predictions
made on each candle close, so both report numbers computed the same way (docs/evaluation.md,
"Simulated trading"). Per bar, in time order: `on_candle(bar)` first (it may close the open trade on
that bar's prices), then `on_forecast(forecast)` made at that bar's close (it may open one).

Rules, all in `SimulationSettings` (ml/config.py):
- **Side**: the forecast's signal: BUY/STRONG_BUY -> LONG, SELL/STRONG_SELL -> SHORT, HOLD -> WAIT.
  Nothing opens while a trade is open or without a positive volatility.
- **Entry** at the forecast bar's close, worse by `slippage_bps` (a market order).
- **Take-profit / stop-loss** at `tp_mult` / `sl_mult` times the predicted volatility (a fraction of
  the price over the horizon) away from the entry.
- **Exit** on a later bar: a bar that opens beyond the stop or the target fills at its open (a gap
  through the stop costs more than the stop); else a bar whose range touches the stop exits at the
  stop, one that touches the target at the target; a bar that touches both is counted as the stop
  (the order of prices inside a bar is unknown, so the conservative one). A trade still open at the
  close of its `horizon`-th bar exits at that close. Market exits (stop, gap, expiry) pay slippage;
  the target is a resting limit order and fills at its price.
- **Fees**: `fee_bps` per side, on the notional of each side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

LONG_SIGNALS = frozenset({"BUY", "STRONG_BUY"})
SHORT_SIGNALS = frozenset({"SELL", "STRONG_SELL"})
EXIT_REASONS = ("take_profit", "stop_loss", "gap_stop", "gap_target", "expiry")


@dataclass(frozen=True)
class SimConfig:
    tp_mult: float = 1.5
    sl_mult: float = 1.0
    fee_bps: float = 10.0
    slippage_bps: float = 2.0

    def __post_init__(self) -> None:
        if self.tp_mult <= 0 or self.sl_mult <= 0:
            raise ValueError("tp_mult and sl_mult must be > 0")
        if self.fee_bps < 0 or self.slippage_bps < 0:
            raise ValueError("fee_bps and slippage_bps must be >= 0")

    @classmethod
    def from_settings(cls, settings: Any) -> SimConfig:
        s = settings.simulation
        return cls(tp_mult=s.tp_mult, sl_mult=s.sl_mult, fee_bps=s.fee_bps, slippage_bps=s.slippage_bps)

    @property
    def fee(self) -> float:
        return self.fee_bps / 10_000.0

    @property
    def slip(self) -> float:
        return self.slippage_bps / 10_000.0


@dataclass(frozen=True)
class Bar:
    """One closed candle; `ts` is its open time (epoch ms)."""

    ts: int
    open: float
    high: float
    low: float
    close: float


@dataclass(frozen=True)
class Forecast:
    """A forecast made at the close of the bar that opened at `ts`."""

    ts: int
    close: float                 # that bar's close: the entry reference
    signal: str                  # BUY / STRONG_BUY / SELL / STRONG_SELL / HOLD
    volatility: float | None     # predicted move over the horizon, a fraction of the price (e.g. 0.01)
    horizon: int                 # bars until the trade expires
    probability: float | None = None


@dataclass
class Trade:
    side: str                    # LONG | SHORT
    opened_ts: int               # open time of the forecast bar (entry at its close)
    entry: float
    take_profit: float
    stop_loss: float
    expires_after: int           # bars after the entry bar
    volatility: float
    bars_held: int = 0
    closed_ts: int | None = None  # open time of the bar the trade closed on
    exit: float | None = None
    reason: str | None = None
    gross_return: float | None = None
    fees: float | None = None
    net_return: float | None = None
    peak_return: float = 0.0     # best unrealised return seen at any bar's extreme
    worst_return: float = 0.0    # worst unrealised return seen (the trade's drawdown)

    @property
    def open(self) -> bool:
        return self.closed_ts is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def side_of(signal: str) -> str:
    if signal in LONG_SIGNALS:
        return "LONG"
    if signal in SHORT_SIGNALS:
        return "SHORT"
    return "WAIT"


def _return(side: str, entry: float, price: float) -> float:
    return price / entry - 1.0 if side == "LONG" else 1.0 - price / entry


@dataclass
class Simulator:
    """One pair's simulated account: at most one open trade; equity compounds the closed trades."""

    config: SimConfig = field(default_factory=SimConfig)
    trades: list[Trade] = field(default_factory=list)
    equity: float = 1.0
    bars: int = 0                # bars seen by on_candle
    bars_in_position: int = 0
    fees_paid: float = 0.0       # in equity units
    last_ts: int | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (bar ts, equity marked to that close)

    @property
    def position(self) -> Trade | None:
        return self.trades[-1] if self.trades and self.trades[-1].open else None

    # ------------------------------------------------------------------------------- events
    def on_forecast(self, f: Forecast) -> Trade | None:
        """Open a trade if the forecast asks for one and none is open; returns it."""
        side = side_of(f.signal)
        vol = f.volatility
        if side == "WAIT" or self.position is not None or vol is None or not math.isfinite(vol) or vol <= 0:
            return None
        if not (math.isfinite(f.close) and f.close > 0) or f.horizon < 1:
            return None
        c = self.config
        entry = f.close * (1 + c.slip) if side == "LONG" else f.close * (1 - c.slip)
        sign = 1.0 if side == "LONG" else -1.0
        trade = Trade(side=side, opened_ts=int(f.ts), entry=entry,
                      take_profit=entry * (1 + sign * c.tp_mult * vol),
                      stop_loss=entry * (1 - sign * c.sl_mult * vol),
                      expires_after=int(f.horizon), volatility=float(vol))
        self.trades.append(trade)
        return trade

    def on_candle(self, bar: Bar) -> Trade | None:
        """Move the open trade through one later bar; returns the trade if it closed on it."""
        if self.last_ts is not None and bar.ts <= self.last_ts:
            return None  # a bar seen before (a replay after a restart): nothing happens twice
        self.last_ts = int(bar.ts)
        self.bars += 1
        trade = self.position
        closed = None
        if trade is not None and bar.ts > trade.opened_ts:
            self.bars_in_position += 1
            trade.bars_held += 1
            closed = self._advance(trade, bar)
        mark = self.equity
        if self.position is not None:
            mark = self.equity * (1 + _return(self.position.side, self.position.entry, bar.close))
        self.curve.append((int(bar.ts), mark))
        return closed

    def _advance(self, t: Trade, bar: Bar) -> Trade | None:
        long = t.side == "LONG"
        best, worst = (bar.high, bar.low) if long else (bar.low, bar.high)
        t.peak_return = max(t.peak_return, _return(t.side, t.entry, best))
        t.worst_return = min(t.worst_return, _return(t.side, t.entry, worst))
        beyond_stop = bar.open <= t.stop_loss if long else bar.open >= t.stop_loss
        beyond_target = bar.open >= t.take_profit if long else bar.open <= t.take_profit
        touches_stop = bar.low <= t.stop_loss if long else bar.high >= t.stop_loss
        touches_target = bar.high >= t.take_profit if long else bar.low <= t.take_profit
        if beyond_stop:
            return self._close(t, bar.ts, self._market(t, bar.open), "gap_stop")
        if beyond_target:
            return self._close(t, bar.ts, self._market(t, bar.open), "gap_target")
        if touches_stop:
            return self._close(t, bar.ts, self._market(t, t.stop_loss), "stop_loss")
        if touches_target:
            return self._close(t, bar.ts, t.take_profit, "take_profit")
        if t.bars_held >= t.expires_after:
            return self._close(t, bar.ts, self._market(t, bar.close), "expiry")
        return None

    def _market(self, t: Trade, price: float) -> float:
        """A market exit fills worse by the slippage: a long sells lower, a short buys back higher."""
        s = self.config.slip
        return price * (1 - s) if t.side == "LONG" else price * (1 + s)

    def _close(self, t: Trade, ts: int, price: float, reason: str) -> Trade:
        fee = self.config.fee
        t.closed_ts, t.exit, t.reason = int(ts), float(price), reason
        t.gross_return = _return(t.side, t.entry, price)
        t.fees = fee * (1.0 + price / t.entry)  # both sides' notional, as a fraction of the entry notional
        t.net_return = t.gross_return - t.fees
        self.fees_paid += self.equity * t.fees
        self.equity *= 1.0 + t.net_return
        return t

    # ------------------------------------------------------------------------------- state
    def to_state(self) -> dict[str, Any]:
        """Everything needed to continue later (JSON-able): persisted through the Storage actor."""
        return {"config": asdict(self.config), "trades": [t.to_dict() for t in self.trades],
                "equity": self.equity, "bars": self.bars, "barsInPosition": self.bars_in_position,
                "feesPaid": self.fees_paid, "lastTs": self.last_ts, "curve": [list(p) for p in self.curve]}

    @classmethod
    def from_state(cls, state: dict[str, Any], config: SimConfig | None = None) -> Simulator:
        sim = cls(config or SimConfig(**state["config"]))
        sim.trades = [Trade(**t) for t in state.get("trades", [])]
        sim.equity = float(state.get("equity", 1.0))
        sim.bars = int(state.get("bars", 0))
        sim.bars_in_position = int(state.get("barsInPosition", 0))
        sim.fees_paid = float(state.get("feesPaid", 0.0))
        sim.last_ts = state.get("lastTs")
        sim.curve = [(int(ts), float(v)) for ts, v in state.get("curve", [])]
        return sim


def simulate(bars: list[Bar], forecasts: dict[int, Forecast], config: SimConfig | None = None) -> Simulator:
    """A backtest's trades: every bar in order, then the forecast made at its close (if any)."""
    sim = Simulator(config or SimConfig())
    for bar in bars:
        sim.on_candle(bar)
        f = forecasts.get(int(bar.ts))
        if f is not None:
            sim.on_forecast(f)
    return sim
