"""Synthetic market data: the embedded default source (`data.source: synthetic`).

The process (per pair, per seed; every number below is a constant of this module):

* Time runs on a fixed grid that starts at ORIGIN_TS (2025-01-01T00:00Z). Bar i opens at
  ORIGIN_TS + i * timeframe_ms. The simulation always starts at the origin, so the bar at a given
  timestamp is the same whatever window is asked for and whenever it is asked: a running service
  keeps producing new closed candles on the wall clock, and every old one stays as it was.
* Random draws come in fixed chunks of CHUNK_BARS bars, each seeded by
  SeedSequence([seed, crc32(pair), chunk_index]). Any prefix of the series is therefore stable.
* Per-bar log return r_t = mu_t + sigma_t * eps_t, with eps_t Student-t (5 d.o.f.) scaled to unit
  variance (fat tails).
* Volatility sigma_t = base_sigma(pair, timeframe) * season(UTC hour, weekday) * regime_t * exp(h_t):
  - h_t is a stochastic log-volatility AR(1) with persistence LOGVOL_PHI (0.98): volatility clusters;
  - regime_t is a two-state Markov chain (calm x0.85, volatile x1.7; mean stay 7 days calm,
    1.5 days volatile, converted to per-bar switch probabilities for the timeframe);
  - season() peaks around 15:00 UTC, bottoms around 03:00 UTC, and is lower on weekends.
* The planted signal (the knob is `signal_strength`, default 0.12 in configs/default.yaml):
      mu_t = -signal_strength * sigma_t * sign(log(close_{t-1} / close_{t-1-lookback}))
  i.e. mean reversion on the trailing `lookback`-bar return that is known at the bar's open. With
  strength 0 the log price is a martingale (a pure random walk with the volatility clustering).
  `planted_rule()` is the rule that exploits it; docs/data.md reports its measured accuracy.
* The trend (the knob is `drift`, default 0): an annualised log drift added to every bar's mean log
  return, drift * timeframe_ms / YEAR_MS per bar (365-day year), so ln(close) gains about `drift`
  per year (0.5 = +50 % log a year; |drift| <= MAX_ABS_DRIFT). It lets tests ask for a market no
  fixture was tuned on. Drift 0 adds nothing, so the default series is bit-identical to the one
  without the knob. With a planted signal the mean reversion partly leans against the trend (a
  rising trailing return is more often positive), so the realised trend is somewhat smaller.
* Candles: open = previous close; high/low are drawn exactly from the extremes of a Brownian bridge
  from open to close with the bar's volatility, so high >= max(open, close) and low <= min(open,
  close) > 0 always hold. Volume (in base units) follows the pair's typical quote turnover, the
  volatility level (so it shares the intraday pattern and the regimes), |standardised return|, and
  log-normal noise.
* Per-pair start price and daily volatility: BTC 60,000 / 2.5 %, ETH 3,000 / 3.2 %, XMR 150 / 3.5 %,
  RVN 0.02 / 5 %; any other pair gets them from a hash of its name (price 0.01-1,000, 3-7 %).

Bars before ORIGIN_TS do not exist: asking for them raises ValueError.
"""

from __future__ import annotations

import math
import threading
import zlib
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from ml.clock import last_closed_bar_ts
from ml.data.candles import CANDLE_COLUMNS, empty_candles
from ml.pairs import validate_pair

ORIGIN_TS = 1_735_689_600_000  # 2025-01-01T00:00:00Z, epoch ms
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
YEAR_MS = 365 * DAY_MS  # the year of the annualised drift
MAX_ABS_DRIFT = 10.0  # |annual log drift| accepted: e^10 a year is already far beyond any market
CHUNK_BARS = 8192
MAX_BARS_FROM_ORIGIN = 4_000_000  # a guard against simulating to the year 3000 by mistake

STUDENT_DF = 5.0
LOGVOL_PHI = 0.98
LOGVOL_STD = 0.35  # stationary standard deviation of h_t
CALM_MULT, VOLATILE_MULT = 0.85, 1.7
CALM_MEAN_MS, VOLATILE_MEAN_MS = 7 * DAY_MS, int(1.5 * DAY_MS)
SEASON_AMPLITUDE, SEASON_PEAK_HOUR, WEEKEND_MULT = 0.25, 15.0, 0.8
VOLUME_NOISE = 0.3

