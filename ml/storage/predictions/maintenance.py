"""Compaction and cleanup of one pair's segment files (the caller holds the writer's IO lock).

Compaction merges a run of consecutive small segments into one whose sequence range covers them;
cleanup rewrites a segment without its old records under the same range. Both write the new file
before deleting the old ones (see segments.py for why a crash in between is harmless), and both
delete superseded leftovers of an earlier interrupted run.
"""

from __future__ import annotations

from pathlib import Path

from ml.storage.atomic import fsync_dir
from ml.storage.predictions.segments import Segment, read_segment, remove_segment, write_segment


def is_small(seg: Segment, segment_max_records: int) -> bool:
    """Small enough to be worth merging: under a quarter of the largest segment compaction writes."""
    return seg.count < segment_max_records // 4


def compact_segments(d: Path, pair: str, live: list[Segment], dead: list[Segment], *,
                     segment_max_records: int) -> int:
    """Merge runs of consecutive segments holding small ones (each run at most
    segment_max_records), and delete superseded leftovers; return how many files were merged."""
    merged = 0
    groups: list[list[Segment]] = []
    group: list[Segment] = []
    for seg in sorted(live):
        if group and sum(s.count for s in group) + seg.count > segment_max_records:
            groups.append(group)
            group = []
        group.append(seg)
    if group:
        groups.append(group)
    for group in groups:
        if len(group) < 2 or not any(is_small(s, segment_max_records) for s in group):
            continue
        records: list[dict] = []
        for seg in group:
            records.extend(read_segment(d, seg, restore=True))
        write_segment(d, pair, group[0].lo, group[-1].hi, records)
        for seg in group:
            remove_segment(d, seg)
        merged += len(group)
    for seg in dead:  # leftovers of an interrupted compaction or cleanup
        remove_segment(d, seg)
    if merged or dead:
        fsync_dir(d)
    return merged


def cleanup_segments(d: Path, pair: str, live: list[Segment], dead: list[Segment], cutoff_ms: int) -> int:
    """Remove every record with timestamp < cutoff_ms from a pair's segments; return how many.

    A segment entirely older than the cutoff is deleted; one that straddles it is rewritten with the
    records it keeps, under the same sequence range.
    """
    removed = 0
    touched = bool(dead)
    for seg in live:
        if seg.min_ts >= cutoff_ms:
            continue
        touched = True
        if seg.max_ts < cutoff_ms:
            removed += seg.count
            remove_segment(d, seg)
            continue
        records = read_segment(d, seg, restore=True)
        keep = [r for r in records if r["timestamp"] >= cutoff_ms]
        removed += len(records) - len(keep)
        new = write_segment(d, pair, seg.lo, seg.hi, keep)
        if new.name != seg.name:
            remove_segment(d, seg)
    for seg in dead:
        remove_segment(d, seg)
    if touched:
        fsync_dir(d)
    return removed
