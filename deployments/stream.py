"""Predictions computed when a candle closes, and the server-sent-event stream of them (docs/api.md,
docs/serving.md). The ingress holds one `PredictionStream`; its routes stay a few lines.

- `on_close(closes, first_id)` (the ingress's `on_candle_close`, called by the events hub through a
  deployment handle): per pair, the snapshot is re-read, the all-horizon record of EVERY enabled
  model type is computed once and cached through the normal path (`deployments.predictions`: one
  feature window, shared), then the ensemble's (from those cached records) when two or more types
  are enabled; the default model type at its default horizon is recorded in the history as a close
  event, trades the pair's simulated account (`deployments.simulations`) and is returned to the hub.
- `open(...)`: validates `pairs` and `Last-Event-ID` (422 before anything is streamed), then streams
  `retry:`, the missed events (stored history + the hub's buffer, `ml.serving.events.replay`), and
  the live ones from the hub's long poll, with a heartbeat comment while nothing happens. It ends
  cleanly after `stream.max_duration_s`, before Serve's `request_timeout_s` would cut it mid-stream;
  the client reconnects with Last-Event-ID and misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from deployments.errors import ApiError, dumps
from deployments.schemas import PredictionEvent
from ml.clock import now_ms
from ml.config import PAIR_PATTERN
from ml.serving.events import (
    event_ids,
    history_events,
    parse_event_id,
    replay,
    sse_comment,
    sse_event,
    sse_retry,
)
from ml.serving.history import history_record
from ml.serving.model_ids import ENSEMBLE
from ml.serving.prediction import failure_cause, prediction_body

log = logging.getLogger(__name__)

REPLAY_SCAN = 20_000      # newest history records per pair read for a replay
REPLAY_SINCE_MS = 60_000  # records are stamped after their event id was given: read a minute earlier
HUB_SLACK_S = 10.0        # a long poll's own timeout plus this bounds the call
SIMULATION_TIMEOUT_S = 10.0  # the account's Storage round trips after a close
_PAIR_RE = re.compile(PAIR_PATTERN)
PAIRS_PATTERN = r"^[A-Za-z0-9]{2,15}(,[A-Za-z0-9]{2,15})*$"  # `?pairs=`: names (any case), comma-separated


STREAM_DOC = {  # the OpenAPI text of the route
    "200": "`text/event-stream`: first `retry: <ms>`, then per event `id: <event id>`, `event: prediction`, "
           "`data: <PredictionEvent JSON>` (the body of GET /api/predictions/{pair}), one event per pair per "
           "candle close; a `: heartbeat` comment while nothing happens (stream.heartbeat_s). Sent with "
           "Last-Event-ID (header, or `lastEventId`), the missed events come first, from the stored history. "
           "The stream ends after stream.max_duration_s with a comment; reconnect with the last id.",
    "pairs": "comma-separated pairs to receive (default: every pair)",
    "lastEventId": "the last event id received, for clients that cannot set the Last-Event-ID header (which wins)",
    "Last-Event-ID": "the last event id received (EventSource sends it when it reconnects): replay what came after",
}


def stream_responses() -> dict[int | str, dict[str, Any]]:
    """The 200 of the route as OpenAPI 3.2 describes a stream (`itemSchema`, one item per event; the
    `data` line is JSON of the `PredictionEvent` schema). `type: array` replaces the `type: string`
    FastAPI gives a non-JSON response class (a stream is validated as the list of its events)."""
    data = PredictionEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    data.pop("$defs", None)
    item = {"type": "object", "title": "PredictionEventMessage", "required": ["data"], "properties": {
        "id": {"type": "string", "description": "the event id (decimal digits, increasing): send it back as "
                                                "Last-Event-ID"},
        "event": {"type": "string", "const": "prediction"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        "retry": {"type": "integer", "description": "reconnect delay in ms (the first message)"},
    }}
    whole = {"type": "array", "description": "the stream as a sequence of events (OpenAPI 3.2: `schema` of a "
                                             "sequential media type is the array, `itemSchema` one item)"}
    return {200: {"description": STREAM_DOC["200"],
                  "content": {"text/event-stream": {"schema": whole, "itemSchema": item}}}}


class EventStream(StreamingResponse):
    """`text/event-stream` (also the media type the OpenAPI document names)."""

    media_type = "text/event-stream"


class PredictionStream:
    """`ingress` is the `IngressImpl` replica: its settings, params, snapshots, predictions, history
    buffer and actor clients."""

    def __init__(self, ingress: Any) -> None:
        self.ing = ingress
        self.settings = ingress.settings
        self.stream = ingress.settings.stream
        self._attached = False
        self._attach_task: asyncio.Task | None = None

    def attach(self) -> None:
        """Tell the events hub this replica's application name, in the background, until it has been
        told once (the hub is looked up, not created: the market feed creates it; until it is told, it
        asks serve_config.yaml's application). Called at start and when a stream opens."""
        if self._attached or (self._attach_task is not None and not self._attach_task.done()):
            return
        try:
            from ray import serve

            app_name = serve.get_replica_context().app_name
            loop = asyncio.get_running_loop()
        except Exception:  # noqa: BLE001 - outside a replica, or no loop yet: the next stream tries
            return

        async def run() -> None:
            self._attached = await self.ing.actors.attach_events(app_name, create=False)

        self._attach_task = loop.create_task(run())

    # ================================================================================ compute on close

    async def on_close(self, closes: dict[str, int], first_id: int) -> list[dict[str, Any]]:
        """The events of one close (id, pair, data = the body of GET /api/predictions/{pair})."""
        ids = event_ids(first_id, closes)
        pairs = [p for p in ids if isinstance(p, str) and _PAIR_RE.fullmatch(p)]
        results = await asyncio.gather(*(self._close_one(p, int(closes[p]), ids[p]) for p in pairs),
                                       return_exceptions=True)
        events = []
        for pair, res in zip(pairs, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("close of %s: %s", pair, failure_cause(res))
            elif res is not None:
                events.append(res)
        return events

    async def _close_one(self, pair: str, candle_ts: int, event_id: int) -> dict[str, Any] | None:
        """The event of `pair`'s close of the candle opening at `candle_ts`, or None when the store has
        moved past it meanwhile (a late close: the newer candle's own close carries the event, so no
        candle ever has two) or does not show it."""
        t0 = time.perf_counter()
        ing = self.ing
        async with ing.snapshots.holding(pair):  # requests see the new candle once it is cached
            snap = await ing.snapshots.get(pair, force=True)
            if snap.candle_ts is None or snap.candle_ts < candle_ts:  # the feed's write is visible by now
                await asyncio.sleep(0.2)
                snap = await ing.snapshots.get(pair, force=True)
            if snap.candle_ts != candle_ts:
                log.info("close of %s at %s: the store shows %s, no event", pair, candle_ts, snap.candle_ts)
                return None
            # one all-horizon record per model type (each horizon is picked from it), then the
            # ensemble, whose members are those records again
            types = list(ing.model_types)
            results = await asyncio.gather(*(ing.predictions_.predict(pair, mt, None, False, snap) for mt in types),
                                           return_exceptions=True)
            if ENSEMBLE in ing.accepted_types:
                types.append(ENSEMBLE)
                try:
                    results.append(await ing.predictions_.predict(pair, ENSEMBLE, None, False, snap))
                except Exception as exc:  # noqa: BLE001 - logged below, the event still goes out
                    results.append(exc)
        res = results[types.index(ing.default_model)]
        if isinstance(res, BaseException):
            raise res
        for mt, other in zip(types, results, strict=True):
            if isinstance(other, BaseException):
                log.warning("close of %s: %s: %s", pair, mt, failure_cause(other))
        pred, hit = res
        ts = now_ms()
        body = prediction_body(pair, pred, hit, time.perf_counter() - t0, ts)
        ing.predictions_.count(pred)
        ing.history_.add(history_record(pair, pred, hit is not None, ts, event_id=event_id, event_data=body))
        try:  # the pair's simulated account trades on this close (deployments.simulations)
            await asyncio.wait_for(ing.simulations.on_close(pair, candle_ts, pred), SIMULATION_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the event goes out; the account catches up next close
            ing.simulations.failures += 1
            log.warning("simulated account of %s at %s: %s", pair, candle_ts, failure_cause(exc))
        return {"id": event_id, "pair": pair, "data": body}

    # ================================================================================ the stream

    def parse(self, pairs: str | None, header_id: str | None, query_id: str | None
              ) -> tuple[list[str] | None, int | None]:
        """(pairs or None for all, last event id or None). The route's patterns refuse malformed input
        (422); an unknown pair is 404 `pair_not_found`, as everywhere in the API. The header wins over
        the query: on a reconnect EventSource sends the newest id in the header and the URL it first
        opened, with its old `lastEventId`."""
        wanted = None
        if pairs is not None:
            wanted = sorted({self.ing.params.pair(name) for name in pairs.split(",")})
        try:
            last = parse_event_id(header_id if header_id is not None else query_id)
        except ValueError as exc:
            raise ApiError(422, "invalid_event_id", str(exc)) from None
        return wanted, last

    async def open(self, pairs: list[str] | None, last_id: int | None) -> EventStream:
        """The stream response. The hub is looked up, never created (the market feed creates it): a
        stream opened before it exists, or while it restarts, sends heartbeats until it is there."""
        self.attach()
        try:
            first = await self._hub(None, pairs, 0.0)
        except ApiError:
            first = {"events": [], "lastId": None, "missed": False}
        return EventStream(self._events(pairs, last_id, first),
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _hub(self, last_id: int | None, pairs: list[str] | None, wait_s: float) -> dict:
        """The hub's `after` long poll, bounded."""
        return await self.ing.actors.events_call("after", last_id, pairs, wait_s, timeout=wait_s + HUB_SLACK_S,
                                                 create=False)

    async def _missed(self, pairs: list[str] | None, last_id: int, buffered: list[dict]) -> list[dict]:
        """The events after `last_id` from the stored history (close events only) and `buffered`."""
        targets = pairs or list(self.ing.params.known_pairs())
        with contextlib.suppress(Exception):
            await self.ing.history_.flush()
        reads = await asyncio.gather(*(self.ing.actors.storage_call(
            "query_predictions", p, REPLAY_SCAN, max(0, last_id - REPLAY_SINCE_MS)) for p in targets),
            return_exceptions=True)
        stored: list[dict] = []
        for pair, recs in zip(targets, reads, strict=True):
            if isinstance(recs, BaseException):
                log.warning("stream replay: the history of %s is not readable: %s", pair, failure_cause(recs))
                continue
            stored.extend(history_events(recs, last_id))
        return replay(stored, buffered, last_id, set(pairs) if pairs else None, self.stream.replay_limit)

    async def _events(self, pairs: list[str] | None, last_id: int | None, first: dict) -> AsyncIterator[bytes]:
        deadline = time.monotonic() + self.stream.max_duration_s
        yield sse_retry(self.stream.reconnect_ms)
        if last_id is None:
            cursor = int(first.get("lastId") or 0)
        else:
            cursor = last_id
            try:
                buffered = (await self._hub(last_id, pairs, 0.0))["events"]
            except ApiError:
                buffered = []  # the history alone
            for ev in await self._missed(pairs, last_id, buffered):
                yield sse_event(ev["id"], dumps(ev["data"]))
                cursor = max(cursor, ev["id"])
        heartbeat = float(self.stream.heartbeat_s)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                yield sse_comment(f"stream ends after {self.stream.max_duration_s:g}s: reconnect with Last-Event-ID")
                return
            wait = min(heartbeat, remaining)
            try:
                out = await self._hub(cursor, pairs, wait)
            except ApiError:  # no hub yet, or restarting: a heartbeat, and look again after it
                yield sse_comment("heartbeat")
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                continue
            events = out.get("events") or []
            if out.get("missed"):  # fell behind the hub's buffer: the history has the rest
                events = await self._missed(pairs, cursor, events)
            if not events:
                yield sse_comment("heartbeat")
            for ev in events:
                if ev["id"] > cursor:
                    yield sse_event(ev["id"], dumps(ev["data"]))
                    cursor = ev["id"]

