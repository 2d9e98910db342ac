"""Simulated trading that follows forecasts (trades, equity, Sharpe, drawdown), the same for a backtest
and for live predictions. Ray-free; imports only numpy and `ml.config`'s constants."""
