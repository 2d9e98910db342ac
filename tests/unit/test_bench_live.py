"""The Ray-free parts of bench.bench_live: how the probe's answers become the after-close figures, how
the close latencies become results, and the backfill figures against the stand-in Binance (real HTTP)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not an installed package: import it from this checkout
    sys.path.insert(0, str(REPO))

from bench.bench_live import BARS, ProbeResult, _close_results, bench_backfill  # noqa: E402


def test_probe_splits_the_first_answer_after_each_close_from_the_others():
    p = ProbeResult(answers=[(10.0, 1000, True, False, False), (11.0, 1000, True, False, False),
                             (40.0, 2000, False, False, False), (12.0, 2000, True, False, False),
                             (13.0, 3000, True, False, False)])
    first, rest = p.after_close()
    assert first == [40.0, 13.0]  # a new asOf: the answer after a close (the very first answer is not one)
    assert rest == [10.0, 11.0, 12.0]
    assert p.first_after_close_hits() == (1, 2)
    assert p.hit_share == 0.8


def test_close_results_count_every_close_and_anchor_on_the_delay_plus_one_bar():
    settings = SimpleNamespace(data=SimpleNamespace(source="exchange", feed=SimpleNamespace(close_delay_s=0.2)),
                               timeframe_ms=1000, timeframe="1s")
    m = {"closes": [0, 1000, 2000, 3000], "cached": {0: 300, 1000: 320, 2000: 310},
         "delivered": {0: 305, 1000: 330, 2000: 315, 3000: 400}, "events": 5, "heartbeats": 1}
    rows = {r.name: r for r in _close_results(m, settings, 4.0)}
    cached = rows["candle close -> prediction cached p50"]
    assert (cached.value, cached.anchor_value, cached.ok) == (310, 1200, True)
    assert rows["closes whose prediction was cached"].value == 75.0
    assert rows["closes whose prediction was cached"].ok is False  # a close without its prediction is a miss
    assert rows["closes whose event was delivered"].ok is True


def test_backfill_figures_against_the_stand_in():
    rows = bench_backfill(quick=True)
    assert [r.unit for r in rows] == ["candles/s", "candles/s", "ms"]
    rate, vs_limit, busy = rows
    assert rate.value > 0 and rate.anchor_value > 0
    assert f"{BARS:,} candles of BTC/USDT" in rate.note and "0 rejected" in rate.note
    assert vs_limit.anchor_value == 50_000  # 1000 candles per 50 ms x 0.4 (Binance's rateLimit x klines cost)
    assert busy.value > 0 and "parse_ohlcvs" in busy.note
