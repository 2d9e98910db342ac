"""Market data: the candle schema and its validation, the sources (synthetic, core API, files), the
parquet candle store and the candle feed. Imports ml.clock, ml.config, ml.pairs and ml.storage.atomic
only (no Ray)."""
