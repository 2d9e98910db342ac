"""The exchange source (ml.data.exchange) and `tbml data fetch`, against a stand-in Binance over real HTTP.

The stand-in (`standins.binance`) is an http.server on 127.0.0.1 that answers Binance's public REST
paths with Binance's payload shapes; ccxt's real HTTP client talks to it through `base_url`. It counts
its hits, can be told to fail the next kline requests (429 with Retry-After, 503), and to serve
garbage rows at chosen timestamps. The clock and the sleep are injected: nothing waits for real.
"""

from __future__ import annotations

import json

import pytest
from standins.binance import StandIn, kline

from cli import main
from ml.config import get_settings, load_settings
from ml.data.exchange import (
    ExchangeClient,
    ExchangeRefusedError,
    ExchangeUnavailableError,
    UnknownExchangeError,
    UnknownSymbolError,
    ensure_exchange_history,
    parse_retry_after,
    rewrite_hosts,
)
from ml.data.sources import load_candles
from ml.data.store import CandleStore

TF = 60_000  # 1m
NOW = 1_764_000_030_000  # 30 s into a minute: the bar opened at NOW - 30 s is still open
OPEN_BAR = (NOW // TF) * TF
LAST_CLOSED = OPEN_BAR - TF


class FakeTime:
    """The injected clock (epoch ms) and sleep: sleeping advances the clock and is recorded."""

    def __init__(self, now: int = NOW) -> None:
        self.t = now
        self.sleeps: list[float] = []

    def clock(self) -> int:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += int(seconds * 1000)


@pytest.fixture
def stand_in():
    s = StandIn(now=lambda: NOW)
    yield s
    s.close()


def _settings(tmp_path, **env):
    return load_settings(environ={"TBML_DATA_DIR": str(tmp_path / "data"), "TBML_TIMEFRAME": "1m", **env})


def _client(stand_in, fake: FakeTime, **kw) -> ExchangeClient:
    opts = dict(base_url=stand_in.url, page_limit=100, retries=3, backoff_s=0.5, rng=lambda: 0.5,
                clock=fake.clock, sleep=fake.sleep)
    opts.update(kw)
    return ExchangeClient("binance", **opts)


def test_base_url_replaces_only_the_host():
    urls = {"public": "https://api.binance.com/api/v3", "fapiPublic": "https://fapi.binance.com/fapi/v1",
            "list": ["https://api.{hostname}/v5"], "n": 1}
    out = rewrite_hosts(urls, "http://127.0.0.1:9")
    assert out == {"public": "http://127.0.0.1:9/api/v3", "fapiPublic": "http://127.0.0.1:9/fapi/v1",
                   "list": ["http://127.0.0.1:9/v5"], "n": 1}
    with pytest.raises(ValueError):
        ExchangeClient("binance", base_url="http://127.0.0.1:9/api")
    with pytest.raises(ValueError):
        load_settings(environ={"TBML_DATA__EXCHANGE__BASE_URL": "ftp://x"})


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("7", NOW) == 7.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", 4_000) == pytest.approx(6.0)
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None


def test_backfill_pages_through_history_and_never_stores_the_open_candle(tmp_path, stand_in):
    fake = FakeTime()
    settings = _settings(tmp_path)
    store = CandleStore(settings.data_dir, "1m")
    with _client(stand_in, fake) as client:
        assert client.symbol("BTC") == "BTC/USDT"
        report = ensure_exchange_history("BTC", settings, store, client=client, bars=250)
    s = report.summary()
    cov = store.coverage("BTC")
    assert cov == {"bars": 250, "start": LAST_CLOSED - 249 * TF, "end": LAST_CLOSED}
    assert s["imported"] == s["added"] == 250 and s["rejectedTotal"] == 0 and s["gaps"] == 0
    assert s["openCandlesSkipped"] == 1 and s["end"] == LAST_CLOSED < OPEN_BAR
    # three pages of at most 100, each starting right after the previous one's last bar
    starts = [int(q["startTime"]) for q in stand_in.kline_queries]
    assert starts == [LAST_CLOSED - 249 * TF, LAST_CLOSED - 149 * TF, LAST_CLOSED - 49 * TF]
    assert all(q["limit"] == "100" and q["symbol"] == "BTCUSDT" for q in stand_in.kline_queries)
    assert stand_in.hits["/api/v3/exchangeInfo"] == 1
    # the values are Binance's strings parsed, through the same validation as imports
    row = store.read("BTC").iloc[-1]
    want = kline(LAST_CLOSED)
    assert [row.open, row.high, row.low, row.close, row.volume] == [float(x) for x in want[1:6]]
    # ccxt's rate limiter was on, waiting through the injected sleep (no real wait)
    assert any(kind == "rate_limit" for kind, _ in client.waits)

    # later: only the bars closed since are fetched, and the new open candle is again left out
    fake.t += 5 * TF
    stand_in.now = fake.clock
    stand_in.kline_queries.clear()
    with _client(stand_in, fake) as client:
        report = ensure_exchange_history("BTC", settings, store, client=client, bars=250)
    assert report.added == 5 and len(stand_in.kline_queries) == 1
    assert int(stand_in.kline_queries[0]["startTime"]) == LAST_CLOSED + TF
    assert store.coverage("BTC")["end"] == LAST_CLOSED + 5 * TF
    assert store.coverage("BTC")["bars"] == 255

    # much later: only the span asked for is fetched, not every bar since the store's end
    fake.t += 10_000 * TF
    stand_in.kline_queries.clear()
    with _client(stand_in, fake) as client:
        report = ensure_exchange_history("BTC", settings, store, client=client, bars=150)
    assert report.added == 150 and len(stand_in.kline_queries) == 2
    assert store.coverage("BTC")["end"] == LAST_CLOSED + 10_005 * TF


def test_swap_markets_only_the_perpetual_is_loaded(tmp_path, stand_in):
    fake = FakeTime()
    settings = _settings(tmp_path)
    store = CandleStore(settings.data_dir, "1m")
    with _client(stand_in, fake, market_type="swap") as client:
        assert client.symbol("BTC") == "BTC/USDT:USDT"
        report = ensure_exchange_history("BTC", settings, store, client=client, bars=120)
    assert report.added == 120 and stand_in.hits["/fapi/v1/klines"] == 2
    assert stand_in.hits["/api/v3/exchangeInfo"] == 0 and stand_in.hits["/dapi/v1/exchangeInfo"] == 0
    assert stand_in.hits["/api/v3/klines"] == 0


def test_history_before_the_store_is_fetched_backwards(tmp_path, stand_in):
    fake = FakeTime()
    settings = _settings(tmp_path)
    store = CandleStore(settings.data_dir, "1m")
    with _client(stand_in, fake) as client:
        ensure_exchange_history("ETH", settings, store, client=client, bars=50)
        report = ensure_exchange_history("ETH", settings, store, client=client, bars=180)
    assert report.added == 130
    assert store.coverage("ETH") == {"bars": 180, "start": LAST_CLOSED - 179 * TF, "end": LAST_CLOSED}


def test_429_with_retry_after_and_503_are_retried(tmp_path, stand_in):
    fake = FakeTime()
    settings = _settings(tmp_path)
    store = CandleStore(settings.data_dir, "1m")
    stand_in.faults = [
        (429, {"Retry-After": "7"}, {"code": -1003, "msg": "Too much request weight used; current limit is "
                                     "6000 request weight per 1 MINUTE."}),
        (503, {}, "<html><body><h1>503 Service Unavailable</h1></body></html>"),
    ]
    with _client(stand_in, fake, rng=lambda: 0.0) as client:
        report = ensure_exchange_history("BTC", settings, store, client=client, bars=150)
    assert stand_in.hits["/api/v3/klines"] == 2 + 2  # two failures, then the two pages
    retry_waits = [w for kind, w in client.waits if kind == "retry"]
    assert retry_waits == [7.0, 1.0]  # Retry-After honoured, then backoff_s * 2**1
    assert 7.0 in fake.sleeps and report.retries == 2 and report.requests == 5  # markets + 4
    assert store.coverage("BTC")["bars"] == 150


def test_jitter_stretches_backoff_within_bounds():
    client = ExchangeClient("binance", backoff_s=1.0, jitter=0.1, rng=lambda: 1.0)
    assert client.backoff_delay(0) == pytest.approx(1.1)
    assert client.backoff_delay(2, retry_after=7) == pytest.approx(7.7)
    assert ExchangeClient("binance", max_retry_after_s=30, rng=lambda: 0.0).backoff_delay(0, 3600) == 30


def test_failures_beyond_the_retries_end_in_unavailable(tmp_path, stand_in):
    fake = FakeTime()
    stand_in.faults = [(503, {}, "down")] * 4
    with _client(stand_in, fake, retries=2) as client, pytest.raises(ExchangeUnavailableError, match="503"):
        ensure_exchange_history("BTC", _settings(tmp_path), client=client, bars=10)
    assert stand_in.hits["/api/v3/klines"] == 3


def test_a_404_is_refused_not_retried(tmp_path):
    stand_in = StandIn(now=lambda: NOW)
    try:
        fake = FakeTime()
        client = ExchangeClient("binance", base_url=stand_in.url, clock=fake.clock, sleep=fake.sleep)
        client.exchange.urls["api"]["public"] = stand_in.url + "/nowhere"
        with pytest.raises(ExchangeRefusedError, match="404"):
            client.load_markets()
        assert stand_in.hits["/nowhere/exchangeInfo"] == 1 and not fake.sleeps
    finally:
        stand_in.close()


def test_garbage_rows_are_rejected_and_counted(tmp_path, stand_in):
    fake = FakeTime()
    settings = _settings(tmp_path)
    store = CandleStore(settings.data_dir, "1m")
    bad_nan, bad_range = LAST_CLOSED - 10 * TF, LAST_CLOSED - 20 * TF
    stand_in.garbage[bad_nan] = [bad_nan, "abc", "1.0", "0.5", "0.7", "1", bad_nan + TF - 1, "0", 1, "0", "0", "0"]
    stand_in.garbage[bad_range] = [bad_range, "10", "9", "11", "10", "1", bad_range + TF - 1, "0", 1, "0", "0", "0"]
    with _client(stand_in, fake) as client:
        s = ensure_exchange_history("BTC", settings, store, client=client, bars=60).summary()
    assert s["rejected"] == {"nan": 1, "high_below_low": 1} and s["rejectedTotal"] == 2
    # the store is topped up to the 60 bars asked for by reaching 2 bars further back
    assert s["fetched"] == 62 and s["imported"] == 60 and s["gaps"] == 2 and s["missingBars"] == 2
    assert store.coverage("BTC") == {"bars": 60, "start": LAST_CLOSED - 61 * TF, "end": LAST_CLOSED}
    stored = set(store.read("BTC")["ts"].tolist())
    assert bad_nan not in stored and bad_range not in stored


def test_unknown_symbol_and_exchange_are_clear_errors(stand_in):
    fake = FakeTime()
    with _client(stand_in, fake) as client, pytest.raises(UnknownSymbolError, match="ZZZ/USDT"):
        client.symbol("ZZZ")
    assert stand_in.hits["/api/v3/klines"] == 0 and not [w for k, w in client.waits if k == "retry"]
    with pytest.raises(UnknownExchangeError, match="nosuchexchange"):
        ExchangeClient("nosuchexchange")


def test_load_candles_with_the_exchange_source(tmp_path, stand_in, monkeypatch):
    settings = _settings(tmp_path, TBML_DATA__SOURCE="exchange", TBML_DATA__EXCHANGE__BASE_URL=stand_in.url,
                         TBML_DATA__EXCHANGE__HISTORY_BARS="120", TBML_DATA__EXCHANGE__PAGE_LIMIT="1000")
    stand_in.now = lambda: __import__("time").time() * 1000  # the source runs on the wall clock
    candles = load_candles("BTC", settings, bars=100)
    assert len(candles) == 100
    store = CandleStore(settings.data_dir, "1m")
    assert store.coverage("BTC")["bars"] >= 120
    assert int(candles["ts"].iloc[-1]) <= (int(stand_in.now()) // TF) * TF - TF  # no open candle


# -- the command line ----------------------------------------------------------------------------------

@pytest.fixture
def cli_env(tmp_path, stand_in, monkeypatch):
    stand_in.now = lambda: __import__("time").time() * 1000
    monkeypatch.setenv("TBML_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TBML_DATA__EXCHANGE__BASE_URL", stand_in.url)
    monkeypatch.setenv("TBML_DATA__EXCHANGE__PAGE_LIMIT", "100")
    get_settings.cache_clear()
    yield stand_in
    get_settings.cache_clear()


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_fetch_prints_the_import_summary(cli_env, capsys, tmp_path):
    code, out, err = run_main(capsys, "data", "fetch", "--pair", "BTC,ETH", "--timeframe", "1m", "--bars", "230")
    assert code == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["pair"] for d in docs] == ["BTC", "ETH"]
    for d in docs:
        assert {"imported", "rejected", "rejectedTotal", "duplicates", "gaps", "missingBars", "start", "end",
                "stored", "fetched", "added", "exchange", "symbol", "path", "gapList"} <= set(d)
        assert d["exchange"] == "binance" and d["symbol"] == f"{d['pair']}/USDT"
        assert d["stored"] == d["added"] == 230 and d["rejectedTotal"] == 0
    store = CandleStore(tmp_path / "data", "1m")
    assert store.pairs() == ["BTC", "ETH"]
    assert cli_env.hits["/api/v3/klines"] >= 6  # several pages per pair


def test_cli_fetch_since(cli_env, capsys):
    import time

    since = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() - 150 * 60))
    code, out, err = run_main(capsys, "data", "fetch", "--pair", "BTC", "--timeframe", "1m", "--since", since)
    assert code == 0, err
    doc = json.loads(out)
    assert 148 <= doc["stored"] <= 151 and doc["rejectedTotal"] == 0


