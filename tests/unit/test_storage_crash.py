"""Crash safety: a writer SIGKILLed at random moments never leaves a partial or mixed file.

A small fork server (a fresh interpreter with ml.storage already imported, so each writer starts in
milliseconds) forks one writer per round. The writer loops: write every large document at version
k (in order), append and flush a batch of prediction records, save model version k, k+1, ...
The test kills it at a random moment, then checks from the files alone:
- every document decodes by itself (no backup needed) and holds exactly version v's content;
- each document is the version the previous round left, or one this round's writer completed;
- prediction segments all verify and hold whole batches; the record count never goes back;
- every visible model version's files match their checksums; each kill leaves at most one more
  unfinished (invisible: no meta.json) version directory.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from ml.storage.atomic import decode_json_document
from ml.storage.store import Storage

ROUNDS = 60
MIN_PROGRESS = 20
DOCS = 3
DOC_BYTES = 400_000
BATCH = 25
REPO = Path(__file__).resolve().parents[2]

SERVER = r"""
import os, sys, hashlib
from ml.storage.store import Storage

DOCS, DOC_BYTES, BATCH = map(int, sys.argv[1:4])

def content(i, v):
    seed = hashlib.sha256(f"{i}:{v}".encode()).hexdigest()
    return {"doc": i, "version": v, "blob": (seed * (DOC_BYTES // 64 + 1))[:DOC_BYTES]}

def writer(data_dir):
    s = Storage(data_dir, flush_count=10**9, flush_seconds=10**9)
    v = (s.get_document("queue", "doc0", default={"version": 0})["version"]) + 1
    while True:
        for i in range(DOCS):
            s.put_document("queue", f"doc{i}", content(i, v))
        s.append_predictions([{"pair": "BTC", "timestamp": v * 1000 + j, "v": v} for j in range(BATCH)])
        s.flush()
        s.save_model_version("BTC", "lstm", f"v{v}", {"v": v}, {"weights.pt": os.urandom(65536)})
        v += 1

for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            writer(line.strip())
        finally:
            os._exit(1)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def expected(i: int, v: int) -> dict:
    seed = hashlib.sha256(f"{i}:{v}".encode()).hexdigest()
    return {"doc": i, "version": v, "blob": (seed * (DOC_BYTES // 64 + 1))[:DOC_BYTES]}


def check_round(data_dir: Path, last: list[int], last_count: int, last_incomplete: set[str]
                ) -> tuple[list[int], int, set[str]]:
    versions = []
    for i in range(DOCS):
        path = data_dir / "queue" / f"doc{i}.json"
        if not path.exists():
            versions.append(0)
            continue
        doc = decode_json_document(path.read_bytes())  # the file itself, not its backup
        assert doc == expected(i, doc["version"]), f"doc{i} holds a mixed version"
        versions.append(doc["version"])
    # This round's writer wrote versions > last[0] only: each document is its old version (as the
    # previous round left it) or one the writer completed in this round, never anything else.
    for v, old in zip(versions, last, strict=True):
        assert v == old or v > last[0], (versions, last)
    # Documents are written in order doc0..docN, so a later one is never ahead of an earlier one.
    assert versions == sorted(versions, reverse=True), versions

    reader = Storage.reader(data_dir)
    count = reader.count_predictions("BTC") if (data_dir / "predictions" / "BTC").exists() else 0
    assert count % BATCH == 0 and count >= last_count
    if count:
        records = reader.query_predictions("BTC", limit=None)
        assert len(records) == count
        assert len({r["id"] for r in records}) == count

    vdir = data_dir / "models" / "BTC" / "lstm"
    complete = {m["version"] for m in reader.list_versions("BTC", "lstm")}
    for version in complete:
        assert len(reader.read_model_file("BTC", "lstm", version, "weights.pt")) == 65536
    all_dirs = {p.name for p in vdir.iterdir() if p.is_dir()} if vdir.exists() else set()
    incomplete = all_dirs - complete
    assert all(not (vdir / v / "meta.json").exists() for v in incomplete)
    assert len(incomplete - last_incomplete) <= 1  # only the version being written when killed
    return versions, count, incomplete


def test_sigkill_at_random_moments_leaves_old_or_new(tmp_path: Path):
    data_dir = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TBML_DATA_DIR": str(data_dir)}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(DOCS), str(DOC_BYTES), str(BATCH)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO, env=env)
    rng = random.Random(1234)
    last, last_count, progressed, incomplete = [0] * DOCS, 0, 0, set()
    rounds = 0
    try:
        # At least ROUNDS kills; on a loaded machine the writer may often be killed before it wrote
        # anything, so go on (up to 4x) until enough rounds really interrupted it mid-work.
        while rounds < ROUNDS or (progressed < MIN_PROGRESS and rounds < 4 * ROUNDS):
            rounds += 1
            server.stdin.write(f"{data_dir}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.12))
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline().strip() == "reaped"
            versions, last_count, incomplete = check_round(data_dir, last, last_count, incomplete)
            progressed += versions != last
            last = versions
    finally:
        server.stdin.close()
        server.wait(timeout=10)
    assert progressed >= MIN_PROGRESS, f"the writer progressed in {progressed} of {rounds} rounds only"

    # What a crash leaves (orphan temp files, an unfinished version) is for doctor to clean up.
    storage = Storage(data_dir)
    report = storage.doctor(repair=True, temp_grace_seconds=0)
    assert report["ok"], report
    assert {p["kind"] for p in report["problems"]} <= {"orphan_temp", "incomplete_version", "missing_dir"}
    assert storage.doctor(temp_grace_seconds=0)["healthy"]
