"""Evaluation, Ray-free: the walk-forward backtest and its baselines, the backtest report, and live
accuracy with the degraded rule. May import ml.training, ml.features, ml.data, ml.metrics; never Ray."""
