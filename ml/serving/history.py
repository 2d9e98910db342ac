"""The history record of one served prediction (what the Storage actor appends per pair and the
accuracy monitor later resolves against the candles that followed)."""

from __future__ import annotations

import uuid
from typing import Any


def history_record(pair: str, pred: dict[str, Any], cached: bool, ts: int) -> dict[str, Any]:
    """A served prediction as stored: every answer counts, cached or not (`cached` says which)."""
    rec = {
        "id": uuid.uuid4().hex,
        "requestId": f"{pair}_{ts}",
        "pair": pair,
        "timestamp": ts,
        "direction": pred.get("direction"),
        "probability": pred.get("probability"),
        "confidence": pred.get("confidence"),
        "signal": pred.get("signal"),
        "modelType": pred.get("modelType"),
        "modelVersion": pred.get("modelVersion"),
        "horizon": pred.get("horizon"),
        "asOf": pred.get("asOf"),
        "targetTime": pred.get("targetTime"),
        "stale": pred.get("stale"),
        "fallback": pred.get("fallback"),
        "cached": cached,
    }
    if pred.get("reason"):
        rec["reason"] = pred["reason"]
    return rec
