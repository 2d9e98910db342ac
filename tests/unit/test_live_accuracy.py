"""ml.evaluation.live: the bar convention of resolution (pinned on a hand-built candle frame and against
the training labels), the rolling numbers on hand-checked examples, the degraded rule, and the
monitor's incremental bookkeeping."""

from __future__ import annotations

import pandas as pd
import pytest

from ml.evaluation.live import (
    LiveTracker,
    apply_updates,
    bars_needed,
    degraded,
    pending_count,
    resolve,
    rolling_stats,
)
from ml.training.dataset import make_labels

TF = 300_000
T0 = 1_735_689_600_000  # 2025-01-01T00:00Z, on the bar grid
CLOSES = [100.0, 101.0, 99.0, 102.0, 98.0, 103.0, 97.0, 104.0, 96.0, 105.0]


def candles(closes: list[float] = CLOSES) -> pd.DataFrame:
    ts = [T0 + i * TF for i in range(len(closes))]
    return pd.DataFrame({"ts": ts, "open": closes, "high": closes, "low": closes, "close": closes,
                         "volume": [1.0] * len(closes)})


def served(rid: str, bar: int, horizon: int, *, direction: str = "up", probability: float = 0.6,
           **extra) -> dict:
    """A record as the ingress stores it for a prediction made on the window ending with bar `bar`:
    asOf = close time of that bar (its open time + tf), targetTime = asOf + horizon bars."""
    as_of = T0 + bar * TF + TF
    rec = {"id": rid, "pair": "BTC", "timestamp": as_of + 1_000, "direction": direction,
           "probability": probability, "modelType": "lstm", "modelVersion": "v1", "horizon": horizon,
           "asOf": as_of, "targetTime": as_of + horizon * TF, "fallback": False}
    rec.update(extra)
    return rec


LATE = T0 + 100 * TF  # a clock at which every bar of the frame has long closed


# ------------------------------------------------------------------------------------------ resolve


def test_resolution_compares_the_close_of_the_asof_bar_with_the_close_of_the_target_bar():
    # window ends with bar 2 (close 99); h=2 -> target bar 4 (close 98): down. Off by one bar (bar 3,
    # 102 -> bar 5, 103) would say up.
    recs = [served("a", 2, 2, direction="up"), served("b", 2, 1, direction="down")]
    out = {u["id"]: u for u in resolve(recs, candles(), TF, LATE)}
    assert out["a"] == {"id": "a", "realizedClose": 98.0, "realizedDirection": "down", "correct": False,
                        "resolvedAt": LATE}
    # h=1 -> target bar 3 (close 102) vs bar 2 (99): up; the prediction said down
    assert out["b"]["realizedClose"] == 102.0 and out["b"]["realizedDirection"] == "up"
    assert out["b"]["correct"] is False


def test_resolution_agrees_with_the_training_label_for_every_bar_and_horizon():
    frame = candles()
    for h in (1, 2, 5):
        labels = make_labels(frame["close"], [h]).iloc[:, 0]
        recs = [served(f"{t}-{h}", t, h) for t in range(len(frame) - h)]
        got = {u["id"]: u["realizedDirection"] for u in resolve(recs, frame, TF, LATE)}
        assert len(got) == len(recs)
        for t in range(len(frame) - h):
            assert got[f"{t}-{h}"] == ("up" if labels.iloc[t] == 1.0 else "down"), (t, h)


def test_only_closed_target_bars_with_both_candles_resolve():
    rec = served("a", 2, 2)  # targetTime = close time of bar 4 = T0 + 5 tf
    assert resolve([rec], candles(), TF, rec["targetTime"] - 1) == []  # bar 4 still forming
    assert [u["id"] for u in resolve([rec], candles(), TF, rec["targetTime"])] == ["a"]
    assert resolve([served("far", 8, 3)], candles(), TF, LATE) == []  # bar 11 not stored
    assert resolve([rec], candles()[candles()["ts"] != T0 + 2 * TF], TF, LATE) == []  # base bar missing
    assert resolve([rec], None, TF, LATE) == [] and resolve([rec], candles().iloc[:0], TF, LATE) == []
    # a mapping {open time: close} works like a frame
    assert resolve([rec], {T0 + 2 * TF: 99.0, T0 + 4 * TF: 99.5}, TF, LATE)[0]["realizedDirection"] == "up"


def test_fallbacks_resolved_records_and_records_without_times_or_id_are_skipped():
    done = served("done", 2, 2, realizedClose=1.0, realizedDirection="up", correct=True, resolvedAt=1)
    recs = [served("fb", 2, 2, fallback=True), done, served("x", 2, 2, asOf=None),
            {**served("noid", 2, 2), "id": None}, served("ok", 2, 2)]
    assert [u["id"] for u in resolve(recs, candles(), TF, LATE)] == ["ok"]
    # a tie is "down" (the label is close[t+h] > close[t]); a neutral call is neither right nor wrong
    tie = resolve([served("t", 0, 2, direction="neutral", probability=0.5)], {T0: 100.0, T0 + 2 * TF: 100.0},
                  TF, LATE)
    assert tie[0]["realizedDirection"] == "down" and tie[0]["correct"] is None