# pair -> (start price in USDT, daily volatility, daily quote turnover in USDT)
KNOWN_PAIRS: dict[str, tuple[float, float, float]] = {
    "BTC": (60_000.0, 0.025, 1.5e9),
    "ETH": (3_000.0, 0.032, 8.0e8),
    "XMR": (150.0, 0.035, 2.0e7),
    "RVN": (0.02, 0.05, 5.0e6),
}

SYNTHETIC_DOC = __doc__


def pair_hash(pair: str) -> int:
    """A hash of the pair name that is stable across processes (Python's hash() is salted)."""
    return zlib.crc32(pair.encode("ascii"))


def pair_params(pair: str) -> tuple[float, float, float]:
    """(start price, daily volatility, daily quote turnover) of a pair."""
    if pair in KNOWN_PAIRS:
        return KNOWN_PAIRS[pair]
    rng = np.random.default_rng(np.random.SeedSequence([pair_hash(pair), 0x5EED]))
    price = float(10.0 ** rng.uniform(-2.0, 3.0))
    vol = float(rng.uniform(0.03, 0.07))
    turnover = float(10.0 ** rng.uniform(6.0, 8.0))
    return price, vol, turnover


def _season(ts: np.ndarray) -> np.ndarray:
    """Volatility multiplier by UTC time of day and weekday (mean about 1 over a week)."""
    hour = (ts % DAY_MS) / HOUR_MS
    daily = np.exp(SEASON_AMPLITUDE * np.cos(2.0 * np.pi * (hour - SEASON_PEAK_HOUR) / 24.0))
    daily /= np.i0(SEASON_AMPLITUDE)  # E[exp(a cos U)] = I0(a)
    weekday = ((ts // DAY_MS) + 3) % 7  # 1970-01-01 was a Thursday: 0 = Monday
    return daily * np.where(weekday >= 5, WEEKEND_MULT, 1.0) / (5 + 2 * WEEKEND_MULT) * 7


class _Path:
    """The simulated path of one (pair, seed, strength, lookback, timeframe, drift), grown chunk by chunk.

    Each chunk is simulated from the state the previous one left, so the values never depend on how
    far the path had been grown before: extending it for a streaming call only simulates new chunks.
    """

    def __init__(self, pair: str, seed: int, strength: float, lookback: int, timeframe_ms: int,
                 drift: float = 0.0):
        self.pair, self.seed, self.strength, self.lookback = pair, seed, strength, lookback
        self.tf = timeframe_ms
        self.drift_bar = drift * timeframe_ms / YEAR_MS  # mean log return added to every bar
        price, daily_vol, turnover = pair_params(pair)
        self.base_sigma = daily_vol * math.sqrt(timeframe_ms / DAY_MS)
        self.bar_turnover = turnover * timeframe_ms / DAY_MS
        self.p_enter = min(1.0, timeframe_ms / CALM_MEAN_MS)
        self.p_exit = min(1.0, timeframe_ms / VOLATILE_MEAN_MS)
        self.eta_scale = LOGVOL_STD * math.sqrt(1.0 - LOGVOL_PHI**2)
        self.h_offset = -0.5 * LOGVOL_STD**2  # so E[exp(h)] = 1
        self.chunks: list[np.ndarray] = []  # each (CHUNK_BARS, 5): open, high, low, close, volume
        # Carried state: the last lookback+1 log closes, the log-vol filter state, the regime.
        self.log_tail = [math.log(price)] * (lookback + 1)
        self.zi = np.zeros(1)
        self.volatile = False
        self.lock = threading.Lock()

    @property
    def n_bars(self) -> int:
        return len(self.chunks) * CHUNK_BARS

    def ensure(self, n_bars: int) -> None:
        with self.lock:
            while self.n_bars < n_bars:
                self.chunks.append(self._simulate_chunk(len(self.chunks)))

    def _simulate_chunk(self, k: int) -> np.ndarray:
        n, lb = CHUNK_BARS, self.lookback
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, pair_hash(self.pair), k])))
        eps = rng.standard_t(STUDENT_DF, size=n) * math.sqrt((STUDENT_DF - 2.0) / STUDENT_DF)
        eta = rng.standard_normal(n)
        u_regime = rng.random(n)
        u_high = rng.random(n)
        u_low = rng.random(n)
        vol_noise = rng.standard_normal(n)

        ts = ORIGIN_TS + (np.arange(n, dtype=np.int64) + k * n) * self.tf
        h, self.zi = lfilter([self.eta_scale], [1.0, -LOGVOL_PHI], eta, zi=self.zi)
        base = self.base_sigma * _season(ts) * np.exp(h + self.h_offset)

        # The one feedback loop (regime chain + planted drift), over plain Python floats.
        logs = self.log_tail + [0.0] * n
        sig_out = [0.0] * n
        vol_flag = [False] * n
        k_sig, p_enter, p_exit, volatile = self.strength, self.p_enter, self.p_exit, self.volatile
        mu = self.drift_bar  # adding 0.0 is exact, so drift 0 keeps the drift-free path bit for bit
        for i, (b, e, u) in enumerate(zip(base.tolist(), eps.tolist(), u_regime.tolist(), strict=True)):
            if volatile:
                if u < p_exit:
                    volatile = False
            elif u < p_enter:
                volatile = True
            sig = b * (VOLATILE_MULT if volatile else CALM_MULT)
            prev = logs[i + lb]
            d = prev - logs[i]  # log(close_{t-1} / close_{t-1-lookback})
            s = (d > 0.0) - (d < 0.0)
            logs[i + lb + 1] = prev + sig * (e - k_sig * s) + mu
            sig_out[i] = sig
            vol_flag[i] = volatile
        self.volatile = volatile
        self.log_tail = logs[-(lb + 1):]

        log_all = np.asarray(logs)
        log_close = log_all[lb + 1:]
        log_open = log_all[lb:-1]
        r = log_close - log_open
        sig = np.asarray(sig_out)
        var2 = 2.0 * sig * sig
        # Extremes of a Brownian bridge from 0 to r with variance sig^2 over the bar (exact draws).
        up = 0.5 * (r + np.sqrt(r * r - var2 * np.log1p(-u_high)))
        down = 0.5 * (r - np.sqrt(r * r - var2 * np.log1p(-u_low)))
        o, c = np.exp(log_open), np.exp(log_close)
        hi = np.maximum(np.exp(log_open + up), np.maximum(o, c))
        lo = np.minimum(np.exp(log_open + down), np.minimum(o, c))
        activity = sig / self.base_sigma
        z = np.abs(r) / sig
        volume = (self.bar_turnover / c) * activity**0.8 * (0.5 + 0.6 * z) \
            * np.exp(VOLUME_NOISE * vol_noise - 0.5 * VOLUME_NOISE**2)
        return np.column_stack([o, hi, lo, c, volume])

    def rows(self, i0: int, i1: int) -> np.ndarray:
        """Bars i0..i1-1 as a (n, 5) array."""
        self.ensure(i1)
        c0, c1 = i0 // CHUNK_BARS, (i1 - 1) // CHUNK_BARS
        block = np.concatenate(self.chunks[c0:c1 + 1]) if c1 > c0 else self.chunks[c0]
        off = c0 * CHUNK_BARS
        return block[i0 - off:i1 - off]