@pytest.mark.parametrize(("args", "needle"), [
    (("--pair", "ZZZ"), "ZZZ/USDT"),
    (("--pair", "BTC", "--exchange", "nosuchexchange"), "nosuchexchange"),
    (("--pair", "BTC", "--since", "yesterday-ish"), "--since"),
    (("--pair", "BTC", "--since", "2999-01-01"), "--since"),
    (("--pair", "BTC", "--bars", "10", "--since", "2025-01-01"), "--since"),
    (("--pair", "BTC", "--bars", "0"), "--bars"),
    (("--pair", "b-t-c"), "pair"),
])
def test_cli_fetch_bad_input_exits_2_with_one_line(cli_env, capsys, tmp_path, args, needle):
    code, out, err = run_main(capsys, "data", "fetch", "--timeframe", "1m", *args)
    assert code == 2, (out, err)
    assert out == "" and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "data" / "candles").exists()


def test_cli_fetch_as_a_process_unknown_symbol_exits_2(cli_env, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TBML_DATA_DIR": str(tmp_path / "data"), "TBML_DATA__EXCHANGE__BASE_URL": cli_env.url}
    proc = subprocess.run([sys.executable, "-m", "cli", "data", "fetch", "--pair", "ZZZ", "--timeframe", "1m"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["tbml: error: binance has no spot market ZZZ/USDT"]
    assert cli_env.hits["/api/v3/exchangeInfo"] == 1 and cli_env.hits["/api/v3/klines"] == 0
