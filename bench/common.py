"""What every benchmark returns, and a timer. Benchmarks are never tests: they measure and report.

Each figure is reported beside an anchor measured in the same run (ratio = value / anchor), so the
numbers mean something on any machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class BenchResult:
    section: str            # e.g. "features", "storage"
    name: str               # what was measured
    value: float
    unit: str               # "ms", "records/s", ...
    anchor_name: str = ""   # what it is compared with, measured in the same run
    anchor_value: float | None = None
    target: str = ""        # the performance target in words, e.g. "<= 10 ms"
    ok: bool | None = None  # whether the target was met (None when there is no target)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.anchor_value in (None, 0):
            return None
        return self.value / self.anchor_value

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def time_calls(fn: Callable[[], object], repeat: int, warmup: int = 3) -> list[float]:
    """Wall time of each call in milliseconds."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def bench_main(run: Callable[..., list[BenchResult]], description: str | None = None) -> int:
    """`python -m bench.bench_X [--quick] [--json]`: run one benchmark module and print its results."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0] if description else None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    results = run(quick=args.quick)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    for r in results:
        ratio = f"x{r.ratio:.3g}" if r.ratio is not None else "-"
        ok = "" if r.ok is None else ("  OK" if r.ok else "  MISSED")
        anchor = f"{r.anchor_name} {r.anchor_value:.4g}" if r.anchor_value is not None else "-"
        print(f"{r.name:48s} {r.value:10.4g} {r.unit:10s} anchor {anchor} ({ratio}) {r.target}{ok}  {r.note}")
    return 0