@lru_cache(maxsize=16)
def _path(pair: str, seed: int, strength: float, lookback: int, timeframe_ms: int,
          drift: float = 0.0) -> _Path:
    return _Path(pair, seed, strength, lookback, timeframe_ms, drift)


def generate_candles(
    pair: str,
    n_bars: int,
    *,
    seed: int = 42,
    signal_strength: float = 0.12,
    lookback: int = 10,
    end_ts: int | None = None,
    timeframe_ms: int = 300_000,
    drift: float = 0.0,
) -> pd.DataFrame:
    """The `n_bars` synthetic candles whose last bar opens at `end_ts`.

    `end_ts` defaults to the last closed bar before now. It must lie on the bar grid (a multiple of
    the timeframe after ORIGIN_TS; every timeframe that divides a day qualifies for any floor(t/tf)*tf),
    and the first bar may not open before ORIGIN_TS. The result is a candle frame (see
    ml.data.candles) whose values depend only on (pair, seed, signal_strength, lookback, timeframe,
    drift, bar timestamp). `drift` is the annualised log drift added to every bar's mean log return
    (see the module docstring); 0 gives exactly the drift-free series.
    """
    validate_pair(pair)
    if timeframe_ms <= 0:
        raise ValueError(f"timeframe_ms must be positive, got {timeframe_ms}")
    if n_bars < 0:
        raise ValueError(f"n_bars must be >= 0, got {n_bars}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if lookback < 1:
        raise ValueError(f"lookback must be >= 1, got {lookback}")
    if not 0.0 <= signal_strength <= 1.0:
        raise ValueError(f"signal_strength must be in [0, 1], got {signal_strength}")
    if not (math.isfinite(drift) and abs(drift) <= MAX_ABS_DRIFT):
        raise ValueError(f"drift must be a finite annual log drift in [-{MAX_ABS_DRIFT:g}, {MAX_ABS_DRIFT:g}], "
                         f"got {drift}")
    end = last_closed_bar_ts(timeframe_ms) if end_ts is None else int(end_ts)
    if (end - ORIGIN_TS) % timeframe_ms:
        raise ValueError(f"end_ts {end} is not on the {timeframe_ms} ms bar grid")
    if n_bars == 0:
        return empty_candles()
    last = (end - ORIGIN_TS) // timeframe_ms
    first = last - n_bars + 1
    if first < 0:
        raise ValueError(
            f"synthetic history starts at 2025-01-01T00:00Z: {n_bars} bars ending at {end} would need "
            f"{-first} bar(s) before it; ask for fewer bars or a later end_ts"
        )
    if last >= MAX_BARS_FROM_ORIGIN:
        raise ValueError(f"end_ts {end} is too far after the origin ({last} bars; max {MAX_BARS_FROM_ORIGIN})")
    path = _path(pair, int(seed), float(signal_strength), int(lookback), int(timeframe_ms), float(drift))
    values = path.rows(first, last + 1)
    ts = ORIGIN_TS + np.arange(first, last + 1, dtype=np.int64) * timeframe_ms
    frame = pd.DataFrame(values.copy(), columns=CANDLE_COLUMNS[1:])
    frame.insert(0, "ts", ts)
    return frame


def planted_rule(candles: pd.DataFrame, lookback: int = 10) -> np.ndarray:
    """The planted rule's prediction of "close[t+h] > close[t]" for every row t.

    1.0 when close_t < close_{t-lookback} (the price fell over the trailing window, so the process
    drifts up), 0.0 otherwise (a tie predicts "not up"), NaN for the first `lookback` rows where the
    trailing return is undefined. Float array, one value per row (positional: a gap in the candles
    makes the lookback span more time).
    """
    if lookback < 1:
        raise ValueError(f"lookback must be >= 1, got {lookback}")
    close = np.asarray(candles["close"], dtype=np.float64)
    out = np.full(len(close), np.nan)
    if len(close) > lookback:
        out[lookback:] = (close[lookback:] < close[:-lookback]).astype(np.float64)
    return out


def rule_accuracy(candles: pd.DataFrame, horizon: int = 5, lookback: int = 10,
                  ts: np.ndarray | None = None) -> tuple[float, int]:
    """(accuracy, n) of planted_rule against direction_{horizon}, over the rows where both are
    defined, optionally only at the timestamps `ts` (e.g. a dataset split's end positions)."""
    close = np.asarray(candles["close"], dtype=np.float64)
    pred = planted_rule(candles, lookback)
    label = np.full(len(close), np.nan)
    if len(close) > horizon:
        label[:-horizon] = (close[horizon:] > close[:-horizon]).astype(np.float64)
    ok = ~np.isnan(pred) & ~np.isnan(label)
    if ts is not None:
        ok &= np.isin(np.asarray(candles["ts"], dtype=np.int64), np.asarray(ts, dtype=np.int64))
    n = int(ok.sum())
    return (float(np.mean(pred[ok] == label[ok])) if n else float("nan")), n
