"""The prediction events hub: a detached, named actor (`tbml-prediction-events`, 0 CPUs) between the
market feed and the clients of `GET /api/stream/predictions` (docs/serving.md, docs/api.md).

- `closed({pair: open ts of the newest stored closed candle})` is what the feed calls after a tick in
  which some pairs advanced (fire-and-forget). The closes are queued; ONE consumer at a time gives
  each pair an id (`ml.serving.events`) and has the Serve app compute them: a deployment handle to
  the app's `Ingress` (`on_candle_close(closes, first_id)`), which computes and caches every model
  type and horizon, records the prediction in the history and returns the events. A failing compute
  is logged and the next close goes on.
- `attach(app_name)`: the ingress says which application it is when it starts.
- `after(last_id, pairs, timeout_s)`: a long poll for the events newer than `last_id` (the stream's
  live part), answered from the newest `stream.buffer_events` events kept in memory.

A restarted hub (max_restarts=-1) has an empty buffer and no app name until an ingress attaches again;
its ids still follow the clock, so they stay above the old ones. Nothing is lost for a reconnecting
client: every event is also in the stored history, which the stream replays first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import ray

from ml.clock import now_ms
from ml.serving.events import EventBuffer, event_ids, first_event_id
from ml.serving.prediction import failure_cause

log = logging.getLogger(__name__)

EVENTS_ACTOR_NAME = "tbml-prediction-events"
COMPUTE_TIMEOUT_S = 60.0  # one close of every pair, every model type and horizon
MAX_WAIT_S = 60.0         # longest long poll of `after`
DEFAULT_APP = "tbml"      # serve_config.yaml's application, until an ingress attaches


class PredictionEventsHub:
    """Async actor: one event loop; `closed` only queues, a single consumer task computes."""

    def __init__(self, buffer_events: int | None = None, compute_timeout_s: float = COMPUTE_TIMEOUT_S) -> None:
        from ml.config import get_settings

        self._buffer = EventBuffer(buffer_events or get_settings().stream.buffer_events)
        self._compute_timeout_s = float(compute_timeout_s)
        self._app: str | None = None
        self._handle = None
        self._pending: dict[str, int] = {}
        self._consumer: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._last_id: int | None = None  # the last id given (also to events whose compute failed)
        self.closes = 0
        self.published = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_close_ms: int | None = None

    # -------------------------------------------------------------------------------- the feed side

    async def attach(self, app_name: str) -> dict[str, Any]:
        """The Serve application whose Ingress computes the closes."""
        if app_name != self._app:
            self._app, self._handle = str(app_name), None
        return {"app": self._app}

    async def closed(self, closes: dict[str, int]) -> None:
        """Queue the closes (a pair's newest wins) and make sure the consumer runs; returns at once."""
        for pair, ts in (closes or {}).items():
            if isinstance(pair, str) and isinstance(ts, int) and not isinstance(ts, bool):
                self._pending[pair] = max(ts, self._pending.get(pair, ts))
        if self._pending and (self._consumer is None or self._consumer.done()):
            self._consumer = asyncio.get_running_loop().create_task(self._consume())

    async def _consume(self) -> None:
        while self._pending:
            closes, self._pending = self._pending, {}
            first_id = first_event_id(self._last_id, now_ms())
            ids = event_ids(first_id, closes)
            self._last_id = max(ids.values())
            self.closes += 1
            self.last_close_ms = now_ms()
            try:
                events = await asyncio.wait_for(self._compute(closes, first_id), self._compute_timeout_s)
            except Exception as exc:  # noqa: BLE001 - logged; the next close goes on
                self.failures += 1
                self.last_error = failure_cause(exc)
                self._handle = None  # a new handle next time (the app may have been redeployed)
                log.warning("computing the close of %s failed: %s", ", ".join(sorted(closes)), self.last_error)
                continue
            self._publish(events or [])

    async def _compute(self, closes: dict[str, int], first_id: int) -> list[dict[str, Any]]:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle("Ingress", app_name=self._app or DEFAULT_APP)
        return await self._handle.on_candle_close.remote(closes, first_id)

    def _publish(self, events: list[dict[str, Any]]) -> None:
        added = self._buffer.add(events)
        self.published += added
        if added and self._wake is not None:
            wake, self._wake = self._wake, None
            wake.set()

    # -------------------------------------------------------------------------------- the stream side

    async def after(self, last_id: int | None, pairs: list[str] | None = None, timeout_s: float = 0.0
                    ) -> dict[str, Any]:
        """Events newer than `last_id` (of `pairs`; None: all), waiting up to `timeout_s` for one.
        `lastId` is the newest buffered id (a fresh subscriber starts there), `missed` says that events
        after `last_id` were dropped from the buffer (the caller reads them from the history)."""
        wanted = set(pairs) if pairs else None
        if last_id is None:
            return {"events": [], "lastId": self._buffer.last_id, "missed": False}
        deadline = time.monotonic() + min(max(0.0, float(timeout_s)), MAX_WAIT_S)
        while True:
            events = self._buffer.after(int(last_id), wanted)
            remaining = deadline - time.monotonic()
            if events or remaining <= 0:
                return {"events": events, "lastId": self._buffer.last_id, "missed": self._buffer.missed(int(last_id))}
            if self._wake is None:
                self._wake = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    async def status(self) -> dict[str, Any]:
        return {"app": self._app, "buffered": len(self._buffer), "lastId": self._buffer.last_id,
                "closes": self.closes, "published": self.published, "failures": self.failures,
                "lastError": self.last_error, "lastClose": self.last_close_ms,
                "pending": len(self._pending), "computing": self._consumer is not None and not self._consumer.done()}


PredictionEvents = ray.remote(num_cpus=0)(PredictionEventsHub)


def get_or_create_events_hub(namespace: str, *, name: str = EVENTS_ACTOR_NAME, buffer_events: int | None = None):
    """The hub of `namespace`, created (detached, restarted when it dies) when missing."""
    return PredictionEvents.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, max_restarts=-1, num_cpus=0,
    ).remote(buffer_events)


def find_events_hub(namespace: str, *, name: str = EVENTS_ACTOR_NAME):
    """The hub of `namespace` if it exists, else None (nothing is created)."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


__all__ = ["EVENTS_ACTOR_NAME", "PredictionEvents", "PredictionEventsHub", "find_events_hub",
           "get_or_create_events_hub"]
