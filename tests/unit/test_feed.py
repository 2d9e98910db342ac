"""The market feed (ml.data.feed.CandleFeed) for every source, with an injected clock: close-aligned
fetching, the open candle never stored, failures and lag in the status, the gap backfilled in order.

The exchange is the stand-in Binance (`standins.binance`, real HTTP; ccxt's real client pointed at it by
`base_url`), core a real local HTTP server answering core's `GET /api/pair/{PAIR}`. Stopping a server
is the outage. Nothing waits for real: the clock and the sleep are injected.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from standins.binance import StandIn

from ml.config import load_settings
from ml.data.feed import CandleFeed
from ml.data.store import CandleStore

TF = 60_000
NOW = 1_764_000_030_000  # 30 s into a minute: the bar opened at OPEN_BAR is still open
OPEN_BAR = (NOW // TF) * TF
LAST_CLOSED = OPEN_BAR - TF


class FakeTime:
    def __init__(self, now: int = NOW) -> None:
        self.t = now

    def clock(self) -> int:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += int(seconds * 1000)


def _settings(tmp_path, source: str, **env):
    return load_settings(environ={"TBML_DATA_DIR": str(tmp_path / "data"), "TBML_TIMEFRAME": "1m",
                                  "TBML_DATA__SOURCE": source, "TBML_DATA__FEED__CLOSE_DELAY_S": "1",
                                  "TBML_DATA__FEED__RETRY_S": "5", "TBML_DATA__MAX_LAG_BARS": "2", **env})


@pytest.fixture
def exchange(tmp_path):
    fake = FakeTime()
    stand_in = StandIn(now=fake.clock)
    settings = _settings(tmp_path, "exchange", TBML_DATA__EXCHANGE__BASE_URL=stand_in.url,
                         TBML_DATA__EXCHANGE__HISTORY_BARS="50", TBML_DATA__EXCHANGE__PAGE_LIMIT="20")
    feed = CandleFeed(settings.data_dir, ["BTC", "ETH"], settings, clock=fake.clock, sleep=fake.sleep)
    yield fake, stand_in, feed, CandleStore(settings.data_dir, "1m")
    feed.close()
    stand_in.stop()


def test_exchange_backfill_then_close_aligned_fetching_without_the_open_candle(exchange):
    fake, stand_in, feed, store = exchange
    assert feed.is_due("BTC", NOW)
    assert feed.tick() == {"BTC": 50, "ETH": 50}  # the first pass backfills history_bars, in pages of 20
    for pair in ("BTC", "ETH"):
        cov = store.coverage(pair)
        assert cov == {"bars": 50, "start": LAST_CLOSED - 49 * TF, "end": LAST_CLOSED}  # the open bar is not kept
    assert stand_in.hits["/api/v3/exchangeInfo"] == 1
    assert feed.status()["byPair"]["BTC"] == {
        "source": "exchange", "lastCandle": LAST_CLOSED, "lastClose": OPEN_BAR, "lagBars": 0, "stale": False,
        "bars": 50, "lastError": None, "lastErrorAt": None, "lastSuccessAt": NOW, "barsAdded": 50, "failures": 0,
        "rejected": 0}

    # caught up: nothing is fetched until the next close + close_delay_s
    queries = len(stand_in.kline_queries)
    assert feed.next_due_ms() == OPEN_BAR + TF + 1000
    fake.t = OPEN_BAR + TF + 500  # the bar has closed, the delay has not passed
    assert not feed.is_due("BTC", fake.t) and feed.tick() == {}
    assert len(stand_in.kline_queries) == queries
    assert feed.status()["byPair"]["BTC"]["lagBars"] == 1

    fake.t = OPEN_BAR + TF + 1000
    assert feed.tick() == {"BTC": 1, "ETH": 1}
    assert store.coverage("BTC")["end"] == OPEN_BAR
    assert stand_in.hits["/api/v3/exchangeInfo"] == 1  # one client, markets loaded once
    assert len(stand_in.kline_queries) == queries + 2  # one request per pair


def test_exchange_outage_shows_the_error_and_lag_and_the_gap_is_backfilled_in_order(exchange):
    fake, stand_in, feed, store = exchange
    feed.tick()
    stand_in.stop()
    fake.t = NOW + 4 * TF  # four more bars closed while the exchange is unreachable
    assert feed.tick() == {}
    btc = feed.status()["byPair"]["BTC"]
    assert btc["lastCandle"] == LAST_CLOSED and btc["lagBars"] == 4 and btc["stale"] is True
    assert btc["failures"] == 1 and btc["lastErrorAt"] >= NOW + 4 * TF
    assert "ExchangeUnavailableError" in btc["lastError"], btc
    failed_at = btc["lastErrorAt"]
    assert not feed.is_due("BTC", failed_at + 4_000)  # retried after data.feed.retry_s, not at once
    assert feed.is_due("BTC", failed_at + 5_000)

    stand_in.start()  # back on the same port
    fake.t = max(fake.t, failed_at + 5_000)
    assert feed.tick() == {"BTC": 4, "ETH": 4}
    candles = store.read("BTC")
    assert np.all(np.diff(candles["ts"].to_numpy()) == TF)  # every bar, in order, no gap
    assert candles["ts"].iloc[-1] == (fake.t // TF) * TF - TF
    btc = feed.status()["byPair"]["BTC"]
    assert btc["failures"] == 0 and btc["lagBars"] == 0 and btc["stale"] is False
    assert btc["lastError"] is not None  # the last error stays visible with its time


def test_an_exchange_that_has_not_printed_the_bar_is_asked_again_after_retry_s(exchange):
    fake, stand_in, feed, store = exchange
    feed.tick()
    stand_in.serve_until = LAST_CLOSED  # the exchange lags: the next bar is not printed yet
    fake.t = t0 = OPEN_BAR + TF + 1000
    assert feed.tick() == {}
    assert feed.status()["byPair"]["BTC"]["failures"] == 0
    assert not feed.is_due("BTC", t0 + 4_000) and feed.next_due_ms(t0 + 1) == t0 + 5_000
    stand_in.serve_until = None
    fake.t = t0 + 5_000
    assert feed.tick() == {"BTC": 1, "ETH": 1}


class Core:
    """core's `GET /api/pair/{PAIR}` on a real loopback server: closes/highs/lows/volumes/timestamps."""

    def __init__(self, bars_until) -> None:
        self.bars_until = bars_until  # () -> newest ts it sends (it sends the forming bar too)
        core = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                end = core.bars_until()
                ts = np.arange(end - 59 * TF, end + 1, TF)
                closes = 100 + (ts // TF % 17).astype(float)
                body = json.dumps({"pair": self.path.rsplit("/", 1)[-1], "history": {
                    "closes": closes.tolist(), "highs": (closes + 1).tolist(), "lows": (closes - 2).tolist(),
                    "volumes": [5.0] * len(ts), "timestamps": ts.tolist()}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_core_candles_are_validated_into_the_store_and_core_down_is_an_error_in_status(tmp_path):
    fake = FakeTime()
    core = Core(lambda: (fake.t // TF) * TF)  # core also sends the bar still forming
    settings = _settings(tmp_path, "core", TBML_DATA__CORE__URL=core.url, TBML_DATA__CORE__TIMEOUT_S="2")
    feed = CandleFeed(settings.data_dir, ["BTC"], settings, clock=fake.clock, sleep=fake.sleep)
    store = CandleStore(settings.data_dir, "1m")
    try:
        assert feed.tick() == {"BTC": 59}
        assert store.coverage("BTC")["end"] == LAST_CLOSED  # the forming bar is not stored
        core.stop()
        fake.t = NOW + 3 * TF
        assert feed.tick() == {}
        btc = feed.status()["byPair"]["BTC"]
        assert btc["source"] == "core" and btc["failures"] == 1 and btc["lagBars"] == 3 and btc["stale"] is True
        assert "CoreUnavailableError" in btc["lastError"], btc
    finally:
        feed.close()


def test_files_fetch_nothing_but_report_the_last_candle_and_the_lag(tmp_path):
    from standins.binance import kline

    from ml.data.exchange import rows_to_frame

    settings = _settings(tmp_path, "files")
    store = CandleStore(settings.data_dir, "1m")
    store.write("BTC", rows_to_frame([kline(LAST_CLOSED - i * TF)[:6] for i in range(9, -1, -1)]))
    fake = FakeTime(NOW + 10 * TF)
    feed = CandleFeed(settings.data_dir, ["BTC", "ETH"], settings, clock=fake.clock)
    assert not feed.active and feed.next_due_ms() is None and feed.tick() == {}
    status = feed.status()["byPair"]
    assert status["BTC"]["lastCandle"] == LAST_CLOSED and status["BTC"]["lagBars"] == 10
    assert status["BTC"]["stale"] is True and status["BTC"]["lastError"] is None
    assert status["ETH"]["lastCandle"] is None and status["ETH"]["stale"] is True


def test_synthetic_needs_no_close_delay(tmp_path):
    settings = load_settings(environ={"TBML_DATA_DIR": str(tmp_path / "data")})
    tf = settings.timeframe_ms
    fake = FakeTime((NOW // tf) * tf)
    feed = CandleFeed(settings.data_dir, ["BTC"], settings, clock=fake.clock)
    assert feed.tick()["BTC"] == settings.data.synthetic.history_bars
    fake.t += tf  # exactly at the close: due at once
    assert feed.next_due_ms(fake.t - 1) == fake.t and feed.tick() == {"BTC": 1}


def test_health_data_source_view_degrades_on_lag_or_a_failing_fetch_and_says_when_the_feed_is_away():
    from types import SimpleNamespace

    from deployments.schemas import DataSourceHealth
    from ml.serving import views

    snap = SimpleNamespace(candle_ts=LAST_CLOSED, coverage={"bars": 50})
    kw = dict(source="exchange", timeframe="1m", timeframe_ms=TF, max_lag_bars=2)
    ok = views.data_source_view(["BTC"], [snap], now=NOW, feed={"byPair": {"BTC": {"failures": 0}}}, **kw)
    assert ok["status"] == "healthy" and ok["pairs"]["BTC"]["lagBars"] == 0 and ok["sourceReachable"] is True
    DataSourceHealth.model_validate(ok)
    late = views.data_source_view(["BTC"], [snap], now=NOW + 3 * TF, feed=None, feed_error="not running", **kw)
    assert late["status"] == "degraded" and late["stalePairs"] == ["BTC"] and late["pairs"]["BTC"]["lagBars"] == 3
    assert late["feed"] == {"reachable": False, "error": "not running"} and late["sourceReachable"] is None
    failing = views.data_source_view(["BTC"], [snap], now=NOW, **kw, feed={"byPair": {"BTC": {
        "failures": 2, "lastError": "ExchangeUnavailableError: down", "lastErrorAt": NOW}}})
    assert failing["status"] == "degraded" and failing["failingPairs"] == ["BTC"]
    assert failing["sourceReachable"] is False and failing["pairs"]["BTC"]["lastError"].endswith("down")
    assert views.health_status({"status": "healthy"}, True, {}, [], True) == "degraded"
