"""The metrics files under deploy/ agree with the code: every metric the Grafana dashboard and the
Prometheus alert rules reference is one `actors.metrics.CATALOG` defines (as Ray exports it), the
rules file has Prometheus' rule-group shape, the dashboard is valid JSON, and docs/metrics.md
describes every metric. No cluster: the files are read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from actors.metrics import CATALOG, COUNTER, EXPORT_PREFIX, GAUGE, HISTOGRAM, exported_names

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "tbml-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "tbml-alerts.yml"
DOC = REPO / "docs" / "metrics.md"
NAME = re.compile(r"tbml_[a-z_]+")
EXPORTED = set().union(*(exported_names(m) for m in CATALOG))


def _referenced(text: str) -> set[str]:
    """Metric names in PromQL (loosely: every tbml_... word), as Ray's export spells them."""
    return {EXPORT_PREFIX + n if not n.startswith(EXPORT_PREFIX) else n
            for n in (m.group(0) for m in NAME.finditer(text))}


def _exprs_of_dashboard(dash: dict) -> list[str]:
    out: list[str] = []
    for panel in dash["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
        for inner in panel.get("panels", []):
            out += [t["expr"] for t in inner.get("targets", [])]
    out += [json.dumps(v.get("query")) for v in dash.get("templating", {}).get("list", [])]
    return out


def test_the_catalog_follows_the_prometheus_conventions():
    names = [m.name for m in CATALOG]
    assert len(names) == len(set(names))
    for m in CATALOG:
        assert re.fullmatch(r"tbml_[a-z_]+", m.name), m.name
        assert m.kind in (COUNTER, GAUGE, HISTOGRAM)
        assert (m.kind == COUNTER) == m.name.endswith("_total"), m.name  # counters and only counters
        if m.kind == HISTOGRAM:
            assert m.name.endswith("_seconds") and list(m.buckets) == sorted(m.buckets) and m.buckets
        assert "_ms" not in m.name and "milli" not in m.name  # base units
        assert len(m.labels) <= 5 and not {"version", "job_id", "jobId", "ts"} & set(m.labels)  # low cardinality
        assert m.description and m.where in ("actors.metrics", "deployments.metrics")


def test_exported_names_are_what_ray_prints():
    by = {m.name: m for m in CATALOG}
    assert exported_names(by["tbml_predictions_total"]) == {"ray_tbml_predictions_total"}
    assert exported_names(by["tbml_redis_degraded"]) == {"ray_tbml_redis_degraded"}
    assert exported_names(by["tbml_prediction_latency_seconds"]) == {
        "ray_tbml_prediction_latency_seconds_bucket", "ray_tbml_prediction_latency_seconds_sum",
        "ray_tbml_prediction_latency_seconds_count"}


def test_the_dashboard_is_valid_json_and_references_only_defined_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["panels"], list) and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = _exprs_of_dashboard(dash)
    used = set().union(*(_referenced(e) for e in exprs))
    assert used and used <= EXPORTED, sorted(used - EXPORTED)
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["gridPos"]["w"] <= 24, panel["title"]
    # what it is there for: signal, live accuracy against the base rate, latency, cache, queue, feed lag
    for name in ("ray_tbml_prediction_signal", "ray_tbml_live_accuracy", "ray_tbml_live_base_rate",
                 "ray_tbml_live_baseline_brier", "ray_tbml_prediction_latency_seconds_bucket",
                 "ray_tbml_cache_hits_total", "ray_tbml_training_queue_depth", "ray_tbml_feed_lag_bars"):
        assert name in used, name


def test_the_alert_rules_have_the_rule_group_shape_and_defined_metrics():
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    alerts: dict[str, dict] = {}
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert isinstance(rule["alert"], str) and isinstance(rule["expr"], str)
            assert rule["annotations"]["summary"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["for"]
            assert rule["alert"] not in alerts
            alerts[rule["alert"]] = rule
            used = _referenced(rule["expr"] + json.dumps(rule["annotations"]))
            assert used and used <= EXPORTED, (rule["alert"], sorted(used - EXPORTED))
    exprs = {name: r["expr"] for name, r in alerts.items()}
    # degraded model, feed lag, Redis degraded, training failures
    assert any("ray_tbml_live_degraded" in e for e in exprs.values())
    assert any("ray_tbml_feed_stale" in e or "ray_tbml_feed_lag_bars" in e for e in exprs.values())
    assert any("ray_tbml_redis_degraded" in e for e in exprs.values())
    assert any('outcome="failed"' in e for e in exprs.values())


@pytest.mark.parametrize("metric", CATALOG, ids=lambda m: m.name)
def test_docs_describe_every_metric(metric):
    text = DOC.read_text()
    row = next((line for line in text.splitlines() if line.startswith(f"| `{EXPORT_PREFIX}{metric.name}`")), None)
    assert row is not None, f"docs/metrics.md has no table row for {EXPORT_PREFIX}{metric.name}"
    assert metric.kind in row
    for label in metric.labels:
        assert f"`{label}`" in row, (metric.name, label)


def test_a_failing_recording_is_swallowed_and_logged_once(caplog):
    """Ray's own metric classes, outside a cluster: a wrong tag set raises in Ray; the recorder never
    passes it on and says so once; disabled, it creates nothing."""
    import logging

    from actors.metrics import Recorder

    rec = Recorder(enabled=True)
    with caplog.at_level(logging.WARNING, logger="actors.metrics"):
        rec.inc("tbml_training_runs_total", 1, model="lstm")  # no outcome: Ray refuses it
        rec.inc("tbml_training_runs_total", 1, model="lstm")
        rec.set("tbml_feed_lag_bars", 1, pair="BTC")
        rec.guard(lambda: 1 / 0)
    assert len(caplog.records) == 1 and "Missing value" in caplog.records[0].message

    off = Recorder(enabled=False)
    off.inc("tbml_predictions_total", 1, pair="BTC")
    off.set("tbml_feed_lag_bars", 1, pair="BTC")
    assert off._metrics == {}
