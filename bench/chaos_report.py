"""The pure part of `make chaos`: what one request, one fault and one storage-kill round record, how a
fault's requests are summed up, and the Markdown of docs/reliability.md. No Ray, no HTTP, no clock:
the unit tests (tests/unit/test_chaos.py) drive it with hand-made records.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

# doctor problem kinds that mean a damaged or missing file; the others are harmless leftovers of an
# interrupted write (an orphan temp file, a version directory that never got its meta.json)
CORRUPT_KINDS = frozenset({"checksum_mismatch", "corrupt_document", "corrupt_backup", "missing_document",
                           "weight_checksum_mismatch", "corrupt_candles", "dangling_production"})
LEFTOVER_KINDS = frozenset({"orphan_temp", "incomplete_version"})


@dataclass
class Req:
    """One request of the load: monotonic start/end, HTTP status (0 = connection error or timeout),
    whether the answer was a fallback, and how many history records the answer stands for."""

    t0: float
    t1: float
    status: int
    fallback: bool = False
    records: int = 0
    error: str = ""

    @property
    def failed(self) -> bool:
        return self.status == 0 or self.status >= 500

    @property
    def good(self) -> bool:
        return self.status == 200 and not self.fallback


@dataclass
class Summary:
    sent: int
    failed: int
    fallbacks: int
    other: int            # 4xx answers (none expected)
    served_records: int   # history records the 200 answers stand for
    first_ok_s: float | None   # first good answer started after the fault, seconds after it
    last_bad_s: float | None   # end of the last failed/fallback answer after the fault (None: none)
    samples: list[str] = field(default_factory=list)


def summarize(reqs: list[Req], t_fault: float | None) -> Summary:
    """Sum up one fault's requests; times are relative to `t_fault` (None: no fault was injected)."""
    sent = len(reqs)
    failed = sum(1 for r in reqs if r.failed)
    fallbacks = sum(1 for r in reqs if r.status == 200 and r.fallback)
    other = sum(1 for r in reqs if not r.failed and r.status != 200)
    served = sum(r.records for r in reqs if r.status == 200)
    first_ok = last_bad = None
    if t_fault is not None:
        after = sorted((r for r in reqs if r.t0 >= t_fault), key=lambda r: r.t0)
        first = next((r for r in after if r.good), None)
        first_ok = None if first is None else max(0.0, first.t1 - t_fault)
        bad = [r.t1 - t_fault for r in reqs if r.t1 >= t_fault and not r.good]
        last_bad = max(bad) if bad else None
    samples: list[str] = []
    for r in reqs:
        if (r.failed or r.fallback) and r.error and r.error not in samples:
            samples.append(r.error)
        if len(samples) >= 3:
            break
    return Summary(sent, failed, fallbacks, other, served, first_ok, last_bad, samples)


def doctor_counts(report: dict[str, Any] | None) -> tuple[int | None, int | None, list[str]]:
    """(corrupt files, harmless leftovers, the corrupt paths) of a `tbml storage doctor` report."""
    if not report or "problems" not in report:
        return None, None, []
    problems = report["problems"]
    corrupt = [p for p in problems if p.get("kind") in CORRUPT_KINDS or
               (p.get("kind") not in LEFTOVER_KINDS and p.get("kind") != "missing_dir")]
    leftovers = [p for p in problems if p.get("kind") in LEFTOVER_KINDS]
    return len(corrupt), len(leftovers), [f"{p.get('kind')}: {p.get('path')}" for p in corrupt][:5]


def healthy_again(polls: list[tuple[float, str]], t_fault: float) -> tuple[bool, float | None]:
    """From health polls (monotonic time, status or 'error'): whether health left `healthy` after the
    fault, and seconds until the first `healthy` poll after the last one that was not."""
    after = [(t, s) for t, s in polls if t >= t_fault]
    bad = [t for t, s in after if s != "healthy"]
    if not bad:
        return False, None
    last_bad = max(bad)
    back = next((t for t, s in after if t > last_bad and s == "healthy"), None)
    return True, (None if back is None else back - t_fault)


@dataclass
class FaultResult:
    """One injected fault: what was killed and what the service did."""

    name: str
    target: str = ""           # the process: name and PID
    restarted_by: str = ""     # who brought it back ("Ray (actor restart)", "supervisor", "harness", ...)
    back_s: float | None = None          # until a replacement process answered / was alive
    replaced: bool = True                # whether a replacement process is expected (not for a Train worker)
    summary: Summary | None = None
    lost: int | None = None              # served records minus records found after a save
    health_left: bool | None = None
    health_back_s: float | None = None
    corrupt: int | None = None
    leftovers: int | None = None
    training: str = ""                   # the training job's outcome, when one was involved
    training_s: float | None = None      # fault -> a training completed again
    error: str = ""                      # the harness could not inject or measure (the number is missing)
    notes: list[str] = field(default_factory=list)


@dataclass
class WriteRound:
    """One SIGKILLed writer: writes acknowledged before the kill, and what the files said after."""

    writes: int
    broken_main: int      # documents whose main file does not decode by itself (half-written or mixed)
    went_back: int        # documents older than the last write the writer acknowledged
    records_lost: int     # acknowledged prediction records not found by a reader
    corrupt: int | None   # doctor: damaged files
    leftovers: int | None


def _s(x: float | None, none: str = "–") -> str:
    return none if x is None else f"{x:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _n(x: int | None) -> str:
    return "–" if x is None else f"{x:,}"


