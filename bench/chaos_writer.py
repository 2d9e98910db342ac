"""Fault 6 of `make chaos`: SIGKILL a process in the middle of a run of storage writes.

`python -m bench.chaos_writer DATA_DIR` writes with ml.storage in a loop: DOCS checksummed
documents of ~100 kB in turn at version v (`queue/doc{i}.json`), then a batch of BATCH prediction
records flushed to a segment; after each write returns it prints an acknowledgement
(`doc <i> <v>` / `records <total>`). The harness kills it at a random moment after 50+ writes and
checks, from the files alone, that nothing half-written replaced a good file.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

from bench.chaos_report import WriteRound, doctor_counts

DOCS = 3
DOC_BYTES = 100_000
BATCH = 20
MIN_WRITES = 50
REPO = Path(__file__).resolve().parent.parent


def content(i: int, v: int) -> dict:
    seed = hashlib.sha256(f"{i}:{v}".encode()).hexdigest()
    return {"doc": i, "version": v, "blob": (seed * (DOC_BYTES // 64 + 1))[:DOC_BYTES]}


def writer(data_dir: str) -> None:
    from ml.storage.store import Storage

    s = Storage(data_dir, flush_count=10**9, flush_seconds=10**9)
    v = int(s.get_document("queue", "doc0", default={"version": 0})["version"]) + 1
    total = s.count_predictions("BTC")
    while True:
        for i in range(DOCS):
            s.put_document("queue", f"doc{i}", content(i, v))
            print(f"doc {i} {v}", flush=True)
        s.append_predictions([{"pair": "BTC", "timestamp": v * 1000 + j, "v": v} for j in range(BATCH)])
        s.flush()
        total += BATCH
        print(f"records {total}", flush=True)
        v += 1


def _check(data_dir: Path, acked: dict[int, int], acked_records: int) -> tuple[int, int, int]:
    """(main files that do not decode by themselves, documents older than acknowledged, records lost)."""
    from ml.storage.atomic import decode_json_document
    from ml.storage.store import Storage

    broken = went_back = 0
    for i in range(DOCS):
        path = data_dir / "queue" / f"doc{i}.json"
        if not path.exists():
            went_back += 1 if acked.get(i) else 0
            continue
        try:
            doc = decode_json_document(path.read_bytes())
        except Exception:  # noqa: BLE001 - a half-written or mixed file is what this looks for
            broken += 1
            continue
        if doc != content(i, doc.get("version", -1)) or doc["version"] < acked.get(i, 0):
            went_back += 1
    found = Storage.reader(data_dir).count_predictions("BTC")
    return broken, went_back, max(0, acked_records - found)


def one_round(data_dir: Path, rng: random.Random, doctor, timeout_s: float = 60.0) -> WriteRound:
    """Start the writer, SIGKILL it at a random moment after MIN_WRITES+ acknowledged writes, check."""
    env_py = [sys.executable, "-m", "bench.chaos_writer", str(data_dir)]
    proc = subprocess.Popen(env_py, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    acked: dict[int, int] = {}
    records = 0
    writes = 0
    kill_after = MIN_WRITES + rng.randrange(0, 25)
    deadline = time.monotonic() + timeout_s
    try:
        assert proc.stdout is not None
        while writes < kill_after and time.monotonic() < deadline:
            line = proc.stdout.readline()  # the writer acknowledges a write every few ms
            if not line:
                break
            writes += 1
            parts = line.split()
            if parts[0] == "doc":
                acked[int(parts[1])] = int(parts[2])
            elif parts[0] == "records":
                records = int(parts[1])
        time.sleep(rng.uniform(0, 0.02))  # a random moment inside the next write
    finally:
        proc.kill()
        proc.wait(10)
    # acknowledgements written before the kill are still in the pipe
    assert proc.stdout is not None
    for line in proc.stdout.read().splitlines():
        parts = line.split()
        if parts and parts[0] == "doc":
            acked[int(parts[1])] = int(parts[2])
            writes += 1
        elif parts and parts[0] == "records":
            records = int(parts[1])
            writes += 1
    broken, went_back, lost = _check(data_dir, acked, records)
    corrupt, leftovers, _ = doctor_counts(doctor(data_dir))
    return WriteRound(writes=writes, broken_main=broken, went_back=went_back, records_lost=lost,
                      corrupt=corrupt, leftovers=leftovers)


if __name__ == "__main__":
    writer(sys.argv[1])
