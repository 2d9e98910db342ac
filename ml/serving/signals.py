"""From a calibrated P(up) to what a trader reads: direction, confidence and a five-level signal.

Ray-free and tiny, so the serving code, the CLI and the backtests agree on one rule.

Definitions
-----------
* ``probability`` is the model's calibrated P(close[t+h] > close[t]).
* ``direction`` is ``up`` when p > 0.5, ``down`` when p < 0.5, ``neutral`` when p is 0.5 (within
  ``NEUTRAL_EPS``) and for every fallback answer.
* ``confidence = |p - 0.5| * 2`` in [0, 1]: 0 = a coin flip, 1 = certainty.
* ``signal``: the thresholds ``signals.strong`` (0.7) and ``signals.weak`` (0.55) of the config are
  **probabilities of the predicted direction**, ``max(p, 1 - p)``:

  ====================  ==========================  ============================
  signal                P(up) = p                   confidence
  ====================  ==========================  ============================
  STRONG_BUY            p > strong                  > 2 * strong - 1  (0.4)
  BUY                   weak < p <= strong          > 2 * weak - 1    (0.1)
  HOLD                  1 - weak <= p <= weak       <= 0.1  (no edge)
  SELL                  1 - strong <= p < 1 - weak
  STRONG_SELL           p < 1 - strong
  ====================  ==========================  ============================

Why probabilities and not confidence: the original service showed the same number as
``probability`` and ``confidence`` (``0.742``/``0.742``, see the reference docs), so users read the
thresholds on the probability scale ("BUY above 55 %"). Applied to the confidence they would mean
P(up) > 0.775 for a BUY and > 0.85 for a STRONG_BUY, which a calibrated model of 5-minute crypto
moves practically never says: every answer would be HOLD. Both scales are shown in the table so
nobody has to guess; `thresholds_as_confidence` gives the confidence form.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STRONG_BUY, BUY, HOLD, SELL, STRONG_SELL = "STRONG_BUY", "BUY", "HOLD", "SELL", "STRONG_SELL"
SIGNALS = (STRONG_BUY, BUY, HOLD, SELL, STRONG_SELL)
UP, DOWN, NEUTRAL = "up", "down", "neutral"
NEUTRAL_EPS = 1e-9
DEFAULT_STRONG = 0.7
DEFAULT_WEAK = 0.55


@dataclass(frozen=True)
class Signal:
    direction: str
    probability: float
    confidence: float
    signal: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_thresholds(strong: float, weak: float) -> tuple[float, float]:
    """(strong, weak) as floats; ValueError unless 0.5 <= weak < strong <= 1."""
    strong, weak = float(strong), float(weak)
    if not (0.5 <= weak < strong <= 1.0):
        raise ValueError(f"signal thresholds need 0.5 <= weak < strong <= 1, got weak={weak}, strong={strong}")
    return strong, weak


def thresholds_as_confidence(strong: float = DEFAULT_STRONG, weak: float = DEFAULT_WEAK) -> tuple[float, float]:
    """The same thresholds on the confidence scale: (2*strong - 1, 2*weak - 1), e.g. (0.4, 0.1)."""
    strong, weak = check_thresholds(strong, weak)
    return 2 * strong - 1, 2 * weak - 1


def confidence_of(p: float) -> float:
    return abs(p - 0.5) * 2.0


def classify(p_up: float, strong: float = DEFAULT_STRONG, weak: float = DEFAULT_WEAK) -> Signal:
    """Direction, confidence and signal of one calibrated P(up). ValueError for NaN or p outside [0, 1]."""
    strong, weak = check_thresholds(strong, weak)
    if isinstance(p_up, bool):
        raise ValueError("probability must be a number")
    p = float(p_up)
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be within [0, 1], got {p_up!r}")
    if p > 0.5 + NEUTRAL_EPS:
        direction = UP
    elif p < 0.5 - NEUTRAL_EPS:
        direction = DOWN
    else:
        direction = NEUTRAL
    p_dir = max(p, 1.0 - p)  # probability of the predicted direction
    if p_dir > strong:
        signal = STRONG_BUY if direction == UP else STRONG_SELL
    elif p_dir > weak:
        signal = BUY if direction == UP else SELL
    else:
        signal = HOLD
    return Signal(direction=direction, probability=p, confidence=confidence_of(p), signal=signal)


def neutral() -> Signal:
    """The answer without an edge (no model, no data): p = 0.5, neutral, HOLD."""
    return Signal(direction=NEUTRAL, probability=0.5, confidence=0.0, signal=HOLD)


def data_is_stale(as_of_ms: int | None, now_ms: int | float, timeframe_ms: int, max_lag_bars: int) -> bool:
    """True when the newest candle (closed at `as_of_ms`) is more than `max_lag_bars` bars old: a
    store nobody refreshes must not pass for current data. 0 bars: off; no candles: not this rule."""
    if as_of_ms is None or max_lag_bars <= 0:
        return False
    return (float(now_ms) - float(as_of_ms)) > max_lag_bars * timeframe_ms


def is_stale(trained_at_ms: int | float | None, now_ms: int | float, expire_hours: float) -> bool:
    """True when a model trained at `trained_at_ms` is older than `expire_hours` (unknown age: stale)."""
    if trained_at_ms is None or isinstance(trained_at_ms, bool):
        return True
    if expire_hours <= 0:
        return False
    return (float(now_ms) - float(trained_at_ms)) > expire_hours * 3_600_000
