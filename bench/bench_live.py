"""Live-market benchmark: exchange backfill, and serving while candles close every second.

What it does, all on this machine and torn down at the end (also on failure):

1. **Backfill** (no Ray). The stand-in Binance of the tests (`tests/standins/binance.py`, real HTTP on
   a loopback port, 1m klines) and `ml.data.exchange.ensure_exchange_history` into an empty temporary
   candle store: 20,000 closed 1m candles (BARS) in pages of `data.exchange.page_limit` (1000), through the real
   ccxt client (`base_url` pointed at the stand-in) with ccxt's rate limiting as configured (Binance's
   `rateLimit` x the klines cost: a real wait before every page), every row validated and the store
   written. Markets are loaded before the clock starts (a one-time cost of the client). Anchors, from
   the same run: the *HTTP floor*, the very same kline pages (the query strings the backfill sent)
   fetched by plain keep-alive HTTP and read, with no parsing, validation or store; and the
   *rate-limit ceiling*, page_limit candles per `rateLimit x cost` (the fastest ccxt's throttle lets
   the client go).
2. **Steady state** (a private Ray cluster with its own Redis and data directory: `bench_http.cluster`,
   serve_config.yaml's application) on 1 s candles (`TBML_TIMEFRAME=1s`) of `data.source: exchange`:
   the stand-in Binance printing 1s klines on the wall clock, in a process of its own; the store of
   BTC and ETH backfilled from it (3000 bars) and a promoted lstm for BTC trained on them; the
   market feed actor (`actors.feed`) running with `data.feed.close_delay_s` 0.2 s (the stand-in
   prints a closed kline at once; the 1 s default is a whole 1s bar), so a candle closes every second
   and the store, the events hub (`actors.prediction_events`) and the cache follow. (The synthetic
   market cannot run 1s bars: its simulation starts at 2025-01-01 and stops 4 million bars later.)
   `GET /api/predictions/BTC` at 1 and 32 clients for a fixed time (`bench_http`'s load generator),
   beside `GET /api/ping` in the same run: p50 and throughput. A probe client beside the load reads
   every answer it gets: the share that were cache hits (`cached: true`), and the latency of the
   first answer after each close (a new `asOf`) against its other answers -- the request that pays
   for a close, if anyone does. Last (after 3.), the feed actor is stopped and the prediction route
   is measured again the same way: what the closes themselves cost it, on the same cluster.
3. **Close to prediction**, with no other load: for each close of BTC in a window, from the bar's
   close time (open ts + timeframe) to its prediction being in Redis (the ingress's cache key,
   polled every 2 ms, no client asking), and to its event reaching a subscriber of
   `GET /api/stream/predictions?pairs=BTC` over the Serve proxy; and the share of closes that got
   one. Anchor: `data.feed.close_delay_s` plus one timeframe -- the feed waits close_delay_s after a
   close before it fetches (nothing can be earlier), and a prediction later than one more bar is
   overtaken by the next close.

Targets: backfill >= 0.8x the rate-limit ceiling (the exchange's limit, not our parsing, bounds it;
its ratio to the HTTP floor and the share of ccxt's own parsing are reported without a target);
prediction p50 while candles close <= 1.3x the no-op's (a request after a close costs what a cached
one costs, as in bench_http), throughput at 32 clients >= 0.6x the no-op's; >= 95% of answers cache
hits, the first answer after a close <= 1.3x the others; close -> cached and close -> delivered p50
<= 1x the anchor, for every close; no errors.

The load generator and the probe share the 2 cores with the cluster, as a client on the same host would.
Run: `python -m bench.bench_live [--quick] [--json]` (or `make bench`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BenchResult, bench_main, percentile
from ml.clock import now_ms

REPO = Path(__file__).resolve().parent.parent
SECTION = "live"
NAMESPACE = "tbml-bench"  # bench_http's cluster
PAIR = "BTC"
BARS = 20_000


# ----------------------------------------------------------------------------------- 1. backfill


@contextlib.contextmanager
def _env(**values: str):
    """Set TBML_* variables for the block (settings re-read), then put the old values back."""
    from ml.config import get_settings

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield get_settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


def _stand_in(**kwargs):
    sys.path.insert(0, str(REPO / "tests"))
    from standins.binance import StandIn

    return StandIn(**kwargs)


def _http_floor(port: int, queries: list[dict]) -> tuple[float, list[bytes]]:
    """(seconds, bodies) to GET the same kline pages over one keep-alive connection, bodies read only."""
    from urllib.parse import urlencode

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        t0 = time.perf_counter()
        bodies = []
        for q in queries:
            conn.request("GET", "/api/v3/klines?" + urlencode(q), headers={"Accept": "application/json"})
            resp = conn.getresponse()
            bodies.append(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"the stand-in answered {resp.status} to {q}")
        return time.perf_counter() - t0, bodies
    finally:
        conn.close()


def _ccxt_parse_s(exchange, symbol: str, timeframe: str, bodies: list[bytes]) -> float:
    """Seconds ccxt's own parse_ohlcvs takes for these pages (the JSON already decoded): its share."""
    import json

    pages = [json.loads(b) for b in bodies]
    market = exchange.market(symbol)
    t0 = time.perf_counter()
    for rows in pages:
        exchange.parse_ohlcvs(rows, market, timeframe, None, None)
    return time.perf_counter() - t0


