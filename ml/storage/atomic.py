"""Atomic, verified file writes: the only way this project puts bytes on the shared volume.

Protocol for every write: temp file in the same directory -> write + flush + fsync -> re-read and
compare the SHA-256 -> os.replace onto the target -> fsync the directory. A reader therefore sees
either the old file or the new one, never a partial file, even if the writer is SIGKILLed.

JSON documents are stored in an envelope {"sha256": <hex of the canonical payload>, "data": ...}
and keep one backup generation (`<name>.bak`), so a corrupted file is detected on load and the
previous good version restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
BACKUP_SUFFIX = ".bak"


class ChecksumError(ValueError):
    """A file's content does not match its recorded checksum (corrupt or truncated)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True, verify: bool = True) -> str:
    """Write `data` to `path` atomically; return its SHA-256 hex digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = sha256_hex(data)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{path.name}{TMP_MARK}", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        if verify and sha256_hex(tmp.read_bytes()) != digest:
            raise ChecksumError(f"verification of {tmp} failed after write")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return digest


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode_json_document(data: Any) -> bytes:
    """The on-disk bytes of a JSON document: payload plus its checksum."""
    payload = _canonical(data)
    return b'{"sha256":"' + sha256_hex(payload).encode() + b'","data":' + payload + b"}"


_ENVELOPE_HEAD = b'{"sha256":"'
_ENVELOPE_MID = b'","data":'
_HEAD_LEN = len(_ENVELOPE_HEAD) + 64 + len(_ENVELOPE_MID)


def _split_envelope(raw: bytes) -> tuple[str, bytes] | None:
    """(recorded digest, payload bytes) when `raw` has exactly the layout encode_json_document writes."""
    if (len(raw) > _HEAD_LEN and raw.startswith(_ENVELOPE_HEAD) and raw.endswith(b"}")
            and raw[_HEAD_LEN - len(_ENVELOPE_MID):_HEAD_LEN] == _ENVELOPE_MID):
        try:
            digest = raw[len(_ENVELOPE_HEAD):len(_ENVELOPE_HEAD) + 64].decode("ascii")
        except UnicodeDecodeError:
            return None
        return digest, raw[_HEAD_LEN:-1]
    return None


def verify_json_document(raw: bytes) -> bool:
    """True when `raw` is an intact checksummed document. Cheap for files this module wrote: the digest
    is checked over the raw payload bytes, without parsing or re-serialising the JSON."""
    parts = _split_envelope(raw)
    if parts is not None and sha256_hex(parts[1]) == parts[0]:
        return True
    try:
        decode_json_document(raw)
    except ChecksumError:
        return False
    return True


def decode_json_document(raw: bytes) -> Any:
    """Parse and verify an envelope; raise ChecksumError on any damage."""
    parts = _split_envelope(raw)
    if parts is not None and sha256_hex(parts[1]) == parts[0]:
        # Fast path: the payload bytes are exactly the ones that were hashed.
        try:
            return json.loads(parts[1])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # pragma: no cover - hash matched
            raise ChecksumError(f"not valid JSON: {exc}") from exc
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChecksumError(f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or "sha256" not in doc or "data" not in doc:
        raise ChecksumError("not a checksummed document")
    if sha256_hex(_canonical(doc["data"])) != doc["sha256"]:
        raise ChecksumError("checksum mismatch")
    return doc["data"]


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def _link_backup(path: Path, bak: Path) -> None:
    """Make `bak` another name of `path`'s current inode (no data copied): link to a temp name, then
    rename over the backup, so the backup, too, is always either the old or the new one."""
    fd, tmp_name = tempfile.mkstemp(prefix=f"{bak.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        os.link(path, tmp)
        os.replace(tmp, bak)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any, *, backup: bool = True, fsync: bool = True) -> str:
    """Write a checksummed JSON document; the current good version becomes the backup first.

    The backup is a hard link to the current file (the new version goes to a new inode by rename, so
    the link keeps the old bytes); where hard links are not supported it is a verified copy. The one
    directory fsync after the final rename makes both renames durable.
    """
    path = Path(path)
    if backup and path.exists():
        try:
            current = path.read_bytes()
            if verify_json_document(current):  # only a verified document may become the backup
                try:
                    _link_backup(path, backup_path(path))
                except OSError:
                    atomic_write_bytes(backup_path(path), current, fsync=fsync, verify=False)
        except (ChecksumError, OSError):
            pass
    return atomic_write_bytes(path, encode_json_document(data), fsync=fsync)


def read_json_document(path: str | Path, *, restore: bool = True) -> Any:
    """Load a checksummed JSON document; on damage fall back to (and optionally restore) the backup.

    Raises FileNotFoundError when neither exists and ChecksumError when both are damaged.
    """
    path = Path(path)
    try:
        return decode_json_document(path.read_bytes())
    except (ChecksumError, FileNotFoundError) as first:
        bak = backup_path(path)
        if not bak.exists():
            raise first
        raw = bak.read_bytes()
        data = decode_json_document(raw)
        if restore:
            atomic_write_bytes(path, raw)
        return data


def is_temp_file(path: Path) -> bool:
    return TMP_MARK in path.name
