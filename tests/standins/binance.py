"""A stand-in Binance for tests and benchmarks: real HTTP on a loopback port, Binance's own paths and
payload shapes, state the caller steers.

It answers GET /api/v3/exchangeInfo (spot symbols with their filters), GET /fapi/v1/exchangeInfo (one
USDT perpetual) and GET /api/v3/klines and /fapi/v1/klines (12-element arrays, prices as strings;
startTime/endTime/limit applied the way Binance applies them), and 404 for anything else. ccxt's
real HTTP client talks to it through `data.exchange.base_url`.

Steering: `now` (epoch ms; the open candle is the bar containing it, and it is served like Binance
serves it), `serve_until` (the newest bar served: an exchange that lags or has not printed yet),
`faults` (answers for the next kline requests: 429 with Retry-After, 503, ...), `garbage` (rows
served instead of valid ones), `stop()` / `start()` (the exchange unreachable, then back on the same
port). `hits` and `kline_queries` record what was asked.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INTERVAL_MS = {"1s": 1_000, "1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "1h": 3_600_000}
SYMBOLS = {"BTCUSDT": ("BTC", "USDT"), "ETHUSDT": ("ETH", "USDT"), "ETHBTC": ("ETH", "BTC")}


def wall_ms() -> int:
    return int(time.time() * 1000)


def _symbol_info(symbol: str, base: str, quote: str) -> dict:
    """One entry of exchangeInfo's `symbols`, as Binance returns it."""
    return {
        "symbol": symbol, "status": "TRADING", "baseAsset": base, "baseAssetPrecision": 8,
        "quoteAsset": quote, "quotePrecision": 8, "quoteAssetPrecision": 8, "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True, "ocoAllowed": True, "otoAllowed": True, "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True, "cancelReplaceAllowed": True, "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": True,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": "0.01000000", "maxPrice": "1000000.00000000",
             "tickSize": "0.01000000"},
            {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000.00000000", "stepSize": "0.00001000"},
            {"filterType": "ICEBERG_PARTS", "limit": 10},
            {"filterType": "MARKET_LOT_SIZE", "minQty": "0.00000000", "maxQty": "100.0", "stepSize": "0.00000000"},
            {"filterType": "TRAILING_DELTA", "minTrailingAboveDelta": 10, "maxTrailingAboveDelta": 2000,
             "minTrailingBelowDelta": 10, "maxTrailingBelowDelta": 2000},
            {"filterType": "PERCENT_PRICE_BY_SIDE", "bidMultiplierUp": "5", "bidMultiplierDown": "0.2",
             "askMultiplierUp": "5", "askMultiplierDown": "0.2", "avgPriceMins": 5},
            {"filterType": "NOTIONAL", "minNotional": "5.00000000", "applyMinToMarket": True,
             "maxNotional": "9000000.00000000", "applyMaxToMarket": False, "avgPriceMins": 5},
            {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "maxNumAlgoOrders": 5},
        ],
        "permissions": [], "permissionSets": [["SPOT", "MARGIN"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


def kline(ts: int, tf: int = 60_000) -> list:
    """A deterministic, valid Binance kline for the bar opening at ts (a bar of tf ms)."""
    i = ts // tf
    o = 60_000 + (i % 97) * 3.0
    c = o + ((i % 7) - 3) * 1.5
    hi, lo = max(o, c) + 2.0, min(o, c) - 2.0
    return [ts, f"{o:.2f}", f"{hi:.2f}", f"{lo:.2f}", f"{c:.2f}", f"{10 + i % 13:.5f}", ts + tf - 1,
            f"{(10 + i % 13) * c:.4f}", 100 + i % 50, "4.00000", f"{4 * c:.4f}", "0"]


class StandIn:
    """A stand-in Binance: real HTTP on a free loopback port, state for the tests to steer and read."""

    def __init__(self, now: Callable[[], float] = wall_ms, listed_from: int = 0, *, interval: str = "1m",
                 symbols: dict[str, tuple[str, str]] | None = None, serve_until: int | None = None,
                 port: int = 0) -> None:
        self.now = now
        self.listed_from = listed_from
        self.interval = interval
        self.tf = INTERVAL_MS[interval]
        self.symbols = dict(symbols or SYMBOLS)
        self.serve_until = serve_until
        self.hits: Counter = Counter()
        self.kline_queries: list[dict] = []
        self.faults: list[tuple[int, dict, str]] = []  # answers for the next kline requests
        self.garbage: dict[int, list] = {}  # ts -> the row served instead of the valid one
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                stand_in.handle(self)

        self._handler = Handler
        self.server: ThreadingHTTPServer | None = None
        self.port = port
        self.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again) on the same port."""
        if self.server is not None:
            return
        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop answering: connections are refused until `start()`."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    close = stop

    @staticmethod
    def _send(h, status: int, body, headers: dict | None = None) -> None:
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        h.send_response(status)
        ctype = "text/html" if isinstance(body, str) else "application/json;charset=UTF-8"
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(raw)

    def handle(self, h) -> None:
        url = urllib.parse.urlsplit(h.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        with self.lock:
            self.hits[url.path] += 1
            fault = self.faults.pop(0) if url.path.endswith("/klines") and self.faults else None
        if url.path == "/api/v3/exchangeInfo":
            return self._send(h, 200, {
                "timezone": "UTC", "serverTime": int(self.now()),
                "rateLimits": [
                    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
                    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000}],
                "exchangeFilters": [],
                "symbols": [_symbol_info(s, b, qt) for s, (b, qt) in self.symbols.items()],
            })
        if url.path == "/fapi/v1/exchangeInfo":  # USDT-margined futures: one perpetual
            return self._send(h, 200, {
                "timezone": "UTC", "serverTime": int(self.now()), "rateLimits": [], "exchangeFilters": [],
                "symbols": [{
                    "symbol": "BTCUSDT", "pair": "BTCUSDT", "contractType": "PERPETUAL",
                    "deliveryDate": 4133404800000, "onboardDate": 1569398400000, "status": "TRADING",
                    "maintMarginPercent": "2.5000", "requiredMarginPercent": "5.0000", "baseAsset": "BTC",
                    "quoteAsset": "USDT", "marginAsset": "USDT", "pricePrecision": 2, "quantityPrecision": 3,
                    "baseAssetPrecision": 8, "quotePrecision": 8, "underlyingType": "COIN",
                    "settlePlan": 0, "triggerProtect": "0.0500",
                    "filters": [
                        {"minPrice": "556.80", "maxPrice": "4529764", "filterType": "PRICE_FILTER",
                         "tickSize": "0.10"},
                        {"stepSize": "0.001", "filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.001"},
                        {"limit": 200, "filterType": "MAX_NUM_ORDERS"},
                        {"multiplierDown": "0.9500", "multiplierUp": "1.0500", "multiplierDecimal": "4",
                         "filterType": "PERCENT_PRICE"}],
                    "orderTypes": ["LIMIT", "MARKET", "STOP"], "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
                }],
            })
        if url.path in ("/api/v3/klines", "/fapi/v1/klines"):
            with self.lock:
                self.kline_queries.append(q)
            if fault is not None:
                status, headers, body = fault
                return self._send(h, status, body, headers)
            if q.get("symbol") not in self.symbols:
                return self._send(h, 400, {"code": -1121, "msg": "Invalid symbol."})
            if q.get("interval") != self.interval:
                return self._send(h, 400, {"code": -1120, "msg": "Invalid interval."})
            limit = min(int(q.get("limit", 500)), 1000)
            tf = self.tf
            open_bar = (int(self.now()) // tf) * tf
            newest = open_bar if self.serve_until is None else min(open_bar, int(self.serve_until))
            start = max(int(q.get("startTime", newest - (limit - 1) * tf)), self.listed_from)
            first = -(-start // tf) * tf
            last = min(int(q.get("endTime", newest)), newest)
            last = min(last, first + (limit - 1) * tf)  # one page's rows built, not all up to `newest`
            rows = [self.garbage.get(t) or kline(t, tf) for t in range(first, last + 1, tf)]
            return self._send(h, 200, rows)
        return self._send(h, 404, "<html><body>Not Found</body></html>")
