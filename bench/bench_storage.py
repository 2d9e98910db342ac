"""Storage numbers: atomic write of a 1 MB document with fsync, prediction-record appends.

Targets: the atomic write p50 <= 25 ms; >= 5,000 appended records/s.

- atomic write: `atomic_write_json` of a ~1 MB JSON document (temp file, fsync, re-read + SHA-256,
  rename, directory fsync, hard-linked backup of the previous version) — p50 and p99 — beside the
  same document written plainly (json.dumps + open().write(), no fsync) in the same directory.
- appends: `Storage.append_prediction` of prediction-shaped records, one call per record, including
  every flush to disk (by count, as configured, plus the final one), beside appending the same
  records to an in-process list.

Run: `python -m bench.bench_storage [--quick]` (prints JSON lines).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import BenchResult, bench_main, p50, percentile, time_calls
from ml.storage.atomic import atomic_write_json
from ml.storage.store import Storage

SECTION = "storage"


def one_mb_document(seed: int = 1) -> dict:
    """~1 MB of what the service stores: a history of prediction-like records."""
    rng = random.Random(seed)
    rows = []
    size = 0
    i = 0
    while size < 1_000_000:
        row = {"id": f"{rng.getrandbits(64):016x}", "pair": rng.choice(["BTC", "ETH", "XMR", "RVN"]),
               "timestamp": 1_700_000_000_000 + i * 300_000, "probability": round(rng.random(), 6),
               "direction": rng.choice(["up", "down", "neutral"]), "signal": "HOLD",
               "modelVersion": f"v{i // 100}", "horizon": 5, "features": [round(rng.gauss(0, 1), 5)
                                                                            for _ in range(8)]}
        rows.append(row)
        size += len(json.dumps(row)) + 1
        i += 1
    return {"rows": rows, "count": len(rows)}


def bench_atomic_write(workdir: Path, repeat: int) -> list[BenchResult]:
    doc = one_mb_document()
    doc_bytes = len(json.dumps(doc))
    target = workdir / "doc.json"
    plain = workdir / "plain.json"

    def atomic() -> None:
        atomic_write_json(target, doc)

    def plain_write() -> None:
        with open(plain, "w") as fh:
            fh.write(json.dumps(doc))

    # Interleave so both see the same machine state; warm up each.
    safe, unsafe = [], []
    for _ in range(3):
        atomic()
        plain_write()
    for _ in range(repeat):
        safe += time_calls(atomic, 1, warmup=0)
        unsafe += time_calls(plain_write, 1, warmup=0)
    note = f"document {doc_bytes / 1e6:.2f} MB of JSON, {repeat} writes each, interleaved"
    return [
        BenchResult(SECTION, "atomic write 1 MB document (fsync) p50", p50(safe), "ms",
                    "plain write, no fsync p50", p50(unsafe), "<= 25 ms", p50(safe) <= 25.0, note),
        BenchResult(SECTION, "atomic write 1 MB document (fsync) p99", percentile(safe, 99), "ms",
                    "plain write, no fsync p99", percentile(unsafe, 99), "", None),
    ]


def bench_appends(workdir: Path, n: int, runs: int = 3) -> list[BenchResult]:
    rng = random.Random(2)
    pairs = ["BTC", "ETH", "XMR", "RVN"]
    records = [{"pair": pairs[i % 4], "timestamp": 1_700_000_000_000 + i, "probability": rng.random(),
                "direction": "up", "signal": "BUY", "confidence": 0.4, "modelVersion": "v1", "horizon": 5}
               for i in range(n)]
    rates, anchor_rates = [], []
    flush_count = 0
    for run_no in range(runs):  # alternate with the anchor, so both see the same machine
        storage = Storage(workdir / f"data{run_no}")  # flush_count / flush_seconds from the settings
        flush_count = storage.predictions.flush_count
        t0 = time.perf_counter()
        for rec in records:
            storage.append_prediction(rec)
        storage.flush()
        rates.append(n / (time.perf_counter() - t0))
        stored = sum(storage.count_predictions(p) for p in pairs)
        storage.close()
        assert stored == n, f"{stored} of {n} records stored"

        anchor: list[dict] = []
        t0 = time.perf_counter()
        for rec in records:
            anchor.append(dict(rec))
        anchor_rates.append(n / (time.perf_counter() - t0))
    rate = p50(rates)
    return [BenchResult(
        SECTION, "prediction record appends (incl. flushes)", rate, "records/s",
        "in-process list append", p50(anchor_rates), ">= 5,000 records/s", rate >= 5000,
        f"median of {runs} runs of {n} records, one call each, flushed every {flush_count} records "
        "(one atomic segment write with fsync per pair and flush, compaction included)")]


def run(quick: bool = False) -> list[BenchResult]:
    # On the disk the data lives on (a tmpfs /tmp would make fsync free and the figure meaningless).
    from ml.config import get_settings

    parent = Path(get_settings().data_dir).expanduser().resolve().parent
    workdir = Path(tempfile.mkdtemp(prefix=".tbml-bench-storage-", dir=parent))
    try:
        results = bench_atomic_write(workdir, repeat=15 if quick else 60)
        results += bench_appends(workdir, n=5_000 if quick else 30_000)
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(bench_main(run, __doc__))