def _backfill_once(settings, stand_in, now: int) -> dict:
    from ml.data.exchange import ExchangeClient, ensure_exchange_history
    from ml.data.store import CandleStore

    with tempfile.TemporaryDirectory(prefix="tbml-bench-live-") as tmp:
        store = CandleStore(Path(tmp), settings.timeframe)
        # the client's clock is the wall clock, so ccxt's throttle really waits (its limiter as configured)
        with ExchangeClient.from_settings(settings, base_url=stand_in.url) as client:
            client.load_markets()
            symbol = client.symbol(PAIR)
            ex = client.exchange
            cost = float(ex.api["public"]["get"]["klines"].get("cost", 1)) if "public" in ex.api else 1.0
            ceiling = client.page_limit / (float(ex.rateLimit) * cost / 1000)
            stand_in.kline_queries.clear()
            waits0 = len(client.waits)
            t0 = time.perf_counter()
            report = ensure_exchange_history(PAIR, settings, store, client=client, bars=BARS, now_ms=now)
            elapsed = time.perf_counter() - t0
            waited = sum(s for kind, s in client.waits[waits0:] if kind == "rate_limit")
            queries = list(stand_in.kline_queries)
            floor_s, bodies = _http_floor(stand_in.port, queries)
            parse_s = _ccxt_parse_s(ex, symbol, settings.timeframe, bodies)
        stored = (store.coverage(PAIR) or {}).get("bars") or 0
    return {"symbol": symbol, "elapsed": elapsed, "waited": waited, "stored": stored, "added": report.added,
            "rejected": sum(report.rejected.values()), "pages": len(queries), "floor_s": floor_s,
            "floor_bytes": sum(len(b) for b in bodies), "ceiling": ceiling, "requests": report.requests,
            "parse_s": parse_s}