def render(results: list[FaultResult], rounds: list[WriteRound], *, quick: bool, elapsed_s: float,
           config: dict[str, str], note: str = "") -> str:
    """docs/reliability.md."""
    lines = [
        "# Reliability",
        "",
        "Written by `make chaos` (`python -m bench.chaos`); never edited by hand. A local service started",
        "by `tbml up` serves a small loopback load (client threads sending `GET /api/predictions/{pair}`",
        "and `GET /api/predictions` through the Serve proxy) while the harness",
        "SIGKILLs one real process at a time, found by its PID in Ray's state API or the run state",
        "(`data/run/state.json`). It is a report, not a test: a fault the service does not survive yet is a",
        "number here, not a failed run.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        f"- run at: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, took {elapsed_s:.0f} s"
        f"{' (--quick)' if quick else ''}, 1-min load average at the end {os.getloadavg()[0]:.2f}",
    ]
    lines += [f"- {k}: {v}" for k, v in config.items()]
    if note:
        lines.append(f"- conditions: {note}")
    lines += [
        "",
        "## How to read this",
        "",
        "- *requests*: answers the load got from the fault's start of load to its end (before, during and",
        "  after the kill); *failed*: 5xx or no answer (connection refused/reset, 10 s client timeout);",
        "  *fallbacks*: 200 answers with `fallback: true` (for `/api/predictions`: any pair a fallback).",
        "- *history lost*: history records the 200 answers stand for (one per pair answered) minus the",
        "  records the history endpoint counts after `POST /api/storage/save`; negative means more records",
        "  than answers seen (an answer the client gave up on was still recorded).",
        "- *back*: seconds from the kill until a replacement process answered (Redis PING, a new PID for",
        "  the actor or replica in Ray's state API). *first OK*: until the first good answer (200, not a",
        "  fallback) to a request sent after the kill; *last bad*: until the end of the last failed or",
        "  fallback answer (– none). *healthy again*: until `/api/health` said `healthy` after the last poll",
        "  that did not (– it never left `healthy`; *never* it did not come back within the deadline).",
        "- *corrupt*: files `tbml storage doctor` (no repair) reports damaged or missing afterwards;",
        "  *leftovers*: orphan temp files and unfinished version directories (harmless, repairable).",
        "- *training again*: seconds from the kill until a training job completed (the one running, or a",
        "  new one queued when it had failed or vanished).",
        "",
        "## Serving under faults",
        "",
        "| fault | killed | restarted by | back s | requests | failed | fallbacks | history lost | first OK s "
        "| last bad s | healthy again s | corrupt | leftovers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary
        if r.health_left is None:
            health = "–"
        elif not r.health_left:
            health = "– (stayed healthy)"
        else:
            health = _s(r.health_back_s, "**never**")
        lines.append(
            f"| {r.name} | {_cell(r.target) or '**not found**'} | {_cell(r.restarted_by) or '–'} | "
            f"{_s(r.back_s, '**never**' if r.target and r.replaced else '–')} | "
            f"{_n(s.sent if s else None)} | {_n(s.failed if s else None)} | {_n(s.fallbacks if s else None)} | "
            f"{_n(r.lost)} | {_s(s.first_ok_s if s else None, '**never**' if s else '–')} | "
            f"{_s(s.last_bad_s if s else None)} | {health} | {_n(r.corrupt)} | {_n(r.leftovers)} |")
    trained = [r for r in results if r.training]
    if trained:
        lines += ["", "## Training under faults", "",
                  "| fault | training job | training again s |", "|---|---|---|"]
        for r in trained:
            lines.append(f"| {r.name} | {_cell(r.training)} | {_s(r.training_s, '**not within the deadline**')} |")
    if rounds:
        writes = sorted(w.writes for w in rounds)
        lines += [
            "", "## SIGKILL during storage writes", "",
            "A subprocess writes with `ml.storage` (three checksummed documents of ~100 kB in turn, then a",
            "batch of prediction records flushed to a segment, again and again, each write acknowledged on",
            "its stdout) into a data directory of its own and is SIGKILLed after 50+ writes at a random",
            "moment; then the files alone are checked: every document's main file must decode by itself (no",
            "backup needed) and be at least the version last acknowledged, a reader must count every",
            "acknowledged record, and `tbml storage doctor` must find nothing damaged.",
            "",
            "| rounds | writes before the kill (min / median / max) | half-written main files | "
            "documents older than acknowledged | acknowledged records lost | rounds with a corrupt file (doctor) "
            "| leftovers after the last round |",
            "|---|---|---|---|---|---|---|",
            f"| {len(rounds)} | {writes[0]} / {writes[len(writes) // 2]} / {writes[-1]} | "
            f"{sum(w.broken_main for w in rounds)} | {sum(w.went_back for w in rounds)} | "
            f"{sum(w.records_lost for w in rounds)} | "
            f"{_n(None if any(w.corrupt is None for w in rounds) else sum(1 for w in rounds if w.corrupt))} | "
            f"{_n(rounds[-1].leftovers)} |",
        ]
    noted = [r for r in results if r.notes or r.error or (r.summary and r.summary.samples)]
    if noted:
        lines += ["", "## What happened", ""]
        for r in noted:
            parts = list(r.notes)
            if r.error:
                parts.append(f"harness: {r.error}")
            if r.summary and r.summary.samples:
                parts.append("sample failures: " + "; ".join(f"`{x}`" for x in r.summary.samples))
            if r.summary and r.summary.other:
                parts.append(f"{r.summary.other} 4xx answers")
            lines.append(f"- **{r.name}**: " + "; ".join(parts))
    lines.append("")
    return "\n".join(lines)


__all__ = ["CORRUPT_KINDS", "FaultResult", "Req", "Summary", "WriteRound", "doctor_counts",
           "healthy_again", "render", "summarize"]
