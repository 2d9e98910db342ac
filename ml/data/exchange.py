"""Candles from a crypto exchange through ccxt (`data.source: exchange`, `tbml data fetch`).

Why ccxt: one client for every exchange people run this on (Binance, Coinbase, Bybit, ...), with the
exchange's own endpoints, symbols and rate limits. docs/data.md ("Exchange candles") is the user's view.

- The pair `BTC` is the market `BTC/{quote}` of `market_type` (`spot`, or `swap`: the perpetual settled
  in the quote); only markets of that type are loaded (ccxt's `fetchMarkets` types, where it has them).
- `base_url` (scheme://host[:port]) replaces the REST host of every ccxt URL of the exchange; the paths
  stay the exchange's own (mirrors, proxies, testnets, tests).
- ccxt's rate limiting is on (`enableRateLimit`, the exchange's `rateLimit` and per-endpoint cost);
  its waits go through the injected sleep, as do the retry waits, so tests never wait for real.
- History is paged forward with `since`/`limit` (`fetch_ohlcv`). The still-open candle (ts after the
  last closed bar at the injected clock) is never kept. Every row goes through
  `ml.data.candles.validate_candles`, the validation of imports; rejections are counted by reason.
- Network errors, timeouts, 418/429 and 5xx (ccxt's NetworkError family: RequestTimeout,
  DDoSProtection, RateLimitExceeded, ExchangeNotAvailable) are retried with exponential backoff and
  jitter; a `Retry-After` header (seconds or an HTTP date, from `exchange.last_response_headers`) is
  honoured. Other 4xx and exchange errors are not retried (ExchangeRefusedError). An unknown exchange
  id, symbol or timeframe is ExchangeInputError at once (the CLI exits 2).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from ml.clock import last_closed_bar_ts
from ml.clock import now_ms as wall_now_ms
from ml.config import TIMEFRAME_MS
from ml.data.candles import CANDLE_COLUMNS, REJECT_REASONS, empty_candles, find_gaps, validate_candles
from ml.data.retry_after import parse_retry_after
from ml.data.store import CandleStore
from ml.pairs import validate_pair

log = logging.getLogger(__name__)

MARKET_TYPES = ("spot", "swap")
_HOST = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*")
_RETRY_STATUS_4XX = {408, 418, 429}
FLUSH_ROWS = 100_000  # a long backfill is written to the store in chunks of this many rows


class ExchangeSourceError(RuntimeError):
    """Any failure to get candles from the exchange."""


class ExchangeInputError(ExchangeSourceError, ValueError):
    """Bad input that no retry can fix (unknown exchange, symbol, timeframe or market type)."""


class UnknownExchangeError(ExchangeInputError):
    """Not a ccxt exchange id."""


class UnknownSymbolError(ExchangeInputError, LookupError):
    """The exchange has no market for the pair (of the configured quote and market type)."""


class UnsupportedTimeframeError(ExchangeInputError):
    """The exchange offers no candles of this timeframe."""


class ExchangeRefusedError(ExchangeSourceError):
    """The exchange refused the request (4xx other than 408/418/429, or an exchange error); not retried."""


class ExchangeUnavailableError(ExchangeSourceError):
    """The exchange could not be reached or kept failing after all retries."""


def validate_base_url(value: str) -> str:
    """`scheme://host[:port]` (http or https, no path, query or fragment), without a trailing slash."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url {value!r} must be http(s)://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"base_url {value!r} must be scheme://host[:port] only: the paths stay the exchange's")
    return f"{parts.scheme}://{parts.netloc}"


def rewrite_hosts(urls: Any, base_url: str) -> Any:
    """Every URL string in ccxt's `urls['api']` tree with its scheme://host replaced by `base_url`."""
    if isinstance(urls, str):
        return _HOST.sub(base_url, urls, count=1)
    if isinstance(urls, dict):
        return {k: rewrite_hosts(v, base_url) for k, v in urls.items()}
    if isinstance(urls, list):
        return [rewrite_hosts(v, base_url) for v in urls]
    return urls


