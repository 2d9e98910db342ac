"""ml.storage.atomic: the one atomic-write implementation (checksums, backups, recovery)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ml.storage.atomic import (
    ChecksumError,
    atomic_write_bytes,
    atomic_write_json,
    backup_path,
    decode_json_document,
    encode_json_document,
    is_temp_file,
    read_json_document,
    sha256_hex,
    verify_json_document,
)


def test_atomic_write_bytes_returns_digest_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "sub" / "blob.bin"
    digest = atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert digest == sha256_hex(b"hello")
    assert [p.name for p in target.parent.iterdir()] == ["blob.bin"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch):
    target = tmp_path / "doc.bin"
    atomic_write_bytes(target, b"old")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if is_temp_file(p)]


@pytest.mark.parametrize("data", [{"a": 1, "b": [1.5, "x", None]}, [], "text", {"ü": "ñ ✓"}, 0])
def test_envelope_roundtrip_and_fast_path_agree_with_full_parse(data):
    raw = encode_json_document(data)
    assert decode_json_document(raw) == data
    assert verify_json_document(raw)
    # A document that is valid but not byte-identical to our encoding still verifies (slow path).
    loose = json.dumps({"data": data, "sha256": json.loads(raw)["sha256"]}, indent=1).encode()
    assert decode_json_document(loose) == data
    assert verify_json_document(loose)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_document_is_detected(damage: str):
    raw = bytearray(encode_json_document({"values": list(range(200))}))
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        i = len(raw) // 2
        raw[i] = ord("7") if raw[i] != ord("7") else ord("8")  # still valid JSON, wrong content
    elif damage == "empty":
        raw = bytearray()
    else:
        raw = bytearray(b"\x00\xff" * 50)
    assert not verify_json_document(bytes(raw))
    with pytest.raises(ChecksumError):
        decode_json_document(bytes(raw))


def test_backup_generation_and_recovery(tmp_path: Path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"v": 1})
    assert not backup_path(path).exists()
    atomic_write_json(path, {"v": 2})
    assert decode_json_document(backup_path(path).read_bytes()) == {"v": 1}
    # Backups are hard links (no copy), so the new version must not have touched the old inode.
    atomic_write_json(path, {"v": 3})
    assert decode_json_document(backup_path(path).read_bytes()) == {"v": 2}
    assert os.stat(path).st_ino != os.stat(backup_path(path)).st_ino

    path.write_bytes(path.read_bytes()[:10])  # truncated by a "disk problem"
    assert read_json_document(path, restore=False) == {"v": 2}
    assert not verify_json_document(path.read_bytes())  # restore=False never writes
    assert read_json_document(path) == {"v": 2}
    assert decode_json_document(path.read_bytes()) == {"v": 2}  # restored


def test_damaged_file_never_becomes_the_backup(tmp_path: Path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"v": 1})
    atomic_write_json(path, {"v": 2})
    path.write_bytes(b"{broken")
    atomic_write_json(path, {"v": 3})
    assert decode_json_document(backup_path(path).read_bytes()) == {"v": 1}


def test_both_damaged_raises_and_missing_raises(tmp_path: Path):
    path = tmp_path / "x.json"
    with pytest.raises(FileNotFoundError):
        read_json_document(path)
    atomic_write_json(path, {"v": 1})
    atomic_write_json(path, {"v": 2})
    path.write_bytes(b"junk")
    backup_path(path).write_bytes(b"junk")
    with pytest.raises(ChecksumError):
        read_json_document(path)


def test_link_fallback_copies_when_hard_links_fail(tmp_path: Path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"v": 1})

    def no_links(*_a, **_k):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    atomic_write_json(path, {"v": 2})
    assert decode_json_document(backup_path(path).read_bytes()) == {"v": 1}
    assert not [p for p in tmp_path.iterdir() if is_temp_file(p)]


def test_concurrent_reader_never_sees_a_partial_file(tmp_path: Path):
    import threading

    path = tmp_path / "doc.json"
    atomic_write_json(path, {"v": 0, "blob": "x" * 200_000})
    stop = threading.Event()
    seen: list[int] = []
    errors: list[Exception] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(decode_json_document(path.read_bytes())["v"])  # the file itself, no fallback
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    th = threading.Thread(target=reader)
    th.start()
    try:
        for v in range(1, 60):
            atomic_write_json(path, {"v": v, "blob": str(v) * 200_000}, fsync=False)
    finally:
        stop.set()
        th.join()
    assert not errors
    assert seen == sorted(seen) and len(seen) > 1
