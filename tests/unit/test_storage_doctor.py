"""Corruption is detected by checksum and restored from backup; doctor reports and --repair fixes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cli import main as cli
from ml.storage.atomic import TMP_MARK, backup_path, decode_json_document
from ml.storage.store import Storage


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    s = Storage(tmp_path / "data", flush_count=5, flush_seconds=3600)
    s.ensure_layout()
    return s


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    i = len(raw) - 20
    raw[i] ^= 0x01
    path.write_bytes(bytes(raw))


def kinds(report: dict) -> list[str]:
    return sorted(p["kind"] for p in report["problems"])


def age(path: Path, seconds: float = 3600) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.mark.parametrize("damage", [truncate, flip])
def test_damaged_document_is_detected_restored_and_reported(storage: Storage, damage):
    storage.put_document("queue", "state", {"v": 1, "jobs": list(range(100))})
    storage.put_document("queue", "state", {"v": 2, "jobs": list(range(100))})
    path = storage.data_dir / "queue" / "state.json"
    damage(path)

    report = storage.doctor()
    assert not report["healthy"] and not report["ok"]
    [problem] = report["problems"]
    assert problem["kind"] == "checksum_mismatch" and problem["path"] == "queue/state.json"
    assert problem["fixable"] and not problem["fixed"]
    # A reader gets the backup's content but writes nothing.
    assert Storage.reader(storage.data_dir).get_document("queue", "state")["v"] == 1
    assert storage.doctor()["problemCount"] == 1

    fixed = storage.doctor(repair=True)
    assert fixed["ok"] and fixed["fixedCount"] == 1
    assert fixed["problems"][0]["action"] == "restored from backup"
    assert decode_json_document(path.read_bytes())["v"] == 1
    assert storage.doctor()["healthy"]


def test_writer_restores_on_load(storage: Storage):
    storage.put_document("training", "history", [{"jobId": "a"}])
    storage.put_document("training", "history", [{"jobId": "a"}, {"jobId": "b"}])
    path = storage.data_dir / "training" / "history.json"
    truncate(path)
    assert storage.training_history() == [{"jobId": "a"}]  # the backup generation
    assert decode_json_document(path.read_bytes()) == [{"jobId": "a"}]  # and the file is repaired


def test_orphan_temp_files_are_removed_only_when_old(storage: Storage):
    storage.put_document("queue", "state", {"v": 1})
    old_tmp = storage.data_dir / "queue" / f"state.json{TMP_MARK}abc123"
    old_tmp.write_bytes(b'{"sha256":"partial')
    age(old_tmp)
    young_tmp = storage.data_dir / "queue" / f"other.json{TMP_MARK}def456"
    young_tmp.write_bytes(b"being written")
    deleted_dir = storage.data_dir / "models" / "BTC" / "lstm" / f"v1{TMP_MARK}deleted-1"
    deleted_dir.mkdir(parents=True)
    (deleted_dir / "weights.pt").write_bytes(b"w")
    age(deleted_dir)

    report = storage.doctor()
    assert kinds(report) == ["orphan_temp", "orphan_temp"] and report["inFlightTemp"] == 1
    assert storage.stats()["tempFiles"] == 3
    fixed = storage.doctor(repair=True)
    assert fixed["ok"] and fixed["fixedCount"] == 2
    assert not old_tmp.exists() and not deleted_dir.exists() and young_tmp.exists()
    assert storage.get_document("queue", "state") == {"v": 1}


def test_document_without_good_backup_is_quarantined(storage: Storage):
    storage.put_document("features", "latest", {"f": 1}, pair="BTC")
    path = storage.data_dir / "features" / "BTC" / "latest.json"
    flip(path)
    report = storage.doctor(repair=True)
    assert kinds(report) == ["corrupt_document"] and report["ok"]
    assert not path.exists()
    assert list((storage.data_dir / "quarantine").rglob("latest.json"))
    assert storage.get_document("features", "latest", pair="BTC") is None
    assert storage.doctor()["healthy"]


def test_lost_document_restored_from_backup_and_bad_backup_removed(storage: Storage):
    storage.put_document("queue", "a", {"v": 1})
    storage.put_document("queue", "a", {"v": 2})
    storage.put_document("queue", "b", {"v": 1})
    storage.put_document("queue", "b", {"v": 2})
    (storage.data_dir / "queue" / "a.json").unlink()
    truncate(backup_path(storage.data_dir / "queue" / "b.json"))
    report = storage.doctor(repair=True)
    assert kinds(report) == ["corrupt_backup", "missing_document"] and report["ok"]
    assert storage.get_document("queue", "a") == {"v": 1}
    assert storage.get_document("queue", "b") == {"v": 2}
    assert storage.doctor()["healthy"]


def test_damaged_weights_quarantine_the_version_but_not_production(storage: Storage):
    for v in ("v1", "v2"):
        storage.save_model_version("BTC", "lstm", v, {}, {"weights.pt": os.urandom(256), "scaler.json": b"{}"})
    storage.set_production("BTC", "lstm", "v2", "best")
    flip(storage.data_dir / "models/BTC/lstm/v1/weights.pt")
    flip(storage.data_dir / "models/BTC/lstm/v2/weights.pt")
    report = storage.doctor(repair=True)
    assert kinds(report) == ["weight_checksum_mismatch", "weight_checksum_mismatch"]
    by_path = {p["path"]: p for p in report["problems"]}
    assert by_path["models/BTC/lstm/v1"]["fixed"]
    assert not by_path["models/BTC/lstm/v2"]["fixed"] and "production" in by_path["models/BTC/lstm/v2"]["detail"]
    assert not report["ok"] and report["remainingCount"] == 1
    assert [m["version"] for m in storage.list_versions("BTC", "lstm")] == ["v2"]


def test_corrupt_meta_and_incomplete_version(storage: Storage):
    storage.save_model_version("ETH", "lstm", "v1", {}, {"weights.pt": b"w"})
    flip(storage.data_dir / "models/ETH/lstm/v1/meta.json")  # no backup: meta is written once
    half = storage.data_dir / "models/ETH/lstm/v2"
    half.mkdir()
    (half / "weights.pt").write_bytes(b"w")
    age(half)
    report = storage.doctor(repair=True)
    assert kinds(report) == ["corrupt_document", "incomplete_version"] and report["ok"]
    assert storage.list_versions("ETH", "lstm") == []
    assert storage.doctor()["healthy"]


def test_damaged_prediction_segment(storage: Storage):
    for i in range(10):
        storage.append_prediction({"pair": "BTC", "timestamp": i})
    seg = sorted(storage.predictions.pair_dir("BTC").iterdir())[0]
    truncate(seg)
    report = storage.doctor(repair=True)
    assert kinds(report) == ["corrupt_document"] and report["ok"]
    assert storage.count_predictions("BTC") == 5
    assert len(storage.query_predictions("BTC", limit=None)) == 5


def test_candles_must_open_and_missing_dirs_are_created(storage: Storage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = storage.data_dir / "candles" / "BTC" / "5m.parquet"
    good.parent.mkdir(parents=True)
    pq.write_table(pa.table({"ts": [1, 2], "close": [1.0, 2.0]}), good)
    bad = storage.data_dir / "candles" / "ETH" / "5m.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(good.read_bytes()[:-12])
    (storage.data_dir / "features").rmdir()
    report = storage.doctor(repair=True)
    assert kinds(report) == ["corrupt_candles", "missing_dir"] and report["ok"]
    assert good.exists() and not bad.exists() and (storage.data_dir / "features").is_dir()
    assert storage.doctor()["healthy"]


def test_cli_doctor_exit_codes(storage: Storage, capsys):
    data = str(storage.data_dir)
    storage.put_document("queue", "state", {"v": 1})
    storage.put_document("queue", "state", {"v": 2})
    assert cli(["storage", "doctor", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["healthy"]
    flip(storage.data_dir / "queue" / "state.json")
    tmp = storage.data_dir / "queue" / f"x{TMP_MARK}1"
    tmp.write_bytes(b"partial")
    assert cli(["storage", "doctor", "--data-dir", data, "--temp-grace-seconds", "0"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert kinds(report) == ["checksum_mismatch", "orphan_temp"]
    assert tmp.exists()  # no --repair: nothing touched
    assert cli(["storage", "doctor", "--repair", "--data-dir", data, "--temp-grace-seconds", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["fixedCount"] == 2
    assert not tmp.exists()
    assert cli(["storage", "doctor", "--data-dir", data]) == 0
    capsys.readouterr()
    assert cli(["storage", "doctor", "--data-dir", data, "--temp-grace-seconds", "-1"]) == 2


def test_a_fresh_synth_directory_is_healthy(tmp_path: Path, capsys):
    """`tbml data synth` makes candles/ only; the other category directories are created on first write,
    so their absence is not a problem (doctor lists them, --repair creates them)."""
    data = str(tmp_path / "data")
    assert cli(["data", "synth", "--pairs", "BTC,ETH", "--bars", "300", "--seed", "3", "--data-dir", data]) == 0
    capsys.readouterr()
    assert cli(["storage", "doctor", "--data-dir", data]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] and report["ok"] and report["problems"] == [] and report["problemCount"] == 0
    assert report["checked"]["candleFiles"] == 2
    assert sorted(report["absentCategories"]) == ["features", "models", "predictions", "queue", "training"]
    assert not (tmp_path / "data" / "models").exists()  # a check creates nothing
    assert cli(["storage", "doctor", "--repair", "--data-dir", data]) == 0
    report = json.loads(capsys.readouterr().out)
    assert kinds(report) == ["missing_dir"] * 5 and report["healthy"] and report["fixedCount"] == 5
    assert (tmp_path / "data" / "models").is_dir()
    assert cli(["storage", "doctor", "--data-dir", data]) == 0
    assert json.loads(capsys.readouterr().out)["absentCategories"] == []


def test_real_problems_are_still_found_next_to_absent_directories(tmp_path: Path, capsys):
    data_dir = tmp_path / "data"
    assert cli(["data", "synth", "--pairs", "BTC", "--bars", "300", "--data-dir", str(data_dir)]) == 0
    candles = next((data_dir / "candles").rglob("*.parquet"))
    candles.write_bytes(candles.read_bytes()[:-12])
    (data_dir / "queue").write_text("a file where the queue directory belongs")
    capsys.readouterr()
    assert cli(["storage", "doctor", "--data-dir", str(data_dir)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert kinds(report) == ["corrupt_candles", "not_a_directory"] and not report["healthy"]
    assert "queue" not in report["absentCategories"]
    # No data directory at all is bad input, not a healthy directory.
    for extra in ([], ["--repair"]):
        assert cli(["storage", "doctor", "--data-dir", str(tmp_path / "nope"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tbml: error: no data directory") and err.count("\n") == 1
    assert not (tmp_path / "nope").exists()
