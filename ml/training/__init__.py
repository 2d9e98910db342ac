"""Training, Ray-free: config, dataset, nets, the loop, calibration, evaluation, the run's result and
`train_local`. May import ml.config, ml.clock, ml.features, ml.data and ml.metrics; never Ray."""
