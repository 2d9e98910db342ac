"""Ray-free serving domain: signals, the prediction shape and its fallback, model ids, the history
record, the response views, the per-pair snapshot and the replica's L1 memo. Imports ml only."""
