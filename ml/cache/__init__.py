"""The serving cache: keys.py (key schema, kinds, TTLs), local.py (stored values, the in-process TTL
cache), client.py (the Redis `Cache`). Imports ml.config and redis only (no Ray)."""
