"""`make bench`: run every benchmark module and write docs/benchmarks.md.

Each module exposes `run(quick: bool) -> list[BenchResult]`. Every figure sits beside the anchor it
was measured against in the same run, and the performance target it answers to (each module's docstring
states its targets).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from bench.common import BenchResult

MODULES = ("bench_features", "bench_storage", "bench_cache", "bench_training", "bench_forecast", "bench_http",
           "bench_live")
OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def render(results: list[BenchResult], errors: dict[str, str], elapsed_s: float, note: str = "") -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench.run`); never edited by hand. Each figure is measured",
        "beside its anchor in the same run; *ratio* = value / anchor; *target* is the figure the project",
        "aims for (a `met: **no**` row is a known miss, not a failed run).",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        f"- run at: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, took {elapsed_s:.0f} s, "
        f"1-min load average at the end {os.getloadavg()[0]:.2f}",
    ]
    if note:
        lines.append(f"- conditions: {note}")
    lines.append("")
    sections: dict[str, list[BenchResult]] = {}
    for r in results:
        sections.setdefault(r.section, []).append(r)
    for section, rows in sections.items():
        lines += [f"## {section}", "", "| measure | value | anchor | anchor value | ratio | target | met |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            met = "–" if r.ok is None else ("yes" if r.ok else "**no**")
            lines.append(f"| {r.name} | {_fmt(r.value)} {r.unit} | {r.anchor_name or '–'} | "
                         f"{_fmt(r.anchor_value)} | {_fmt(r.ratio)} | {r.target or '–'} | {met} |")
        notes = [r for r in rows if r.note]
        if notes:
            lines.append("")
            lines += [f"- {r.name}: {r.note}" for r in notes]
        lines.append("")
    if errors:
        lines += ["## Not measured", ""]
        lines += [f"- `{m}`: {e}" for m, e in errors.items()]
        lines.append("")
    return "\n".join(lines)


def _split_sections(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """(the lines before the first section, {section title: its lines from its `## ` heading on})."""
    head: list[str] = []
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        (head if current is None else current).append(line)
    return head, sections


def merge(old: str, new: str, elapsed_s: float, note: str = "") -> str:
    """The report `old` with the sections measured in `new` replaced (or added before "Not measured"):
    `--only` re-measures some modules and keeps the others' figures, saying which were re-measured when."""
    old_head, old_sections = _split_sections(old)
    _, new_sections = _split_sections(new)
    new_sections.pop("Not measured", None)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = list(old_head)
    while head and not head[-1].strip():
        head.pop()
    head.append(f"- re-measured {stamp} (`--only`, {elapsed_s:.0f} s, 1-min load average at the end "
                f"{os.getloadavg()[0]:.2f}{'; ' + note if note else ''}): {', '.join(new_sections)}")
    merged = dict(old_sections)
    tail = merged.pop("Not measured", None)
    merged.update(new_sections)
    if tail is not None:
        merged["Not measured"] = tail
    out = head + [""]
    for lines in merged.values():
        out += lines
        if out[-1].strip():
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument("--only", default="", help="comma-separated module names, e.g. bench_features; the "
                    "other sections of an existing report are kept")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--note", default="", help="run conditions to record in the report")
    args = ap.parse_args(argv)
    wanted = [m for m in MODULES if not args.only or m in args.only.split(",")]
    results: list[BenchResult] = []
    errors: dict[str, str] = {}
    t0 = time.time()
    for name in wanted:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                continue
            raise
        print(f"== {name}", flush=True)
        try:
            got = module.run(quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        for r in got:
            print(json.dumps(r.to_dict()), flush=True)
        results.extend(got)
    report = render(results, errors, time.time() - t0, args.note)
    out = Path(args.out)
    if args.only and out.exists():  # the other modules' sections stay as they were measured
        report = merge(out.read_text(), report, time.time() - t0, args.note)
    out.write_text(report)
    print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
