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
    target: str = ""        # the SPEC §10 target in words, e.g. "<= 10 ms"
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
