"""The Storage actor: the single writer of TBML_DATA_DIR, a thin Ray shell around ml.storage.Storage.

- Detached, named `tbml-storage` in the project's namespace; `get_or_create_storage_actor()` is the
  only way to reach it. `max_restarts=-1`: a crashed actor comes back and finds its state on disk.
- Async: every call runs its blocking file IO in a worker thread (`asyncio.to_thread`), so many
  callers are served concurrently; Storage's own locks serialise the writes (no lost updates).
- Holds the data directory's writer lock (`.writer.lock`), so the CLI cannot write behind its back.
- A background task flushes buffered predictions once they are `prediction_flush_seconds` old.
- Another applies retention (`storage.retention_hours`, every `storage.retention_interval_s`): prediction
  and training records past the cutoff go, nothing else (ml.storage.retention holds the rule). The last
  run is kept on disk, so a restarted actor waits out the rest of the interval instead of running at once;
  what the runs removed is in `stats()["retention"]`.
- Another measures the bytes per category every `metrics.storage_interval_s` and re-reads the
  supervisor document, for Ray's metrics export (`actors.metrics`, docs/metrics.md).
- Graceful shutdown flushes: `stop_storage_actor(handle)` (shutdown() then Ray's graceful exit);
  `actor.__ray_terminate__.remote()` alone also flushes, through atexit. A hard `ray.kill` loses
  only what was still buffered (at most flush_count records or flush_seconds worth).

Retries: `max_task_retries=-1` re-runs a call that was in flight when the actor died. Every write
is idempotent under re-execution (same version content, same production pointer, training records
upserted by jobId) and prediction records that carry an `id` are de-duplicated, so callers that
need exactly-once appends set `id` (ml.storage.predictions.new_record_id()) before calling.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from pathlib import Path
from typing import Any

import ray

from actors.metrics import record_storage, record_supervisor
from ml.clock import now_ms
from ml.config import get_settings
from ml.serving.views import SUPERVISOR_DOCUMENT
from ml.storage.store import Storage

log = logging.getLogger(__name__)

ACTOR_NAME = "tbml-storage"


@ray.remote(num_cpus=0)
class StorageActor:
    def __init__(self, data_dir: str | None = None, **storage_options: Any) -> None:
        self._data_dir = data_dir
        self._options = storage_options
        self._storage = self._open()
        self._storage.ensure_layout()
        self._flusher: asyncio.Task | None = None
        self._retention: asyncio.Task | None = None
        self._metrics: asyncio.Task | None = None
        self._retention_if_due()  # before the first call is served: no race with the first appends
        self._closed = False
        atexit.register(self._close)  # runs on Ray's graceful exit (__ray_terminate__) and SIGTERM

    # ---- plumbing -----------------------------------------------------------------------------
    def _open(self) -> Storage:
        # A restarted actor may briefly race the dying one for the writer lock: wait for it.
        return Storage(self._data_dir, writer_lock=True, lock_timeout=30.0, **self._options)

    def _close(self) -> dict:
        if self._closed:
            return {"savedCount": 0}
        self._closed = True
        return self._storage.close()

    async def _run(self, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:  # after shutdown(): take the directory back
            self._storage = await asyncio.to_thread(self._open)
            self._closed = False
        self._start_background()
        return await asyncio.to_thread(getattr(self._storage, fn_name), *args, **kwargs)

    def _start_background(self) -> None:
        """(Re)start the background tasks; they need the running event loop, hence not in __init__."""
        loop = asyncio.get_running_loop()
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        if self._metrics is None or self._metrics.done():
            self._metrics = loop.create_task(self._metrics_loop())
        if self._storage.retention_hours > 0 and (self._retention is None or self._retention.done()):
            self._retention = loop.create_task(self._retention_loop())

    def _retention_if_due(self, now: int | None = None) -> int | None:
        """Run retention when it is due at `now`; return when it is due next (None: retention is off)."""
        storage = self._storage
        now = now_ms() if now is None else now
        due = storage.retention_next_run_at(now)
        if due is None or due > now:
            return due
        try:
            run = storage.run_retention(now)
            if any((run.get("removed") or {}).values()):
                log.info("retention removed %s (cutoff %s)", run["removed"], run["cutoff"])
        except Exception as exc:  # noqa: BLE001 - reported in stats; tried again one interval later
            log.error("retention run failed: %s", exc)
            return now + int(storage.retention_interval_s * 1000)
        return storage.retention_next_run_at(now)

    async def _flush_loop(self) -> None:
        interval = max(0.05, min(0.5, self._storage.predictions.flush_seconds / 4))
        while not self._closed:
            await asyncio.sleep(interval)
            if self._storage.predictions.flush_due():
                try:
                    await asyncio.to_thread(self._storage.flush_if_due)
                except Exception as exc:  # noqa: BLE001 - keep flushing later; records stay buffered
                    log.error("background flush failed: %s", exc)

    async def _metrics_loop(self) -> None:
        """Storage bytes and the supervisor's restarts for the metrics export (actors.metrics)."""
        settings = get_settings().metrics
        if not settings.enabled:
            return
        while not self._closed:
            try:
                record_storage(await asyncio.to_thread(self._storage.stats))
                record_supervisor(await asyncio.to_thread(self._storage.get_document, *SUPERVISOR_DOCUMENT, None))
            except Exception as exc:  # noqa: BLE001 - measured again next interval
                log.debug("storage metrics: %s", exc)
            await asyncio.sleep(float(settings.storage_interval_s))

    async def _retention_loop(self) -> None:
        storage = self._storage
        while not self._closed and storage is self._storage:
            now = now_ms()
            due = await asyncio.to_thread(self._retention_if_due, now)
            if due is None:
                return  # retention_hours = 0: keep forever
            await asyncio.sleep(min(max(0.0, (due - now) / 1000), storage.retention_interval_s))

    # ---- API (mirrors ml.storage.store.Storage) ---------------------------------------------
    async def ping(self) -> dict:
        if not self._closed:
            self._start_background()  # the schedules run from the start, not only after the first write
        return {"ok": True, "dataDir": str(self._storage.data_dir), "closed": self._closed}

    async def data_dir(self) -> str:
        if not self._closed:
            self._start_background()
        return str(self._storage.data_dir)

    async def put_document(self, category: str, name: str, data: Any, pair: str | None = None) -> str:
        out = await self._run("put_document", category, name, data, pair=pair)
        if (category, name) == SUPERVISOR_DOCUMENT and pair is None:
            record_supervisor(data)  # its restarts in the metrics export at once
        return out

    async def get_document(self, category: str, name: str, default: Any = None, pair: str | None = None) -> Any:
        return await self._run("get_document", category, name, default, pair=pair)

    async def delete_document(self, category: str, name: str, pair: str | None = None) -> bool:
        return await self._run("delete_document", category, name, pair=pair)

    async def save_model_version(self, pair: str, model_type: str, version: str, meta: dict,
                                 files: dict[str, bytes]) -> dict:
        return await self._run("save_model_version", pair, model_type, version, meta, files)

    async def update_version_meta(self, pair: str, model_type: str, version: str, changes: dict) -> dict:
        return await self._run("update_version_meta", pair, model_type, version, changes)

    async def list_versions(self, pair: str, model_type: str) -> list[dict]:
        return await self._run("list_versions", pair, model_type)

    async def get_version_meta(self, pair: str, model_type: str, version: str) -> dict | None:
        return await self._run("get_version_meta", pair, model_type, version)

    async def read_model_file(self, pair: str, model_type: str, version: str, name: str) -> bytes:
        return await self._run("read_model_file", pair, model_type, version, name)

    async def set_production(self, pair: str, model_type: str, version: str, reason: str = "") -> dict:
        return await self._run("set_production", pair, model_type, version, reason)

    async def get_production(self, pair: str, model_type: str) -> dict | None:
        return await self._run("get_production", pair, model_type)

    async def delete_version(self, pair: str, model_type: str, version: str) -> bool:
        return await self._run("delete_version", pair, model_type, version)

    async def model_keys(self) -> list[tuple[str, str]]:
        return await self._run("model_keys")

    async def append_training_record(self, record: dict) -> dict:
        return await self._run("append_training_record", record)

    async def training_history(self, limit: int | None = None) -> list[dict]:
        return await self._run("training_history", limit)

    async def append_prediction(self, record: dict) -> dict | None:
        return (await self.append_predictions([record]))[0]

    async def append_predictions(self, records: list[dict]) -> list[dict | None]:
        log_ = self._storage.predictions
        if self._closed or log_.append_needs_io(records):
            return await self._run("append_predictions", records)
        # Fast path: buffering is memory-only, so do it on the event loop; only a flush goes to a thread.
        out = log_.append(records, autoflush=False)
        if log_.flush_due():
            await self._run("flush_if_due")
        else:
            self._start_background()
        return out

    async def flush(self) -> int:
        return await self._run("flush")

    async def query_predictions(self, pair: str, limit: int | None = 100, since: int | None = None) -> list[dict]:
        return await self._run("query_predictions", pair, limit, since)

    async def count_predictions(self, pair: str) -> int:
        return await self._run("count_predictions", pair)

    async def update_predictions(self, pair: str, updates: list[dict]) -> int:
        return await self._run("update_predictions", pair, updates)

    async def prediction_pairs(self) -> list[str]:
        return await self._run("prediction_pairs")

    async def stats(self) -> dict:
        out = await self._run("stats")
        record_storage(out)
        return out

    async def save(self) -> dict:
        return await self._run("save")

    async def cleanup(self, max_age_hours: float) -> dict:
        return await self._run("cleanup", max_age_hours)

    async def run_retention(self) -> dict:
        """Apply retention now (the schedule does this on its own); returns what it removed."""
        return await self._run("run_retention")

    async def doctor(self, repair: bool = False, temp_grace_seconds: float = 60.0) -> dict:
        return await self._run("doctor", repair, temp_grace_seconds=temp_grace_seconds)

    async def shutdown(self) -> dict:
        """Flush everything and release the writer lock (e.g. before `tbml storage doctor --repair`
        or a graceful stop). The actor stays; its next call takes the directory back."""
        for task in (self._flusher, self._retention):
            if task is not None:
                task.cancel()
        self._flusher = self._retention = None
        return await asyncio.to_thread(self._close)


