"""`tbml storage doctor [--repair]`: find (and fix) what is wrong under the data directory.

Checks, in order:
- category directories: one that does not exist yet is healthy (Storage creates it on first write;
  `tbml data synth` makes only candles/), listed under `absentCategories`; repair creates them and
  lists each as a fixed `missing_dir` entry, which does not make the directory unhealthy;
- orphan temp files/directories left by an interrupted write or delete, older than a grace period
  so a write in progress is not mistaken for one (repair: remove);
- every checksummed JSON document (features, training, queue, model meta and production pointers,
  prediction segments): damaged -> restored from its backup when that is intact, else moved to
  `quarantine/`; a backup whose document is missing -> restored; a damaged backup -> removed;
- model versions: a directory without meta.json (an interrupted save) -> quarantined; a weight file
  whose SHA-256 differs from meta.json, or is missing -> the version is quarantined unless it is the
  production version (then the problem remains: retrain or roll back); a production pointer to a
  version that does not exist is reported;
- candle files: each parquet file must open with pyarrow (repair: quarantine).

Nothing is deleted that holds data: what cannot be restored is moved to
`quarantine/{stamp}/{original relative path}`.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from ml.clock import now_ms
from ml.storage.atomic import (
    BACKUP_SUFFIX,
    ChecksumError,
    atomic_write_bytes,
    backup_path,
    is_temp_file,
    read_json_document,
    sha256_hex,
    verify_json_document,
)
from ml.storage.models import META_NAME, PRODUCTION_NAME, ModelStore
from ml.storage.paths import CATEGORIES, DOCUMENT_CATEGORIES, QUARANTINE_DIR, WRITER_LOCK_NAME
from ml.storage.predictions.segments import SEGMENT_RE


def is_document(rel: Path) -> bool:
    """Whether a file (relative to the data directory) is a checksummed JSON document."""
    top = rel.parts[0]
    if top in DOCUMENT_CATEGORIES:
        return rel.suffix == ".json"
    if top == "models":  # weight files such as scaler.json are plain files, checked against meta
        return rel.name in (META_NAME, PRODUCTION_NAME)
    if top == "predictions":
        return SEGMENT_RE.fullmatch(rel.name) is not None
    return False


class _Doctor:
    def __init__(self, root: Path, models: ModelStore, repair: bool, temp_grace_seconds: float) -> None:
        self.root = root
        self.models = models
        self.repair = repair
        self.grace = temp_grace_seconds
        self.now = time.time()
        self.stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.problems: list[dict[str, Any]] = []
        self.checked = {"documents": 0, "modelVersions": 0, "weightFiles": 0, "candleFiles": 0}
        self.absent: list[str] = []
        self.in_flight = 0
        self.lost_versions: set[Path] = set()
        self.settled: dict[Path, bool] = {}

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def problem(self, kind: str, path: Path, detail: str, *, fixable: bool, fix=None, action: str = "") -> None:
        entry: dict[str, Any] = {"kind": kind, "path": self.rel(path), "detail": detail,
                                 "fixable": fixable, "fixed": False}
        if self.repair and fixable and fix is not None:
            try:
                fix()
                entry["fixed"] = True
                entry["action"] = action
            except (OSError, ChecksumError) as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
        self.problems.append(entry)

    def quarantine(self, path: Path) -> None:
        dest = self.root / QUARANTINE_DIR / self.stamp / path.relative_to(self.root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)

    def old_enough(self, path: Path) -> bool:
        try:
            return self.now - path.lstat().st_mtime >= self.grace
        except FileNotFoundError:
            return False

    # ---- checks ---------------------------------------------------------------------------------
    def check_dirs(self) -> None:
        for cat in CATEGORIES:
            d = self.root / cat
            if d.is_dir():
                continue
            if d.exists() or d.is_symlink():  # a file (or dangling link) where a directory belongs
                self.problem("not_a_directory", d, f"{cat} is not a directory (move it away)", fixable=False)
            elif self.repair:
                self.problem("missing_dir", d, f"category directory {cat}/ did not exist yet", fixable=True,
                             fix=lambda d=d: d.mkdir(parents=True, exist_ok=True), action="created")
            else:
                self.absent.append(cat)

    def walk(self) -> list[Path]:
        """Every regular file outside quarantine and temp items; temp items are handled here."""
        files: list[Path] = []
        if not self.root.is_dir():
            return files
        stack = [self.root]
        while stack:
            d = stack.pop()
            try:
                entries = sorted(d.iterdir())
            except FileNotFoundError:
                continue
            for p in entries:
                if d == self.root and p.name in (QUARANTINE_DIR, WRITER_LOCK_NAME):
                    continue
                if is_temp_file(p):
                    self.check_temp(p)
                elif p.is_dir() and not p.is_symlink():
                    stack.append(p)
                elif p.is_file():
                    files.append(p)
        return files

    def check_temp(self, p: Path) -> None:
        if not self.old_enough(p):
            self.in_flight += 1
            return

        def remove(p: Path = p) -> None:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

        self.problem("orphan_temp", p, "temp file left by an interrupted write", fixable=True,
                     fix=remove, action="removed")

    def check_document(self, path: Path) -> None:
        self.checked["documents"] += 1
        bak = backup_path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        if verify_json_document(raw):
            if bak.exists() and not verify_json_document(_read_or_empty(bak)):
                self.problem("corrupt_backup", bak, "backup fails its checksum (the document is fine)",
                             fixable=True, fix=lambda: bak.unlink(missing_ok=True), action="removed")
            return
        bak_raw = _read_or_empty(bak) or None
        if bak_raw is not None and verify_json_document(bak_raw):
            self.problem("checksum_mismatch", path, "document fails its checksum; its backup is intact",
                         fixable=True, fix=lambda: atomic_write_bytes(path, bak_raw),
                         action="restored from backup")
            return

        rel = path.relative_to(self.root)
        if rel.parts[0] == "models" and path.name == META_NAME:
            # Without its meta a version's weights cannot be verified: the whole version goes.
            vdir = path.parent
            is_prod = self.production_version(vdir.parent) == vdir.name
            self.problem("corrupt_document", path, "version metadata fails its checksum and has no intact "
                         "backup" + (" — this is the production version: retrain or roll back" if is_prod
                                     else " (repair moves the version to quarantine)"),
                         fixable=not is_prod, fix=lambda: self.quarantine(vdir), action="quarantined version")
            self.lost_versions.add(vdir)
            return

        def lose() -> None:
            self.quarantine(path)
            if bak.exists():
                self.quarantine(bak)

        self.problem("corrupt_document", path, "document fails its checksum and has no intact backup "
                     "(repair moves it to quarantine: its data is lost)", fixable=True, fix=lose,
                     action="quarantined")

    def production_version(self, type_dir: Path) -> str | None:
        """The production version id of `models/{PAIR}/{model_type}/` (read only, never restored)."""
        try:
            doc = read_json_document(type_dir / PRODUCTION_NAME, restore=False)
        except (FileNotFoundError, ChecksumError):
            return None
        return doc.get("version") if isinstance(doc, dict) else None

    def check_orphan_backup(self, bak: Path) -> None:
        main = bak.with_name(bak.name[: -len(BACKUP_SUFFIX)])
        if main.exists() or not bak.exists():  # (a repair may have moved it meanwhile)
            return
        raw = _read_or_empty(bak)
        if not raw and not bak.exists():
            return
        if verify_json_document(raw):
            self.problem("missing_document", main, "document is missing; its backup is intact",
                         fixable=True, fix=lambda: atomic_write_bytes(main, raw),
                         action="restored from backup")
        else:
            self.problem("corrupt_backup", bak, "backup of a missing document fails its checksum",
                         fixable=True, fix=lambda: self.quarantine(bak), action="quarantined")

    def check_models(self) -> None:
        models = self.models
        for pair, mt in models.model_keys():
            versions = models.version_ids(pair, mt)
            prod_version = self.production_version(models.type_dir(pair, mt))
            if prod_version is not None and prod_version not in versions:
                self.problem("dangling_production", models.production_path(pair, mt),
                             f"production points to version {prod_version!r}, which does not exist "
                             "(promote another version)", fixable=False)
            for v in versions:
                self.checked["modelVersions"] += 1
                vdir = models.version_dir(pair, mt, v)
                meta_path = vdir / META_NAME
                if vdir in self.lost_versions:
                    continue  # reported with its metadata
                if not meta_path.exists():
                    if not self.settled.get(vdir, self.old_enough(vdir)):
                        self.in_flight += 1
                        continue
                    self.problem("incomplete_version", vdir, "version directory without meta.json "
                                 "(an interrupted save)", fixable=v != prod_version,
                                 fix=lambda vdir=vdir: self.quarantine(vdir), action="quarantined")
                    continue
                try:
                    meta = read_json_document(meta_path, restore=False)
                except ChecksumError:
                    continue  # reported as a damaged document
                bad = []
                for name, entry in (meta.get("files") or {}).items():
                    self.checked["weightFiles"] += 1
                    try:
                        if sha256_hex((vdir / name).read_bytes()) != entry.get("sha256"):
                            bad.append(f"{name} fails its checksum")
                    except FileNotFoundError:
                        bad.append(f"{name} missing")
                if bad and not meta_path.exists():
                    continue  # deleted by the writer while we looked (a read-only doctor on a live dir)
                if bad:
                    is_prod = v == prod_version
                    detail = "; ".join(bad) + (" — this is the production version: retrain or roll back"
                                               if is_prod else "")
                    self.problem("weight_checksum_mismatch", vdir, detail, fixable=not is_prod,
                                 fix=lambda vdir=vdir: self.quarantine(vdir), action="quarantined version")

    def check_candles(self, path: Path) -> None:
        self.checked["candleFiles"] += 1
        try:
            import pyarrow.parquet as pq

            pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read means the file is damaged
            self.problem("corrupt_candles", path, f"parquet file does not open: {type(exc).__name__}: "
                         f"{str(exc)[:200]}", fixable=True, fix=lambda: self.quarantine(path),
                         action="quarantined")

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        # Ages of the version directories before any repair touches them (removing a temp file from a
        # directory makes it look freshly modified).
        models = self.models
        self.settled = {models.version_dir(p, m, v): self.old_enough(models.version_dir(p, m, v))
                        for p, m in models.model_keys() for v in models.version_ids(p, m)}
        self.check_dirs()
        files = self.walk()
        for path in files:
            top = path.relative_to(self.root).parts[0]
            if top == "candles" and path.suffix == ".parquet":
                self.check_candles(path)
            elif is_document(path.relative_to(self.root)):
                self.check_document(path)
        for path in files:
            rel = path.relative_to(self.root)
            stem = path.name[: -len(BACKUP_SUFFIX)]
            if path.name.endswith(BACKUP_SUFFIX) and stem and is_document(rel.with_name(stem)):
                self.check_orphan_backup(path)
        self.check_models()
        fixed = sum(1 for p in self.problems if p["fixed"])
        remaining = len(self.problems) - fixed
        return {
            "dataDir": str(self.root),
            "repair": self.repair,
            # A directory created by repair was never a problem (see check_dirs).
            "healthy": all(p["kind"] == "missing_dir" and p["fixed"] for p in self.problems),
            "ok": remaining == 0,
            "problemCount": len(self.problems),
            "fixedCount": fixed,
            "remainingCount": remaining,
            "problems": self.problems,
            "checked": self.checked,
            "absentCategories": self.absent,
            "inFlightTemp": self.in_flight,
            "durationMs": round((time.perf_counter() - t0) * 1000, 3),
            "timestamp": now_ms(),
        }


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def run_doctor(data_dir: Path, models: ModelStore, *, repair: bool = False,
               temp_grace_seconds: float = 60.0) -> dict[str, Any]:
    """Check `data_dir` (its model versions through `models`); with `repair`, fix what can be fixed.

    The caller serialises this with its writes (Storage.doctor holds its locks meanwhile).
    """
    return _Doctor(Path(data_dir), models, repair, temp_grace_seconds).run()
