"""The buffered prediction log: records held in memory, flushed in batches as segment files.

Each flush writes one new segment per pair with the next sequence number (lo == hi); segment files
are described in segments.py, compaction and cleanup in maintenance.py.

Ordering: newest first means by `timestamp` descending, ties broken by arrival order (later first).
`since` keeps records with `timestamp >= since`.

Records always get an `id` (a random hex string) when they arrive without one. Records that arrive
*with* an id already present for that pair are dropped, so a retried call (e.g. a Ray actor task
re-executed after a restart) does not duplicate records: callers who want exactly-once supply ids
(`new_record_id()`).
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ml.storage.atomic import ChecksumError
from ml.storage.paths import check_pair, safe_path
from ml.storage.predictions.maintenance import cleanup_segments, compact_segments, is_small
from ml.storage.predictions.segments import Segment, list_segments, read_segment, write_segment

log = logging.getLogger(__name__)

RECENT_IDS_PER_PAIR = 20_000
FLUSH_THREADS = 4
_ARRIVAL = 1 << 62  # sequence number given to records still in the buffer: newer than any segment


def new_record_id() -> str:
    return uuid.uuid4().hex


def validate_record(record: Any) -> dict:
    """A shallow copy of a valid record (pair checked, integer epoch-ms timestamp, JSON-serialisable)."""
    if not isinstance(record, dict):
        raise ValueError(f"a prediction record must be a dict, not {type(record).__name__}")
    rec = dict(record)
    rec["pair"] = check_pair(rec.get("pair"))
    ts = rec.get("timestamp")
    if isinstance(ts, float) and ts.is_integer():
        ts = int(ts)
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise ValueError(f"a prediction record needs an integer epoch-ms 'timestamp' >= 0, got {ts!r}")
    rec["timestamp"] = ts
    rid = rec.get("id")
    if rid is None:
        rec["id"] = new_record_id()
    elif not isinstance(rid, str) or not rid or len(rid) > 128:
        raise ValueError(f"a record 'id' must be a non-empty string of at most 128 characters, got {rid!r}")
    try:
        json.dumps(rec, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prediction record is not JSON-serialisable: {exc}") from exc
    return rec


class PredictionLog:
    """Buffer + segments for every pair. Thread-safe; only one process may write a data directory.

    Two locks: `_buf_lock` guards the in-memory buffer and is held only for list operations, so
    appends never wait for disk; `_io_lock` serialises everything that reads or writes segments
    (flush, query, update, cleanup, compaction), so a query sees each record exactly once, either
    in the buffer or in a segment.
    """

    def __init__(self, data_dir: Path, *, flush_count: int = 200, flush_seconds: float = 2.0,
                 writable: bool = True, compact_threshold: int = 32, segment_max_records: int = 5000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._root = Path(data_dir)
        self.flush_count = max(1, int(flush_count))
        self.flush_seconds = float(flush_seconds)
        self.writable = writable
        self.compact_threshold = max(2, compact_threshold)
        self.segment_max_records = max(2, segment_max_records)
        self._clock = clock
        self._buf_lock = threading.Lock()
        self._io_lock = threading.RLock()
        self._buffer: dict[str, list[dict]] = {}
        self._buffered = 0
        self._oldest: float | None = None
        self._recent: dict[str, tuple[deque, set]] = {}
        # The writer's view of the live segments and next sequence number per pair: it is the only
        # process changing them, so it lists a directory once instead of on every flush and query.
        self._live: dict[str, list[Segment]] = {}
        self._next_seq: dict[str, int] = {}
        self._has_dead: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None

    # ---- paths and listing ----------------------------------------------------------------
    def pair_dir(self, pair: str) -> Path:
        return safe_path(self._root, "predictions", pair=pair)

    def pairs(self) -> list[str]:
        base = self._root / "predictions"
        if not base.is_dir():
            names: set[str] = set()
        else:
            names = {p.name for p in base.iterdir() if p.is_dir()}
        with self._buf_lock:
            names.update(self._buffer)
        out = []
        for n in sorted(names):
            try:
                out.append(check_pair(n))
            except ValueError:
                continue
        return out

    def segments(self, pair: str) -> tuple[list[Segment], list[Segment]]:
        """(live, superseded) segments of a pair, read from the directory listing."""
        return list_segments(self.pair_dir(pair))

    def _live_segments(self, pair: str) -> list[Segment]:
        """Live segments of a pair (caller holds the IO lock): cached in the writer, listed in readers."""
        if not self.writable:
            return self.segments(pair)[0]
        cached = self._live.get(pair)
        if cached is None:
            live, dead = self.segments(pair)
            listed_next = max((s.hi for s in live + dead), default=0) + 1
            self._next_seq[pair] = max(self._next_seq.get(pair, 1), listed_next)
            self._live[pair] = cached = live
            if dead:  # leftovers of a writer that died mid-compaction: removed at the next check
                self._has_dead.add(pair)
        return list(cached)

    def _read_segment(self, d: Path, seg: Segment) -> list[dict]:
        return read_segment(d, seg, restore=self.writable)

    # ---- append and flush -------------------------------------------------------------------
    def _load_recent_ids(self, pair: str) -> tuple[deque, set]:
        """Ids of the newest records of a pair on disk, for deduplication (takes the IO lock)."""
        ids: list[str] = []
        with self._io_lock:
            live = self._live_segments(pair)
            d = self.pair_dir(pair)
            for seg in sorted(live, key=lambda s: s.hi, reverse=True):
                try:
                    ids.extend(r.get("id") for r in reversed(self._read_segment(d, seg)))
                except (FileNotFoundError, ChecksumError):
                    continue
                if len(ids) >= RECENT_IDS_PER_PAIR:
                    break
        ids = [i for i in ids[:RECENT_IDS_PER_PAIR] if isinstance(i, str)]
        ids.reverse()
        return deque(ids), set(ids)

    def _remember(self, pair: str, rid: str) -> bool:
        """Record an id (caller holds the buffer lock); False when it was already there."""
        order, seen = self._recent[pair]
        if rid in seen:
            return False
        order.append(rid)
        seen.add(rid)
        if len(order) > RECENT_IDS_PER_PAIR:
            seen.discard(order.popleft())
        return True

    def append(self, records: Iterable[dict], *, autoflush: bool = True) -> list[dict | None]:
        """Validate and buffer records. Returns, per record, a copy as stored (with its `id`), or
        None when a record with that id is already there (a duplicate, not stored again)."""
        self._require_writable()
        checked = []
        for raw in records:
            had_id = isinstance(raw, dict) and raw.get("id") is not None
            checked.append((validate_record(raw), had_id))
        # Records that came with an id are checked against the pair's recent ids; load those first,
        # outside the buffer lock (lock order is always IO lock, then buffer lock).
        for pair in {rec["pair"] for rec, had_id in checked if had_id} - set(self._recent):
            loaded = self._load_recent_ids(pair)
            with self._buf_lock:
                self._recent.setdefault(pair, loaded)
        out: list[dict | None] = []
        with self._buf_lock:
            for rec, had_id in checked:
                pair = rec["pair"]
                if pair in self._recent and not self._remember(pair, rec["id"]) and had_id:
                    out.append(None)
                    continue
                self._buffer.setdefault(pair, []).append(rec)
                self._buffered += 1
                out.append(dict(rec))
            if self._buffered and self._oldest is None:
                self._oldest = self._clock()
        if autoflush and self.flush_due():
            self.flush()
        return out

    def append_needs_io(self, records: Iterable[dict]) -> bool:
        """Whether append(records, autoflush=False) would read from disk (to load the recent ids of a
        pair, for records that come with an id); otherwise it only touches memory."""
        return any(isinstance(r, dict) and r.get("id") is not None and r.get("pair") not in self._recent
                   for r in records)

    @property
    def buffered(self) -> int:
        return self._buffered

    def flush_due(self) -> bool:
        if self._buffered >= self.flush_count:
            return True
        oldest = self._oldest
        return oldest is not None and self._clock() - oldest >= self.flush_seconds

    def flush(self) -> int:
        """Write every buffered record to disk (one new segment per pair); return how many.

        The pairs' segments are written concurrently: their fsyncs then share journal commits,
        which makes a flush of several pairs several times faster than writing them one by one.
        """
        if not self.writable:
            return 0
        with self._io_lock:
            with self._buf_lock:
                pending, self._buffer = self._buffer, {}
                self._buffered = 0
                oldest, self._oldest = self._oldest, None
            failure: BaseException | None = None
            results: dict[str, BaseException | None] = {}
            try:
                self._write_segments(pending, results)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after restoring the buffer
                failure = exc
            written: dict[str, int] = {}
            for pair, exc in results.items():  # also those done before an interruption
                if exc is None:
                    written[pair] = len(pending.pop(pair))
                elif failure is None:
                    failure = exc
            if failure is not None:
                with self._buf_lock:  # nothing is lost: put what was not written back in front
                    for pair, recs in pending.items():
                        self._buffer[pair] = recs + self._buffer.get(pair, [])
                        self._buffered += len(recs)
                    if self._buffered:
                        self._oldest = oldest if oldest is not None else self._clock()
                raise failure
            for pair in written:
                try:
                    self.maybe_compact(pair)
                except (OSError, ChecksumError) as exc:  # the records are safe; compaction can wait
                    log.warning("compaction of %s predictions failed: %s", pair, exc)
        return sum(written.values())

    def _write_segments(self, pending: dict[str, list[dict]], results: dict[str, BaseException | None]) -> None:
        """Write one new segment per pair (concurrently when there are several), recording in
        `results` per pair None (written) or the exception it raised."""

        def one(pair: str) -> None:
            try:
                self._write_new_segment(pair, pending[pair])
                results[pair] = None
            except Exception as exc:  # noqa: BLE001 - reported per pair to the caller
                results[pair] = exc

        pairs = list(pending)
        futures = []
        if len(pairs) > 1:
            try:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=FLUSH_THREADS, thread_name_prefix="tbml-flush")
                for pair in pairs:
                    futures.append(self._pool.submit(one, pair))
            except RuntimeError:  # interpreter shutting down (the exit flush): the rest one by one
                pass
        for f in futures:
            f.result()
        for pair in pairs:
            if pair not in results:
                one(pair)

    def _write_new_segment(self, pair: str, records: list[dict]) -> Segment:
        d = self.pair_dir(pair)
        live = self._live_segments(pair)
        seq = self._next_seq[pair]
        seg = write_segment(d, pair, seq, seq, records)
        self._next_seq[pair] = seq + 1
        self._live[pair] = [*live, seg]
        return seg

    def maybe_compact(self, pair: str, *, force: bool = False) -> int:
        """Compact when more than `compact_threshold` small segments have piled up (or `force`), or
        when superseded leftovers are known; return how many files were merged."""
        with self._io_lock:
            small = sum(is_small(s, self.segment_max_records) for s in self._live_segments(pair))
            if not force and small <= self.compact_threshold and pair not in self._has_dead:
                return 0
            self._live.pop(pair, None)
            live, dead = self.segments(pair)
            merged = compact_segments(self.pair_dir(pair), pair, live, dead,
                                      segment_max_records=self.segment_max_records)
            self._live.pop(pair, None)
            self._has_dead.discard(pair)
            return merged

    # ---- queries ----------------------------------------------------------------------------
    def query(self, pair: str, limit: int | None = 100, since: int | None = None) -> list[dict]:
        """Records of a pair, newest first (by timestamp, then arrival), at most `limit`."""
        pair = check_pair(pair)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
        if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)):
            raise ValueError(f"since must be epoch milliseconds, got {since!r}")
        if limit == 0:
            return []
        for attempt in range(5):
            try:
                return self._query_once(pair, limit, since)
            except FileNotFoundError:  # a writer in another process compacted meanwhile: re-list
                if attempt == 4:
                    raise
                with self._io_lock:
                    self._live.pop(pair, None)
                time.sleep(0.01)
        return []  # pragma: no cover

    def _query_once(self, pair: str, limit: int | None, since: int | None) -> list[dict]:
        with self._io_lock:
            with self._buf_lock:
                buffered = list(self._buffer.get(pair, ()))
            keyed: list[tuple[tuple[int, int, int], dict]] = [
                ((r["timestamp"], _ARRIVAL, i), r) for i, r in enumerate(buffered)
                if since is None or r["timestamp"] >= since
            ]
            live = self._live_segments(pair)
            d = self.pair_dir(pair)
            for seg in sorted(live, key=lambda s: (s.max_ts, s.hi), reverse=True):
                if since is not None and seg.max_ts < since:
                    continue
                if limit is not None and len(keyed) >= limit:
                    keyed = heapq.nlargest(limit, keyed, key=lambda kr: kr[0])
                    if seg.max_ts < keyed[-1][0][0]:
                        break  # every remaining segment is older than the limit-th newest record
                for i, r in enumerate(self._read_segment(d, seg)):
                    if since is None or r["timestamp"] >= since:
                        keyed.append(((r["timestamp"], seg.lo, i), r))
        keyed.sort(key=lambda kr: kr[0], reverse=True)
        if limit is not None:
            keyed = keyed[:limit]
        return [dict(r) for _, r in keyed]

    def count(self, pair: str) -> int:
        pair = check_pair(pair)
        with self._io_lock:
            live = self._live_segments(pair)
            with self._buf_lock:
                return sum(s.count for s in live) + len(self._buffer.get(pair, ()))

    def total_count(self) -> int:
        return sum(self.count(p) for p in self.pairs())

    # ---- updates and cleanup ----------------------------------------------------------------
    def update(self, pair: str, updates: list[dict]) -> int:
        """Merge fields into records by `id` (e.g. realized outcomes); return how many were found.

        `id`, `pair` and `timestamp` cannot be changed. A changed segment is rewritten atomically.
        """
        self._require_writable()
        pair = check_pair(pair)
        todo: dict[str, dict] = {}
        for u in updates:
            if not isinstance(u, dict) or not isinstance(u.get("id"), str):
                raise ValueError("every update needs a string 'id'")
            fields = {k: v for k, v in u.items() if k not in ("id", "pair", "timestamp")}
            try:
                json.dumps(fields, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"update for {u['id']!r} is not JSON-serialisable: {exc}") from exc
            todo.setdefault(u["id"], {}).update(fields)
        found = 0
        with self._io_lock:
            with self._buf_lock:
                for rec in self._buffer.get(pair, ()):
                    if rec["id"] in todo:
                        rec.update(todo.pop(rec["id"]))
                        found += 1
            if not todo:
                return found
            live = self._live_segments(pair)
            d = self.pair_dir(pair)
            for seg in sorted(live, key=lambda s: s.hi, reverse=True):
                records = self._read_segment(d, seg)
                changed = False
                for rec in records:
                    if rec.get("id") in todo:
                        rec.update(todo.pop(rec["id"]))
                        found += 1
                        changed = True
                if changed:
                    write_segment(d, pair, seg.lo, seg.hi, records, name=seg.name)
                if not todo:
                    break
        return found

    def cleanup(self, cutoff_ms: int) -> int:
        """Remove every record with timestamp < cutoff_ms (buffered or on disk); return how many."""
        self._require_writable()
        removed = 0
        with self._io_lock:
            with self._buf_lock:
                for pair, recs in list(self._buffer.items()):
                    keep = [r for r in recs if r["timestamp"] >= cutoff_ms]
                    removed += len(recs) - len(keep)
                    self._buffered -= len(recs) - len(keep)
                    if keep:
                        self._buffer[pair] = keep
                    else:  # no empty list left behind: flush would try to write an empty segment
                        del self._buffer[pair]
                if not self._buffered:
                    self._oldest = None
            for pair in self.pairs():
                self._live_segments(pair)  # make sure the next sequence number is known
                self._live.pop(pair, None)
                live, dead = self.segments(pair)
                removed += cleanup_segments(self.pair_dir(pair), pair, live, dead, cutoff_ms)
                self._live.pop(pair, None)
        return removed

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError("this Storage is read-only (only the Storage actor writes)")

    def forget_caches(self) -> None:
        """Drop what the writer remembers of the files (after they changed behind its back, e.g. by
        doctor --repair): recent ids and live segments. Sequence numbers only ever grow."""
        with self._io_lock, self._buf_lock:
            self._recent.clear()
            self._live.clear()
