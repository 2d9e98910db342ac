"""Cache keys: the kinds of cached values, their default TTLs, and `cache_key`, the one key schema.

Keys carry the last closed candle and the model version, so a new candle or a new production model
is a different key: never served stale, no invalidation needed.
"""

from __future__ import annotations

import re
from enum import StrEnum
from operator import index
from urllib.parse import quote

from ml.config import PAIR_PATTERN


class CacheKind(StrEnum):
    PREDICTIONS = "predictions"
    FEATURES = "features"
    MODEL_STATUS = "modelStatus"
    HEALTH = "health"


DEFAULT_TTLS: dict[CacheKind, float] = {
    CacheKind.PREDICTIONS: 30.0,
    CacheKind.FEATURES: 300.0,
    CacheKind.MODEL_STATUS: 60.0,
    CacheKind.HEALTH: 10.0,
}

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PAIR_RE = re.compile(PAIR_PATTERN)
_MISSING = "~"  # placeholder for an absent part; "~" is always escaped inside parts
_MAX_PART = 200


def _escape(part: str) -> str:
    """Percent-escape everything but [A-Za-z0-9._-] so ':' (the separator) and '~' never leak."""
    return quote(part, safe="").replace("~", "%7E")


def _text_part(name: str, value: str | int | None) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"cache key part {name} must be a string, got {type(value).__name__}")
    text = str(value)
    if not text or len(text) > _MAX_PART:
        raise ValueError(f"cache key part {name} must be 1..{_MAX_PART} characters")
    return _escape(text)


def cache_key(kind: CacheKind | str, *, pair: str | None = None, model: str | None = None,
              version: str | None = None, candle_ts: int | None = None, extra: str | int | None = None,
              namespace: str = "tbml") -> str:
    """`<ns>:<kind>:<pair>:<model>:<version>:<candle_ts>:<extra>`, absent parts as '~', trailing ones dropped.

    e.g. cache_key(CacheKind.PREDICTIONS, pair="BTC", model="lstm", version="v20261121-0501",
    candle_ts=1763700900000, extra="h5") == "tbml:predictions:BTC:lstm:v20261121-0501:1763700900000:h5".
    Positions are fixed, so two different part sets can never produce the same key.
    """
    kind = CacheKind(kind)
    if not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace):
        raise ValueError(f"invalid cache namespace {namespace!r}")
    if pair is not None and (not isinstance(pair, str) or not _PAIR_RE.match(pair)):
        raise ValueError(f"invalid pair {pair!r} (expected {PAIR_PATTERN})")
    if candle_ts is None:
        ts_part = _MISSING
    else:
        if isinstance(candle_ts, bool):
            raise ValueError("candle_ts must be an integer epoch ms")
        try:
            ts = index(candle_ts)
        except TypeError:
            raise ValueError(f"candle_ts must be an integer epoch ms, got {candle_ts!r}") from None
        if ts < 0:
            raise ValueError("candle_ts must be >= 0")
        ts_part = str(ts)
    parts = [
        pair or _MISSING,
        _text_part("model", model),
        _text_part("version", version),
        ts_part,
        _text_part("extra", extra),
    ]
    while parts and parts[-1] == _MISSING:
        parts.pop()
    return ":".join([namespace, kind.value, *parts])
