"""Prediction segment files: their names, which ones are live, and reading/writing one.

`predictions/{PAIR}/seg_{lo}_{hi}_{minTs}_{maxTs}_{count}.json` is a checksummed JSON document
(written with atomic_write_json) holding `{"pair", "seqLo", "seqHi", "records": [...]}`. The name
carries what a query needs to skip a segment without opening it.

Compaction and cleanup write a new file before deleting the old ones, so a crash in between leaves
files whose sequence ranges overlap: a segment whose range is covered by another's is *superseded*
and ignored (for an equal range the one with fewer records wins: only cleanup produces equal
ranges, and it only removes records). Readers in other processes therefore always see a consistent
set, whatever moment a writer died.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ml.storage.atomic import atomic_write_json, backup_path, read_json_document

SEGMENT_RE = re.compile(r"seg_(\d{10})_(\d{10})_(\d+)_(\d+)_(\d+)\.json")


@dataclass(frozen=True, order=True)
class Segment:
    lo: int
    hi: int
    min_ts: int
    max_ts: int
    count: int
    name: str

    @classmethod
    def parse(cls, name: str) -> Segment | None:
        m = SEGMENT_RE.fullmatch(name)
        if not m:
            return None
        lo, hi, mn, mx, count = (int(g) for g in m.groups())
        return cls(lo, hi, mn, mx, count, name) if lo <= hi else None

    @staticmethod
    def file_name(lo: int, hi: int, min_ts: int, max_ts: int, count: int) -> str:
        return f"seg_{lo:010d}_{hi:010d}_{min_ts}_{max_ts}_{count}.json"


def split_live(segments: Iterable[Segment]) -> tuple[list[Segment], list[Segment]]:
    """(live, superseded): a segment is superseded when another's sequence range covers it."""
    ordered = sorted(segments, key=lambda s: (s.lo, -s.hi, s.count, s.name))
    live: list[Segment] = []
    dead: list[Segment] = []
    max_hi = -1
    for seg in ordered:
        if seg.hi <= max_hi:
            dead.append(seg)
        else:
            live.append(seg)
            max_hi = seg.hi
    return live, dead


def list_segments(d: Path) -> tuple[list[Segment], list[Segment]]:
    """(live, superseded) segments in a pair's directory, from its listing."""
    if not d.is_dir():
        return [], []
    segs = [s for s in (Segment.parse(p.name) for p in d.iterdir()) if s is not None]
    return split_live(segs)


def read_segment(d: Path, seg: Segment, *, restore: bool) -> list[dict]:
    """The records of a segment (`restore`: repair a damaged file from its backup, writers only)."""
    data = read_json_document(d / seg.name, restore=restore)
    return list(data.get("records", [])) if isinstance(data, dict) else []


def write_segment(d: Path, pair: str, lo: int, hi: int, records: list[dict], *,
                  name: str | None = None) -> Segment:
    """Write a segment for sequence range lo..hi; with `name`, rewrite that file in place."""
    rewrite = name is not None  # an in-place rewrite keeps the previous version as backup
    ts = [r["timestamp"] for r in records]
    name = name or Segment.file_name(lo, hi, min(ts), max(ts), len(records))
    atomic_write_json(d / name, {"pair": pair, "seqLo": lo, "seqHi": hi, "records": records},
                      backup=rewrite)
    seg = Segment.parse(name)
    assert seg is not None
    return seg


def remove_segment(d: Path, seg: Segment) -> None:
    # Backup first: a backup without its file means "file lost" to doctor, which restores it.
    backup_path(d / seg.name).unlink(missing_ok=True)
    (d / seg.name).unlink(missing_ok=True)
