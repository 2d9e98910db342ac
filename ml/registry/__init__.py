"""The model registry, Ray-free: versions and the promotion rule, the production reader, the model loader.
May import ml.training (nets, scaler, calibration) and ml.clock; never Ray."""