class ExchangeClient:
    """One ccxt exchange, its markets of one type, with retries and an injected clock and sleep."""

    def __init__(self, exchange_id: str = "binance", *, quote: str = "USDT", market_type: str = "spot",
                 base_url: str | None = None, timeout_s: float = 10.0, retries: int = 5,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, max_retry_after_s: float = 300.0,
                 jitter: float = 0.1, page_limit: int = 1000,
                 clock: Callable[[], int] = wall_now_ms, sleep: Callable[[float], None] = time.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        import ccxt

        if retries < 0:
            raise ValueError("retries must be >= 0")
        if page_limit < 1:
            raise ValueError("page_limit must be >= 1")
        if market_type not in MARKET_TYPES:
            raise ExchangeInputError(f"unknown market type {market_type!r}; one of {', '.join(MARKET_TYPES)}")
        exchange_id = (exchange_id or "").strip()
        if exchange_id not in ccxt.exchanges:
            raise UnknownExchangeError(f"unknown exchange {exchange_id!r}: not a ccxt exchange id "
                                       f"(e.g. binance, bybit, coinbase, kraken, okx)")
        self.ccxt = ccxt
        self.exchange_id = exchange_id
        self.quote = quote.strip().upper()
        self.market_type = market_type
        self.base_url = validate_base_url(base_url) if base_url else None
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.jitter = float(jitter)
        self.page_limit = int(page_limit)
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self.requests = 0
        self.retried = 0
        self.waits: list[tuple[str, float]] = []  # ("rate_limit" | "retry", seconds), for reports and tests
        self._last_status: int | None = None
        self._last_request_ms: int | None = None
        ex = getattr(ccxt, exchange_id)({"enableRateLimit": True, "timeout": int(timeout_s * 1000)})
        if self.base_url:
            ex.urls["api"] = rewrite_hosts(ex.urls.get("api"), self.base_url)
        self._narrow_market_types(ex)
        ex.throttle = self._throttle  # ccxt's rate limit (rateLimit x cost), waiting through our sleep
        original = ex.on_rest_response

        def on_rest_response(code, *args):  # the HTTP status of the last answer, to classify failures
            self._last_status = int(code) if code is not None else None
            return original(code, *args)

        ex.on_rest_response = on_rest_response
        self.exchange = ex
        self._markets_loaded = False

    @classmethod
    def from_settings(cls, settings=None, **kwargs: Any) -> ExchangeClient:
        if settings is None:
            from ml.config import get_settings

            settings = get_settings()
        s = settings.data.exchange
        opts = dict(quote=s.quote, market_type=s.market_type, base_url=s.base_url, timeout_s=s.timeout_s,
                    retries=s.retries, backoff_s=s.backoff_s, max_backoff_s=s.max_backoff_s,
                    max_retry_after_s=s.max_retry_after_s, page_limit=s.page_limit)
        opts.update(kwargs)
        exchange_id = opts.pop("exchange_id", None) or s.id
        return cls(exchange_id, **opts)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        session = getattr(self.exchange, "session", None)
        if session is not None:
            session.close()

    def __enter__(self) -> ExchangeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ccxt hooks --------------------------------------------------------------------------
    def _narrow_market_types(self, ex) -> None:
        """Load only the markets of `market_type` where the exchange lets ccxt choose (fetchMarkets types)."""
        wanted = [self.market_type] if self.market_type == "spot" else ["swap", "linear"]  # settled in the quote
        opt = ex.options.get("fetchMarkets")
        types = opt.get("types") if isinstance(opt, dict) else opt if isinstance(opt, list) else None
        if isinstance(types, list):
            narrowed = [t for t in types if t in wanted]
            if narrowed:
                if isinstance(opt, dict):
                    ex.options["fetchMarkets"] = {**opt, "types": narrowed}
                else:
                    ex.options["fetchMarkets"] = narrowed
        if "defaultType" in ex.options:
            ex.options["defaultType"] = self.market_type

    def _throttle(self, cost: float | None = None) -> None:
        now = int(self._clock())
        if self._last_request_ms is not None:
            wait_ms = float(self.exchange.rateLimit) * (1 if cost is None else float(cost)) - (now - self._last_request_ms)
            if wait_ms > 0:
                self.waits.append(("rate_limit", wait_ms / 1000.0))
                self._sleep(wait_ms / 1000.0)
                now = int(self._clock())
        self._last_request_ms = now

    # -- retries -----------------------------------------------------------------------------
    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry `attempt + 1`: Retry-After if given (capped), else exponential; plus jitter."""
        if retry_after is not None:
            base = min(max(retry_after, 0.0), self.max_retry_after_s)
        else:
            base = min(self.backoff_s * (2 ** attempt), self.max_backoff_s)
        return base * (1.0 + self.jitter * self._rng())

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ccxt = self.ccxt
        attempts = self.retries + 1
        last_failure = "no attempt made"
        for attempt in range(attempts):
            self._last_status = None
            self.exchange.last_response_headers = None
            self.requests += 1
            try:
                return fn(*args, **kwargs)
            except ccxt.BadSymbol as exc:
                raise UnknownSymbolError(f"{self.exchange_id}: {what}: unknown symbol ({_first_line(exc)})") from None
            except ccxt.NetworkError as exc:
                status = self._last_status
                if status is not None and 400 <= status < 500 and status not in _RETRY_STATUS_4XX:
                    raise ExchangeRefusedError(f"{self.exchange_id} refused {what}: HTTP {status}") from None
                last_failure = f"{type(exc).__name__}" + (f" (HTTP {status})" if status else f": {_first_line(exc)}")
                headers = self.exchange.last_response_headers or {}
                retry_after = parse_retry_after(headers.get("Retry-After"), int(self._clock())) if status else None
            except ccxt.BaseError as exc:
                status = f" (HTTP {self._last_status})" if self._last_status else ""
                raise ExchangeRefusedError(
                    f"{self.exchange_id} refused {what}{status}: {type(exc).__name__}: {_first_line(exc)}") from None
            if attempt + 1 < attempts:
                delay = self.backoff_delay(attempt, retry_after)
                self.retried += 1
                self.waits.append(("retry", delay))
                log.warning("%s %s failed (%s); retry %d/%d in %.2fs", self.exchange_id, what, last_failure,
                            attempt + 1, self.retries, delay)
                self._sleep(delay)
        raise ExchangeUnavailableError(
            f"{self.exchange_id} unavailable for {what} after {attempts} attempt(s): {last_failure}")

    # -- markets -----------------------------------------------------------------------------
    def load_markets(self) -> dict[str, Any]:
        if not self._markets_loaded:
            self._call("load_markets", self.exchange.load_markets)
            self._markets_loaded = True
        return self.exchange.markets or {}

    def symbol(self, pair: str) -> str:
        """The ccxt symbol of `pair` (BTC -> BTC/USDT spot, BTC/USDT:USDT swap); UnknownSymbolError if none."""
        pair = validate_pair(pair)
        markets = self.load_markets()
        candidates = [m for m in markets.values()
                      if m.get("type") == self.market_type and str(m.get("base", "")).upper() == pair
                      and str(m.get("quote", "")).upper() == self.quote]
        if self.market_type == "swap":
            candidates = [m for m in candidates if str(m.get("settle") or "").upper() == self.quote] or candidates
        if not candidates:
            raise UnknownSymbolError(f"{self.exchange_id} has no {self.market_type} market {pair}/{self.quote}")
        preferred = f"{pair}/{self.quote}" + (f":{self.quote}" if self.market_type == "swap" else "")
        chosen = next((m for m in candidates if m.get("symbol") == preferred), candidates[0])
        return str(chosen["symbol"])

    def check_timeframe(self, timeframe: str) -> None:
        ex = self.exchange
        if not ex.has.get("fetchOHLCV"):
            raise ExchangeInputError(f"{self.exchange_id} offers no candles (fetchOHLCV) through ccxt")
        if ex.timeframes and timeframe not in ex.timeframes:
            raise UnsupportedTimeframeError(
                f"{self.exchange_id} has no {timeframe} candles; it offers {', '.join(ex.timeframes)}")

    # -- candles -----------------------------------------------------------------------------
    def fetch_page(self, symbol: str, timeframe: str, since: int, limit: int | None = None) -> list[list]:
        """One fetch_ohlcv call: rows [ts, open, high, low, close, volume] as ccxt parsed them."""
        limit = limit or self.page_limit
        rows = self._call(f"candles of {symbol} since {since}", self.exchange.fetch_ohlcv, symbol, timeframe,
                          since=int(since), limit=int(limit))
        return rows if isinstance(rows, list) else []

    def fetch_range(self, symbol: str, timeframe: str, start_ts: int, end_ts: int,
                    on_page: Callable[[int, int], None] | None = None) -> tuple[list[list], int]:
        """Raw rows with start_ts <= ts <= end_ts (rows without a readable ts kept, for validation to count);
        also the number of rows after end_ts that were dropped (the open candle and beyond)."""
        tf = TIMEFRAME_MS[timeframe]
        since = int(start_ts)
        out: list[list] = []
        beyond = 0
        max_pages = (end_ts - start_ts) // (tf * self.page_limit) + 3
        pages = 0
        while since <= end_ts and pages < max_pages * 2:
            pages += 1
            rows = self.fetch_page(symbol, timeframe, since)
            kept = 0
            last_ts: int | None = None
            for row in rows:
                ts = row[0] if isinstance(row, list | tuple) and row else None
                if not isinstance(ts, int | float) or not np.isfinite(ts):
                    out.append(list(row) if isinstance(row, list | tuple) else [None] * 6)
                    continue
                ts = int(ts)
                last_ts = ts if last_ts is None else max(last_ts, ts)
                if ts > end_ts:
                    beyond += 1
                elif ts >= start_ts:
                    out.append(list(row))
                    kept += 1
            if on_page is not None:
                on_page(kept, min(last_ts if last_ts is not None else since, end_ts))
            if last_ts is None:  # an empty page (downtime, before listing): skip its window
                since += tf * self.page_limit
            elif last_ts >= end_ts or last_ts < since:  # done, or the exchange ignored `since`: no loop
                break
            else:
                since = last_ts + tf
        return out, beyond


def rows_to_frame(rows: list[list]) -> pd.DataFrame:
    """ccxt OHLCV rows -> raw candle frame (None -> NaN), for validate_candles."""
    if not rows:
        return empty_candles()
    fixed = [(list(r) + [None] * 6)[:6] for r in rows]
    arr = pd.DataFrame(fixed, columns=CANDLE_COLUMNS)
    frame = pd.DataFrame({c: pd.to_numeric(arr[c], errors="coerce").astype("float64") for c in CANDLE_COLUMNS})
    if not frame["ts"].isna().any():
        frame["ts"] = frame["ts"].astype("int64")
    return frame


@dataclass
class FetchReport:
    """What one backfill did: the JSON summary of `tbml data fetch` (the keys of an import's summary)."""

    pair: str
    exchange: str
    symbol: str
    timeframe: str
    fetched: int = 0
    imported: int = 0
    added: int = 0
    open_candles_skipped: int = 0
    rejected: Counter = field(default_factory=Counter)
    accepted_ts: list[np.ndarray] = field(default_factory=list)
    requests: int = 0
    retries: int = 0

    def summary(self) -> dict[str, Any]:
        ts = np.sort(np.concatenate(self.accepted_ts)) if self.accepted_ts else np.array([], dtype="int64")
        gaps = find_gaps(ts, TIMEFRAME_MS[self.timeframe])
        rejected = {r: int(self.rejected[r]) for r in REJECT_REASONS if self.rejected.get(r)}
        return {
            "pair": self.pair, "exchange": self.exchange, "symbol": self.symbol, "timeframe": self.timeframe,
            "fetched": self.fetched, "imported": self.imported, "rejected": rejected,
            "rejectedTotal": sum(rejected.values()), "duplicates": rejected.get("duplicate_ts", 0),
            "gaps": len(gaps), "missingBars": int(sum(g.missing_bars for g in gaps)),
            "gapList": [g.to_dict() for g in gaps[:20]],
            "start": int(ts[0]) if len(ts) else None, "end": int(ts[-1]) if len(ts) else None,
            "added": self.added, "openCandlesSkipped": self.open_candles_skipped,
            "requests": self.requests, "retries": self.retries,
        }


def ensure_exchange_history(pair: str, settings=None, store: CandleStore | None = None, *,
                            client: ExchangeClient | None = None, bars: int | None = None,
                            since_ts: int | None = None, now_ms: int | None = None,
                            on_page: Callable[[int, int], None] | None = None) -> FetchReport:
    """Make the store hold the pair's closed candles from the exchange; returns what was fetched.

    The target is `bars` (default `data.exchange.history_bars`) bars up to the last closed bar, or every
    bar from `since_ts` on. Only what the store lacks within that span is fetched: the bars before its
    first one and after its last one (a store older than the span keeps a gap up to the span). Valid rows are merged into the store (`CandleStore.append`, atomic writes) in
    chunks of FLUSH_ROWS, so an interrupted long backfill keeps what it had.
    """
    pair = validate_pair(pair)
    if settings is None:
        from ml.config import get_settings

        settings = get_settings()
    store = store or CandleStore(settings.data_dir, settings.timeframe)
    own = client is None
    client = client or ExchangeClient.from_settings(settings)
    try:
        tf = store.timeframe_ms
        now = int(client._clock()) if now_ms is None else int(now_ms)
        end = last_closed_bar_ts(tf, now)
        target = int(bars or settings.data.exchange.history_bars)
        if target < 1:
            raise ValueError(f"bars must be >= 1, got {target}")
        if since_ts is not None:
            if since_ts > end:
                raise ExchangeInputError(f"since {since_ts} is after the last closed {store.timeframe} bar ({end})")
            desired_start = -(-int(since_ts) // tf) * tf
        else:
            desired_start = end - (target - 1) * tf
        requests0, retries0 = client.requests, client.retried
        client.check_timeframe(store.timeframe)
        symbol = client.symbol(pair)
        report = FetchReport(pair, client.exchange_id, symbol, store.timeframe)

        def run(start: int, stop: int) -> int:
            if start > stop:
                return 0
            rows, beyond = client.fetch_range(symbol, store.timeframe, start, stop, on_page)
            report.fetched += len(rows)
            report.open_candles_skipped += beyond
            got = 0
            for i in range(0, max(len(rows), 1), FLUSH_ROWS):
                chunk = rows[i:i + FLUSH_ROWS]
                if not chunk:
                    break
                result = validate_candles(rows_to_frame(chunk))
                report.rejected.update({k: v for k, v in result.rejected.items() if v})
                if not result.candles.empty:
                    report.imported += len(result.candles)
                    report.accepted_ts.append(result.candles["ts"].to_numpy())
                    report.added += store.append(pair, result.candles)
                    got += len(result.candles)
            return got

        cov = store.coverage(pair)
        if cov is None or not cov["bars"]:
            run(desired_start, end)
        else:
            run(max(cov["end"] + tf, desired_start), end)  # a store far behind is not filled further back
            if desired_start < cov["start"]:
                run(desired_start, cov["start"] - tf)
        if since_ts is None:  # gaps in the exchange's history: reach further back until the target is stored
            for _ in range(3):
                cov = store.coverage(pair)
                if not cov or not cov["bars"] or cov["bars"] >= target:
                    break
                first = cov["start"]
                if run(first - (target - cov["bars"]) * tf, first - tf) == 0:
                    break
        report.requests = client.requests - requests0
        report.retries = client.retried - retries0
        return report
    finally:
        if own:
            client.close()


def exchange_candles(pair: str, settings=None, *, bars: int | None = None,
                     store: CandleStore | None = None, client: ExchangeClient | None = None) -> pd.DataFrame:
    """The newest `bars` (default all stored) closed candles after bringing the store up to date."""
    if settings is None:
        from ml.config import get_settings

        settings = get_settings()
    store = store or CandleStore(settings.data_dir, settings.timeframe)
    target = max(int(bars or 0), settings.data.exchange.history_bars)
    report = ensure_exchange_history(pair, settings, store, client=client, bars=target)
    if report.rejected:
        log.warning("exchange candles for %s: %d rejected %s", pair, sum(report.rejected.values()),
                    dict(report.rejected))
    return store.tail(pair, bars) if bars else store.read(pair)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
