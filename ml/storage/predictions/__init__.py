"""Prediction history: segments.py (segment files), log.py (the buffered PredictionLog), maintenance.py
(compaction, cleanup). Imports only ml.storage.atomic, ml.storage.paths and the standard library."""
