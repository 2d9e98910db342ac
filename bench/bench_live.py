"""Live-market benchmark: exchange backfill, and serving while candles close every second.

What it does, all on this machine and torn down at the end (also on failure):

1. **Backfill** (no Ray). The stand-in Binance of the tests (`tests/standins/binance.py`, real HTTP on
   a loopback port, 1m klines) and `ml.data.exchange.ensure_exchange_history` into an empty temporary
   candle store: BARS closed 1m candles in pages of `data.exchange.page_limit` (1000), through the real
   ccxt client (`base_url` pointed at the stand-in) with ccxt's rate limiting as configured (Binance's
   `rateLimit` x the klines cost: a real wait before every page), every row validated and the store
   written. Markets are loaded before the clock starts (a one-time cost of the client). Anchors, from
   the same run: the *HTTP floor*, the very same kline pages (the query strings the backfill sent)
   fetched by plain keep-alive HTTP and read, with no parsing, validation or store; and the
   *rate-limit ceiling*, page_limit candles per `rateLimit x cost` (the fastest ccxt's throttle lets
   the client go).
2. **Steady state** (a private Ray cluster with its own Redis and data directory: `bench_http.cluster`,
   serve_config.yaml's application, a promoted lstm for BTC) with `TBML_TIMEFRAME=1s` and the
   synthetic source, and the market feed actor (`actors.feed`) running, so a candle closes every
   second and the store follows. `GET /api/predictions/BTC` at 1 and 32 clients for a fixed time
   (`bench_http`'s load generator), beside `GET /api/ping` in the same run: p50 and throughput. A
   probe client beside the load reads every answer it gets: the share that were cache hits
   (`cached: true`), and the latency of the first answer after each close (a new `asOf`) against
   the others -- the request that pays for a close, if anyone does.
3. **Close to prediction** (needs predictions computed on close, `actors.prediction_events`, and
   the stream `GET /api/stream/predictions`). For each close: from the bar's close time (open ts +
   timeframe) to its prediction being in Redis (the ingress's cache key, polled), and to its
   event reaching a subscriber of the stream over the Serve proxy. Anchor: `data.feed.close_delay_s`
   plus one timeframe -- the feed waits close_delay_s after a close before it fetches, and a tick
   that is late by up to one bar is still on time for the next close (the designed budget).

Targets: backfill >= 0.8x the rate-limit ceiling (the exchange's limit, not our parsing, bounds it;
its ratio to the HTTP floor and the share of ccxt's own parsing are reported, without a target); prediction p50 after closes <=
1.3x the no-op's (a request after a close costs what a cached one costs, as in bench_http), throughput
at 32 clients >= 0.6x the no-op's; >= 95% of answers cache hits and the first answer after a close
a hit; close -> cached and close -> delivered p50 <= 1x the anchor; no errors.

The load generator and the probe share the 2 cores with the cluster, as a client on the same host would.
Run: `python -m bench.bench_live [--quick] [--json]` (or `make bench`).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BenchResult, bench_main
from ml.clock import now_ms

REPO = Path(__file__).resolve().parent.parent
SECTION = "live"
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


# ----------------------------------------------------------------------------------- run


def run(quick: bool = False) -> list[BenchResult]:
    return bench_backfill(quick)


if __name__ == "__main__":
    raise SystemExit(bench_main(run, __doc__))