def test_bars_needed_and_apply_updates():
    recs = [served("a", 2, 2), served("b", 5, 3), served("future", 9, 5), served("fb", 0, 1, fallback=True)]
    # a: bars 2..4, b: bars 5..8; the future one's target has not closed yet
    assert bars_needed(recs, TF, LATE - 1) is not None
    assert bars_needed(recs, TF, T0 + 9 * TF) == (T0 + 2 * TF, T0 + 8 * TF)
    assert bars_needed([served("future", 9, 5)], TF, T0 + 10 * TF) is None
    merged = apply_updates(recs, resolve(recs, candles(), TF, LATE))
    assert merged is recs and recs[0]["realizedClose"] == 98.0 and recs[1]["realizedClose"] == 96.0
    assert "realizedClose" not in recs[2] and "realizedClose" not in recs[3]


# ------------------------------------------------------------------------------------------ numbers


def outcome(rid: str, bar: int, p: float, direction: str, realized: str, **extra) -> dict:
    return served(rid, bar, 1, probability=p, direction=direction, realizedDirection=realized,
                  realizedClose=1.0, correct=None, resolvedAt=1, **extra)


HAND = [
    outcome("A", 1, 0.8, "up", "up"),        # (0.8 - 1)^2 = 0.04, right
    outcome("B", 2, 0.3, "down", "up"),      # (0.3 - 1)^2 = 0.49, wrong
    outcome("C", 3, 0.6, "up", "down"),      # (0.6 - 0)^2 = 0.36, wrong
    outcome("D", 4, 0.5, "neutral", "down"),  # (0.5 - 0)^2 = 0.25, not a call
]


def test_rolling_stats_on_a_hand_checked_window():
    s = rolling_stats(HAND, window=10)
    assert s["n"] == 4 and s["nDirectional"] == 3 and s["nCorrect"] == 1
    assert s["accuracy"] == pytest.approx(1 / 3)
    assert s["brier"] == pytest.approx((0.04 + 0.49 + 0.36 + 0.25) / 4)  # 0.285
    assert s["baseRate"] == pytest.approx(0.5)
    assert s["baselineBrier"] == pytest.approx(0.25)  # 0.5 * (1 - 0.5)
    assert (s["since"], s["until"]) == (HAND[0]["asOf"], HAND[3]["asOf"])


def test_window_takes_the_newest_predictions_and_each_prediction_counts_once():
    repeats = [dict(HAND[0], id=f"A{i}", timestamp=HAND[0]["timestamp"] + i) for i in range(3)]
    other = [outcome("G", 5, 0.9, "up", "up", modelType="gru"),
             outcome("F", 6, 0.9, "up", "up", fallback=True),
             served("U", 7, 1)]  # not resolved
    recs = HAND + repeats + other
    assert rolling_stats(recs, 10, model_type="lstm")["n"] == 4
    assert rolling_stats(recs, 10)["n"] == 5  # + the gru one; never the fallback or the unresolved one
    assert rolling_stats(recs, 10, model_type="lstm", model_version="v2")["n"] == 0
    two = rolling_stats(recs, 2, model_type="lstm")  # C and D
    assert two["n"] == 2 and two["accuracy"] == 0.0 and two["nDirectional"] == 1
    assert two["brier"] == pytest.approx((0.36 + 0.25) / 2)
    # both went down: the window's own rate (0) would be a perfect forecast in hindsight; the
    # baseline is the fixed reference instead (0.5 by default: Brier 0.25; a 0.6 training rate: 0.36)
    assert two["baseRate"] == 0.0 and two["baselineBrier"] == pytest.approx(0.25) and two["referenceRate"] == 0.5
    trained = rolling_stats(recs, 2, model_type="lstm", reference=0.6)
    assert trained["baselineBrier"] == pytest.approx(0.36) and trained["brier"] == two["brier"]
    assert (two["since"], two["until"]) == (HAND[2]["asOf"], HAND[3]["asOf"])
    empty = rolling_stats([], 10)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["brier"] is None
    only_neutral = rolling_stats([HAND[3]], 10)
    assert only_neutral["n"] == 1 and only_neutral["accuracy"] is None and only_neutral["brier"] == 0.25
    assert pending_count(recs) == 1 and pending_count(recs, "gru") == 0