def stop_storage_actor(handle, timeout: float = 30.0) -> dict | None:
    """Stop the actor gracefully: flush, then Ray's graceful exit (no restart). Falls back to
    ray.kill when it does not answer within `timeout` seconds."""
    saved = None
    try:
        saved = ray.get(handle.shutdown.remote(), timeout=timeout)
        handle.__ray_terminate__.remote()
    except (ray.exceptions.RayError, TimeoutError) as exc:
        log.warning("graceful stop of the Storage actor failed (%s); killing it", exc)
        ray.kill(handle, no_restart=True)
    return saved


def get_or_create_storage_actor(data_dir: str | Path | None = None, namespace: str | None = None, *,
                                name: str = ACTOR_NAME, **storage_options: Any):
    """The Storage actor of this cluster, created (detached) if it does not exist yet.

    `data_dir` defaults to the settings' data_dir. It is resolved *here*, because the actor's working
    directory differs from the caller's: pass an absolute path (or set TBML_DATA_DIR to one) when
    several processes may be the first to ask. An existing actor serving a different absolute
    directory than the one asked for is an error; for relative paths (ambiguous across processes)
    the existing actor wins, with a warning.
    """
    settings = get_settings()
    ns = namespace or settings.namespace
    asked = Path(data_dir if data_dir is not None else settings.data_dir).expanduser()
    wanted = str(asked.resolve())
    try:
        handle = ray.get_actor(name, namespace=ns)
    except ValueError:
        handle = StorageActor.options(
            name=name, namespace=ns, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=-1, num_cpus=0,
        ).remote(wanted, **storage_options)
    actual = ray.get(handle.data_dir.remote())
    if actual != wanted:
        message = (f"the Storage actor {name!r} in namespace {ns!r} serves {actual}, not {wanted}")
        if asked.is_absolute():
            raise RuntimeError(message + "; set TBML_DATA_DIR consistently or stop the actor first")
        log.warning("%s (relative data dir %r: using the actor's)", message, str(asked))
    return handle
