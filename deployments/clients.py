"""The ingress's clients of the cluster's actors: the Storage actor (the single writer of the shared
volume), the TrainingQueue, the accuracy monitor (created in the background when missing, so a
plain `serve deploy` gets one) and the prediction events hub (`actors.prediction_events`). Calls are bounded by `actor_timeout_s` and their failures become
`ApiError`s: 503 when an actor is unreachable, 422 for a request the actor refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from deployments.args import AppArgs
from deployments.errors import ApiError
from ml.serving.prediction import failure_cause

log = logging.getLogger(__name__)

MONITOR_RETRY_S = 30.0


class ActorClients:
    """Handles created on first use (in a worker thread: getting or creating an actor blocks)."""

    def __init__(self, args: AppArgs, namespace: str, data_dir: str) -> None:
        self.args = args
        self.namespace = namespace
        self.data_dir = data_dir
        self._storage = None
        self._queue = None
        self._monitor = None
        self._feed = None
        self._monitor_task: asyncio.Task | None = None
        self._monitor_retry_at = 0.0
        self._events = None

    def _timeout(self, timeout: float | None) -> float:
        return timeout or self.args.actor_timeout_s

    async def storage(self):
        if self._storage is None:
            from actors.storage import get_or_create_storage_actor

            try:
                self._storage = await asyncio.wait_for(asyncio.to_thread(
                    get_or_create_storage_actor, self.data_dir, self.namespace), self.args.actor_timeout_s)
            except Exception as exc:  # noqa: BLE001
                raise ApiError(503, "storage_unavailable", f"the Storage actor is not reachable: {exc}") from None
        return self._storage

    async def storage_call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        handle = await self.storage()
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), self._timeout(timeout))
        except ApiError:
            raise
        except TimeoutError:
            raise ApiError(503, "storage_unavailable", f"the Storage actor did not answer {method} in time") from None
        except (ValueError, PermissionError) as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - RayActorError, RayTaskError, ...
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ValueError | LookupError):
                raise ApiError(422, "invalid_request", str(cause)) from None
            raise ApiError(503, "storage_unavailable", f"Storage actor {method} failed: {exc}") from None

    async def queue(self):
        if self._queue is None:
            from actors.training_queue import get_or_create_queue_actor

            try:
                self._queue = await asyncio.wait_for(asyncio.to_thread(
                    get_or_create_queue_actor, self.namespace, self.data_dir, self.args.queue_overrides,
                    name=self.args.queue_name), self.args.actor_timeout_s)
            except Exception as exc:  # noqa: BLE001
                raise ApiError(503, "queue_unavailable", f"the TrainingQueue actor is not reachable: {exc}") from None
        return self._queue

    async def queue_call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        handle = await self.queue()
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), self._timeout(timeout))
        except TimeoutError:
            raise ApiError(503, "queue_unavailable", f"the TrainingQueue did not answer {method} in time") from None
        except Exception as exc:  # noqa: BLE001
            raise ApiError(503, "queue_unavailable", f"TrainingQueue {method} failed: {exc}") from None

    async def feed_call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """A call to the market feed actor (`actors.feed`), looked up, never created: `tbml up` and its
        supervisor own it; 503 `feed_unavailable` when it is not there or does not answer in time."""
        from actors.feed import FEED_ACTOR_NAME

        t = self._timeout(timeout)
        try:
            if self._feed is None:
                import ray

                self._feed = await asyncio.wait_for(asyncio.to_thread(
                    ray.get_actor, FEED_ACTOR_NAME, namespace=self.namespace), t)
            return await asyncio.wait_for(getattr(self._feed, method).remote(*args), t)
        except TimeoutError:
            raise ApiError(503, "feed_unavailable", f"the market feed did not answer {method} in time") from None
        except Exception as exc:  # noqa: BLE001 - not running, killed (the supervisor recreates it), ...
            self._feed = None  # looked up again next time
            raise ApiError(503, "feed_unavailable", f"the market feed is not reachable: {failure_cause(exc)}") from None

    def ensure_monitor(self) -> None:
        """Make sure the accuracy monitor actor exists: created in the background, never on a
        request's path; retried MONITOR_RETRY_S later if it fails."""
        if self._monitor is not None or not self.args.monitor:
            return
        if (self._monitor_task is not None and not self._monitor_task.done()) \
                or time.monotonic() < self._monitor_retry_at:
            return
        self._monitor_task = asyncio.get_running_loop().create_task(self._create_monitor())

    async def _create_monitor(self):
        from actors.accuracy_monitor import get_or_create_monitor_actor

        overrides = {"queue_name": self.args.queue_name, "queue_overrides": self.args.queue_overrides,
                     **(self.args.monitor_overrides or {})}
        try:
            self._monitor = await asyncio.wait_for(asyncio.to_thread(
                get_or_create_monitor_actor, self.namespace, self.data_dir, overrides,
                name=self.args.monitor_name), self.args.actor_timeout_s)
        except Exception as exc:  # noqa: BLE001 - live accuracy is optional; the API works without it
            self._monitor_retry_at = time.monotonic() + MONITOR_RETRY_S
            log.warning("the accuracy monitor could not be created: %s", failure_cause(exc))
        return self._monitor

    async def events_hub(self, *, create: bool = True):
        """The prediction events hub of the namespace (created when missing, unless not `create`:
        then None when there is none)."""
        if self._events is None:
            from actors.prediction_events import find_events_hub, get_or_create_events_hub

            try:
                self._events = await asyncio.wait_for(asyncio.to_thread(
                    get_or_create_events_hub if create else find_events_hub, self.namespace),
                    self.args.actor_timeout_s)
            except Exception as exc:  # noqa: BLE001
                raise ApiError(503, "events_unavailable",
                               f"the prediction events hub is not reachable: {failure_cause(exc)}") from None
        return self._events

    async def events_call(self, method: str, *args: Any, timeout: float | None = None, create: bool = True) -> Any:
        """A call to the hub, bounded; its failure is a 503 `events_unavailable` (and a new handle next
        time), as is its absence when not `create`."""
        handle = await self.events_hub(create=create)
        if handle is None:
            raise ApiError(503, "events_unavailable", "no prediction events hub runs yet (the market feed "
                                                      "creates it with its first close)")
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), self._timeout(timeout))
        except TimeoutError:
            raise ApiError(503, "events_unavailable", f"the events hub did not answer {method} in time") from None
        except Exception as exc:  # noqa: BLE001 - RayActorError while it restarts, ...
            self._events = None
            raise ApiError(503, "events_unavailable", f"events hub {method} failed: {failure_cause(exc)}") from None

    async def attach_events(self, app_name: str, *, create: bool) -> bool:
        """Tell the hub which Serve application computes the closes; whether it was told (failures are
        logged, never raised: the stream is optional and the rest of the API works without the hub)."""
        try:
            if await self.events_hub(create=create) is not None:
                await self.events_call("attach", app_name)
                return True
        except ApiError as exc:
            log.warning("the prediction events hub: %s", exc.message)
        return False
