"""The cross-replica cache on Redis (redis.asyncio), with degraded mode and single-flight.

What it guarantees:
- Keys (ml.cache.keys) carry the last closed candle and the model version, so nothing is invalidated.
- TTLs per kind come from config (predictions 30 s, features 300 s, model status 60 s, health 10 s).
- Concurrent misses on one key compute once: in-process single-flight (one shared task per key)
  plus a short Redis `SET NX` lock so two replicas don't both compute; the loser polls briefly for
  the winner's value and computes itself if the winner is too slow or gives up.
- Hit/miss counters live in Redis (one Lua round trip does GET + HINCRBY), shared by all replicas.
- Redis unreachable -> nothing is raised to the caller: the cache turns `degraded`, reads and writes
  go to a bounded in-process TTL+LRU cache (ml.cache.local), counts are kept locally (and added to
  Redis on recovery). A background probe pings Redis at most every `reconnect_interval_s`; requests
  never wait for a dead Redis while degraded. When Redis answers again `degraded` clears by itself
  and Redis is authoritative again (the local cache is dropped).

The local cache is used only in degraded mode. Writing it while Redis is healthy would need
invalidation when Redis changes and would serve values Redis has already expired; keys already
include candle and model version, so the only price of an empty local cache at the start of an
outage is a few recomputations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ml.cache.keys import DEFAULT_TTLS, NAMESPACE_RE, CacheKind
from ml.cache.local import CacheHit, LocalTTLCache, decode_value, encode_value

log = logging.getLogger(__name__)

T = TypeVar("T")


# GET and count the outcome in one round trip. KEYS: value, hits hash, misses hash; ARGV: kind.
_GET_AND_COUNT = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('HINCRBY', KEYS[2], ARGV[1], 1) else redis.call('HINCRBY', KEYS[3], ARGV[1], 1) end
return v
"""
# Delete the lock only if we still own it.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Errors that mean "Redis is not reachable right now" (refused, reset, timed out, auth/loading).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


class _Failed:
    """Sentinel: the Redis operation did not happen (down, degraded or a Redis error)."""


_FAILED = _Failed()


@dataclass
class _Flight:
    task: asyncio.Task | None = None
    joined: int = 0        # callers that attached to this flight besides the first
    outcome_hit: bool = False


def _redact(url: str | None) -> str | None:
    if url is None:
        return None
    return re.sub(r"//([^@/]*)@", "//***@", url)


def _empty_counts() -> dict[str, dict[str, int]]:
    return {"hits": {k.value: 0 for k in CacheKind}, "misses": {k.value: 0 for k in CacheKind}}


