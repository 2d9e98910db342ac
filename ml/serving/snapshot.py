"""What the request path knows about a pair, re-read at most every `interval_s` per replica: the open
time of the newest candle in the candle store (coverage, for every data source: the market feed keeps
the store current, so a source that stops delivering shows as old candles, never as the wall clock)
and the production version of every model type (pointer + metadata on the shared volume, through
`ml.registry.production`), and with `ensemble` among the types the newest ensemble version even when
it is not production (what `model=ensemble` says when none was promoted). No actor call, no Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ml.registry.production import Production, production_from
from ml.serving.model_ids import ENSEMBLE

log = logging.getLogger(__name__)

META_CACHE_ITEMS = 256  # version metadata never changes once written: kept per replica


@dataclass
class PairSnapshot:
    at: float                          # time.monotonic() of the read
    candle_ts: int | None              # open time of the last closed candle (None: no data)
    coverage: dict[str, Any] | None
    production: dict[str, Production | None] = field(default_factory=dict)
    newest_ensemble: dict[str, Any] | None = None  # meta of the newest ensemble version, promoted or not


class Snapshots:
    """Per-pair snapshots, one read in flight per pair (worker thread), shared by concurrent requests.

    `store` is an `ml.data.store.CandleStore`, `reader` a read-only `ml.storage.store.Storage`.
    `live_source` says whether the market feed keeps the store current (every source but `files`);
    it is shown in the coverage (`live`), the candles are the store's either way.
    """

    def __init__(self, store: Any, reader: Any, model_types: list[str], timeframe_ms: int, *,
                 live_source: bool, interval_s: float, default_horizons: list[int]) -> None:
        self.store = store
        self.reader = reader
        self.model_types = list(model_types)
        self.tf = int(timeframe_ms)
        self.live_source = live_source
        self.interval_s = float(interval_s)
        self.default_horizons = [int(h) for h in default_horizons]
        self._snaps: dict[str, PairSnapshot] = {}
        self._held: dict[str, PairSnapshot] = {}  # answered while the pair's new close is computed
        self._tasks: dict[str, asyncio.Task] = {}
        self._meta: OrderedDict[tuple[str, str, str], dict] = OrderedDict()

    async def get(self, pair: str, *, force: bool = False) -> PairSnapshot:
        held = self._held.get(pair)
        if held is not None and not force:
            return held
        snap = self._snaps.get(pair)
        if snap is not None and not force and time.monotonic() - snap.at < self.interval_s:
            return snap
        task = self._tasks.get(pair)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.read, pair))
            self._tasks[pair] = task
        snap = await asyncio.shield(task)
        self._snaps[pair] = snap
        return snap

    @contextlib.asynccontextmanager
    async def holding(self, pair: str):
        """While the block runs, requests keep the pair's current snapshot (a forced `get` inside the
        block reads the new one): a closed candle becomes visible to them only once its predictions
        are cached, so the first request after a close is a cache hit, not a wait for the compute."""
        current = self._snaps.get(pair)
        if current is not None:
            self._held[pair] = current
        try:
            yield
        finally:
            self._held.pop(pair, None)

    def invalidate(self, pair: str) -> None:
        self._snaps.pop(pair, None)

    def horizons(self, prod: Production | None) -> list[int]:
        """The horizons a production version predicts (the configured ones without a model)."""
        return (prod.horizons if prod else []) or list(self.default_horizons)

    def read(self, pair: str) -> PairSnapshot:
        """Candle coverage and production versions of one pair (blocking: run in a worker thread)."""
        coverage = None
        candle_ts = None
        try:
            coverage = self.store.coverage(pair)
        except Exception as exc:  # noqa: BLE001 - unreadable file: treated as no data
            log.warning("coverage of %s failed: %s", pair, exc)
        if coverage and coverage.get("bars"):
            candle_ts = int(coverage["end"])
        if coverage is not None:
            coverage = {**coverage, "live": self.live_source}
        production = {mt: self.production(pair, mt) for mt in self.model_types}
        newest = self.newest_version(pair, ENSEMBLE) if ENSEMBLE in self.model_types else None
        return PairSnapshot(at=time.monotonic(), candle_ts=candle_ts, coverage=coverage, production=production,
                            newest_ensemble=newest)

    def newest_version(self, pair: str, mt: str) -> dict | None:
        """The meta of the newest stored version of pair/mt (ids start with their UTC time), or None.
        One directory listing; the meta is read once (cached like every version's)."""
        try:
            ids = self.reader.models.version_ids(pair, mt)
        except Exception as exc:  # noqa: BLE001 - unreadable directory: no version
            log.warning("versions of %s/%s unreadable: %s", pair, mt, exc)
            return None
        for version in sorted(ids, reverse=True):
            meta = self.meta(pair, mt, version)
            if meta is not None:
                return dict(meta, version=version)
        return None

    def production(self, pair: str, mt: str) -> Production | None:
        """`ml.registry.production.read_production`, with the version metadata cached."""
        try:
            pointer = self.reader.get_production(pair, mt)
        except Exception as exc:  # noqa: BLE001 - damaged pointer: no model (the doctor repairs it)
            log.warning("production pointer of %s/%s unreadable: %s", pair, mt, exc)
            return None
        if not pointer or not pointer.get("version"):
            return None
        return production_from(pointer, self.meta(pair, mt, pointer["version"]))

    def meta(self, pair: str, mt: str, version: str) -> dict | None:
        key = (pair, mt, version)
        meta = self._meta.get(key)
        if meta is None:
            try:
                meta = self.reader.get_version_meta(pair, mt, version)
            except Exception as exc:  # noqa: BLE001
                log.warning("meta of %s/%s/%s unreadable: %s", pair, mt, version, exc)
                return None
            if meta is None:
                return None
            self._meta[key] = meta
            while len(self._meta) > META_CACHE_ITEMS:
                self._meta.popitem(last=False)
        return meta
