"""The service's own numbers in Ray's metrics system (`ray.util.metrics`), for the actors; the Serve
replicas record theirs through `deployments.metrics` (`ray.serve.metrics`). docs/metrics.md lists
every metric, what it means and how to scrape it.

`CATALOG` is the one list of the metrics the code defines (name, type, labels, meaning): both
modules create their metrics from it, and the Grafana dashboard and the alert rules under deploy/
may reference only these names (tests/unit/test_metrics_files.py checks it). Ray exports each one
with a `ray_` prefix (`tbml_predictions_total` is scraped as `ray_tbml_predictions_total`), adds its
own labels (`SessionName`, `NodeAddress`, `WorkerId`, `Component`, ...) and reports a value to the
node's metrics agent every `metrics_report_interval_ms` (10 s by default).

Recording must never slow or break the work it describes: every call is a few in-process updates,
any failure is swallowed and logged once per process, and `metrics.enabled: false` makes every
call a no-op.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
EXPORT_PREFIX = "ray_"  # what Ray puts in front of every application metric in its export
SIGNAL_VALUES = {"STRONG_BUY": 2.0, "BUY": 1.0, "HOLD": 0.0, "SELL": -1.0, "STRONG_SELL": -2.0}

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TRAINING_BUCKETS_S = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


@dataclass(frozen=True)
class MetricDef:
    """One metric the service records: its name as defined (before Ray's `ray_` prefix)."""

    name: str
    kind: str
    labels: tuple[str, ...]
    description: str
    where: str  # the module that records it
    buckets: tuple[float, ...] = ()


_SERVE = "deployments.metrics"
_ACT = "actors.metrics"

CATALOG: tuple[MetricDef, ...] = (
    # -- the Serve replicas (the Ingress); Ray Serve adds deployment, replica and application labels
    MetricDef("tbml_predictions_total", COUNTER, ("pair", "model", "signal", "fallback", "cached"),
              "predictions served (each pair of GET /api/predictions counts once)", _SERVE),
    MetricDef("tbml_prediction_probability", GAUGE, ("pair", "model"),
              "P(up) of the newest model answer (not a fallback) this replica served", _SERVE),
    MetricDef("tbml_prediction_signal", GAUGE, ("pair", "model"),
              "signal of that answer: 2 STRONG_BUY, 1 BUY, 0 HOLD, -1 SELL, -2 STRONG_SELL", _SERVE),
    MetricDef("tbml_prediction_latency_seconds", HISTOGRAM, ("endpoint",),
              "time to answer a prediction request in the ingress (endpoint: one | all)", _SERVE,
              LATENCY_BUCKETS_S),
    MetricDef("tbml_cache_hits_total", COUNTER, ("kind",),
              "cache lookups answered from the replica memo or Redis (kind: predictions | features)", _SERVE),
    MetricDef("tbml_cache_misses_total", COUNTER, ("kind",),
              "cache lookups that had to compute (bypassCache requests are not lookups)", _SERVE),
    MetricDef("tbml_redis_degraded", GAUGE, (),
              "1 while this replica's cache cannot reach Redis (answers from process memory), else 0", _SERVE),
    # -- the accuracy monitor: live numbers of each production version, per pass
    MetricDef("tbml_live_accuracy", GAUGE, ("pair", "model"),
              "live accuracy of the production version over the newest live.window resolved predictions",
              _ACT),
    MetricDef("tbml_live_brier", GAUGE, ("pair", "model"), "live Brier score of the production version", _ACT),
    MetricDef("tbml_live_baseline_brier", GAUGE, ("pair", "model"),
              "Brier score of always saying the reference (training) base rate on the same predictions", _ACT),
    MetricDef("tbml_live_base_rate", GAUGE, ("pair", "model"),
              "share of those resolved predictions whose price went up (the base rate)", _ACT),
    MetricDef("tbml_live_resolved", GAUGE, ("pair", "model"),
              "resolved predictions the live numbers are computed over (n)", _ACT),
    MetricDef("tbml_live_degraded", GAUGE, ("pair", "model"),
              "1 when the production version has lost its edge (ml.evaluation.live.degraded), else 0", _ACT),
    MetricDef("tbml_model_age_seconds", GAUGE, ("pair", "model"),
              "seconds since the production version was trained (its trainedAt)", _ACT),
    # -- the supervisor's ledger, read by the Storage actor when the supervisor publishes it
    MetricDef("tbml_supervisor_restarts", GAUGE, ("piece",),
              "restarts of a piece by the foreground `tbml up` supervisor in this run (a count; a gauge "
              "because the supervisor is no Ray driver and publishes it as a document)", _ACT),
    MetricDef("tbml_supervisor_down", GAUGE, ("piece",),
              "1 while the supervisor reports a piece down or given up on, else 0", _ACT),
    # -- the training queue
    MetricDef("tbml_training_queue_depth", GAUGE, (), "training jobs waiting in the queue", _ACT),
    MetricDef("tbml_training_queue_active", GAUGE, (), "training runs running now", _ACT),
    MetricDef("tbml_training_queue_paused", GAUGE, (), "1 after an emergency stop until resume, else 0", _ACT),
    MetricDef("tbml_training_runs_total", COUNTER, ("model", "outcome"),
              "finished training jobs (outcome: completed | failed | cancelled)", _ACT),
    MetricDef("tbml_training_run_duration_seconds", HISTOGRAM, ("model", "outcome"),
              "start to finish of a training run that started (queue wait excluded)", _ACT, TRAINING_BUCKETS_S),
    # -- the market feed, after every tick
    MetricDef("tbml_feed_lag_bars", GAUGE, ("pair",),
              "closed bars the candle store is behind the clock", _ACT),
    MetricDef("tbml_feed_lag_seconds", GAUGE, ("pair",),
              "seconds since the newest stored candle closed (up to one bar plus close_delay_s is normal)",
              _ACT),
    MetricDef("tbml_feed_last_candle_timestamp_seconds", GAUGE, ("pair",),
              "open time of the newest stored candle (Unix seconds)", _ACT),
    MetricDef("tbml_feed_stale", GAUGE, ("pair",),
              "1 when the pair is more than data.max_lag_bars behind (or has no candle), else 0", _ACT),
    # -- the Storage actor, every metrics.storage_interval_s and on every stats call
    MetricDef("tbml_storage_bytes", GAUGE, ("category",),
              "bytes on the data volume per storage category (quarantine included)", _ACT),
)

BY_NAME: dict[str, MetricDef] = {m.name: m for m in CATALOG}


def exported_names(metric: MetricDef) -> set[str]:
    """The sample names an operator sees for `metric` in Ray's export."""
    base = EXPORT_PREFIX + metric.name
    if metric.kind == HISTOGRAM:
        return {base + "_bucket", base + "_sum", base + "_count"}
    if metric.kind == COUNTER and not base.endswith("_total"):
        return {base + "_total"}
    return {base}


def _enabled() -> bool:
    try:
        from ml.config import get_settings

        return bool(get_settings().metrics.enabled)
    except Exception:  # noqa: BLE001 - settings that do not load are reported elsewhere
        return True


class Recorder:
    """Creates the metrics of `CATALOG` once per process (lazily) and records into them; never raises.

    `factory(kind)` returns the metric class to use (ray.util.metrics here, ray.serve.metrics in
    the Serve replicas).
    """

    def __init__(self, factory: Any = None, enabled: bool | None = None) -> None:
        self._factory = factory or _util_factory
        self.enabled = _enabled() if enabled is None else bool(enabled)
        self._metrics: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._warned = False
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # last value per series
        self._refresher: threading.Thread | None = None

    def _metric(self, name: str) -> Any:
        m = self._metrics.get(name)
        if m is None:
            with self._lock:
                m = self._metrics.get(name)
                if m is None:
                    d = BY_NAME[name]
                    cls = self._factory(d.kind)
                    kwargs: dict[str, Any] = {"description": d.description, "tag_keys": d.labels}
                    if d.kind == HISTOGRAM:
                        kwargs["boundaries"] = list(d.buckets)
                    m = cls(d.name, **kwargs)
                    self._metrics[name] = m
        return m

    def _failed(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("metrics: recording failed (logged once; the service goes on): %s: %s",
                        type(exc).__name__, exc)

    def inc(self, name: str, value: float = 1.0, **tags: Any) -> None:
        if not self.enabled or value <= 0:
            return
        try:
            self._metric(name).inc(value, tags=_tags(tags))
        except Exception as exc:  # noqa: BLE001 - a metric never breaks the work it counts
            self._failed(exc)

    def set(self, name: str, value: float | None, **tags: Any) -> None:
        """Set a gauge; the value is set again every report interval until the next set (below)."""
        if not self.enabled or value is None:
            return
        try:
            t, v = _tags(tags), float(value)
            self._metric(name).set(v, tags=dict(t))
            self._gauges[(name, tuple(sorted(t.items())))] = v
            if self._refresher is None:
                self._start_refresher()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def _start_refresher(self) -> None:
        """Ray's agent drops a gauge series it has not heard of for two report intervals, and with Ray
        2.60 a gauge set once leaves the export after ~20 s (docs/metrics.md): a daemon thread sets
        every gauge series of this process again each interval, so a value set once (a monitor pass,
        a feed tick) stays in the export while the process lives and goes with it."""
        with self._lock:
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh_loop, name="tbml-metrics-refresh",
                                                   daemon=True)
                self._refresher.start()

    def _refresh_loop(self) -> None:
        interval_s = _report_interval_s()
        while True:
            time.sleep(interval_s)
            for (name, tags), value in list(self._gauges.items()):
                try:
                    self._metric(name).set(value, tags=dict(tags))
                except Exception as exc:  # noqa: BLE001
                    self._failed(exc)

    def observe(self, name: str, value: float | None, **tags: Any) -> None:
        if not self.enabled or value is None:
            return
        try:
            self._metric(name).observe(float(value), tags=_tags(tags))
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def guard(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` (a few recordings from a report); a failure is swallowed and logged once."""
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)


def _report_interval_s() -> float:
    """Ray's metrics report interval in this process (10 s unless configured), at least 1 s."""
    try:
        import ray

        return max(1.0, ray._config.metrics_report_interval_ms() / 1000)
    except Exception:  # noqa: BLE001 - outside a Ray process
        return 10.0


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: ("true" if v is True else "false" if v is False else "" if v is None else str(v))
            for k, v in tags.items()}


def _util_factory(kind: str) -> Any:
    from ray.util import metrics

    return {COUNTER: metrics.Counter, GAUGE: metrics.Gauge, HISTOGRAM: metrics.Histogram}[kind]


_recorder: Recorder | None = None


def recorder() -> Recorder:
    """This process's recorder for the actors (created on first use)."""
    global _recorder
    if _recorder is None:
        _recorder = Recorder()
    return _recorder


def _flag(value: Any) -> float:
    return 1.0 if value else 0.0


# ----------------------------------------------------------------------------- what the actors report
def record_queue(summary: dict[str, Any]) -> None:
    """The training queue's depth, active runs and pause flag (`QueueState.summary`)."""
    r = recorder()

    def go() -> None:
        r.set("tbml_training_queue_depth", summary.get("queued"))
        r.set("tbml_training_queue_active", summary.get("active"))
        r.set("tbml_training_queue_paused", _flag(summary.get("paused")))

    r.guard(go)


def record_training_run(job: Any) -> None:
    """One finished job: counted by outcome; its run's duration when it started."""
    r = recorder()

    def go() -> None:
        model, outcome = str(job.model_type), str(job.status)
        r.inc("tbml_training_runs_total", 1, model=model, outcome=outcome)
        if job.started_at is not None and job.finished_at is not None:
            r.observe("tbml_training_run_duration_seconds", max(0, job.finished_at - job.started_at) / 1000,
                      model=model, outcome=outcome)

    r.guard(go)


def record_live(pair: str, models: dict[str, dict[str, Any]], production: dict[str, Any], now: int) -> None:
    """The accuracy monitor's numbers of one pair (its live document's `models`) and model ages."""
    r = recorder()

    def go() -> None:
        for mt, entry in models.items():
            tags = {"pair": pair, "model": mt}
            r.set("tbml_live_accuracy", entry.get("accuracy"), **tags)
            r.set("tbml_live_brier", entry.get("brier"), **tags)
            r.set("tbml_live_baseline_brier", entry.get("baselineBrier"), **tags)
            r.set("tbml_live_base_rate", entry.get("baseRate"), **tags)
            r.set("tbml_live_resolved", entry.get("n") or 0, **tags)
            r.set("tbml_live_degraded", _flag(entry.get("degraded")), **tags)
        for mt, prod in production.items():
            age = prod.age_ms(now) if prod is not None else None
            if age is not None:
                r.set("tbml_model_age_seconds", age / 1000, pair=pair, model=mt)

    r.guard(go)


def record_feed(status: dict[str, Any], now: int) -> None:
    """The market feed's per-pair status (`CandleFeed.status()["byPair"]`)."""
    r = recorder()

    def go() -> None:
        for pair, st in (status.get("byPair") or {}).items():
            r.set("tbml_feed_lag_bars", st.get("lagBars"), pair=pair)
            r.set("tbml_feed_stale", _flag(st.get("stale")), pair=pair)
            if st.get("lastCandle") is not None:
                r.set("tbml_feed_last_candle_timestamp_seconds", int(st["lastCandle"]) / 1000, pair=pair)
            if st.get("lastClose") is not None:
                r.set("tbml_feed_lag_seconds", max(0, now - int(st["lastClose"])) / 1000, pair=pair)

    r.guard(go)


def record_feed_of(feed: Any) -> None:
    """`record_feed` of a `ml.data.feed.CandleFeed` now (its status is read inside the guard)."""
    r = recorder()

    def go() -> None:
        now = int(feed.clock())
        record_feed(feed.status(now), now)

    r.guard(go)


def record_storage(stats: dict[str, Any]) -> None:
    """Bytes per category of `Storage.stats()` (and the quarantine)."""
    r = recorder()

    def go() -> None:
        for cat, c in (stats.get("categories") or {}).items():
            r.set("tbml_storage_bytes", c.get("bytes") or 0, category=cat)
        r.set("tbml_storage_bytes", (stats.get("quarantine") or {}).get("bytes") or 0, category="quarantine")

    r.guard(go)


def record_supervisor(doc: Any) -> None:
    """The supervisor document (`cluster.ops.supervisor` publishes it through the Storage actor)."""
    r = recorder()

    def go() -> None:
        if not isinstance(doc, dict):
            return
        down = set(doc.get("down") or []) | set(doc.get("gaveUp") or [])
        for piece, n in (doc.get("restarts") or {}).items():
            r.set("tbml_supervisor_restarts", int(n or 0), piece=piece)
            r.set("tbml_supervisor_down", _flag(piece in down), piece=piece)

    r.guard(go)


__all__ = ["BY_NAME", "CATALOG", "COUNTER", "EXPORT_PREFIX", "GAUGE", "HISTOGRAM", "SIGNAL_VALUES", "MetricDef",
           "Recorder",
           "exported_names", "record_feed", "record_feed_of", "record_live", "record_queue", "record_storage",
           "record_supervisor", "record_training_run", "recorder"]
