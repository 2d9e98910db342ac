"""The trade simulator (ml.simulation), checked by hand: take-profit, stop-loss, expiry, a gap through
the stop, a bar touching both, fees and slippage, WAIT, one position at a time, state kept across a
restart, and the same trades whether the bars come all at once (backtest) or one by one (live)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.simulation.stats import bars_per_year, max_drawdown, sharpe, summary
from ml.simulation.trades import Bar, Forecast, SimConfig, Simulator, simulate

TF = 300_000
NO_COSTS = SimConfig(tp_mult=1.5, sl_mult=1.0, fee_bps=0.0, slippage_bps=0.0)


def bar(i: int, o: float, h: float, lo: float, c: float) -> Bar:
    return Bar(ts=i * TF, open=o, high=h, low=lo, close=c)


def forecast(i: int, close: float, signal: str, vol: float = 0.02, horizon: int = 5) -> Forecast:
    return Forecast(ts=i * TF, close=close, signal=signal, volatility=vol, horizon=horizon)


def test_long_take_profit_with_fees():
    sim = Simulator(SimConfig(tp_mult=1.5, sl_mult=1.0, fee_bps=10.0, slippage_bps=0.0))
    t = sim.on_forecast(forecast(0, 100.0, "BUY", vol=0.02))
    assert (t.side, t.entry, t.take_profit, t.stop_loss) == ("LONG", 100.0, pytest.approx(103.0), pytest.approx(98.0))
    assert sim.on_candle(bar(1, 100.5, 102.0, 99.0, 101.0)) is None  # touches neither
    closed = sim.on_candle(bar(2, 101.0, 103.5, 100.0, 103.2))
    assert closed is t and t.reason == "take_profit" and t.exit == pytest.approx(103.0)
    assert t.gross_return == pytest.approx(0.03)
    assert t.fees == pytest.approx(0.001 * (1 + 1.03))  # 10 bps on the entry and on the exit notional
    assert t.net_return == pytest.approx(0.03 - 0.00203)
    assert sim.equity == pytest.approx(1.02797)
    assert t.peak_return == pytest.approx(0.035) and t.worst_return == pytest.approx(-0.01)


def test_short_stop_loss_pays_slippage_on_entry_and_exit():
    sim = Simulator(SimConfig(tp_mult=1.5, sl_mult=1.0, fee_bps=0.0, slippage_bps=5.0))
    t = sim.on_forecast(forecast(0, 100.0, "STRONG_SELL", vol=0.01))
    assert t.side == "SHORT" and t.entry == pytest.approx(99.95)  # sold 5 bps below the close
    assert t.stop_loss == pytest.approx(99.95 * 1.01) and t.take_profit == pytest.approx(99.95 * 0.985)
    sim.on_candle(bar(1, 100.0, 101.2, 99.9, 101.0))
    assert t.reason == "stop_loss"
    assert t.exit == pytest.approx(99.95 * 1.01 * 1.0005)  # bought back 5 bps above the stop
    assert t.net_return == pytest.approx(1 - t.exit / 99.95) and t.net_return < -0.01


def test_expiry_exits_at_the_close_of_the_last_bar():
    sim = Simulator(SimConfig(tp_mult=3.0, sl_mult=3.0, fee_bps=0.0, slippage_bps=10.0))
    t = sim.on_forecast(forecast(0, 100.0, "BUY", vol=0.01, horizon=2))
    sim.on_candle(bar(1, 100.0, 100.5, 99.5, 100.2))
    assert t.open
    sim.on_candle(bar(2, 100.2, 100.8, 99.8, 100.6))
    assert t.reason == "expiry" and t.bars_held == 2
    assert t.exit == pytest.approx(100.6 * 0.999)  # a market sell 10 bps under the close
    assert t.gross_return == pytest.approx(100.6 * 0.999 / (100.0 * 1.001) - 1)


def test_a_gap_through_the_stop_fills_at_the_open():
    sim = Simulator(NO_COSTS)
    t = sim.on_forecast(forecast(0, 100.0, "BUY", vol=0.02))  # stop at 98
    sim.on_candle(bar(1, 97.0, 97.5, 96.0, 97.2))
    assert t.reason == "gap_stop" and t.exit == 97.0  # worse than the stop
    assert t.net_return == pytest.approx(-0.03)
    sim2 = Simulator(NO_COSTS)
    t2 = sim2.on_forecast(forecast(0, 100.0, "SELL", vol=0.02))  # short: target at 97
    sim2.on_candle(bar(1, 96.0, 96.5, 95.5, 96.2))
    assert t2.reason == "gap_target" and t2.exit == 96.0 and t2.net_return == pytest.approx(0.04)


def test_a_bar_touching_both_counts_as_the_stop():
    sim = Simulator(NO_COSTS)
    t = sim.on_forecast(forecast(0, 100.0, "BUY", vol=0.02))
    sim.on_candle(bar(1, 100.0, 104.0, 97.0, 101.0))
    assert t.reason == "stop_loss" and t.exit == pytest.approx(98.0)


def test_hold_waits_and_one_position_at_a_time():
    sim = Simulator(NO_COSTS)
    assert sim.on_forecast(forecast(0, 100.0, "HOLD")) is None
    assert sim.on_forecast(forecast(0, 100.0, "BUY", vol=0.0)) is None  # no volatility: no stops to set
    assert sim.on_forecast(forecast(0, 100.0, "BUY", vol=math.nan)) is None
    first = sim.on_forecast(forecast(0, 100.0, "BUY"))
    assert sim.on_forecast(forecast(0, 100.0, "SELL")) is None and sim.position is first
    sim.on_candle(bar(1, 100.0, 100.5, 99.5, 100.0))
    assert sim.on_forecast(forecast(1, 100.0, "SELL")) is None  # still open
    assert len(sim.trades) == 1


def test_a_bar_seen_twice_moves_nothing_twice():
    sim = Simulator(NO_COSTS)
    t = sim.on_forecast(forecast(0, 100.0, "BUY", horizon=2))
    b = bar(1, 100.0, 100.5, 99.5, 100.1)
    sim.on_candle(b)
    sim.on_candle(b)
    assert t.bars_held == 1 and t.open and sim.bars == 1


def _path(n: int = 300, seed: int = 3) -> tuple[list[Bar], dict[int, Forecast]]:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.004, n)))
    bars, forecasts = [], {}
    prev = 100.0
    for i, c in enumerate(close):
        o = prev * (1 + rng.normal(0, 0.001))
        hi, lo = max(o, c) * (1 + abs(rng.normal(0, 0.002))), min(o, c) * (1 - abs(rng.normal(0, 0.002)))
        bars.append(Bar(i * TF, o, hi, lo, float(c)))
        signal = ("BUY", "SELL", "HOLD")[int(rng.integers(0, 3))]
        forecasts[i * TF] = Forecast(i * TF, float(c), signal, volatility=0.006, horizon=6)
        prev = float(c)
    return bars, forecasts


def test_live_one_bar_at_a_time_with_restarts_gives_the_backtests_trades():
    bars, forecasts = _path()
    cfg = SimConfig(tp_mult=1.5, sl_mult=1.0, fee_bps=10.0, slippage_bps=2.0)
    backtest = simulate(bars, forecasts, cfg)
    state = Simulator(cfg).to_state()
    for b in bars:  # live: each close in its own process life, the state stored in between
        live = Simulator.from_state(state)
        live.on_candle(b)
        live.on_forecast(forecasts[b.ts])
        state = live.to_state()
    live = Simulator.from_state(state)
    assert [t.to_dict() for t in live.trades] == [t.to_dict() for t in backtest.trades]
    assert live.equity == backtest.equity and len(backtest.trades) > 10
    assert summary(live, TF) == summary(backtest, TF)


def test_summary_numbers_by_hand():
    eq = np.array([1.0, 1.1, 0.99, 1.2])
    assert max_drawdown(eq) == pytest.approx(0.1)  # 1.1 -> 0.99
    r = np.array([0.1, 0.99 / 1.1 - 1, 1.2 / 0.99 - 1])
    assert sharpe(eq, TF) == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(105_120))
    assert bars_per_year(TF) == 105_120 and sharpe(np.ones(5), TF) is None
    bars, forecasts = _path(60)
    sim = simulate(bars, forecasts, NO_COSTS)
    s = summary(sim, TF, np.array([b.close for b in bars]))
    closed = [t for t in sim.trades if not t.open]
    assert s["trades"] == len(closed) and s["wins"] == sum(t.net_return > 0 for t in closed)
    assert s["equity"] == pytest.approx(float(np.prod([1 + t.net_return for t in closed])))
    assert s["feesPaid"] == 0.0 and 0.0 < s["exposure"] <= 1.0
    assert s["buyAndHold"]["totalReturn"] == pytest.approx(bars[-1].close / bars[0].close - 1)


# ------------------------------------------------------------------------------------ live account


def test_the_live_document_gives_the_backtests_trades_through_json():
    """Closes one at a time through the stored JSON document (as the service does after each candle
    close) give exactly the trades of the backtest on the same bars and forecasts."""
    import json

    from ml.simulation.live import advance, view

    bars, forecasts = _path(200, seed=5)
    cfg = SimConfig(tp_mult=1.5, sl_mult=1.0, fee_bps=10.0, slippage_bps=2.0)
    backtest = simulate(bars, forecasts, cfg)
    doc = None
    for i, b in enumerate(bars):
        f = forecasts[b.ts]
        pred = {"signal": f.signal, "horizon": f.horizon, "probability": 0.6, "fallback": False}
        seen = bars[max(0, i - 3):i + 1]  # the caller may pass bars seen before: they move nothing twice
        doc, _ = advance(doc, "BTC", seen, pred, f.volatility, cfg, now=b.ts)
        doc = json.loads(json.dumps(doc, allow_nan=False))  # what the Storage actor keeps
    live = Simulator.from_state(doc["state"], cfg)
    assert [t.to_dict() for t in live.trades] == [t.to_dict() for t in backtest.trades]
    body = view(doc, "BTC", TF, cfg)
    closed = [t for t in backtest.trades if not t.open]
    assert body["stats"]["trades"] == len(closed) and body["stats"]["equity"] == pytest.approx(backtest.equity)
    assert body["trades"][0] == closed[-1].to_dict()  # newest first
    assert body["buyAndHold"]["totalReturn"] == pytest.approx(bars[-1].close / bars[0].close - 1)
    assert body["since"] == bars[0].ts


def test_a_fallback_opens_nothing_but_its_bar_still_moves_the_trade():
    from ml.simulation.live import advance

    cfg = NO_COSTS
    doc, did = advance(None, "BTC", [bar(0, 100, 100.5, 99.5, 100)], {"signal": "BUY", "horizon": 2}, 0.02, cfg, 0)
    assert did["opened"]["side"] == "LONG"
    doc, did = advance(doc, "BTC", [bar(1, 100, 103.5, 99.9, 103)], {"fallback": True, "signal": "HOLD"}, 0.02,
                       cfg, 1)
    assert did["opened"] is None and did["closed"][0]["reason"] == "take_profit"
    doc, did = advance(doc, "BTC", [bar(2, 103, 104, 102, 103.5)], {"fallback": True, "signal": "SELL"}, 0.02,
                       cfg, 2)
    assert did == {"closed": [], "opened": None}


def test_the_live_document_stays_bounded(monkeypatch):
    from ml.simulation import live

    monkeypatch.setattr(live, "MAX_CURVE", 150)
    monkeypatch.setattr(live, "MAX_TRADES", 5)
    bars, forecasts = _path(live.MAX_CURVE + 100, seed=9)
    doc = None
    for b in bars:
        f = forecasts[b.ts]
        doc, _ = live.advance(doc, "BTC", [b], {"signal": f.signal, "horizon": 2}, 0.004, NO_COSTS, b.ts)
    assert len(doc["closes"]) == live.MAX_CURVE and len(doc["state"]["curve"]) == live.MAX_CURVE
    assert len(doc["state"]["trades"]) <= live.MAX_TRADES + 1
    assert doc["state"]["bars"] == len(bars)  # the counters are all-time
