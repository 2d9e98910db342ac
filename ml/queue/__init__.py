"""The training queue's rules, Ray-free: requests and their limits, jobs, the state machine, its views and
the periodic-retrain choice. May import ml.config, ml.pairs and ml.registry.production; never Ray."""
