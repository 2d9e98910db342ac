"""Storage: documents, model versions and production pointer, training history, stats, cleanup, lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main as cli
from ml.storage import models as models_module
from ml.storage import store as store_module
from ml.storage.atomic import ChecksumError, backup_path
from ml.storage.models import ProductionVersionError, VersionExistsError, VersionNotFoundError
from ml.storage.store import Storage, StorageLockedError

HOUR_MS = 3_600_000


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    s = Storage(tmp_path / "data", flush_count=10, flush_seconds=3600, keep_versions=2)
    s.ensure_layout()
    return s


def test_documents_roundtrip_with_backup(storage: Storage):
    assert storage.get_document("queue", "state", default={"empty": True}) == {"empty": True}
    storage.put_document("queue", "state", {"queued": [1]})
    storage.put_document("queue", "state", {"queued": [1, 2]})
    assert storage.get_document("queue", "state") == {"queued": [1, 2]}
    path = storage.data_dir / "queue" / "state.json"
    assert backup_path(path).exists()
    storage.put_document("features", "latest", {"names": ["rsi"]}, pair="BTC")
    assert (storage.data_dir / "features" / "BTC" / "latest.json").exists()
    assert Storage.reader(storage.data_dir).get_document("features", "latest", pair="BTC") == {"names": ["rsi"]}
    with pytest.raises(ValueError, match="not JSON"):
        storage.put_document("queue", "bad", {"x": float("inf")})
    assert storage.delete_document("queue", "state") and not path.exists() and not backup_path(path).exists()


def test_model_versions_are_visible_only_when_complete(storage: Storage, monkeypatch):
    meta = storage.save_model_version("BTC", "lstm", "v1", {"metrics": {"brier": 0.24}},
                                      {"weights.pt": b"\x00" * 100, "scaler.json": b'{"mean": [0]}'})
    assert meta["files"]["weights.pt"]["bytes"] == 100 and meta["version"] == "v1"
    assert storage.read_model_file("BTC", "lstm", "v1", "scaler.json") == b'{"mean": [0]}'
    # Re-saving the same content is a no-op (a retried call); different content is refused.
    assert storage.save_model_version("BTC", "lstm", "v1", {}, {"weights.pt": b"\x00" * 100,
                                                                "scaler.json": b'{"mean": [0]}'}) == meta
    with pytest.raises(VersionExistsError):
        storage.save_model_version("BTC", "lstm", "v1", {}, {"weights.pt": b"other"})

    # A save that dies after the weights but before meta.json leaves an invisible version.
    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(models_module, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.save_model_version("BTC", "lstm", "v2", {}, {"weights.pt": b"w2"})
    monkeypatch.undo()
    assert [m["version"] for m in storage.list_versions("BTC", "lstm")] == ["v1"]
    assert storage.get_version_meta("BTC", "lstm", "v2") is None
    with pytest.raises(VersionNotFoundError):
        storage.read_model_file("BTC", "lstm", "v2", "weights.pt")
    storage.save_model_version("BTC", "lstm", "v2", {}, {"weights.pt": b"w2"})  # a retry completes it
    assert [m["version"] for m in storage.list_versions("BTC", "lstm")] == ["v2", "v1"]

    path = storage.data_dir / "models/BTC/lstm/v1/weights.pt"
    path.write_bytes(b"\x01" + path.read_bytes()[1:])
    with pytest.raises(ChecksumError):
        storage.read_model_file("BTC", "lstm", "v1", "weights.pt")
    with pytest.raises(FileNotFoundError):
        storage.read_model_file("BTC", "lstm", "v2", "scaler.json")


def test_production_pointer_history_and_delete_guard(storage: Storage):
    for v in ("v1", "v2", "v3"):
        storage.save_model_version("ETH", "gru", v, {}, {"weights.pt": v.encode()})
    with pytest.raises(VersionNotFoundError):
        storage.set_production("ETH", "gru", "v9", "nope")
    assert storage.get_production("ETH", "gru") is None
    storage.set_production("ETH", "gru", "v1", "first")
    p = storage.set_production("ETH", "gru", "v3", "better brier")
    assert p["version"] == "v3" and p["previous"] == "v1" and p["reason"] == "better brier"
    assert [h["version"] for h in p["history"]] == ["v1", "v3"]
    assert storage.set_production("ETH", "gru", "v3", "better brier") == p  # idempotent
    assert [m["isProduction"] for m in storage.list_versions("ETH", "gru")] == [True, False, False]
    with pytest.raises(ProductionVersionError):
        storage.delete_version("ETH", "gru", "v3")
    assert storage.delete_version("ETH", "gru", "v1") is True
    assert storage.delete_version("ETH", "gru", "v1") is False
    assert [m["version"] for m in storage.list_versions("ETH", "gru")] == ["v3", "v2"]
    assert storage.model_keys() == [("ETH", "gru")]


def test_training_history_upserts_by_job_and_is_bounded(tmp_path: Path):
    s = Storage(tmp_path / "data", history_limit=5)
    s.append_training_record({"jobId": "BTC_lstm_1", "status": "queued"})
    s.append_training_record({"jobId": "BTC_lstm_1", "status": "completed"})
    for i in range(7):
        s.append_training_record({"jobId": f"ETH_lstm_{i}", "status": "completed"})
    hist = s.training_history()
    assert len(hist) == 5
    assert [r["jobId"] for r in hist] == [f"ETH_lstm_{i}" for i in range(6, 1, -1)]
    assert s.training_history(limit=2) == hist[:2]


def test_stats_counts_and_bytes_per_category(storage: Storage):
    storage.save_model_version("BTC", "lstm", "v1", {}, {"weights.pt": b"w" * 1000, "scaler.json": b"{}"})
    storage.set_production("BTC", "lstm", "v1", "r")
    storage.append_training_record({"jobId": "j1"})
    storage.put_document("queue", "state", {"q": []})
    storage.put_document("features", "latest", {"f": [1]}, pair="BTC")
    (storage.data_dir / "candles" / "BTC").mkdir(parents=True)
    (storage.data_dir / "candles" / "BTC" / "5m.parquet").write_bytes(b"x" * 10)
    for i in range(13):
        storage.append_prediction({"pair": "BTC", "timestamp": i})
    st = storage.stats()
    cats = st["categories"]
    assert set(cats) == {"candles", "models", "weights", "training", "predictions", "features", "queue"}
    assert cats["models"]["count"] == 1 and cats["weights"]["count"] == 2
    assert cats["weights"]["bytes"] == 1002
    assert cats["candles"] == {"count": 1, "bytes": 10, "files": 1}
    assert cats["training"]["count"] == 1 and cats["queue"]["count"] == 1 and cats["features"]["count"] == 1
    assert cats["predictions"]["count"] == 13 and st["bufferedPredictions"] == 3
    assert cats["predictions"]["bytes"] > 0
    assert st["totalBytes"] == sum(c["bytes"] for c in cats.values())
    assert {f["category"] for f in st["files"]} == set(cats)
    assert storage.save()["savedCount"] == 3
    assert storage.stats()["bufferedPredictions"] == 0


def test_cleanup_removes_old_records_and_versions_never_production(storage: Storage, monkeypatch):
    now = store_module.now_ms()
    clock = {"t": now - 100 * HOUR_MS}
    monkeypatch.setattr(store_module, "now_ms", lambda: clock["t"])
    monkeypatch.setattr(models_module, "now_ms", lambda: clock["t"])
    for i in range(6):  # v0 (oldest) .. v5, each an hour apart, 100..95 hours ago
        storage.save_model_version("BTC", "lstm", f"v{i}", {}, {"weights.pt": b"w"})
        clock["t"] += HOUR_MS
    storage.set_production("BTC", "lstm", "v0", "the old one is still best")
    storage.append_training_record({"jobId": "old"})
    clock["t"] = now
    storage.save_model_version("BTC", "lstm", "v6", {}, {"weights.pt": b"w"})  # new
    storage.append_training_record({"jobId": "new"})
    # Predictions 50 h old and fresh ones, in the same segments (straddling) and in old-only ones.
    for i in range(25):
        storage.append_prediction({"pair": "ETH", "timestamp": now - 50 * HOUR_MS + i, "n": i})
    for i in range(15):
        storage.append_prediction({"pair": "ETH", "timestamp": now - 1000 + i, "n": 100 + i})
    assert storage.count_predictions("ETH") == 40

    with pytest.raises(ValueError):
        storage.cleanup(-1)
    result = storage.cleanup(24)
    assert result["predictions"] == 25 and result["trainingRecords"] == 1
    # keep_versions=2: v6, v5 kept; v4..v1 older than 24 h removed; v0 is production: kept.
    assert sorted(result["modelVersions"]) == [f"BTC/lstm/v{i}" for i in range(1, 5)]
    assert result["cleanedCount"] == 25 + 1 + 4
    assert [m["version"] for m in storage.list_versions("BTC", "lstm")] == ["v6", "v5", "v0"]
    assert [r["jobId"] for r in storage.training_history()] == ["new"]
    left = storage.query_predictions("ETH", limit=None)
    assert sorted(r["n"] for r in left) == list(range(100, 115))
    assert Storage.reader(storage.data_dir).count_predictions("ETH") == 15

    result = storage.cleanup(0)  # everything old enough, still never the production version
    assert [m["version"] for m in storage.list_versions("BTC", "lstm")] == ["v6", "v5", "v0"]
    assert storage.get_production("BTC", "lstm")["version"] == "v0"


def test_one_writer_per_data_dir(tmp_path: Path, capsys):
    data_dir = tmp_path / "data"
    actor_like = Storage(data_dir, writer_lock=True)
    with pytest.raises(StorageLockedError, match="another process"):
        Storage(data_dir, writer_lock=True)
    assert cli(["storage", "cleanup", "--max-age-hours", "1", "--data-dir", str(data_dir)]) == 1
    assert "being written by another process" in capsys.readouterr().err
    actor_like.close()
    assert cli(["storage", "cleanup", "--max-age-hours", "1", "--data-dir", str(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["cleanedCount"] == 0


def test_cli_stats_and_cleanup_validation(tmp_path: Path, capsys):
    data_dir = tmp_path / "data"
    s = Storage(data_dir)
    s.append_predictions([{"pair": "BTC", "timestamp": 1}])
    s.close()
    assert cli(["storage", "stats", "--data-dir", str(data_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["categories"]["predictions"]["count"] == 1 and "files" not in out
    assert cli(["storage", "stats", "--files", "--data-dir", str(data_dir)]) == 0
    assert len(json.loads(capsys.readouterr().out)["files"]) == 1
    for bad in ("-1", "nan", "inf", "abc"):
        assert cli(["storage", "cleanup", "--max-age-hours", bad, "--data-dir", str(data_dir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tbml: error:") and err.count("\n") == 1
    assert cli(["storage", "cleanup", "--data-dir", str(data_dir)]) == 2
    assert cli(["storage", "stats", "--data-dir", str(tmp_path / "nope")]) == 2
    capsys.readouterr()
    # Below one hour needs --force (ml.storage.retention); without it: exit 2, one line, nothing removed.
    for small in ("0", "0.5"):
        assert cli(["storage", "cleanup", "--max-age-hours", small, "--data-dir", str(data_dir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tbml: error:") and "--force" in err and err.count("\n") == 1
    assert Storage.reader(data_dir).count_predictions("BTC") == 1
    assert cli(["storage", "cleanup", "--max-age-hours", "0", "--force", "--data-dir", str(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"] == 1
