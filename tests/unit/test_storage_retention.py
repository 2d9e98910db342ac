"""Retention: the rule (ml.storage.retention) with fixed timestamps, and Storage.run_retention on a real
data directory — old records go, recent ones and every model version stay, stats shows what went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main as cli
from ml.storage.retention import (
    HOUR_MS,
    MaxAgeError,
    add_run,
    check_max_age_hours,
    empty_state,
    next_run_at,
    retention_cutoff,
    split_expired,
)
from ml.storage.store import TRAINING_HISTORY, Storage

NOW = 1_800_000_000_000  # a fixed "now" (epoch ms); nothing below reads the clock for the rule


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    s = Storage(tmp_path / "data", flush_count=1000, flush_seconds=3600, keep_versions=1,
                retention_hours=168, retention_interval_s=60)
    s.ensure_layout()
    return s


def test_cutoff_is_now_minus_hours_and_zero_keeps_forever():
    assert retention_cutoff(NOW, 168) == NOW - 168 * HOUR_MS
    assert retention_cutoff(NOW, 0.5) == NOW - HOUR_MS // 2
    assert retention_cutoff(NOW, 0) is None


def test_training_records_split_by_their_time():
    cutoff = NOW - 10
    records = [{"jobId": "a", "recordedAt": NOW - 11}, {"jobId": "b", "recordedAt": NOW - 10},
               {"jobId": "c", "completedAt": NOW}, {"jobId": "d"}]
    keep, removed = split_expired(records, cutoff)
    assert [r["jobId"] for r in keep] == ["b", "c"] and removed == 2  # exactly at the cutoff stays


def test_schedule_runs_at_once_the_first_time_then_every_interval():
    assert next_run_at(NOW, None, 60) == NOW
    assert next_run_at(NOW, NOW - 10_000, 60) == NOW + 50_000
    assert next_run_at(NOW, NOW + 5_000, 60) == NOW  # the clock went back: do not wait for the future
    state = add_run(empty_state(), {"at": NOW, "removed": {"predictions": 3, "trainingRecords": 1}})
    state = add_run(state, {"at": NOW + 1, "removed": {"predictions": 2, "trainingRecords": 0}})
    assert state["runs"] == 2 and state["lastRun"]["at"] == NOW + 1
    assert state["totalRemoved"] == {"predictions": 5, "trainingRecords": 1}


@pytest.mark.parametrize("value, force, ok", [
    (1, False, True), (168, False, True), (1_000_000, False, True), (0.99, False, False), (0, False, False),
    (0, True, True), (0.5, True, True), (-1, True, False), (float("nan"), True, False),
    (float("inf"), False, False), (1_000_001, True, False), (True, True, False), ("24", False, False),
    (None, False, False),
])
def test_explicit_cleanup_limit(value, force, ok):
    if ok:
        assert check_max_age_hours(value, force=force) == float(value)
    else:
        with pytest.raises(MaxAgeError) as info:
            check_max_age_hours(value, force=force)
        assert "\n" not in str(info.value) and "maxAgeHours" in str(info.value)


def test_run_retention_removes_only_records_past_the_cutoff(storage: Storage):
    cutoff = NOW - 168 * HOUR_MS
    # Predictions: on disk (one old-only segment, one straddling the cutoff) and still buffered.
    storage.append_predictions([{"pair": "BTC", "timestamp": cutoff - 1000 + i, "n": i} for i in range(5)])
    storage.flush()
    storage.append_predictions([{"pair": "BTC", "timestamp": cutoff - 2 + i, "n": 10 + i} for i in range(4)])
    storage.flush()
    storage.append_predictions([{"pair": "ETH", "timestamp": cutoff - 1, "n": 20},
                                {"pair": "ETH", "timestamp": NOW - 1, "n": 21}])  # buffered
    # Training records with fixed times (append_training_record stamps the wall clock).
    storage.put_document("training", TRAINING_HISTORY, [
        {"jobId": "old", "recordedAt": cutoff - 1}, {"jobId": "edge", "recordedAt": cutoff},
        {"jobId": "new", "recordedAt": NOW - HOUR_MS}])
    # Model versions, all far older than the cutoff, beyond keep_versions, one of them production.
    for v in ("v1", "v2", "v3"):
        storage.save_model_version("BTC", "lstm", v, {}, {"weights.pt": v.encode()})
    storage.set_production("BTC", "lstm", "v1", "test")

    run = storage.run_retention(now=NOW)
    assert run["enabled"] and run["at"] == NOW and run["cutoff"] == cutoff
    assert run["removed"] == {"predictions": 5 + 2 + 1, "trainingRecords": 1}
    assert sorted(r["n"] for r in storage.query_predictions("BTC", limit=None)) == [12, 13]
    assert [r["n"] for r in storage.query_predictions("ETH", limit=None)] == [21]
    assert [r["jobId"] for r in storage.training_history()] == ["new", "edge"]
    # Retention never prunes model versions (only an explicit cleanup does, never production).
    assert sorted(m["version"] for m in storage.list_versions("BTC", "lstm")) == ["v1", "v2", "v3"]
    assert storage.get_production("BTC", "lstm")["version"] == "v1"

    # An hour later the window has moved an hour: what sat at the old cutoff goes now; totals add up.
    again = storage.run_retention(now=NOW + HOUR_MS)
    assert again["removed"] == {"predictions": 2, "trainingRecords": 1}
    assert storage.count_predictions("BTC") == 0 and storage.count_predictions("ETH") == 1
    assert storage.flush() == 1  # what is left in the buffer
    status = storage.stats()["retention"]
    assert status["enabled"] and status["retentionHours"] == 168 and status["intervalS"] == 60
    assert status["runs"] == 2 and status["lastRun"]["at"] == NOW + HOUR_MS
    assert status["lastRun"]["cutoff"] == cutoff + HOUR_MS
    assert status["totalRemoved"] == {"predictions": 10, "trainingRecords": 2}
    assert status["lastError"] is None
    assert storage.retention_next_run_at(NOW + HOUR_MS) == NOW + HOUR_MS + 60_000
    assert storage.retention_next_run_at(NOW + 2 * HOUR_MS) == NOW + HOUR_MS + 60_000  # overdue: due


def test_retention_zero_keeps_everything(tmp_path: Path):
    s = Storage(tmp_path / "data", retention_hours=0)
    s.append_predictions([{"pair": "BTC", "timestamp": 1}])
    assert s.run_retention(now=NOW) == {"enabled": False, "retentionHours": 0.0}
    assert s.retention_next_run_at(NOW) is None
    assert s.count_predictions("BTC") == 1
    assert s.stats()["retention"]["enabled"] is False and s.stats()["retention"]["runs"] == 0
    with pytest.raises(ValueError, match="retention_interval_s"):
        Storage(tmp_path / "other", retention_interval_s=0)


def test_the_last_run_is_on_disk_for_readers_and_the_cli(storage: Storage, capsys):
    storage.append_predictions([{"pair": "BTC", "timestamp": 5}])
    storage.run_retention(now=NOW)
    assert storage.flush() == 0  # the emptied buffer of BTC left no empty segment to write
    storage.close()
    reader = Storage.reader(storage.data_dir)
    assert reader.stats()["retention"]["lastRun"]["removed"]["predictions"] == 1
    assert reader.retention_next_run_at(NOW + 1) == NOW + int(reader.retention_interval_s * 1000)
    assert cli(["storage", "stats", "--data-dir", str(storage.data_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)["retention"]
    assert shown["runs"] == 1 and shown["lastRun"]["at"] == NOW
    assert shown["lastRun"]["cutoff"] == NOW - 168 * HOUR_MS
    assert shown["totalRemoved"] == {"predictions": 1, "trainingRecords": 0}


def test_explicit_cleanup_takes_an_injected_now(storage: Storage):
    storage.append_predictions([{"pair": "BTC", "timestamp": NOW - 2 * HOUR_MS},
                                {"pair": "BTC", "timestamp": NOW - HOUR_MS // 2}])
    result = storage.cleanup(1, now=NOW)
    assert result["cutoff"] == NOW - HOUR_MS and result["predictions"] == 1
    with pytest.raises(ValueError):
        storage.cleanup(float("nan"), now=NOW)
    assert storage.count_predictions("BTC") == 1
