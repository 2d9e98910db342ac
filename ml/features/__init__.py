"""Features (SPEC §4): the causal per-timestep feature matrix and its fast serving window."""

from ml.features.catalog import CATALOG, FeatureSpec
from ml.features.matrix import (
    FEATURE_NAMES,
    LOOKBACK_BARS,
    MIN_WARMUP_BARS,
    N_FEATURES,
    WARMUP_BARS,
    feature_matrix,
    feature_names_hash,
    latest_window,
)

__all__ = [
    "CATALOG",
    "FEATURE_NAMES",
    "LOOKBACK_BARS",
    "MIN_WARMUP_BARS",
    "N_FEATURES",
    "WARMUP_BARS",
    "FeatureSpec",
    "feature_matrix",
    "feature_names_hash",
    "latest_window",
]