def bench_backfill(quick: bool) -> list[BenchResult]:
    repeat = 2 if quick else 5
    tf = 60_000
    now = (now_ms() // tf) * tf + tf // 2  # mid-bar: the open candle is served, never stored
    stand_in = _stand_in(now=lambda: now, interval="1m")
    try:
        with _env(TBML_TIMEFRAME="1m") as settings:
            runs = [_backfill_once(settings, stand_in, now) for _ in range(repeat)]
    finally:
        stand_in.stop()
    rate = statistics.median(r["stored"] / r["elapsed"] for r in runs)
    floor = statistics.median(r["stored"] / r["floor_s"] for r in runs)
    busy = statistics.median(r["elapsed"] - r["waited"] for r in runs)
    floor_s = statistics.median(r["floor_s"] for r in runs)
    r0 = runs[0]
    detail = (f"{r0['stored']:,} candles of {r0['symbol']} in {r0['pages']} pages ({r0['requests']} requests, "
              f"{r0['floor_bytes'] / 1e6:.1f} MB), {r0['rejected']} rejected; median of {repeat} backfills into an "
              f"empty store, {statistics.median(r['elapsed'] for r in runs):.2f} s each of which "
              f"{statistics.median(r['waited'] for r in runs):.2f} s ccxt rate-limit waits")
    ok = all(r["stored"] == BARS and r["rejected"] == 0 for r in runs)
    parse_ms = statistics.median(r["parse_s"] for r in runs) * 1000
    per_page = 1000 / r0["ceiling"] * r0["stored"] / max(r0["pages"], 1)  # ms the limiter allows per page
    return [
        BenchResult(SECTION, "exchange backfill rate (1m candles, pages of 1000)", rate, "candles/s",
                    "HTTP floor (same pages, no parsing/validation/store)", floor, note=detail),
        BenchResult(SECTION, "exchange backfill rate vs ccxt's rate limit", rate, "candles/s",
                    "rate-limit ceiling (page_limit per rateLimit x cost)", r0["ceiling"], ">= 0.8x ceiling",
                    rate >= 0.8 * r0["ceiling"] and ok,
                    note=(f"the limiter allows a page every {per_page:.0f} ms; a page costs "
                          f"{busy * 1000 / max(r0['pages'], 1):.0f} ms here outside its waits (on a real exchange "
                          "the network round trip adds to that)") if ok else
                    f"stored {[r['stored'] for r in runs]} of {BARS}, rejected {[r['rejected'] for r in runs]}"),
        BenchResult(SECTION, "exchange backfill time outside rate-limit waits", busy * 1000, "ms",
                    "HTTP floor time (same pages)", floor_s * 1000,
                    note=f"of which ccxt's own parse_ohlcvs {parse_ms:.0f} ms (measured alone on the same pages); "
                         "the rest: ccxt's request path, ml.data.candles validation and the atomic store write"),
    ]


# ----------------------------------------------------------------------------------- 2. steady state

LIVE_PAIRS = "[BTC, ETH]"  # two pairs close every second: the feed's, the hub's and the cache's work
CLOSE_DELAY_S = 0.2       # the stand-in prints a closed 1s kline at once; the default (1 s) is a whole bar
LIVE_HISTORY_BARS = 3000   # 1s candles kept per pair (the feed's backfill target, the model's training set)
PREDICTION = f"/api/predictions/{PAIR}"
PROBE_PACE_S = 0.02  # the probe's pause between requests (<= 50 req/s: one light client more)


@dataclass
class ProbeResult:
    """Every answer the probe got: (latency ms, asOf, cached, stale, fallback), in order."""

    answers: list[tuple[float, int | None, bool, bool, bool]] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def after_close(self) -> tuple[list[float], list[float]]:
        """(latencies of the first answer with a new asOf, latencies of the others)."""
        first, rest = [], []
        prev = None
        for i, (ms, as_of, *_rest) in enumerate(self.answers):
            (first if i > 0 and as_of != prev else rest).append(ms)
            prev = as_of
        return first, rest

    def first_after_close_hits(self) -> tuple[int, int]:
        hits = n = 0
        prev = None
        for i, (_ms, as_of, cached, *_rest) in enumerate(self.answers):
            if i > 0 and as_of != prev:
                n += 1
                hits += bool(cached)
            prev = as_of
        return hits, n

    @property
    def hit_share(self) -> float:
        return sum(1 for a in self.answers if a[2]) / len(self.answers) if self.answers else 0.0


async def _probe(port: int, path: str, start: float, stop: float, out: ProbeResult) -> None:
    """One keep-alive client that reads every answer's body (the load generator only counts them)."""
    from bench.bench_http import _read_response

    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n"
               "Accept: application/json\r\n\r\n").encode()
    reader = writer = None
    try:
        while time.perf_counter() < stop:
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
                t0 = time.perf_counter()
                writer.write(request)
                status, body = await asyncio.wait_for(_read_response(reader), 30)
                ms = (time.perf_counter() - t0) * 1000
                if t0 < start:
                    continue
                if status != 200:
                    raise ValueError(f"HTTP {status}: {body[:160]!r}")
                if path == PREDICTION:
                    d = json.loads(body)
                    pred = d["prediction"]
                    out.answers.append((ms, pred.get("asOf"), bool(d.get("cached")), bool(pred.get("stale")),
                                        bool(pred.get("fallback"))))
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError, TimeoutError) as exc:
                if time.perf_counter() >= start:
                    out.errors += 1
                    if len(out.error_samples) < 3:
                        out.error_samples.append(f"probe {type(exc).__name__}: {exc}"[:200])
                if writer is not None:
                    writer.close()
                reader = writer = None
            await asyncio.sleep(PROBE_PACE_S)
    finally:
        if writer is not None:
            writer.close()


