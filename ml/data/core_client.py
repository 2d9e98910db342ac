"""Client of trading-bot-core, the original ecosystem's market-data service.

`GET {core}/api/pair/{PAIR}` answers `{pair, history: {closes, highs, lows, volumes, timestamps},
...}` (a `{data: {...}}` wrapper is accepted too). Conversion to candles:
- `ts` = `timestamps[i]` taken as the bar's open time; seconds or milliseconds (also µs/ns) are
  detected per value by magnitude (`ml.data.files.epoch_to_ms`).
- core sends no opens: `open[i]` = `close[i-1]`, and the first bar's open = its own close. When the
  previous close lies outside this bar's `[low, high]` (a price gap between bars) it is clamped
  into the range, so a gap does not turn into an `open_outside_range` rejection.
The frame is raw: callers validate it (`ml.data.candles.validate_candles`).

Failure handling: each request has `timeout_s`; network errors, timeouts, 5xx and 429 are retried
`retries` times with exponential backoff (`backoff_s * 2**k`, capped at `max_backoff_s`; a 429's or
503's `Retry-After` in seconds or as an HTTP date is honoured, capped at `max_retry_after_s`).
404 raises PairNotFoundError and other 4xx CoreResponseError at once, without retrying. When the
attempts are used up, CoreUnavailableError says what the last failure was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pandas as pd

from ml.data.candles import CANDLE_COLUMNS, empty_candles
from ml.data.files import epoch_to_ms
from ml.data.retry_after import parse_retry_after
from ml.pairs import validate_pair

HISTORY_KEYS = ("closes", "highs", "lows", "volumes", "timestamps")


class CoreError(RuntimeError):
    """Any failure to get candles from core."""


class PairNotFoundError(CoreError, LookupError):
    """core does not know the pair (HTTP 404). Not retried."""


class CoreResponseError(CoreError):
    """core refused the request (4xx other than 404/429) or answered something that is not a pair history."""


class CoreUnavailableError(CoreError):
    """core could not be reached or kept failing (network, timeout, 5xx, 429) after all retries."""


class CoreClient:
    """Synchronous client with per-request timeout, bounded retries and exponential backoff."""

    def __init__(self, base_url: str, timeout_s: float = 5.0, retries: int = 3, backoff_s: float = 0.5, *,
                 max_backoff_s: float = 30.0, max_retry_after_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self._sleep = sleep
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout_s), transport=transport,
                                  follow_redirects=True, headers={"Accept": "application/json"})

    @classmethod
    def from_settings(cls, settings=None, **kwargs: Any) -> CoreClient:
        if settings is None:
            from ml.config import get_settings

            settings = get_settings()
        core = settings.data.core
        return cls(core.url, core.timeout_s, core.retries, core.backoff_s, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------
    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt counts from 0)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after_s)
        return min(self.backoff_s * (2 ** attempt), self.max_backoff_s)

    def fetch_pair(self, pair: str) -> dict[str, Any]:
        """The JSON document core returns for a pair."""
        validate_pair(pair)
        url = f"{self.base_url}/api/pair/{pair}"
        attempts = self.retries + 1
        last_failure = "no attempt made"
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                resp = self._http.get(url)
            except httpx.TimeoutException:
                last_failure = f"timed out after {self.timeout_s:g}s"
            except httpx.TransportError as exc:
                last_failure = f"network error: {type(exc).__name__}: {exc}"
            else:
                status = resp.status_code
                if status == 404:
                    raise PairNotFoundError(f"core at {self.base_url} does not know pair {pair} (HTTP 404)")
                if status == 429 or status >= 500:
                    last_failure = f"HTTP {status}"
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                elif status >= 400:
                    raise CoreResponseError(f"core at {self.base_url} refused {pair}: HTTP {status}")
                else:
                    try:
                        body = resp.json()
                    except ValueError:
                        raise CoreResponseError(
                            f"core at {self.base_url} answered {pair} with a body that is not JSON"
                        ) from None
                    if not isinstance(body, dict):
                        raise CoreResponseError(f"core at {self.base_url} answered {pair} with non-object JSON")
                    return body
            if attempt + 1 < attempts:
                self._sleep(self.backoff_delay(attempt, retry_after))
        raise CoreUnavailableError(
            f"core at {self.base_url} unavailable for {pair} after {attempts} attempt(s): {last_failure}"
        )

    def fetch_candles(self, pair: str) -> pd.DataFrame:
        """Raw (unvalidated) candles of a pair, oldest first as core sends them."""
        return history_to_candles(self.fetch_pair(pair), pair)


def history_to_candles(body: dict[str, Any], pair: str = "?") -> pd.DataFrame:
    """Turn core's `history` arrays into a raw candle frame (see the module docstring)."""
    doc = body
    if "history" not in doc and isinstance(doc.get("data"), dict):
        doc = doc["data"]
    hist = doc.get("history")
    if not isinstance(hist, dict):
        raise CoreResponseError(f"core's answer for {pair} has no history object")
    missing = [k for k in HISTORY_KEYS if not isinstance(hist.get(k), list)]
    if missing:
        raise CoreResponseError(f"core's history for {pair} lacks array(s): {', '.join(missing)}")
    lengths = {k: len(hist[k]) for k in HISTORY_KEYS}
    if len(set(lengths.values())) != 1:
        shown = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise CoreResponseError(f"core's history arrays for {pair} differ in length ({shown})")
    if lengths["closes"] == 0:
        return empty_candles()

    def numbers(key: str) -> np.ndarray:
        return pd.to_numeric(pd.Series(hist[key], dtype="object"), errors="coerce").to_numpy(
            dtype="float64", na_value=np.nan)

    close, high, low, volume = numbers("closes"), numbers("highs"), numbers("lows"), numbers("volumes")
    ts = epoch_to_ms(pd.to_numeric(pd.Series(hist["timestamps"], dtype="object"), errors="coerce"))
    open_ = np.empty_like(close)
    open_[0] = close[0]
    open_[1:] = close[:-1]
    with np.errstate(invalid="ignore"):
        ordered = low <= high
        open_ = np.where(ordered, np.clip(open_, low, high), open_)
    frame = pd.DataFrame({"ts": ts, "open": open_, "high": high, "low": low, "close": close, "volume": volume})
    if not frame["ts"].isna().any():
        frame["ts"] = frame["ts"].astype("int64")
    return frame[CANDLE_COLUMNS]
