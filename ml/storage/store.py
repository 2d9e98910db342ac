"""`Storage`: everything the service keeps under TBML_DATA_DIR, as plain Python (no Ray).

The Storage actor (actors/storage.py) wraps one writable instance and is the only writer. Other
processes may open `Storage(data_dir, read_only=True)` and read files directly: every file is
replaced atomically (ml.storage.atomic), so they never see a partial file, and a read-only
instance never writes (not even to restore a damaged file from its backup).

Thread-safe: document, model and training writes are serialised by one lock; prediction appends
only touch an in-memory buffer (see ml.storage.predictions.log).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ml.clock import now_ms
from ml.storage.atomic import (
    BACKUP_SUFFIX,
    ChecksumError,
    atomic_write_json,
    is_temp_file,
    read_json_document,
)
from ml.storage.doctor import run_doctor
from ml.storage.models import META_NAME, PRODUCTION_NAME, ModelStore
from ml.storage.paths import (
    CATEGORIES,
    DOCUMENT_CATEGORIES,
    QUARANTINE_DIR,
    WRITER_LOCK_NAME,
    UnsafePathError,
    check_category,
    document_file_name,
    safe_path,
)
from ml.storage.predictions.log import PredictionLog
from ml.storage.retention import (
    RETENTION_DOCUMENT,
    add_run,
    check_max_age_hours,
    cutoff_for_age,
    empty_state,
    next_run_at,
    retention_cutoff,
    split_expired,
)

log = logging.getLogger(__name__)

STAT_CATEGORIES = ("candles", "models", "weights", "training", "predictions", "features", "queue")
TRAINING_HISTORY = "history"
MAX_LISTED_FILES = 1000


class StorageLockedError(RuntimeError):
    """Another process (normally the Storage actor) holds the data directory's writer lock."""


