"""Market data: the candle schema, its validation, the sources and the candle store."""
