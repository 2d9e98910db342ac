"""Features: the causal per-timestep feature matrix, its fast serving window (and its JSON codec), and
the look-ahead check that any feature function can be run through. Imports ml.config and ml.clock only."""

from ml.features.catalog import CATALOG, FeatureSpec
from ml.features.causality import LeakReport, LookAheadError, assert_causal, find_lookahead
from ml.features.matrix import (
    FEATURE_NAMES,
    LOOKBACK_BARS,
    MIN_WARMUP_BARS,
    N_FEATURES,
    WARMUP_BARS,
    feature_matrix,
    feature_names_hash,
)
from ml.features.window import decode_window, encode_window, last_row, latest_window

__all__ = [
    "CATALOG",
    "FEATURE_NAMES",
    "LOOKBACK_BARS",
    "MIN_WARMUP_BARS",
    "N_FEATURES",
    "WARMUP_BARS",
    "FeatureSpec",
    "LeakReport",
    "LookAheadError",
    "assert_causal",
    "decode_window",
    "encode_window",
    "feature_matrix",
    "feature_names_hash",
    "find_lookahead",
    "last_row",
    "latest_window",
]
