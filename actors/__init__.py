"""Thin Ray actor shells around ml/: Storage (+ its remote client), TrainingQueue, AccuracyMonitor,
the market feed, and the TorchTrainer adapter the queue launches. May import ml; never deployments,
cluster or cli."""
