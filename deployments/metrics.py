"""The Serve replicas' own numbers (`ray.serve.metrics`, which adds the deployment, replica and
application labels): predictions served, their latency, cache hits and misses by kind, and whether
this replica's cache has lost Redis. Names and meanings are in `actors.metrics.CATALOG` and
docs/metrics.md.

A recording is a few in-process updates that never raise (`actors.metrics.Recorder`: a failure is
logged once per process); `metrics.enabled: false` turns them into no-ops.
"""

from __future__ import annotations

from typing import Any

from actors.metrics import COUNTER, GAUGE, HISTOGRAM, SIGNAL_VALUES, Recorder


def _serve_factory(kind: str) -> Any:
    from ray.serve import metrics

    return {COUNTER: metrics.Counter, GAUGE: metrics.Gauge, HISTOGRAM: metrics.Histogram}[kind]


class ServeMetrics:
    """What one ingress replica records; created in the replica's constructor."""

    def __init__(self, enabled: bool) -> None:
        self.rec = Recorder(_serve_factory, enabled=enabled)

    def served(self, pair: str, pred: dict[str, Any], hit: Any) -> None:
        """One prediction answered (each pair of GET /api/predictions counts once)."""
        model, signal = pred.get("modelType") or "", pred.get("signal") or ""
        self.rec.inc("tbml_predictions_total", 1, pair=pair, model=model, signal=signal,
                     fallback=bool(pred.get("fallback")), cached=hit is not None)
        if not pred.get("fallback"):
            self.rec.set("tbml_prediction_probability", pred.get("probability"), pair=pair, model=model)
            self.rec.set("tbml_prediction_signal", SIGNAL_VALUES.get(signal), pair=pair, model=model)

    def latency(self, endpoint: str, seconds: float) -> None:
        self.rec.observe("tbml_prediction_latency_seconds", seconds, endpoint=endpoint)

    def lookup(self, kind: str, hit: Any) -> None:
        """One cache lookup of `kind` (predictions, features): a hit or a miss."""
        self.rec.inc("tbml_cache_hits_total" if hit is not None else "tbml_cache_misses_total", 1, kind=kind)

    def redis(self, degraded: bool) -> None:
        """This replica's cache state, set with every answer (a gauge a live replica keeps fresh)."""
        self.rec.set("tbml_redis_degraded", 1.0 if degraded else 0.0)


__all__ = ["ServeMetrics"]