class Cache:
    """Async cache for the Serve deployments. One instance per replica (per event loop).

    `url=None` gives a local-only cache (no Redis configured; not `degraded`). Time comes from
    arguments, so tests drive it without sleeping: `clock` (monotonic seconds: local expiry, lock
    waits), `wall_clock` (epoch seconds: value ages, downSince), `sleep` (the reconnect probe's and
    the lock wait's pauses).
    """

    def __init__(self, url: str | None, *, namespace: str = "tbml",
                 ttls: dict[CacheKind, float] | None = None, local_max_items: int = 10_000,
                 reconnect_interval_s: float = 1.0, socket_timeout_s: float = 0.25,
                 lock_ttl_s: float = 10.0, lock_wait_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        if not NAMESPACE_RE.match(namespace):
            raise ValueError(f"invalid cache namespace {namespace!r}")
        self.url = url
        self.namespace = namespace
        self.ttls: dict[CacheKind, float] = dict(DEFAULT_TTLS)
        for kind, ttl in (ttls or {}).items():
            self.ttls[CacheKind(kind)] = self._check_ttl(ttl)
        self.reconnect_interval_s = float(reconnect_interval_s)
        self.socket_timeout_s = float(socket_timeout_s)
        self.lock_ttl_s = float(lock_ttl_s)
        self.lock_wait_s = float(lock_wait_s)
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self._local = LocalTTLCache(local_max_items, clock=clock)
        self._hits_key = f"{namespace}:stats:hits"
        self._misses_key = f"{namespace}:stats:misses"
        self._pending = _empty_counts()        # counted while Redis was unusable, not yet in Redis
        self._last_remote = _empty_counts()    # last counters read from Redis
        self._inflight: dict[str, _Flight] = {}
        self._degraded = False
        self._down_since: float | None = None
        self._last_error: str | None = None
        self._probe_task: asyncio.Task | None = None
        self._closed = False
        self._client: aioredis.Redis | None = None
        if url is not None:
            # Retry once without backoff: enough to replace a pooled connection that a Redis restart
            # broke, and quick to give up when Redis is really down (the default retries for seconds).
            self._client = aioredis.Redis.from_url(
                url,
                socket_timeout=self.socket_timeout_s,
                socket_connect_timeout=self.socket_timeout_s,
                retry=Retry(NoBackoff(), 1),
            )
            self._get_script = self._client.register_script(_GET_AND_COUNT)
            self._release_script = self._client.register_script(_RELEASE_LOCK)

    @classmethod
    def from_settings(cls, settings: Any = None, **kwargs: Any) -> Cache:
        """From `get_settings()`: Redis URL (or the local Redis `make run` starts), namespace, TTLs."""
        if settings is None:
            from ml.config import get_settings

            settings = get_settings()
        url = settings.redis.url or f"redis://127.0.0.1:{settings.redis.port}/0"
        c = settings.cache
        ttls = {
            CacheKind.PREDICTIONS: c.predictions_ttl_s,
            CacheKind.FEATURES: c.features_ttl_s,
            CacheKind.MODEL_STATUS: c.model_status_ttl_s,
            CacheKind.HEALTH: c.health_ttl_s,
        }
        return cls(url, namespace=settings.namespace, ttls=ttls, **kwargs)

    async def __aenter__(self) -> Cache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- state -----------------------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while Redis is configured but unreachable (serving from the in-process cache)."""
        return self._degraded

    def status(self) -> dict[str, Any]:
        """For the health endpoint's `components.redis`."""
        state = "disabled" if self._client is None else "degraded" if self._degraded else "connected"
        return {
            "status": state,
            "degraded": self._degraded,
            "url": _redact(self.url),
            "downSince": None if self._down_since is None else int(self._down_since * 1000),
            "lastError": self._last_error,
            "localItems": len(self._local),
        }

    def ttl_for(self, kind: CacheKind | str, ttl: float | None = None) -> float:
        return self._check_ttl(ttl) if ttl is not None else self.ttls[CacheKind(kind)]

    @staticmethod
    def _check_ttl(ttl: float) -> float:
        ttl = float(ttl)
        if not ttl > 0:
            raise ValueError(f"cache TTL must be > 0 seconds, got {ttl}")
        return ttl

    def _mark_down(self, error: BaseException) -> None:
        self._last_error = f"{type(error).__name__}: {error}"
        if not self._degraded:
            self._degraded = True
            self._down_since = self._wall()
            log.warning("cache: Redis unreachable (%s); serving from the in-process cache", self._last_error)
        self._ensure_probe()

    def _ensure_probe(self) -> None:
        if self._closed or self._client is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = self._probe_task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._probe_task = loop.create_task(self._probe(), name="tbml-cache-reconnect")

    async def _probe(self) -> None:
        """While degraded: ping Redis every `reconnect_interval_s` until it answers."""
        assert self._client is not None
        while self._degraded and not self._closed:
            await self._sleep(self.reconnect_interval_s)
            try:
                await self._client.ping()
            except (*_UNREACHABLE, RedisError) as e:
                self._last_error = f"{type(e).__name__}: {e}"
                continue
            await self._recovered()

    async def _recovered(self) -> None:
        if not self._degraded:
            return
        self._degraded = False
        self._down_since = None
        self._local.clear()  # Redis is authoritative again
        log.warning("cache: Redis reachable again; leaving degraded mode")
        await self._flush_pending()

    async def _run(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T | _Failed:
        """Run one Redis operation; never raises for Redis trouble, returns _FAILED instead."""
        if self._client is None:
            return _FAILED
        if self._degraded:
            self._ensure_probe()
            return _FAILED
        try:
            return await op(self._client)
        except _UNREACHABLE as e:
            self._mark_down(e)
            return _FAILED
        except RedisError as e:  # e.g. OOM or a READONLY replica: skip Redis for this operation
            self._last_error = f"{type(e).__name__}: {e}"
            log.warning("cache: Redis error %s", self._last_error)
            return _FAILED

    # -- counters --------------------------------------------------------------------------------

    def _count_local(self, kind: CacheKind, hit: bool, n: int = 1) -> None:
        if n:
            self._pending["hits" if hit else "misses"][kind.value] += n

    async def _count(self, kind: CacheKind, hit: bool, n: int) -> None:
        if n <= 0:
            return
        field = self._hits_key if hit else self._misses_key
        if await self._run(lambda c: c.hincrby(field, kind.value, n)) is _FAILED:
            self._count_local(kind, hit, n)

    async def _flush_pending(self) -> None:
        if not any(v for group in self._pending.values() for v in group.values()):
            return
        pending, self._pending = self._pending, _empty_counts()

        async def op(c: aioredis.Redis) -> list:
            async with c.pipeline(transaction=False) as p:
                for group, key in (("hits", self._hits_key), ("misses", self._misses_key)):
                    for kind, n in pending[group].items():
                        if n:
                            p.hincrby(key, kind, n)
                return await p.execute()

        if await self._run(op) is _FAILED:
            for group, by_kind in pending.items():
                for kind, n in by_kind.items():
                    self._pending[group][kind] += n

    async def counters(self) -> dict[str, Any]:
        """{"hits": {kind: n}, "misses": {kind: n}, "hitRate": float, "source": "redis"|"local"}.

        Shared across replicas through Redis; while Redis is down: the last Redis figures plus what
        this replica counted since (added to Redis on recovery).
        """
        await self._flush_pending()

        async def op(c: aioredis.Redis) -> list:
            async with c.pipeline(transaction=False) as p:
                p.hgetall(self._hits_key)
                p.hgetall(self._misses_key)
                return await p.execute()

        res = await self._run(op)
        if res is _FAILED:
            source = "local"
            counts = _empty_counts()
            for group in ("hits", "misses"):
                for kind in counts[group]:
                    counts[group][kind] = self._last_remote[group][kind] + self._pending[group][kind]
        else:
            source = "redis"
            counts = _empty_counts()
            for group, raw in zip(("hits", "misses"), res, strict=True):
                for k, v in raw.items():
                    name = k.decode() if isinstance(k, bytes) else str(k)
                    counts[group][name] = int(v)
            self._last_remote = {g: dict(v) for g, v in counts.items()}
        hits = sum(counts["hits"].values())
        misses = sum(counts["misses"].values())
        rate = hits / (hits + misses) if hits + misses else 0.0
        return {"hits": counts["hits"], "misses": counts["misses"], "hitRate": rate, "source": source}

    # -- reads and writes ------------------------------------------------------------------------

    async def get(self, kind: CacheKind | str, key: str) -> CacheHit | None:
        """The cached value (counted as a hit) or None (counted as a miss)."""
        kind = CacheKind(kind)
        raw = await self._run(
            lambda c: self._get_script(keys=[key, self._hits_key, self._misses_key], args=[kind.value])
        )
        if raw is _FAILED:
            hit = decode_value(self._local.get(key), "local", self._wall())
            self._count_local(kind, hit is not None)
            return hit
        return decode_value(raw, "redis", self._wall())

    async def set(self, kind: CacheKind | str, key: str, value: Any, ttl: float | None = None) -> None:
        """Store a JSON value for the kind's TTL (or `ttl` seconds). Raises only for non-JSON values."""
        ttl_s = self.ttl_for(kind, ttl)
        payload = encode_value(value, self._wall())
        ms = max(1, round(ttl_s * 1000))
        if await self._run(lambda c: c.set(key, payload, px=ms)) is _FAILED:
            self._local.set(key, payload, ttl_s)

    async def delete(self, key: str) -> None:
        self._local.delete(key)
        await self._run(lambda c: c.delete(key))

    async def get_or_compute(self, kind: CacheKind | str, key: str, compute: Callable[[], Awaitable[T]],
                             ttl: float | None = None) -> tuple[T, CacheHit | None]:
        """(value, hit) on a hit; (value, None) after computing it. Concurrent misses compute once.

        All callers of one key in this process share one task (cancelling a caller does not cancel
        the computation). Across replicas a `SET NX PX` lock elects one computer; the others poll
        for its value for up to `lock_wait_s` and get it as a hit, or compute themselves. An
        exception from `compute` goes to every waiting caller and nothing is cached.
        """
        kind = CacheKind(kind)
        ttl_s = self.ttl_for(kind, ttl)
        loop = asyncio.get_running_loop()
        flight = self._inflight.get(key)
        if flight is not None and flight.task is not None and flight.task.get_loop() is loop \
                and not flight.task.done():
            flight.joined += 1
        else:
            flight = _Flight()
            flight.task = loop.create_task(self._load(flight, kind, key, compute, ttl_s))
            flight.task.add_done_callback(_retrieve_exception)
            self._inflight[key] = flight
        return await asyncio.shield(flight.task)

    async def _load(self, flight: _Flight, kind: CacheKind, key: str,
                    compute: Callable[[], Awaitable[T]], ttl_s: float) -> tuple[T, CacheHit | None]:
        lock_key = f"{self.namespace}:lock:{key}"
        token: str | None = None
        try:
            hit = await self.get(kind, key)
            if hit is not None:
                flight.outcome_hit = True
                return hit.value, hit
            candidate = secrets.token_hex(8)
            lock_ms = max(1, round(self.lock_ttl_s * 1000))
            got = await self._run(lambda c: c.set(lock_key, candidate, nx=True, px=lock_ms))
            if got is not _FAILED:
                if got:
                    token = candidate
                else:
                    waited = await self._wait_for_other(key, lock_key)
                    if waited is not None:
                        return waited.value, waited
            value = await compute()
            await self.set(kind, key, value, ttl_s)
            return value, None
        finally:
            if self._inflight.get(key) is flight:
                del self._inflight[key]  # later callers start a new flight
            if token is not None:
                await self._run(lambda c: self._release_script(keys=[lock_key], args=[token]))
            await self._count(kind, flight.outcome_hit, flight.joined)

    async def _wait_for_other(self, key: str, lock_key: str) -> CacheHit | None:
        """Another replica holds the lock: poll for its value while the lock lives, up to lock_wait_s."""
        deadline = self._clock() + self.lock_wait_s
        delay = 0.005

        async def op(c: aioredis.Redis) -> list:
            async with c.pipeline(transaction=False) as p:
                p.get(key)
                p.exists(lock_key)
                return await p.execute()

        while self._clock() < deadline:
            await self._sleep(delay)
            delay = min(delay * 2, 0.05)
            res = await self._run(op)
            if res is _FAILED:
                return None
            raw, locked = res
            if raw is not None:
                return decode_value(raw, "redis", self._wall())
            if not locked:
                return None  # the holder gave up (error) or its lock expired
        log.info("cache: lock holder for %s too slow; computing here", key)
        return None

    # -- lifecycle -------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """Really ask Redis (also while degraded); a success ends degraded mode."""
        if self._client is None or self._closed:
            return False
        try:
            await self._client.ping()
        except _UNREACHABLE as e:
            self._mark_down(e)
            return False
        except RedisError as e:
            self._last_error = f"{type(e).__name__}: {e}"
            return False
        await self._recovered()
        return True

    async def close(self) -> None:
        self._closed = True
        task, self._probe_task = self._probe_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await task
        if self._client is not None:
            with contextlib.suppress(*_UNREACHABLE, RedisError, RuntimeError):
                await self._client.aclose()


def _retrieve_exception(task: asyncio.Task) -> None:
    """Mark a flight's exception as seen even if every caller was cancelled (no asyncio warning)."""
    if not task.cancelled():
        task.exception()