def _with_probe(port: int, route: str, clients: int, seconds: float, warmup: float):
    """bench_http's load of `route` and, in a thread beside it, the probe on the same path."""
    from bench.bench_http import ROUTES, run_load

    out = ProbeResult()
    t0 = time.perf_counter()
    start, stop = t0 + warmup, t0 + warmup + seconds
    th = threading.Thread(target=lambda: asyncio.run(_probe(port, ROUTES.get(route, route), start, stop, out)),
                          daemon=True)
    th.start()
    try:
        result = run_load("127.0.0.1", port, route, clients, seconds, warmup=warmup)
    finally:
        th.join(timeout=seconds + warmup + 60)
    return result, out


def _merge_probes(parts: list[ProbeResult]) -> ProbeResult:
    out = ProbeResult()
    for p in parts:
        out.answers += p.answers
        out.errors += p.errors
        out.error_samples += p.error_samples
    return out


def measure_steady(port: int, seconds: float, rounds: int) -> dict:
    """No-op and prediction at 1 and 32 clients, in interleaved rounds (as bench_http.measure)."""
    from bench.bench_http import CONCURRENCY, _merge

    loads: dict[tuple[str, int], list] = {}
    probes: dict[tuple[str, int], list[ProbeResult]] = {}
    for c in CONCURRENCY:
        for _ in range(rounds):
            for route in ("no-op", "cached prediction"):
                r, p = _with_probe(port, route, c, seconds / rounds, warmup=0.5)
                loads.setdefault((route, c), []).append(r)
                probes.setdefault((route, c), []).append(p)
        for route in ("no-op", "cached prediction"):
            r = _merge(loads[(route, c)])
            p = _merge_probes(probes[(route, c)])
            print(f"  {route:20s} c={c:<3d} p50 {r.p50:7.2f} ms  p99 {r.p99:7.2f} ms  {r.throughput:8.0f} req/s  "
                  f"errors {r.errors}  probe: {len(p.answers)} answers, hits {p.hit_share:.1%}", flush=True)
    return {k: (_merge(v), _merge_probes(probes[k])) for k, v in loads.items()}


def _steady_results(runs: dict) -> list[BenchResult]:
    from bench.bench_http import CONCURRENCY

    out: list[BenchResult] = []
    for c in CONCURRENCY:
        noop, _ = runs[("no-op", c)]
        pred, probe = runs[("cached prediction", c)]
        ratio = pred.p50 / noop.p50 if noop.p50 else None
        first, rest = probe.after_close()
        closes = len(first)
        stale = sum(1 for a in probe.answers if a[3])
        out.append(BenchResult(
            SECTION, f"prediction p50 while candles close every 1 s, {c} client(s)", pred.p50, "ms",
            f"no-op p50, {c} client(s)", noop.p50, "<= 1.3x no-op", ratio is not None and ratio <= 1.3,
            f"p99 {pred.p99:.2f} ms (no-op {noop.p99:.2f}), n={pred.n}, {closes} closes seen by the probe"))
        tratio = pred.throughput / noop.throughput if noop.throughput else None
        out.append(BenchResult(
            SECTION, f"prediction throughput while candles close, {c} client(s)", pred.throughput, "req/s",
            f"no-op throughput, {c} client(s)", noop.throughput, ">= 0.6x no-op" if c > 1 else "",
            (tratio is not None and tratio >= 0.6) if c > 1 else None))
        hits, n_first = probe.first_after_close_hits()
        out.append(BenchResult(
            SECTION, f"answers that were cache hits, {c} client(s)", probe.hit_share * 100, "%",
            target=">= 95%", ok=probe.hit_share >= 0.95,
            note=f"{len(probe.answers)} answers read by the probe beside the load; the first answer after a "
                 f"close was a hit {hits}/{n_first} times; {stale} said stale"))
        if first and rest:
            f50, r50 = percentile(first, 50), percentile(rest, 50)
            out.append(BenchResult(
                SECTION, f"first answer after a close p50, {c} client(s)", f50, "ms",
                f"the probe's other answers p50, {c} client(s)", r50, "<= 1.3x", f50 <= 1.3 * r50,
                note=f"n={len(first)} (max {max(first):.1f} ms) against n={len(rest)}; the probe is one more "
                     "client sending every 20 ms; a first answer that is no hit computed the prediction or "
                     "waited for the compute in flight"))
    errors = sum(r.errors + p.errors for r, p in runs.values())
    samples = [x for r, p in runs.values() for x in r.error_samples + p.error_samples][:3]
    out.append(BenchResult(SECTION, "errors while candles close (all runs)", errors, "requests", target="0",
                           ok=errors == 0, note="; ".join(samples) or
                           f"{sum(r.n + len(p.answers) for r, p in runs.values()):,} requests, none failed"))
    return out


