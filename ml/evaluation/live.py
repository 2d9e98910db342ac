"""Live accuracy of served predictions: resolve them against the candles that followed, roll up
accuracy and Brier against the base rate, and decide when a production model has lost its edge.

Ray-free. Used by the accuracy monitor actor (`actors/accuracy_monitor.py`, which persists the
resolutions and queues retraining) and by the ingress (`GET /api/predictions/{pair}/accuracy`,
history: `with_outcomes`, `accuracy_summary`), so both apply exactly the same rules.

Bar convention (the training label's, ml/training/dataset.py: `direction_h = close[t+h] > close[t]`): a
prediction made on the window ending with bar t (candle ts = open time) has `asOf` = close time of
bar t = `ts_t + tf` and `targetTime = asOf + h * tf` = close time of bar t+h. So it is resolved by

    base   = close of the bar opening at asOf - tf        (bar t)
    target = close of the bar opening at targetTime - tf  (bar t+h)
    realizedDirection = "up" if target > base else "down" (a tie is "down", as in the label)

and only once that target bar has closed on the clock (`targetTime <= now`): a candle store may
hold a bar that is still forming (e.g. an imported kline export of the current day), whose close
is not final.

The same prediction is usually served many times (cache hits, several clients); it counts once in
the rolling numbers: one prediction = (modelType, modelVersion, asOf, horizon).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RESOLVED_FIELDS = ("realizedClose", "realizedDirection", "correct", "resolvedAt")
DIRECTIONAL = ("up", "down")
SCAN_LIMIT = 20_000          # records read per query (the monitor's first scan, each incremental query)
SLACK_MS = 120_000           # re-read this far behind the newest record seen (late history batches)
GIVE_UP_MS = 86_400_000      # stop waiting for a target bar this long after it should have closed

Key = tuple[Any, Any, Any, Any]


# ------------------------------------------------------------------------------------------ records


def prediction_key(record: Mapping[str, Any]) -> Key:
    """What makes two served records the same prediction."""
    return (record.get("modelType"), record.get("modelVersion"), record.get("asOf"), record.get("horizon"))


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_trackable(record: Mapping[str, Any]) -> bool:
    """A real model prediction with its times: fallbacks (neutral HOLD, no model) are never scored."""
    return (not record.get("fallback") and _int(record.get("asOf")) and _int(record.get("targetTime"))
            and record["targetTime"] > record["asOf"])


def is_resolved(record: Mapping[str, Any]) -> bool:
    return record.get("resolvedAt") is not None and record.get("realizedDirection") in DIRECTIONAL


def bars_needed(records: Iterable[Mapping[str, Any]], timeframe_ms: int, now_ms: int) -> tuple[int, int] | None:
    """(first, last) open time of the bars that resolving `records` at `now_ms` needs; None if none."""
    lo = hi = None
    for r in records:
        if is_trackable(r) and not is_resolved(r) and r["targetTime"] <= now_ms:
            b, t = r["asOf"] - timeframe_ms, r["targetTime"] - timeframe_ms
            lo = b if lo is None else min(lo, b)
            hi = t if hi is None else max(hi, t)
    return None if lo is None else (lo, hi)


def closes_by_ts(candles: Any) -> dict[int, float]:
    """{open time: close} from a candle frame (ts, close columns) or a mapping."""
    if candles is None:
        return {}
    if isinstance(candles, Mapping):
        return {int(k): float(v) for k, v in candles.items()}
    if len(candles) == 0:
        return {}
    return dict(zip((int(t) for t in candles["ts"].tolist()), (float(c) for c in candles["close"].tolist()),
                    strict=True))


def resolve(records: Iterable[Mapping[str, Any]], candles: Any, timeframe_ms: int, now_ms: int) -> list[dict]:
    """Updates for the records whose target bar has closed by `now_ms` and whose two bars are in
    `candles` (frame with ts/close, or {open time: close}):
    `{id, realizedClose, realizedDirection, correct, resolvedAt}`. `correct` is None for a neutral
    prediction. Fallbacks, already resolved records and records without an id are skipped."""
    close = closes_by_ts(candles)
    out: list[dict] = []
    if not close:
        return out
    for r in records:
        if not is_trackable(r) or is_resolved(r) or not isinstance(r.get("id"), str):
            continue
        if r["targetTime"] > now_ms:
            continue
        c0 = close.get(r["asOf"] - timeframe_ms)
        c1 = close.get(r["targetTime"] - timeframe_ms)
        if c0 is None or c1 is None:
            continue
        realized = "up" if c1 > c0 else "down"
        direction = r.get("direction")
        out.append({"id": r["id"], "realizedClose": c1, "realizedDirection": realized,
                    "correct": (direction == realized) if direction in DIRECTIONAL else None,
                    "resolvedAt": int(now_ms)})
    return out


def apply_updates(records: list[dict], updates: Iterable[Mapping[str, Any]]) -> list[dict]:
    """`records` with the updates merged in by id (in place, also returned)."""
    by_id = {u["id"]: u for u in updates}
    if by_id:
        for r in records:
            u = by_id.get(r.get("id"))
            if u is not None:
                r.update({k: v for k, v in u.items() if k != "id"})
    return records


# ------------------------------------------------------------------------------------------ numbers


def _probability(record: Mapping[str, Any]) -> float | None:
    p = record.get("probability")
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        return None
    return float(p)


def distinct_resolved(records: Iterable[Mapping[str, Any]], model_type: str | None = None,
                      model_version: str | None = None) -> list[Mapping[str, Any]]:
    """Resolved, scoreable predictions, one per prediction key, newest (by asOf) first."""
    rows = [r for r in records if is_trackable(r) and is_resolved(r) and _probability(r) is not None
            and (model_type is None or r.get("modelType") == model_type)
            and (model_version is None or r.get("modelVersion") == model_version)]
    rows.sort(key=lambda r: (r["asOf"], r.get("timestamp") or 0), reverse=True)
    seen: set[Key] = set()
    out = []
    for r in rows:
        k = prediction_key(r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def reference_rate(meta: Mapping[str, Any] | None) -> float | None:
    """The up-rate a model version was trained on (its test baseline's constant probability)."""
    try:
        rate = ((meta or {}).get("metrics") or {}).get("baseline", {}).get("base_rate")
    except AttributeError:
        return None
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        return None
    return float(rate)


def rolling_stats(records: Iterable[Mapping[str, Any]], window: int, model_type: str | None = None,
                  model_version: str | None = None, reference: float | None = None) -> dict[str, Any]:
    """Numbers over the newest `window` resolved predictions (each counted once):

    n; accuracy over the directional ones (None if none); Brier of P(up); baseRate = share that went
    up in the window; baselineBrier = Brier of always answering `reference` (the model's TRAINING
    up-rate, see reference_rate; 0.5 when unknown) on the same rows -- a forecast fixed before the
    outcomes, unlike the window's own up-rate, whose Brier (baseRate * (1 - baseRate)) is chosen
    in hindsight and would make an honest no-edge model look worse than "the base rate" by chance;
    since/until = asOf of the oldest/newest one.
    """
    rows = distinct_resolved(records, model_type, model_version)[:max(0, int(window))]
    n = len(rows)
    ref = 0.5 if reference is None else float(reference)
    out: dict[str, Any] = {"n": n, "accuracy": None, "brier": None, "baseRate": None, "baselineBrier": None,
                           "referenceRate": ref, "nDirectional": 0, "nCorrect": 0, "since": None, "until": None}
    if not n:
        return out
    ys = [1.0 if r["realizedDirection"] == "up" else 0.0 for r in rows]
    ps = [_probability(r) for r in rows]
    directional = [r for r in rows if r.get("direction") in DIRECTIONAL]
    correct = sum(1 for r in directional if r["direction"] == r["realizedDirection"])
    base = sum(ys) / n
    out.update(
        accuracy=correct / len(directional) if directional else None,
        brier=sum((p - y) ** 2 for p, y in zip(ps, ys, strict=True)) / n,
        baseRate=base,
        baselineBrier=sum((ref - y) ** 2 for y in ys) / n,
        nDirectional=len(directional),
        nCorrect=correct,
        since=min(r["asOf"] for r in rows),
        until=max(r["asOf"] for r in rows),
    )
    return out


def pending_count(records: Iterable[Mapping[str, Any]], model_type: str | None = None) -> int:
    """Distinct trackable predictions not resolved yet (their target bar is ahead, or its candle missing)."""
    return len({prediction_key(r) for r in records if is_trackable(r) and not is_resolved(r)
                and (model_type is None or r.get("modelType") == model_type)})


def degraded(stats: Mapping[str, Any], min_n: int, margin: float) -> tuple[bool, str]:
    """(flag, reason): degraded when at least `min_n` predictions are resolved and their Brier is worse
    than the baseline's (the training up-rate as a constant, see rolling_stats) by more than
    `margin` -- the model then does worse than saying nothing, i.e. it has no edge left."""
    n = int(stats.get("n") or 0)
    brier, base = stats.get("brier"), stats.get("baselineBrier")
    if n < min_n or brier is None or base is None:
        return False, f"{n} of the {min_n} resolved predictions needed to judge the model"
    if brier > base + margin:
        return True, (f"live Brier {brier:.4f} over the last {n} resolved predictions is worse than the "
                      f"base rate's {base:.4f} by more than {margin:g}")
    return False, f"live Brier {brier:.4f} is within {margin:g} of the base rate's {base:.4f} (n={n})"


def judged(stats: Mapping[str, Any], min_n: int, margin: float) -> dict[str, Any]:
    """`stats` with the verdict of `degraded`: `degraded` and `degradedReason`."""
    flag, reason = degraded(stats, min_n, margin)
    return {**stats, "degraded": flag, "degradedReason": reason}


def accuracy_summary(records: list[Mapping[str, Any]], window: int,
                     production: Mapping[str, tuple[str, float | None] | None], *, model_type: str | None,
                     reference: float | None, min_n: int, margin: float) -> dict[str, Any]:
    """The live accuracy of a pair's served records: overall (of `model_type`, or every type and
    version when None, against `reference`) and per model type of `production` ({type: (production
    version, its reference_rate)} or None without a model), each judged by `degraded`."""
    models: dict[str, dict[str, Any]] = {}
    for t, prod in production.items():
        if prod is None:
            models[t] = {"version": None}
            continue
        version, ref = prod
        stats = rolling_stats(records, window, model_type=t, model_version=version, reference=ref)
        models[t] = {"version": version, **judged(stats, min_n, margin)}
    overall = rolling_stats(records, window, model_type=model_type, reference=reference)
    return {"window": window, "modelType": model_type, **judged(overall, min_n, margin),
            "pending": pending_count(records, model_type), "minN": min_n, "margin": margin, "models": models}


def with_outcomes(records: list[dict], timeframe_ms: int, now_ms: int,
                  read_candles: Callable[[int, int], Any] | None = None) -> list[dict]:
    """Records with their realized outcome: the monitor's persisted resolution where it has run, else
    resolved here by the same rule from `read_candles(first_ts, last_ts)` (not persisted, so answers
    stay fresh between monitor passes; None: nothing resolves on the fly). `outcome` repeats
    realizedDirection for older clients. In place, also returned."""
    if read_candles is not None:
        span = bars_needed(records, timeframe_ms, now_ms)
        if span is not None:
            try:
                candles = read_candles(span[0], span[1])
            except Exception:  # noqa: BLE001 - no candles: nothing resolves on the fly
                candles = None
            apply_updates(records, resolve(records, candles, timeframe_ms, now_ms))
    for r in records:
        if r.get("realizedDirection") is not None:
            r["outcome"] = r["realizedDirection"]
    return records


# ------------------------------------------------------------------------------------------ tracker


@dataclass
class _PairState:
    since: int | None = None                                     # next query: records with timestamp >= since
    newest: int | None = None                                    # newest record timestamp seen
    pending: dict[str, dict] = field(default_factory=dict)       # id -> unresolved record
    resolved: dict[Key, dict] = field(default_factory=dict)      # key -> a resolved record (for the stats)
    resolved_total: int = 0                                      # records this tracker resolved
    abandoned: int = 0                                           # targets whose candles never came


_KEEP = ("id", "timestamp", "modelType", "modelVersion", "asOf", "targetTime", "horizon", "direction",
         "probability", "fallback", *RESOLVED_FIELDS)


class LiveTracker:
    """What the accuracy monitor remembers per pair between passes, so a pass reads only the records
    served since the last one instead of the whole history.

    A pass: `query_args(pair)` -> read those records -> `observe(pair, records, now)` -> read the
    candles of `bars_needed(pair, now)` -> `due_updates(pair, candles, now)` -> persist them ->
    `mark_resolved(pair, updates)` -> `stats(pair, model_type, version)`.

    The first pass of a pair reads its newest `scan_limit` records (picks up what was pending before
    a restart); later passes read from `SLACK_MS` behind the newest record seen (history arrives in
    batches, a little late). Unresolved records wait in memory until their target bar closes and is
    stored, or are dropped `give_up_ms` after it should have closed (a gap in the candles).
    """

    def __init__(self, timeframe_ms: int, window: int, *, scan_limit: int = SCAN_LIMIT,
                 slack_ms: int = SLACK_MS, give_up_ms: int = GIVE_UP_MS) -> None:
        self.tf = int(timeframe_ms)
        self.window = max(1, int(window))
        self.scan_limit = max(1, int(scan_limit))
        self.slack_ms = int(slack_ms)
        self.give_up_ms = int(give_up_ms)
        self._pairs: dict[str, _PairState] = {}

    def _state(self, pair: str) -> _PairState:
        return self._pairs.setdefault(pair, _PairState())

    def query_args(self, pair: str) -> tuple[int, int | None]:
        """(limit, since) for the next history query of `pair`."""
        return self.scan_limit, self._state(pair).since

    def observe(self, pair: str, records: Iterable[Mapping[str, Any]], now_ms: int) -> None:
        """Take in a query's records: resolved ones feed the stats, unresolved ones wait."""
        st = self._state(pair)
        for r in records:
            ts = r.get("timestamp")
            if _int(ts):
                st.newest = ts if st.newest is None else max(st.newest, ts)
            if not is_trackable(r) or not isinstance(r.get("id"), str):
                continue
            if is_resolved(r):
                st.pending.pop(r["id"], None)
                self._keep_resolved(st, r)
            elif r["id"] not in st.pending:
                st.pending[r["id"]] = {k: r.get(k) for k in _KEEP}
        for rid, r in list(st.pending.items()):
            if r["targetTime"] + self.give_up_ms < now_ms:
                del st.pending[rid]
                st.abandoned += 1
        if st.newest is not None:
            st.since = max(st.since or 0, st.newest - self.slack_ms)

    def _keep_resolved(self, st: _PairState, r: Mapping[str, Any]) -> None:
        k = prediction_key(r)
        if k in st.resolved:
            return
        st.resolved[k] = {f: r.get(f) for f in _KEEP}
        same = [key for key in st.resolved if key[:2] == k[:2]]
        if len(same) > self.window:  # keep the newest `window` per model type and version
            same.sort(key=lambda key: st.resolved[key]["asOf"])
            for old in same[:len(same) - self.window]:
                del st.resolved[old]

    def bars_needed(self, pair: str, now_ms: int) -> tuple[int, int] | None:
        return bars_needed(self._state(pair).pending.values(), self.tf, now_ms)

    def due_updates(self, pair: str, candles: Any, now_ms: int) -> list[dict]:
        """Resolutions of the waiting records that `candles` settle (not applied until mark_resolved)."""
        return resolve(self._state(pair).pending.values(), candles, self.tf, now_ms)

    def mark_resolved(self, pair: str, updates: Iterable[Mapping[str, Any]]) -> int:
        """The updates were persisted: move their records from waiting to the stats."""
        st = self._state(pair)
        n = 0
        for u in updates:
            r = st.pending.pop(u["id"], None)
            if r is None:
                continue
            r.update({k: v for k, v in u.items() if k != "id"})
            self._keep_resolved(st, r)
            n += 1
        st.resolved_total += n
        return n

    def stats(self, pair: str, model_type: str | None = None, model_version: str | None = None,
              reference: float | None = None) -> dict[str, Any]:
        return rolling_stats(self._state(pair).resolved.values(), self.window, model_type, model_version, reference)

    def counts(self, pair: str) -> dict[str, Any]:
        st = self._state(pair)
        return {"pending": len(st.pending), "resolvedByMonitor": st.resolved_total, "abandoned": st.abandoned,
                "since": st.since, "newestRecord": st.newest}


__all__ = ["SCAN_LIMIT", "LiveTracker", "RESOLVED_FIELDS", "accuracy_summary", "apply_updates", "bars_needed",
           "closes_by_ts", "degraded", "distinct_resolved", "is_resolved", "is_trackable", "judged", "pending_count",
           "prediction_key", "reference_rate", "resolve", "rolling_stats", "with_outcomes"]
