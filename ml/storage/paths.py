"""The data-directory layout, and the one function that turns names into paths.

Every path under TBML_DATA_DIR is built by `safe_path`: each component (category, pair, model type,
version, file name) is checked against a strict ASCII pattern *before* it touches the file system,
and the resolved result must stay inside the data directory. Anything else raises UnsafePathError
and nothing is created.

Layout::

    candles/{PAIR}/{timeframe}.parquet            (written by ml.data.store.CandleStore)
    features/[{PAIR}/]{name}.json                 feature snapshots (checksummed documents)
    models/{PAIR}/{model_type}/{version}/meta.json   + weight files (weights.pt, scaler.json, ...)
    models/{PAIR}/{model_type}/production.json    pointer to the production version
    training/history.json                         bounded list of training job records
    predictions/{PAIR}/seg_*.json                 immutable prediction segments (predictions/segments.py)
    queue/state.json                              TrainingQueue state
    quarantine/...                                files `doctor --repair` moved aside
"""

from __future__ import annotations

import re
from pathlib import Path

from ml.pairs import InvalidPairError, validate_pair
from ml.storage.atomic import BACKUP_SUFFIX, TMP_MARK

CATEGORIES = ("candles", "features", "models", "training", "predictions", "queue")
DOCUMENT_CATEGORIES = ("features", "training", "queue")
QUARANTINE_DIR = "quarantine"
WRITER_LOCK_NAME = ".writer.lock"

MODEL_TYPE_PATTERN = r"^[a-z][a-z0-9_]{1,31}$"
VERSION_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"

# fullmatch + explicit ASCII classes: no "$ matches before a trailing newline", no Unicode digits.
_MODEL_TYPE_RE = re.compile(MODEL_TYPE_PATTERN[1:-1])
_VERSION_RE = re.compile(VERSION_PATTERN[1:-1])
_NAME_RE = re.compile(NAME_PATTERN[1:-1])


class UnsafePathError(ValueError):
    """A name that may not become part of a path (traversal, absolute path, odd characters)."""


class UnsafePairError(UnsafePathError, InvalidPairError):
    """An invalid pair name; catchable as UnsafePathError or InvalidPairError."""


def _refuse(kind: str, value: object, rule: str) -> UnsafePathError:
    return UnsafePathError(f"unsafe {kind} {value!r}: {rule}")


def _reserved(value: str) -> bool:
    return TMP_MARK in value or value.endswith(BACKUP_SUFFIX)


def check_pair(pair: object) -> str:
    try:
        return validate_pair(pair)  # type: ignore[arg-type]
    except InvalidPairError as exc:
        raise UnsafePairError(str(exc)) from None


def check_model_type(model_type: object) -> str:
    if not isinstance(model_type, str) or not _MODEL_TYPE_RE.fullmatch(model_type):
        raise _refuse("model type", model_type, "expected 2-32 characters of a-z, 0-9, _ starting with a letter")
    return model_type


def check_version(version: object) -> str:
    if (not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or version in (".", "..")
            or _reserved(version)):
        raise _refuse("version id", version,
                      f"expected 1-64 characters of A-Z a-z 0-9 _ . - (not '.', '..', '{TMP_MARK}' or "
                      f"'{BACKUP_SUFFIX}')")
    return version


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or _reserved(name):
        raise _refuse("file name", name,
                      "expected 1-128 characters of A-Z a-z 0-9 _ . - not starting with '.' or '-' "
                      f"(and without '{TMP_MARK}' or a '{BACKUP_SUFFIX}' ending)")
    return name


def check_category(category: object) -> str:
    if category not in CATEGORIES:
        raise _refuse("category", category, f"expected one of {', '.join(CATEGORIES)}")
    return category  # type: ignore[return-value]


def safe_path(root: str | Path, category: str, *, pair: str | None = None, model_type: str | None = None,
              version: str | None = None, name: str | None = None) -> Path:
    """`root/category[/pair[/model_type[/version]]][/name]`, every part validated; never outside root.

    Pure: creates nothing. Raises UnsafePathError for any refused component.
    """
    parts = [check_category(category)]
    if pair is not None:
        parts.append(check_pair(pair))
    if model_type is not None:
        if pair is None:
            raise UnsafePathError("a model type needs a pair")
        parts.append(check_model_type(model_type))
    if version is not None:
        if model_type is None:
            raise UnsafePathError("a version needs a model type")
        parts.append(check_version(version))
    if name is not None:
        parts.append(check_name(name))
    base = Path(root).expanduser().resolve()
    path = base.joinpath(*parts)
    # Belt and braces: the patterns already forbid separators and "..", but a symlink inside the
    # data directory could still point elsewhere.
    if not path.resolve().is_relative_to(base):
        raise UnsafePathError(f"unsafe path {path}: resolves outside the data directory {base}")
    return path


def document_file_name(name: str) -> str:
    """A document's file name: `name` plus `.json` unless it already ends so (validated)."""
    check_name(name)
    return check_name(name if name.endswith(".json") else f"{name}.json")
