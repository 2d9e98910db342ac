"""The ingress's buffer of served predictions: a response never waits for storage. Records are sent
to the Storage actor in batches every `flush_s` by a background task; a failed batch is put back in
front (the buffer is bounded: the oldest records are dropped, and counted, past `max_buffer`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


class HistoryBuffer:
    """`send(batch)` appends a batch to the store; `after_flush()` runs after each background flush."""

    def __init__(self, send: Callable[[list[dict]], Awaitable[Any]], *, flush_s: float, max_batch: int,
                 max_buffer: int, after_flush: Callable[[], None] | None = None) -> None:
        self.send = send
        self.flush_s = flush_s
        self.max_batch = max_batch
        self.max_buffer = max_buffer
        self.after_flush = after_flush
        self._records: list[dict] = []
        self._task: asyncio.Task | None = None
        self.sent = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._records)

    def add(self, rec: dict) -> None:
        if len(self._records) >= self.max_buffer:
            self._records.pop(0)
            self.dropped += 1
        self._records.append(rec)
        task = self._task
        if task is None or task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while self._records:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
                if self.after_flush is not None:
                    self.after_flush()
            except Exception as exc:  # noqa: BLE001 - keep the records for the next round
                log.warning("sending prediction history failed: %s", exc)
                await asyncio.sleep(1.0)

    async def flush(self) -> int:
        """Send everything buffered now; returns how many records were sent."""
        sent = 0
        while self._records:
            batch, self._records = self._records[:self.max_batch], self._records[self.max_batch:]
            try:
                await self.send(batch)
            except Exception:
                self._records[:0] = batch  # put back in front (bounded by max_buffer)
                overflow = len(self._records) - self.max_buffer
                if overflow > 0:
                    del self._records[:overflow]
                    self.dropped += overflow
                raise
            sent += len(batch)
            self.sent += len(batch)
        return sent

    def stats(self) -> dict[str, int]:
        return {"buffered": len(self._records), "sent": self.sent, "dropped": self.dropped}