def measure_quiet(port: int, seconds: float, rounds: int) -> dict:
    """The prediction route again with the feed stopped (no closes), the probe beside it as before."""
    from bench.bench_http import CONCURRENCY, _merge

    out = {}
    for c in CONCURRENCY:
        parts = [_with_probe(port, "cached prediction", c, seconds / rounds, warmup=0.5) for _ in range(rounds)]
        r = _merge([x[0] for x in parts])
        out[c] = (r, _merge_probes([x[1] for x in parts]))
        print(f"  prediction, no closes c={c:<3d} p50 {r.p50:7.2f} ms  {r.throughput:8.0f} req/s  errors {r.errors}",
              flush=True)
    return out


def _quiet_results(runs: dict, quiet: dict) -> list[BenchResult]:
    """What the closes cost the prediction route: the same load with and without them."""
    out = []
    for c, (r, p) in quiet.items():
        live, _ = runs[("cached prediction", c)]
        out.append(BenchResult(
            SECTION, f"prediction p50 while candles close vs none, {c} client(s)", live.p50, "ms",
            f"prediction p50 with the feed stopped (no closes), {c} client(s)", r.p50,
            note=f"measured after the other figures on the same cluster; without closes: p99 {r.p99:.2f} ms, "
                 f"{r.throughput:,.0f} req/s, n={r.n}, {r.errors + p.errors} errors, probe hits {p.hit_share:.1%}"))
    return out


def _wait_moving(port: int, timeout_s: float = 90.0) -> None:
    """Until two consecutive closes show up in the answers (the feed runs and the ingress follows)."""
    from bench.bench_http import ROUTES

    seen: set = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", ROUTES["cached prediction"])
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                pred = json.loads(body)["prediction"]
                if not pred.get("fallback"):
                    seen.add(pred.get("asOf"))
        except (OSError, ValueError, KeyError):
            pass
        finally:
            conn.close()
        if len(seen) >= 3:
            return
        time.sleep(0.2)
    raise RuntimeError(f"predictions did not follow the closes within {timeout_s:.0f} s (asOf seen: {sorted(seen)})")


# ----------------------------------------------------------------------------------- 3. close -> prediction


CLOSE_GRACE_S = 5.0  # after the window: how long a close of the window may still take to be cached/delivered


def _cache_poller(redis_url: str, keys_for, tf: int, window: tuple[int, int], out: dict) -> None:
    """For every bar closing in the window (epoch ms): when its prediction key is first in Redis,
    minus its close time. Polled every 2 ms until CLOSE_GRACE_S after the window."""
    import redis

    from ml.clock import last_closed_bar_ts

    r = redis.Redis.from_url(redis_url, socket_timeout=5)
    pending: dict[int, str] = {}
    nxt = last_closed_bar_ts(tf, window[0]) + tf  # the first bar that closes after the window opens
    try:
        while now_ms() < window[1] + CLOSE_GRACE_S * 1000 and (pending or now_ms() < window[1]):
            now = now_ms()
            while nxt + tf <= min(now, window[1]):
                pending[nxt] = keys_for(nxt)
                out["closes"].append(nxt)
                nxt += tf
            if pending:
                ts_list = sorted(pending)
                pipe = r.pipeline(transaction=False)
                for t in ts_list:
                    pipe.exists(pending[t])
                res = pipe.execute()
                seen_at = now_ms()
                for t, hit in zip(ts_list, res, strict=True):
                    if hit:
                        out["cached"][t] = seen_at - (t + tf)
                        del pending[t]
            time.sleep(0.002)
    finally:
        r.close()