def test_reference_rate_is_the_training_up_rate_of_the_version():
    from ml.evaluation.live import reference_rate

    assert reference_rate({"metrics": {"baseline": {"base_rate": 0.53}}}) == 0.53
    assert reference_rate({"metrics": {}}) is None and reference_rate(None) is None
    assert reference_rate({"metrics": {"baseline": {"base_rate": 1.7}}}) is None


def test_a_perfect_no_edge_forecast_is_never_degraded_whatever_the_window_did():
    """p = 0.5 on a window that went up 70 % of the time: the hindsight rate (0.7) would have a
    Brier of 0.21 and call the coin-flip model degraded; against the fixed reference it is not."""
    recs = [outcome(f"N{i}", i, 0.5, "neutral", "up" if i % 10 < 7 else "down") for i in range(200)]
    s = rolling_stats(recs, 200)
    assert s["baseRate"] == pytest.approx(0.7) and s["brier"] == pytest.approx(0.25)
    assert degraded(s, min_n=100, margin=0.01)[0] is False


def test_degraded_needs_enough_predictions_and_a_brier_worse_than_the_base_rate_by_the_margin():
    s = rolling_stats(HAND, 10)  # brier 0.285 vs baseline 0.25
    flag, reason = degraded(s, min_n=4, margin=0.01)
    assert flag is True and "0.2850" in reason and "0.2500" in reason
    assert degraded(s, min_n=4, margin=0.05)[0] is False  # 0.285 <= 0.30
    flag, reason = degraded(s, min_n=5, margin=0.0)
    assert flag is False and "4 of the 5" in reason
    assert degraded({"n": 10, "brier": 0.25, "baselineBrier": 0.25}, 1, 0.0)[0] is False  # equal: not worse
    assert degraded(rolling_stats([], 10), 0, 0.0)[0] is False


# ------------------------------------------------------------------------------------------ tracker


def test_tracker_resolves_incrementally_and_keeps_the_stats():
    tr = LiveTracker(TF, window=3, scan_limit=500, slack_ms=60_000, give_up_ms=10 * TF)
    assert tr.query_args("BTC") == (500, None)  # first pass: the newest records, whatever their age
    early = [served("a", 2, 2, direction="down", probability=0.3), served("a2", 2, 2, direction="down",
                                                                         probability=0.3),
             served("b", 6, 2), served("fb", 2, 2, fallback=True)]
    now = T0 + 7 * TF  # a's target bar (4) has closed, b's (8) has not
    tr.observe("BTC", early, now)
    assert tr.counts("BTC")["pending"] == 3
    assert tr.query_args("BTC") == (500, max(r["timestamp"] for r in early) - 60_000)
    assert tr.bars_needed("BTC", now) == (T0 + 2 * TF, T0 + 4 * TF)
    ups = tr.due_updates("BTC", candles(), now)
    assert sorted(u["id"] for u in ups) == ["a", "a2"] and all(u["correct"] is True for u in ups)
    assert tr.stats("BTC")["n"] == 0  # nothing counts before it is persisted
    assert tr.mark_resolved("BTC", ups) == 2
    s = tr.stats("BTC", "lstm", "v1")
    assert s["n"] == 1 and s["accuracy"] == 1.0 and s["brier"] == pytest.approx(0.09)  # a and a2: one prediction
    # the next query brings a back (persisted) and b again (still waiting): nothing twice
    tr.observe("BTC", [dict(early[0], **ups[0]), early[2]], now)
    assert tr.counts("BTC")["pending"] == 1 and tr.stats("BTC")["n"] == 1
    # b's target bar closes; the candle arrives
    later = T0 + 10 * TF
    ups = tr.due_updates("BTC", candles(), later)
    assert [u["id"] for u in ups] == ["b"] and tr.mark_resolved("BTC", ups) == 1
    assert tr.stats("BTC")["n"] == 2 and tr.counts("BTC")["resolvedByMonitor"] == 3
    # a record whose target bar never arrives is dropped give_up_ms after it should have closed
    tr.observe("BTC", [served("gap", 20, 1)], T0 + 22 * TF)
    assert "gap" in {rid for rid in tr._state("BTC").pending}
    tr.observe("BTC", [], T0 + 22 * TF + 10 * TF + 1)
    assert tr.counts("BTC")["abandoned"] == 1


def test_tracker_keeps_only_the_newest_window_per_model_version():
    tr = LiveTracker(TF, window=2)
    recs = [outcome(f"r{i}", i, 0.7, "up", "up") for i in range(5)]
    tr.observe("ETH", recs, LATE)
    assert len(tr._state("ETH").resolved) == 2
    s = tr.stats("ETH", "lstm", "v1")
    assert s["n"] == 2 and (s["since"], s["until"]) == (recs[3]["asOf"], recs[4]["asOf"])
    assert tr.stats("BTC")["n"] == 0  # pairs are separate
