"""Prediction events: what `GET /api/stream/predictions` sends when a candle closes (docs/api.md).

Ray-free parts of the stream: event ids, the server-sent-event framing, the bounded buffer the events
hub keeps in memory, and the replay a reconnecting client gets (its missed events, from the stored
history and the buffer, merged). An event is `{"id": int, "pair": str, "data": body}`, where `body`
is the body of `GET /api/predictions/{pair}` (`ml.serving.prediction.prediction_body`).

Ids follow the wall clock (`max(now_ms, last + 1)`, one per pair of a close): strictly increasing,
also across a restart of the hub, which forgets its last id but not the time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

EVENT_NAME = "prediction"
MAX_ID_DIGITS = 18  # epoch ms has 13; anything longer is not an id this service gave
EVENT_ID_PATTERN = rf"^[0-9]{{1,{MAX_ID_DIGITS}}}$"  # Last-Event-ID / lastEventId as the HTTP API documents it


def first_event_id(last_id: int | None, now_ms: int) -> int:
    """The id of the first event of a close: after the last one, and not before the clock."""
    return max(int(now_ms), (int(last_id) + 1) if last_id is not None else 0)


def event_ids(first_id: int, pairs: Iterable[str]) -> dict[str, int]:
    """One id per pair of a close, in pair order (the hub and the ingress agree on this mapping)."""
    return {pair: int(first_id) + i for i, pair in enumerate(sorted(set(pairs)))}


def parse_event_id(raw: str | None) -> int | None:
    """A `Last-Event-ID` (header or query) as an integer; None when absent or empty (a fresh start).
    Raises ValueError for anything but decimal digits."""
    if raw is None:
        return None
    text = raw.strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > MAX_ID_DIGITS:
        raise ValueError(f"Last-Event-ID must be an event id (decimal digits), got {text[:40]!r}")
    return int(text)


# ------------------------------------------------------------------------------------------ framing


def sse_event(event_id: int, data: bytes, event: str = EVENT_NAME) -> bytes:
    """One event: `id`, `event`, `data` lines and the blank line that ends it. `data` is one line of
    JSON (compact JSON never contains a raw newline)."""
    if b"\n" in data or b"\r" in data:
        raise ValueError("event data must be a single line")
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (int(event_id), event.encode(), data)


def sse_comment(text: str) -> bytes:
    """A comment line (ignored by EventSource): the heartbeat that keeps proxies from closing an idle
    connection, and the note before the stream ends."""
    return b": " + " ".join(text.split()).encode() + b"\n\n"


def sse_retry(ms: int) -> bytes:
    """How long an EventSource waits before it reconnects (it then sends Last-Event-ID)."""
    return b"retry: %d\n\n" % int(ms)


# ------------------------------------------------------------------------------------------ buffer


class EventBuffer:
    """The newest `capacity` events in id order; remembers the newest id it had to drop, so a reader
    behind that knows it missed something (and reads the history)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._events: deque[dict[str, Any]] = deque()
        self.evicted_id: int | None = None

    def __len__(self) -> int:
        return len(self._events)

    @property
    def last_id(self) -> int | None:
        return self._events[-1]["id"] if self._events else None

    def add(self, events: Iterable[dict[str, Any]]) -> int:
        """Append events newer than the newest kept (older or repeated ids are ignored); returns how
        many were added."""
        added = 0
        for ev in sorted(events, key=lambda e: e["id"]):
            last = self.last_id
            if last is not None and ev["id"] <= last:
                continue
            self._events.append(ev)
            added += 1
            while len(self._events) > self.capacity:
                self.evicted_id = self._events.popleft()["id"]
        return added

    def after(self, last_id: int, pairs: set[str] | None = None) -> list[dict[str, Any]]:
        """Events with an id above `last_id` (of `pairs`, None: every pair), in id order."""
        out = []
        for ev in reversed(self._events):
            if ev["id"] <= last_id:
                break
            if pairs is None or ev["pair"] in pairs:
                out.append(ev)
        out.reverse()
        return out

    def missed(self, last_id: int) -> bool:
        """Whether events after `last_id` were dropped from the buffer (only the history has them)."""
        return self.evicted_id is not None and self.evicted_id > last_id


# ------------------------------------------------------------------------------------------ replay


def history_events(records: Iterable[dict[str, Any]], last_id: int) -> list[dict[str, Any]]:
    """The close events among stored history records (`eventId` and `eventData`), newer than `last_id`."""
    out = []
    for rec in records:
        eid = rec.get("eventId")
        data = rec.get("eventData")
        if isinstance(eid, int) and not isinstance(eid, bool) and eid > last_id and isinstance(data, dict):
            out.append({"id": eid, "pair": rec.get("pair"), "data": data})
    return out


def replay(history: Iterable[dict[str, Any]], buffered: Iterable[dict[str, Any]], last_id: int,
           pairs: set[str] | None, limit_per_pair: int) -> list[dict[str, Any]]:
    """What a client that last saw `last_id` missed: the events of both sources newer than it, each
    id once (the buffer's copy wins), in id order, at most the newest `limit_per_pair` per pair."""
    by_id: dict[int, dict[str, Any]] = {}
    for ev in history:
        if ev["id"] > last_id and (pairs is None or ev["pair"] in pairs):
            by_id[ev["id"]] = ev
    for ev in buffered:
        if ev["id"] > last_id and (pairs is None or ev["pair"] in pairs):
            by_id[ev["id"]] = ev
    kept: dict[str, int] = {}
    out = []
    for eid in sorted(by_id, reverse=True):
        ev = by_id[eid]
        if kept.get(ev["pair"], 0) >= limit_per_pair:
            continue
        kept[ev["pair"]] = kept.get(ev["pair"], 0) + 1
        out.append(ev)
    out.reverse()
    return out


__all__ = ["EVENT_ID_PATTERN", "EVENT_NAME", "EventBuffer", "event_ids", "first_event_id", "history_events",
           "parse_event_id", "replay", "sse_comment", "sse_event", "sse_retry"]