def _sse_reader(port: int, tf: int, window: tuple[int, int], out: dict) -> None:
    """A subscriber of the stream over the Serve proxy: for each event of PAIR whose bar closed in the
    window, its arrival time minus that close (the event's `asOf`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", f"/api/stream/predictions?pairs={PAIR}", headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            out["stream_error"] = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return
        data = None
        while now_ms() < window[1] + CLOSE_GRACE_S * 1000:
            try:
                line = resp.readline()
            except TimeoutError:
                continue
            if not line:
                out["stream_error"] = "the stream ended"
                return
            line = line.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data = line[5:].strip()
            elif line.startswith(b":"):
                out["heartbeats"] += 1
            elif not line and data is not None:
                arrived = now_ms()
                body = json.loads(data)
                data = None
                as_of = (body.get("prediction") or {}).get("asOf")
                if body.get("pair") == PAIR and as_of is not None and window[0] < int(as_of) <= window[1]:
                    out["delivered"][int(as_of) - tf] = arrived - int(as_of)
                out["events"] += 1
    except Exception as exc:  # noqa: BLE001 - reported as not measured
        out["stream_error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        conn.close()


def measure_close(port: int, info: dict, settings, seconds: float) -> dict:
    """close -> cached (Redis polled) and close -> delivered (a stream subscriber), with no other load."""
    from ml.cache.keys import CacheKind, cache_key

    h = settings.labels.horizons[0]
    tf = settings.timeframe_ms

    def keys_for(ts_open: int) -> str:
        return cache_key(CacheKind.PREDICTIONS, pair=PAIR, model=settings.model.default_type,
                         version=info["version"], candle_ts=ts_open, extra=f"h{h}", namespace=settings.namespace)

    out = {"closes": [], "cached": {}, "delivered": {}, "events": 0, "heartbeats": 0, "stream_error": None}
    start = now_ms() + 1000  # the subscriber is connected by then
    window = (start, start + int(seconds * 1000))
    threads = [threading.Thread(target=_cache_poller, args=(info["redis_url"], keys_for, tf, window, out),
                                daemon=True),
               threading.Thread(target=_sse_reader, args=(port, tf, window, out), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + CLOSE_GRACE_S + 30)
    return out


def _close_results(m: dict, settings, seconds: float) -> list[BenchResult]:
    delay_s = 0.0 if settings.data.source == "synthetic" else settings.data.feed.close_delay_s
    anchor = delay_s * 1000 + settings.timeframe_ms
    anchor_name = f"feed close delay ({delay_s:g} s) + one timeframe ({settings.timeframe})"
    closes = len(m["closes"])
    out = []
    for what, share, got, how in (
            ("prediction cached", "closes whose prediction was cached", m["cached"],
             "to its prediction key in Redis (polled every 2 ms), no client asking"),
            ("event delivered to a stream subscriber", "closes whose event was delivered", m["delivered"],
             f"to its event read by a subscriber of /api/stream/predictions?pairs={PAIR} over the Serve proxy")):
        if not got:
            continue
        lat = list(got.values())
        v = percentile(lat, 50)
        beyond = f"; {v - delay_s * 1000:.0f} ms of the p50 after the close delay (fetch, store, hub, compute)"
        out.append(BenchResult(
            SECTION, f"candle close -> {what} p50", v, "ms", anchor_name, anchor, "<= 1x anchor", v <= anchor,
            note=f"{len(got)} of the {closes} closes of {PAIR} in {seconds:.0f} s (a close overtaken by the next one "
                 f"before it was computed is not), p90 {percentile(lat, 90):.0f} ms, max {max(lat):.0f} ms; from "
                 f"the bar's close time {how}" + beyond))
        out.append(BenchResult(
            SECTION, share, 100 * len(got) / closes if closes else 0.0, "%",
            target="100%", ok=len(got) == closes,
            note=f"{len(got)} of {closes}" + (f"; {m['heartbeats']} heartbeats, {m['events']} events in all"
                                              if "event" in what else "")))
    return out


STAND_IN_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from standins.binance import StandIn
s = StandIn(interval="1s")
print(s.port, flush=True)
sys.stdin.read()  # until the benchmark closes the pipe
s.stop()
"""