class WriterLock:
    """An advisory `flock` on `{data_dir}/.writer.lock`: at most one writing process per directory.

    The kernel drops it when the holder dies (even by SIGKILL), so a restarted actor gets it back.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / WRITER_LOCK_NAME
        self._fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise StorageLockedError(
                        f"{self.path.parent} is being written by another process ({holder}); stop the "
                        f"cluster (or use the HTTP API) and try again") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _flush_at_exit(predictions: PredictionLog) -> None:
    try:
        predictions.flush()
    except Exception as exc:  # noqa: BLE001 - interpreter exit: report, never raise
        log.error("flushing predictions at exit failed: %s", exc)


class Storage:
    def __init__(self, data_dir: str | Path | None = None, *, read_only: bool = False,
                 writer_lock: bool = False, lock_timeout: float = 0.0,
                 flush_count: int | None = None, flush_seconds: float | None = None,
                 keep_versions: int | None = None, history_limit: int | None = None,
                 retention_hours: float | None = None, retention_interval_s: float | None = None) -> None:
        from ml.config import get_settings

        settings = get_settings()
        self.data_dir = Path(data_dir if data_dir is not None else settings.data_dir).expanduser().resolve()
        self.read_only = read_only
        self.keep_versions = settings.storage.keep_versions if keep_versions is None else int(keep_versions)
        self.history_limit = settings.queue.history_limit if history_limit is None else int(history_limit)
        self.retention_hours = float(settings.storage.retention_hours if retention_hours is None
                                     else retention_hours)
        self.retention_interval_s = float(settings.storage.retention_interval_s if retention_interval_s is None
                                          else retention_interval_s)
        if not (math.isfinite(self.retention_hours) and self.retention_hours >= 0):
            raise ValueError(f"retention_hours must be a finite number >= 0, got {self.retention_hours!r}")
        if not (math.isfinite(self.retention_interval_s) and self.retention_interval_s > 0):
            raise ValueError(f"retention_interval_s must be a finite number > 0, got {self.retention_interval_s!r}")
        self._retention_error: dict | None = None
        self._lock = threading.RLock()
        self._writer_lock = WriterLock(self.data_dir)
        if writer_lock and not read_only:
            self._writer_lock.acquire(lock_timeout)
        self.models = ModelStore(self.data_dir, writable=not read_only)
        self.predictions = PredictionLog(
            self.data_dir,
            flush_count=settings.storage.prediction_flush_count if flush_count is None else flush_count,
            flush_seconds=settings.storage.prediction_flush_seconds if flush_seconds is None else flush_seconds,
            writable=not read_only,
        )
        # Buffered predictions are flushed when the interpreter exits normally (and on close()).
        self._finalizer = weakref.finalize(self, _flush_at_exit, self.predictions) if not read_only else None

    @classmethod
    def reader(cls, data_dir: str | Path | None = None) -> Storage:
        """A read-only view for processes other than the Storage actor."""
        return cls(data_dir, read_only=True)

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> dict:
        """Flush buffered predictions and release the writer lock."""
        saved = self.save() if not self.read_only else {"savedCount": 0}
        if self._finalizer is not None:
            self._finalizer.detach()
        self._writer_lock.release()
        return saved

    def ensure_layout(self) -> list[str]:
        """Create the category directories that are missing; return their names."""
        self._require_writable()
        created = []
        for cat in CATEGORIES:
            d = self.data_dir / cat
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                created.append(cat)
        return created

    # ---- documents ----------------------------------------------------------------------------
    def _document_path(self, category: str, name: str, pair: str | None) -> Path:
        if category not in DOCUMENT_CATEGORIES:
            raise UnsafePathError(f"documents live in {', '.join(DOCUMENT_CATEGORIES)}, not {category!r}")
        return safe_path(self.data_dir, category, pair=pair, name=document_file_name(name))

    def put_document(self, category: str, name: str, data: Any, *, pair: str | None = None) -> str:
        """Write a checksummed JSON document atomically (previous version kept as backup)."""
        self._require_writable()
        path = self._document_path(category, name, pair)
        try:
            json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"document {category}/{name} is not JSON-serialisable: {exc}") from exc
        with self._lock:
            return atomic_write_json(path, data)

    def get_document(self, category: str, name: str, default: Any = None, *, pair: str | None = None) -> Any:
        """Load a document (verified; recovered from its backup if damaged), or `default` if absent."""
        path = self._document_path(category, name, pair)
        try:
            return read_json_document(path, restore=not self.read_only)
        except FileNotFoundError:
            return default

    def delete_document(self, category: str, name: str, *, pair: str | None = None) -> bool:
        self._require_writable()
        path = self._document_path(category, name, pair)
        with self._lock:
            existed = path.exists()
            # Backup first: a backup without its file means "file lost" to doctor, which restores it.
            path.with_name(path.name + BACKUP_SUFFIX).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        return existed

    # ---- models -------------------------------------------------------------------------------
    def save_model_version(self, pair: str, model_type: str, version: str, meta: dict,
                           files: dict[str, bytes]) -> dict:
        with self._lock:
            return self.models.save_version(pair, model_type, version, meta, files)

    def update_version_meta(self, pair: str, model_type: str, version: str, changes: dict) -> dict:
        with self._lock:
            return self.models.update_meta(pair, model_type, version, changes)

    def list_versions(self, pair: str, model_type: str) -> list[dict]:
        return self.models.list_versions(pair, model_type)

    def get_version_meta(self, pair: str, model_type: str, version: str) -> dict | None:
        return self.models.get_meta(pair, model_type, version)

    def read_model_file(self, pair: str, model_type: str, version: str, name: str) -> bytes:
        return self.models.read_file(pair, model_type, version, name)

    def set_production(self, pair: str, model_type: str, version: str, reason: str = "") -> dict:
        with self._lock:
            return self.models.set_production(pair, model_type, version, reason)

    def get_production(self, pair: str, model_type: str) -> dict | None:
        return self.models.get_production(pair, model_type)

    def delete_version(self, pair: str, model_type: str, version: str) -> bool:
        with self._lock:
            return self.models.delete_version(pair, model_type, version)

    def model_keys(self) -> list[tuple[str, str]]:
        return self.models.model_keys()

    # ---- training history ---------------------------------------------------------------------
    def append_training_record(self, record: dict) -> dict:
        """Add a job record, or replace the one with the same `jobId` (records are updated as a job
        moves on). The list keeps the newest `history_limit` records."""
        self._require_writable()
        if not isinstance(record, dict):
            raise ValueError("a training record must be a dict")
        rec = dict(record)
        rec["recordedAt"] = now_ms()
        with self._lock:
            history = list(self.get_document("training", TRAINING_HISTORY, default=[]))
            job_id = rec.get("jobId")
            if job_id is not None:
                history = [r for r in history if r.get("jobId") != job_id]
            history.append(rec)
            self.put_document("training", TRAINING_HISTORY, history[-self.history_limit:])
        return rec

    def training_history(self, limit: int | None = None) -> list[dict]:
        """Training job records, newest first."""
        history = list(self.get_document("training", TRAINING_HISTORY, default=[]))
        history.reverse()
        return history if limit is None else history[: max(0, int(limit))]

    # ---- predictions --------------------------------------------------------------------------
    def append_prediction(self, record: dict) -> dict | None:
        """Buffer one record; return it as stored (with its `id`), or None if it was a duplicate."""
        return self.predictions.append([record])[0]

    def append_predictions(self, records: list[dict]) -> list[dict | None]:
        """Buffer records (flushed by count and age); per record as stored, or None for a duplicate."""
        return self.predictions.append(records)

    def flush(self) -> int:
        return self.predictions.flush()

    def flush_if_due(self) -> int:
        return self.predictions.flush() if self.predictions.flush_due() else 0

    def query_predictions(self, pair: str, limit: int | None = 100, since: int | None = None) -> list[dict]:
        return self.predictions.query(pair, limit=limit, since=since)

    def count_predictions(self, pair: str) -> int:
        return self.predictions.count(pair)

    def update_predictions(self, pair: str, updates: list[dict]) -> int:
        return self.predictions.update(pair, updates)

    def prediction_pairs(self) -> list[str]:
        return self.predictions.pairs()

    # ---- maintenance --------------------------------------------------------------------------
    def save(self) -> dict:
        """Flush everything buffered (predictions) to disk."""
        t0 = time.perf_counter()
        saved = self.predictions.flush() if not self.read_only else 0
        return {"savedCount": saved, "durationMs": round((time.perf_counter() - t0) * 1000, 3),
                "timestamp": now_ms()}

    def stats(self) -> dict:
        """Count and bytes per category, and the list of files (first MAX_LISTED_FILES)."""
        cats = {c: {"count": 0, "bytes": 0, "files": 0} for c in STAT_CATEGORIES}
        files: list[dict] = []
        temp_files = 0
        quarantine = {"count": 0, "bytes": 0}
        total = 0
        if self.data_dir.is_dir():
            for path in sorted(self.data_dir.rglob("*")):
                if not path.is_file() or path.name == WRITER_LOCK_NAME:
                    continue
                rel = path.relative_to(self.data_dir)
                size = path.stat().st_size
                total += size
                if rel.parts[0] == QUARANTINE_DIR:
                    quarantine["count"] += 1
                    quarantine["bytes"] += size
                    continue
                if any(is_temp_file(Path(p)) for p in rel.parts):
                    temp_files += 1
                    continue
                cat = _category_of(rel)
                if cat is None:
                    continue
                cats[cat]["bytes"] += size
                cats[cat]["files"] += 1
                if len(files) < MAX_LISTED_FILES:
                    files.append({"path": str(rel), "category": cat, "bytes": size,
                                  "modifiedAt": int(path.stat().st_mtime * 1000)})
        # Counts are of the things users think in, not of files.
        cats["candles"]["count"] = sum(1 for f in self._iter_files("candles") if f.suffix == ".parquet")
        cats["models"]["count"] = sum(
            1 for p, m in self.model_keys() for v in self.models.version_ids(p, m)
            if (self.models.version_dir(p, m, v) / META_NAME).is_file())
        cats["weights"]["count"] = cats["weights"]["files"]
        try:
            cats["training"]["count"] = len(self.get_document("training", TRAINING_HISTORY, default=[]))
        except ChecksumError:
            cats["training"]["count"] = 0
        cats["predictions"]["count"] = self.predictions.total_count()
        for cat in ("features", "queue"):
            cats[cat]["count"] = sum(1 for f in self._iter_files(cat)
                                     if f.suffix == ".json" and not is_temp_file(f))
        return {
            "dataDir": str(self.data_dir),
            "categories": cats,
            "totalBytes": total,
            "files": files,
            "filesTruncated": sum(c["files"] for c in cats.values()) > len(files),
            "tempFiles": temp_files,
            "quarantine": quarantine,
            "bufferedPredictions": self.predictions.buffered,
            "retention": self.retention_status(),
            "timestamp": now_ms(),
        }

    def _iter_files(self, category: str):
        base = self.data_dir / check_category(category)
        return (p for p in base.rglob("*") if p.is_file()) if base.is_dir() else iter(())

    def _remove_records_before(self, cutoff: int) -> tuple[int, int]:
        """Remove prediction and training records older than `cutoff` (epoch ms); return both counts.
        The caller holds self._lock."""
        removed_predictions = self.predictions.cleanup(cutoff)
        history = list(self.get_document("training", TRAINING_HISTORY, default=[]))
        keep, removed_training = split_expired(history, cutoff)
        if removed_training:
            self.put_document("training", TRAINING_HISTORY, keep)
        return removed_predictions, removed_training

    def cleanup(self, max_age_hours: float, *, now: int | None = None) -> dict:
        """Remove prediction and training records older than `max_age_hours`, and model versions
        beyond `keep_versions` (per pair and model type) that are also older — never a production
        version. The edges (CLI, HTTP) ask for >= 1 hour unless forced (ml.storage.retention)."""
        self._require_writable()
        max_age_hours = check_max_age_hours(max_age_hours, force=True)
        t0 = time.perf_counter()
        cutoff = cutoff_for_age(now_ms() if now is None else now, max_age_hours)
        with self._lock:
            removed_predictions, removed_training = self._remove_records_before(cutoff)
            removed_versions = []
            for pair, mt in self.model_keys():
                prod = self.get_production(pair, mt)
                prod_version = prod.get("version") if prod else None
                versions = self.list_versions(pair, mt)
                for meta in versions[max(0, self.keep_versions):]:
                    v = meta.get("version")
                    if v == prod_version or meta.get("savedAt", 0) >= cutoff:
                        continue
                    if self.models.delete_version(pair, mt, v):
                        removed_versions.append(f"{pair}/{mt}/{v}")
        return {
            "cleanedCount": removed_predictions + removed_training + len(removed_versions),
            "maxAgeHours": max_age_hours,
            "cutoff": cutoff,
            "predictions": removed_predictions,
            "trainingRecords": removed_training,
            "modelVersions": removed_versions,
            "durationMs": round((time.perf_counter() - t0) * 1000, 3),
            "timestamp": now_ms(),
        }

    # ---- retention (the schedule itself is in actors/storage.py) ------------------------------
    def _retention_state(self) -> dict:
        try:
            state = self.get_document("training", RETENTION_DOCUMENT, default=None)
        except ChecksumError:
            state = None
        return state if isinstance(state, dict) else empty_state()

    def retention_next_run_at(self, now: int) -> int | None:
        """When the retention schedule is due next (epoch ms), or None when retention is off."""
        if retention_cutoff(now, self.retention_hours) is None:
            return None
        last = (self._retention_state().get("lastRun") or {}).get("at")
        return next_run_at(now, last if isinstance(last, int) else None, self.retention_interval_s)

    def run_retention(self, now: int | None = None) -> dict:
        """Remove the prediction and training records older than `retention_hours` before `now`
        (nothing when retention is 0), and record what went in training/retention.json (stats shows it).
        Never touches model versions."""
        self._require_writable()
        now = now_ms() if now is None else int(now)
        cutoff = retention_cutoff(now, self.retention_hours)
        if cutoff is None:
            return {"enabled": False, "retentionHours": self.retention_hours}
        t0 = time.perf_counter()
        try:
            with self._lock:
                predictions, training = self._remove_records_before(cutoff)
                run = {"at": now, "cutoff": cutoff, "retentionHours": self.retention_hours,
                       "removed": {"predictions": predictions, "trainingRecords": training},
                       "durationMs": round((time.perf_counter() - t0) * 1000, 3)}
                self.put_document("training", RETENTION_DOCUMENT, add_run(self._retention_state(), run))
        except Exception as exc:
            self._retention_error = {"at": now, "error": f"{type(exc).__name__}: {exc}"}
            raise
        self._retention_error = None
        return {"enabled": True, **run}

    def retention_status(self, now: int | None = None) -> dict:
        """The retention settings of this instance and what the runs removed (for stats)."""
        now = now_ms() if now is None else int(now)
        try:
            state = self._retention_state()
        except OSError as exc:
            state = {**empty_state(), "readError": f"{type(exc).__name__}: {exc}"}
        enabled = self.retention_hours > 0
        return {"enabled": enabled, "retentionHours": self.retention_hours,
                "intervalS": self.retention_interval_s, **state,
                "nextRunAt": self.retention_next_run_at(now) if enabled else None,
                "lastError": self._retention_error}

    def doctor(self, repair: bool = False, *, temp_grace_seconds: float = 60.0) -> dict:
        """Check the data directory; with `repair`, fix what can be fixed. See ml.storage.doctor."""
        if repair:
            self._require_writable()
        with self._lock, self.predictions._io_lock:
            report = run_doctor(self.data_dir, self.models, repair=repair,
                                temp_grace_seconds=temp_grace_seconds)
            if repair:
                self.predictions.forget_caches()
        return report

    def _require_writable(self) -> None:
        if self.read_only:
            raise PermissionError("this Storage is read-only (only the Storage actor writes)")


def _category_of(rel: Path) -> str | None:
    """The stats category of a file, by where it sits."""
    top = rel.parts[0]
    if top == "models":
        if rel.name in (PRODUCTION_NAME, META_NAME) or rel.name in (
                PRODUCTION_NAME + BACKUP_SUFFIX, META_NAME + BACKUP_SUFFIX):
            return "models"
        return "weights" if len(rel.parts) >= 5 else "models"
    return top if top in STAT_CATEGORIES else None
