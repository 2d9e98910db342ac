"""Market data: the candle schema and its validation, the sources (synthetic, core API, files) and the
parquet candle store. Imports ml.clock, ml.config, ml.pairs and ml.storage.atomic only (no Ray)."""