@contextlib.contextmanager
def stand_in_process():
    """The stand-in Binance printing 1s klines on the wall clock, in its own process (the benchmark's
    load generator must not slow the exchange down through the GIL); yields its base URL."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", STAND_IN_SCRIPT, str(REPO / "tests")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().strip() or 0)
        if not port:
            raise RuntimeError("the stand-in Binance did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _prepare_exchange(data_dir: Path, pairs: list[str], settings) -> None:
    """The store of every pair backfilled from the stand-in (what `tbml data fetch` does)."""
    from ml.data.exchange import ensure_exchange_history
    from ml.data.store import CandleStore

    store = CandleStore(data_dir, settings.timeframe)
    for pair in pairs:
        ensure_exchange_history(pair, settings, store, bars=LIVE_HISTORY_BARS)


def _train_on_store(storage_handle) -> str:
    """A production lstm for PAIR trained (2 epochs) on its stored candles; returns its version."""
    import ray

    from ml.config import get_settings
    from ml.data.store import CandleStore
    from ml.registry.versions import Registry
    from ml.training.config import TrainConfig
    from ml.training.local import train_local

    class Remote:  # the Registry's storage calls, through the Storage actor
        def __getattr__(self, name):
            def call(*args, **kwargs):
                return ray.get(getattr(storage_handle, name).remote(*args, **kwargs), timeout=120)

            return call

    settings = get_settings()
    candles = CandleStore(settings.data_dir, settings.timeframe).read(PAIR)
    cfg = TrainConfig.from_settings(PAIR, "lstm", epochs=2, bars=len(candles), threads=1)
    meta = Registry(Remote()).register(PAIR, train_local(cfg, candles))
    if not meta["promotion"]["promoted"]:  # the benchmark needs a production model either way
        ray.get(storage_handle.set_production.remote(PAIR, "lstm", meta["version"], "bench: forced"), timeout=60)
    return meta["version"]


@contextlib.contextmanager
def live_cluster():
    """bench_http's cluster on 1 s exchange candles (the stand-in), with the market feed and the
    prediction events hub (where there is one) running."""
    import ray

    from bench.bench_http import cluster

    with stand_in_process() as url, \
            _env(TBML_TIMEFRAME="1s", TBML_PAIRS=LIVE_PAIRS, TBML_DATA__SOURCE="exchange",
                 TBML_DATA__EXCHANGE__BASE_URL=url, TBML_DATA__EXCHANGE__HISTORY_BARS=str(LIVE_HISTORY_BARS),
                 TBML_DATA__FEED__CLOSE_DELAY_S=str(CLOSE_DELAY_S)), \
            cluster(prepare=_prepare_exchange, train=_train_on_store) as (port, info):
        from actors.feed import get_or_create_feed
        from ml.config import get_settings

        settings = get_settings()
        feed = get_or_create_feed(NAMESPACE, str(info["data_dir"]), list(settings.pairs))
        ray.get(feed.status.remote(), timeout=120)
        _wait_moving(port)
        try:  # the feed creates the hub, as in the service
            from actors.prediction_events import EVENTS_ACTOR_NAME

            ray.get(ray.get_actor(EVENTS_ACTOR_NAME, namespace=NAMESPACE).status.remote(), timeout=30)
            hub = True
        except Exception:  # noqa: BLE001 - no hub: the close figures say so
            hub = False
        yield port, dict(info, redis_url=os.environ["TBML_REDIS_URL"], hub=hub, feed=feed), settings


def bench_live(quick: bool) -> list[BenchResult]:
    seconds, rounds, close_s = (4.0, 2, 10.0) if quick else (12.0, 4, 30.0)
    t0 = time.monotonic()
    with live_cluster() as (port, info, settings):
        print(f"  live cluster up in {time.monotonic() - t0:.0f} s (hub: {info['hub']})", flush=True)
        runs = measure_steady(port, seconds, rounds)
        results = _steady_results(runs)
        m = measure_close(port, info, settings, close_s)
        print(f"  closes {len(m['closes'])}, cached {len(m['cached'])}, delivered {len(m['delivered'])}, "
              f"stream error {m['stream_error']}", flush=True)
        results += _close_results(m, settings, close_s)
        import ray

        ray.kill(info["feed"], no_restart=True)  # no more closes: the same route, the same cluster
        quiet = measure_quiet(port, seconds, rounds)
        results += _quiet_results(runs, quiet)
    if not m["cached"] or not m["delivered"]:
        why = []
        if not m["cached"]:
            why.append(f"none of {len(m['closes'])} closes had its prediction cached without a request")
        if not m["delivered"]:
            why.append(f"stream: {m['stream_error'] or 'no event received'}")
        results[-1].note = f"{results[-1].note}; close -> prediction not measured: {'; '.join(why)}"
    return results


# ----------------------------------------------------------------------------------- run


def run(quick: bool = False) -> list[BenchResult]:
    load_before = os.getloadavg()[0]
    results = bench_backfill(quick) + bench_live(quick)
    results[0].note += (f"; measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
                        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2-core machine)")
    return results


if __name__ == "__main__":
    raise SystemExit(bench_main(run, __doc__))
