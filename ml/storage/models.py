"""Model versions on disk: weight files plus a checksummed `meta.json`, and a production pointer.

A version directory `models/{PAIR}/{model_type}/{version}/` becomes visible only when its meta.json
exists, and meta.json is written last, with the SHA-256 and size of every file. So a reader never
sees a half-written version, and `read_model_file` detects a damaged weight file.

Deleting a version first renames its directory to a temp name (the version disappears at once),
then removes it; an interrupted delete leaves only a temp directory that `doctor --repair` removes.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ml.clock import now_ms
from ml.storage.atomic import (
    TMP_MARK,
    ChecksumError,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    is_temp_file,
    read_json_document,
    sha256_hex,
)
from ml.storage.paths import check_model_type, check_pair, check_version, safe_path

log = logging.getLogger(__name__)

META_NAME = "meta.json"
PRODUCTION_NAME = "production.json"
PROMOTION_HISTORY = 50


class VersionExistsError(FileExistsError):
    """A different version with this id already exists (versions are immutable)."""


class ProductionVersionError(ValueError):
    """The operation would remove the production version."""


class VersionNotFoundError(FileNotFoundError):
    """No complete version with this id."""


class ModelStore:
    def __init__(self, data_dir: Path, *, writable: bool = True) -> None:
        self._root = Path(data_dir)
        self.writable = writable

    # ---- paths ------------------------------------------------------------------------------
    def version_dir(self, pair: str, model_type: str, version: str) -> Path:
        return safe_path(self._root, "models", pair=pair, model_type=model_type, version=version)

    def type_dir(self, pair: str, model_type: str) -> Path:
        return safe_path(self._root, "models", pair=pair, model_type=model_type)

    def production_path(self, pair: str, model_type: str) -> Path:
        return safe_path(self._root, "models", pair=pair, model_type=model_type, name=PRODUCTION_NAME)

    def model_keys(self) -> list[tuple[str, str]]:
        """Every (pair, model_type) that has a directory."""
        base = self._root / "models"
        out = []
        if not base.is_dir():
            return out
        for pdir in sorted(base.iterdir()):
            try:
                pair = check_pair(pdir.name)
            except ValueError:
                continue
            if not pdir.is_dir():
                continue
            for tdir in sorted(pdir.iterdir()):
                try:
                    mt = check_model_type(tdir.name)
                except ValueError:
                    continue
                if tdir.is_dir():
                    out.append((pair, mt))
        return out

    def version_ids(self, pair: str, model_type: str) -> list[str]:
        """Ids of the version directories (complete or not), temp directories excluded."""
        d = self.type_dir(pair, model_type)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            if not p.is_dir() or is_temp_file(p):
                continue
            try:
                out.append(check_version(p.name))
            except ValueError:
                continue
        return out

    # ---- write --------------------------------------------------------------------------------
    def save_version(self, pair: str, model_type: str, version: str, meta: dict[str, Any],
                     files: dict[str, bytes]) -> dict[str, Any]:
        self._require_writable()
        if not isinstance(meta, dict):
            raise ValueError("meta must be a dict")
        if not isinstance(files, dict):
            raise ValueError("files must be a dict of name -> bytes")
        vdir = self.version_dir(pair, model_type, version)
        paths = {}
        for name, data in files.items():
            if name in (META_NAME,):
                raise ValueError(f"{META_NAME} is reserved for the version's metadata")
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ValueError(f"file {name!r} must be bytes, not {type(data).__name__}")
            paths[name] = safe_path(self._root, "models", pair=pair, model_type=model_type,
                                    version=version, name=name)
        digests = {name: {"sha256": sha256_hex(bytes(data)), "bytes": len(data)} for name, data in files.items()}
        existing = self.get_meta(pair, model_type, version)
        if existing is not None:
            if existing.get("files") == digests:
                return existing  # same content saved again (e.g. a retried call): nothing to do
            raise VersionExistsError(f"version {version!r} of {pair}/{model_type} already exists")
        for name, data in files.items():
            atomic_write_bytes(paths[name], bytes(data))
        full = dict(meta)
        full.update({"pair": pair, "modelType": model_type, "version": version, "files": digests,
                     "savedAt": now_ms()})
        atomic_write_json(vdir / META_NAME, full)  # last: the version is visible only when complete
        return full

    def update_meta(self, pair: str, model_type: str, version: str, changes: dict[str, Any]) -> dict:
        """Merge fields into a version's meta (not `files`, `version`, `pair`, `modelType`)."""
        self._require_writable()
        meta = self.get_meta(pair, model_type, version)
        if meta is None:
            raise VersionNotFoundError(f"no version {version!r} of {pair}/{model_type}")
        protected = {"files", "version", "pair", "modelType", "savedAt"}
        meta.update({k: v for k, v in changes.items() if k not in protected})
        atomic_write_json(self.version_dir(pair, model_type, version) / META_NAME, meta)
        return meta

    def set_production(self, pair: str, model_type: str, version: str, reason: str = "") -> dict:
        self._require_writable()
        if self.get_meta(pair, model_type, version) is None:
            raise VersionNotFoundError(f"no complete version {version!r} of {pair}/{model_type}")
        current = self.get_production(pair, model_type)
        if current and current.get("version") == version and current.get("reason") == reason:
            return current  # already production for this reason (also makes retries harmless)
        now = now_ms()
        history = list((current or {}).get("history", []))
        history.append({"version": version, "promotedAt": now, "reason": reason})
        pointer = {"pair": pair, "modelType": model_type, "version": version, "promotedAt": now,
                   "reason": reason, "previous": (current or {}).get("version"),
                   "history": history[-PROMOTION_HISTORY:]}
        atomic_write_json(self.production_path(pair, model_type), pointer)
        return pointer

    def delete_version(self, pair: str, model_type: str, version: str) -> bool:
        """Remove a version (True) or report it absent (False); the production version is refused."""
        self._require_writable()
        vdir = self.version_dir(pair, model_type, version)
        prod = self.get_production(pair, model_type)
        if prod and prod.get("version") == version:
            raise ProductionVersionError(
                f"version {version!r} is the production version of {pair}/{model_type}; promote another first")
        if not vdir.is_dir():
            return False
        doomed = vdir.with_name(f"{version}{TMP_MARK}deleted-{uuid.uuid4().hex[:8]}")
        os.replace(vdir, doomed)
        fsync_dir(vdir.parent)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    # ---- read ---------------------------------------------------------------------------------
    def get_meta(self, pair: str, model_type: str, version: str) -> dict | None:
        path = self.version_dir(pair, model_type, version) / META_NAME
        try:
            meta = read_json_document(path, restore=self.writable)
        except FileNotFoundError:
            return None
        return meta if isinstance(meta, dict) else None

    def list_versions(self, pair: str, model_type: str) -> list[dict]:
        """Metadata of every complete version, newest first (by savedAt, then id)."""
        out = []
        for version in self.version_ids(pair, model_type):
            try:
                meta = self.get_meta(pair, model_type, version)
            except (ChecksumError, OSError) as exc:  # doctor reports it; others stay listable
                log.warning("skipping damaged version %s/%s/%s: %s", pair, model_type, version, exc)
                continue
            if meta is not None:
                out.append(meta)
        prod = self.get_production(pair, model_type)
        prod_version = prod.get("version") if prod else None
        for meta in out:
            meta["isProduction"] = meta.get("version") == prod_version
        out.sort(key=lambda m: (m.get("savedAt", 0), m.get("version", "")), reverse=True)
        return out

    def read_file(self, pair: str, model_type: str, version: str, name: str) -> bytes:
        path = safe_path(self._root, "models", pair=pair, model_type=model_type, version=version, name=name)
        meta = self.get_meta(pair, model_type, version)
        if meta is None:
            raise VersionNotFoundError(f"no complete version {version!r} of {pair}/{model_type}")
        entry = meta.get("files", {}).get(name)
        if entry is None:
            raise FileNotFoundError(f"version {version!r} of {pair}/{model_type} has no file {name!r}")
        data = path.read_bytes()
        if sha256_hex(data) != entry.get("sha256"):
            raise ChecksumError(f"{path}: checksum mismatch (file damaged)")
        return data

    def get_production(self, pair: str, model_type: str) -> dict | None:
        try:
            doc = read_json_document(self.production_path(pair, model_type), restore=self.writable)
        except FileNotFoundError:
            return None
        return doc if isinstance(doc, dict) else None

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError("this Storage is read-only (only the Storage actor writes)")
