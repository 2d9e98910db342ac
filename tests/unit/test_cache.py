"""ml.cache (keys, local, client) against a real redis-server (fixtures in tests/conftest.py).

Where a test is about time (local expiry, ages, lock waits, the reconnect interval) it drives a
FakeClock instead of sleeping; Redis's own TTLs and outages still take real time.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import pytest
import redis

from ml.cache.client import Cache
from ml.cache.keys import CacheKind, cache_key
from ml.cache.local import CacheHit, LocalTTLCache
from ml.config import Settings

pytestmark = pytest.mark.timeout(60)

P = CacheKind.PREDICTIONS


def key(candle_ts: int = 1763700900000, version: str = "v20261121-0501", pair: str = "BTC") -> str:
    return cache_key(P, pair=pair, model="lstm", version=version, candle_ts=candle_ts, extra="h5")


class FakeClock:
    """Monotonic and wall time that move only when told (or when `sleep` is awaited)."""

    def __init__(self, mono: float = 1000.0, wall: float = 1_763_700_000.0) -> None:
        self.mono = mono
        self.wall = wall
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)

    def inject(self) -> dict:
        return {"clock": self.monotonic, "wall_clock": self.time, "sleep": self.sleep}


def make_cache(url: str | None, **kw) -> Cache:
    kw.setdefault("reconnect_interval_s", 0.2)
    return Cache(url, **kw)


async def wait_until(cond, timeout: float = 8.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return cond()


# --- keys ----------------------------------------------------------------------------------------

def test_cache_key_schema() -> None:
    assert key() == "tbml:predictions:BTC:lstm:v20261121-0501:1763700900000:h5"
    assert cache_key(CacheKind.HEALTH) == "tbml:health"
    assert cache_key(CacheKind.FEATURES, pair="ETH", candle_ts=5, namespace="t1") == "t1:features:ETH:~:~:5"
    assert cache_key("modelStatus", pair="BTC") == "tbml:modelStatus:BTC"
    # positions are fixed: a value in another slot never collides
    assert cache_key(P, pair="BTC", model="x") != cache_key(P, pair="BTC", version="x")
    # separators and the placeholder are escaped inside parts
    k = cache_key(P, pair="BTC", model="a:b", extra="~")
    assert k == "tbml:predictions:BTC:a%3Ab:~:~:%7E"


@pytest.mark.parametrize("kwargs", [
    {"pair": "btc"}, {"pair": "BTC:X"}, {"model": ""}, {"version": "x" * 201}, {"candle_ts": -1},
    {"candle_ts": 1.5}, {"candle_ts": True}, {"model": 3.0}, {"namespace": "a:b"}, {"namespace": ""},
])
def test_cache_key_rejects_bad_parts(kwargs) -> None:
    with pytest.raises(ValueError):
        cache_key(P, **kwargs)


def test_cache_key_unknown_kind() -> None:
    with pytest.raises(ValueError):
        cache_key("nope", pair="BTC")


def test_local_ttl_cache_expiry_and_lru() -> None:
    clock = FakeClock()
    c = LocalTTLCache(max_items=2, clock=clock.monotonic)
    c.set("a", "1", 10)
    c.set("b", "2", 10)
    assert c.get("a") == "1"          # a is now most recently used
    c.set("c", "3", 10)               # evicts b
    assert c.get("b") is None and c.get("a") == "1" and c.get("c") == "3"
    c.set("d", "4", 0.05)
    clock.advance(0.049)
    assert c.get("d") == "4"
    clock.advance(0.031)
    assert c.get("d") is None


def test_from_settings_uses_config() -> None:
    s = Settings(namespace="ns1")
    c = Cache.from_settings(s)
    assert c.ttls == {CacheKind.PREDICTIONS: 30, CacheKind.FEATURES: 300, CacheKind.MODEL_STATUS: 60,
                      CacheKind.HEALTH: 10}
    assert c.namespace == "ns1" and c.url == "redis://127.0.0.1:6380/0"
    s2 = Settings.model_validate({"redis": {"url": "redis://:secret@10.0.0.1:7000/1"},
                                  "cache": {"predictions_ttl_s": 5}})
    c2 = Cache.from_settings(s2)
    assert c2.url == "redis://:secret@10.0.0.1:7000/1" and c2.ttls[P] == 5
    assert "secret" not in str(c2.status())
    with pytest.raises(ValueError):
        Cache(None, ttls={P: 0})


# --- basic behaviour -----------------------------------------------------------------------------

def test_hit_after_set_and_counters(redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as c:
            assert await c.get(P, key()) is None
            await c.set(P, key(), {"direction": "up", "probability": 0.61})
            hit = await c.get(P, key())
            assert isinstance(hit, CacheHit)
            assert hit.value == {"direction": "up", "probability": 0.61}
            assert hit.source == "redis" and 0 <= hit.age_s < 1
            counts = await c.counters()
            assert counts["hits"][P.value] == 1 and counts["misses"][P.value] == 1
            assert counts["hitRate"] == pytest.approx(0.5) and counts["source"] == "redis"
            assert set(counts["hits"]) == {"predictions", "features", "modelStatus", "health"}
            assert not c.degraded and c.status()["status"] == "connected"
        # stored with the kind's TTL in Redis
        assert 0 < redis.Redis.from_url(redis_url).pttl(key()) <= 30_000

    asyncio.run(main())


def test_age_is_real(redis_url: str) -> None:
    clock = FakeClock()

    async def main() -> None:
        async with make_cache(redis_url, **clock.inject()) as c:
            await c.set(P, key(), 1)
            clock.advance(0.3)
            hit = await c.get(P, key())
            assert hit is not None and 0.25 <= hit.age_s < 2
            assert hit.age_s == pytest.approx(0.3)
        # a second replica (another instance) reads the same age: it is stored with the value
        async with make_cache(redis_url, **clock.inject()) as other:
            hit = await other.get(P, key())
            assert hit is not None and hit.age_s == pytest.approx(0.3)

    asyncio.run(main())


def test_expiry_after_ttl(redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url, ttls={P: 0.3}) as c:
            await c.set(P, key(), "a")
            assert (await c.get(P, key())).value == "a"
            await asyncio.sleep(0.45)
            assert await c.get(P, key()) is None
            await c.set(P, key(), "b", ttl=0.2)   # explicit ttl beats the kind's
            await asyncio.sleep(0.35)
            assert await c.get(P, key()) is None

    asyncio.run(main())


def test_new_candle_or_model_version_misses(redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as c:
            calls = []

            async def compute(tag):
                calls.append(tag)
                return tag

            v, hit = await c.get_or_compute(P, key(), lambda: compute("first"))
            assert (v, hit) == ("first", None)
            v, hit = await c.get_or_compute(P, key(), lambda: compute("again"))
            assert v == "first" and hit is not None
            v, hit = await c.get_or_compute(P, key(candle_ts=1763701200000), lambda: compute("candle"))
            assert (v, hit) == ("candle", None)
            v, hit = await c.get_or_compute(P, key(version="v20261121-0600"), lambda: compute("model"))
            assert (v, hit) == ("model", None)
            assert calls == ["first", "candle", "model"]

    asyncio.run(main())


def test_fifty_concurrent_misses_compute_once(redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as c:
            calls = 0

            async def compute():
                nonlocal calls
                calls += 1
                await asyncio.sleep(0.1)
                return {"n": calls}

            results = await asyncio.gather(*(c.get_or_compute(P, key(), compute) for _ in range(50)))
            assert calls == 1
            assert all(v == {"n": 1} and hit is None for v, hit in results)
            counts = await c.counters()
            assert counts["misses"][P.value] == 50 and counts["hits"][P.value] == 0
            v, hit = await c.get_or_compute(P, key(), compute)
            assert v == {"n": 1} and hit is not None and calls == 1

    asyncio.run(main())


def test_compute_error_reaches_every_caller_and_is_not_cached(redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as c:
            calls = 0

            async def boom():
                nonlocal calls
                calls += 1
                await asyncio.sleep(0.05)
                raise RuntimeError("model failed")

            results = await asyncio.gather(*(c.get_or_compute(P, key(), boom) for _ in range(5)),
                                           return_exceptions=True)
            assert calls == 1 and all(isinstance(r, RuntimeError) for r in results)

            async def ok():
                return "fine"

            assert await c.get_or_compute(P, key(), ok) == ("fine", None)

    asyncio.run(main())


def test_cancelled_caller_does_not_cancel_the_computation(redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as c:
            async def slow():
                await asyncio.sleep(0.2)
                return "done"

            first = asyncio.create_task(c.get_or_compute(P, key(), slow))
            await asyncio.sleep(0.02)
            second = asyncio.create_task(c.get_or_compute(P, key(), slow))
            await asyncio.sleep(0.02)
            first.cancel()
            assert await second == ("done", None)
            assert (await c.get(P, key())).value == "done"

    asyncio.run(main())


# --- two replicas --------------------------------------------------------------------------------

def test_two_instances_share_values_and_counters(redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as a, make_cache(redis_url) as b:
            async def compute():
                return [1, 2, 3]

            assert await a.get_or_compute(P, key(), compute) == ([1, 2, 3], None)
            v, hit = await b.get_or_compute(P, key(), compute)
            assert v == [1, 2, 3] and hit is not None and hit.source == "redis"
            await b.get(CacheKind.FEATURES, "tbml:features:BTC")
            for c in (a, b):
                counts = await c.counters()
                assert counts["hits"] == {"predictions": 1, "features": 0, "modelStatus": 0, "health": 0}
                assert counts["misses"] == {"predictions": 1, "features": 1, "modelStatus": 0, "health": 0}

    asyncio.run(main())


def test_two_replicas_concurrent_miss_compute_once(redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as a, make_cache(redis_url) as b:
            calls = []

            def computer(name):
                async def compute():
                    calls.append(name)
                    await asyncio.sleep(0.2)
                    return name
                return compute

            (va, ha), (vb, hb) = await asyncio.gather(
                a.get_or_compute(P, key(), computer("a")), b.get_or_compute(P, key(), computer("b")))
            assert len(calls) == 1
            assert va == vb == calls[0]
            # exactly one computed it, the other got it from Redis as a hit
            assert sorted([ha is None, hb is None]) == [False, True]
            # the lock is released
            assert redis.Redis.from_url(redis_url).exists(f"tbml:lock:{key()}") == 0

    asyncio.run(main())


def test_replica_computes_itself_when_lock_holder_is_too_slow(redis_url: str) -> None:
    async def main() -> None:
        # another replica holds the lock and never delivers
        redis.Redis.from_url(redis_url).set(f"tbml:lock:{key()}", "someone-else", px=10_000)
        clock = FakeClock()
        async with make_cache(redis_url, lock_wait_s=0.3, **clock.inject()) as c:
            async def compute():
                return "mine"

            t0 = clock.monotonic()
            assert await c.get_or_compute(P, key(), compute) == ("mine", None)
            assert clock.monotonic() - t0 >= 0.25
            # it polled (with growing pauses, at most 50 ms) until lock_wait_s was used up
            assert len(clock.slept) > 3 and max(clock.slept) <= 0.05
        # our lock attempt failed, so the foreign lock is untouched
        assert redis.Redis.from_url(redis_url).get(f"tbml:lock:{key()}") == b"someone-else"

    asyncio.run(main())


# --- Redis outages -------------------------------------------------------------------------------

def test_redis_down_mid_test_degrades_then_reconnects_by_itself(redis_server, redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as c:
            calls = 0

            async def compute():
                nonlocal calls
                calls += 1
                return {"calls": calls}

            assert await c.get_or_compute(P, key(), compute) == ({"calls": 1}, None)
            assert (await c.get(P, key())).source == "redis"

            redis_server.stop()
            try:
                # requests still succeed: a miss computes, then the local cache answers
                v, hit = await c.get_or_compute(P, key(candle_ts=1), compute)
                assert v == {"calls": 2} and hit is None
                assert c.degraded and c.status()["status"] == "degraded"
                v, hit = await c.get_or_compute(P, key(candle_ts=1), compute)
                assert v == {"calls": 2} and hit is not None and hit.source == "local"
                # 50 concurrent requests while degraded: still one computation
                results = await asyncio.gather(*(c.get_or_compute(P, key(candle_ts=2), compute)
                                                 for _ in range(50)))
                assert calls == 3 and all(v == {"calls": 3} for v, _ in results)
                await c.set(P, "tbml:predictions:ETH", "local-only")
                assert (await c.get(P, "tbml:predictions:ETH")).source == "local"
                counts = await c.counters()
                assert counts["source"] == "local"
                # last Redis figures (none read yet) plus what was counted locally
                assert counts["hits"][P.value] >= 2 and counts["misses"][P.value] >= 51
                assert await c.ping() is False
                assert c.degraded
            finally:
                redis_server.start()

            # no requests: the background probe notices Redis by itself
            assert await wait_until(lambda: not c.degraded), "cache did not reconnect"
            assert c.status()["localItems"] == 0
            await c.set(P, key(candle_ts=3), "back")
            raw = redis.Redis.from_url(redis_url).get(key(candle_ts=3))
            assert raw is not None and b"back" in raw
            hit = await c.get(P, key(candle_ts=3))
            assert hit.value == "back" and hit.source == "redis"
            # what was counted during the outage reached Redis
            counts = await c.counters()
            assert counts["source"] == "redis" and counts["misses"][P.value] >= 51

    asyncio.run(main())


def test_reconnect_is_driven_by_requests_too(redis_server, redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url, reconnect_interval_s=0.1) as c:
            redis_server.stop()
            try:
                assert await c.get(P, key()) is None
                assert c.degraded
            finally:
                redis_server.start()
            deadline = time.monotonic() + 8
            while c.degraded and time.monotonic() < deadline:
                await c.get(P, key())
                await asyncio.sleep(0.05)
            assert not c.degraded
            await c.set(P, key(), 7)
            assert (await c.get(P, key())).source == "redis"

    asyncio.run(main())


def test_quick_restart_replaces_broken_pooled_connections(redis_server, redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as c:
            # several pooled connections, all broken by the restart below
            await asyncio.gather(*(c.set(P, key(candle_ts=i), i) for i in range(5)))
            redis_server.stop()
            redis_server.start()
            await c.set(P, key(), "after-restart")
            hit = await c.get(P, key())
            assert hit is not None and hit.value == "after-restart" and hit.source == "redis"
            assert not c.degraded

    asyncio.run(main())


def test_hung_redis_times_out_quickly_and_recovers(redis_server, redis_url: str) -> None:
    """A frozen server (SIGSTOP) accepts connections but never answers: socket timeouts, not a hang."""
    async def main() -> None:
        async with make_cache(redis_url, socket_timeout_s=0.1) as c:
            await c.set(P, key(), "before")
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                assert await c.get(P, key()) is None  # the local cache is empty: a miss, no error
                assert time.monotonic() - t0 < 2
                assert c.degraded
                t0 = time.monotonic()
                for _ in range(20):  # while degraded, requests do not wait for Redis at all
                    await c.get(P, key())
                assert time.monotonic() - t0 < 0.5
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            assert await wait_until(lambda: not c.degraded)
            assert (await c.get(P, key())).value == "before"

    asyncio.run(main())


def test_unreachable_from_the_start() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here

    async def main() -> None:
        async with make_cache(f"redis://127.0.0.1:{port}/0") as c:
            async def compute():
                return 42

            assert await c.get_or_compute(P, key(), compute) == (42, None)
            assert c.degraded
            v, hit = await c.get_or_compute(P, key(), compute)
            assert v == 42 and hit.source == "local"

    asyncio.run(main())


def test_probe_waits_reconnect_interval_between_pings() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    clock = FakeClock()

    async def main() -> None:
        async with make_cache(f"redis://127.0.0.1:{port}/0", reconnect_interval_s=0.7, **clock.inject()) as c:
            assert await c.get(P, key()) is None
            assert c.degraded
            assert c.status()["downSince"] == int(clock.time() * 1000)
            for _ in range(200):  # the probe runs on the loop: let it go a few rounds
                if len(clock.slept) >= 3:
                    break
                await asyncio.sleep(0.01)
            assert len(clock.slept) >= 3 and all(s == 0.7 for s in clock.slept)
            assert c.degraded  # still down: every ping failed

    asyncio.run(main())


def test_local_only_cache_without_redis() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with Cache(None, ttls={P: 0.2}, **clock.inject()) as c:
            assert not c.degraded and c.status()["status"] == "disabled"
            await c.set(P, key(), {"x": 1})
            hit = await c.get(P, key())
            assert hit.value == {"x": 1} and hit.source == "local"
            clock.advance(0.3)
            assert await c.get(P, key()) is None
            counts = await c.counters()
            assert counts["hits"][P.value] == 1 and counts["misses"][P.value] == 1
            assert await c.ping() is False

    asyncio.run(main())


def test_non_json_value_raises(redis_url: str) -> None:
    async def main() -> None:
        async with make_cache(redis_url) as c:
            with pytest.raises(TypeError):
                await c.set(P, key(), object())

    asyncio.run(main())
