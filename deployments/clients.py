"""The ingress's clients of the cluster's actors: the Storage actor (the single writer of the shared
volume), the TrainingQueue, and the accuracy monitor (created in the background when missing, so a
plain `serve deploy` gets one). Calls are bounded by `actor_timeout_s` and their failures become
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
        self._monitor_task: asyncio.Task | None = None
        self._monitor_retry_at = 0.0

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
