"""The history record of one served prediction (what the Storage actor appends per pair and the
accuracy monitor later resolves against the candles that followed)."""

from __future__ import annotations

import uuid
from typing import Any


def history_record(pair: str, pred: dict[str, Any], cached: bool, ts: int, *, event_id: int | None = None,
                   event_data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A served prediction as stored: every answer counts, cached or not (`cached` says which). A
    prediction made when a candle closed carries its stream event (`eventId`, and `eventData`: the
    body sent), so a reconnecting client is replayed exactly what it missed (`ml.serving.events`)."""
    rec = {
        "id": uuid.uuid4().hex,
        "requestId": f"{pair}_{ts}",
        "pair": pair,
        "timestamp": ts,
        "direction": pred.get("direction"),
        "probability": pred.get("probability"),
        "confidence": pred.get("confidence"),
        "signal": pred.get("signal"),
        "volatility": pred.get("volatility"),
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
    if event_id is not None:
        rec["eventId"] = int(event_id)
        rec["eventData"] = event_data
    return rec
