"""Prediction history: batched appends, queries (newest first, limit, since), updates, compaction."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ml.storage.predictions import segments as segments_module
from ml.storage.predictions.segments import Segment, split_live
from ml.storage.store import Storage

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path, **kw) -> Storage:
    kw.setdefault("flush_count", 10)
    kw.setdefault("flush_seconds", 3600)
    return Storage(tmp_path / "data", **kw)


def ts_of(records: list[dict]) -> list[int]:
    return [r["timestamp"] for r in records]


def test_newest_first_with_limit_and_since_across_buffer_and_segments(tmp_path: Path):
    s = make(tmp_path)
    # Out of order on purpose: ordering is by timestamp, not by arrival.
    order = [5, 1, 9, 3, 7, 2, 8, 6, 4, 0] * 3
    for i, t in enumerate(order):
        s.append_prediction({"pair": "BTC", "timestamp": 1000 + t * 10 + i // 10, "n": i})
    s.append_prediction({"pair": "BTC", "timestamp": 5000, "n": "buffered"})  # not flushed yet
    assert s.predictions.buffered == 1
    everything = s.query_predictions("BTC", limit=None)
    assert len(everything) == 31 == s.count_predictions("BTC")
    assert ts_of(everything) == sorted(ts_of(everything), reverse=True)
    assert everything[0]["n"] == "buffered"
    assert s.query_predictions("BTC", limit=5) == everything[:5]
    since = everything[12]["timestamp"]
    got = s.query_predictions("BTC", limit=100, since=since)
    assert got == [r for r in everything if r["timestamp"] >= since]
    assert s.query_predictions("BTC", limit=3, since=since) == got[:3]
    assert s.query_predictions("BTC", limit=0) == []
    assert s.query_predictions("ETH") == []
    with pytest.raises(ValueError):
        s.query_predictions("BTC", limit=-1)


def test_equal_timestamps_come_out_latest_arrival_first(tmp_path: Path):
    s = make(tmp_path, flush_count=3)
    for i in range(7):
        s.append_prediction({"pair": "BTC", "timestamp": 100, "n": i})
    assert [r["n"] for r in s.query_predictions("BTC", limit=None)] == [6, 5, 4, 3, 2, 1, 0]


def test_flush_by_count_and_by_age(tmp_path: Path):
    s = make(tmp_path, flush_count=5, flush_seconds=2.0)
    clock = FakeClock()
    s.predictions._clock = clock
    for i in range(4):
        s.append_prediction({"pair": "BTC", "timestamp": i})
    assert s.predictions.buffered == 4 and not s.predictions.flush_due()
    s.append_prediction({"pair": "ETH", "timestamp": 4})
    assert s.predictions.buffered == 0  # count reached: flushed, one segment per pair
    assert len(s.predictions.segments("BTC")[0]) == 1 and len(s.predictions.segments("ETH")[0]) == 1

    s.append_prediction({"pair": "BTC", "timestamp": 10})
    clock.t += 1.0
    assert s.flush_if_due() == 0
    clock.t += 1.5
    assert s.predictions.flush_due()
    s.append_prediction({"pair": "BTC", "timestamp": 11})  # the age check runs on append
    assert s.predictions.buffered == 0
    assert Storage.reader(s.data_dir).count_predictions("BTC") == 6


def test_ids_are_given_and_duplicates_by_id_dropped_even_after_restart(tmp_path: Path):
    s = make(tmp_path)
    stored = s.append_prediction({"pair": "BTC", "timestamp": 1, "p": 0.7})
    assert isinstance(stored["id"], str) and len(stored["id"]) == 32
    mine = s.append_prediction({"pair": "BTC", "timestamp": 2, "id": "req-1"})
    assert mine["id"] == "req-1"
    assert s.append_prediction({"pair": "BTC", "timestamp": 2, "id": "req-1"}) is None
    assert s.append_predictions([{"pair": "BTC", "timestamp": 3, "id": "req-2"},
                                 {"pair": "BTC", "timestamp": 3, "id": "req-2"}])[1] is None
    s.close()
    again = make(tmp_path)  # a restarted writer learns the recent ids from disk
    assert again.append_prediction({"pair": "BTC", "timestamp": 2, "id": "req-1"}) is None
    assert again.count_predictions("BTC") == 3


@pytest.mark.parametrize("bad", [
    {"timestamp": 1}, {"pair": "BTC"}, {"pair": "BTC", "timestamp": "1"}, {"pair": "BTC", "timestamp": -5},
    {"pair": "BTC", "timestamp": 1, "x": object()}, {"pair": "BTC", "timestamp": 1, "x": float("nan")},
    {"pair": "BTC", "timestamp": 1, "id": 7}, "not a dict",
])
def test_invalid_records_are_refused_whole_batch(tmp_path: Path, bad):
    s = make(tmp_path)
    with pytest.raises(ValueError):
        s.append_predictions([{"pair": "BTC", "timestamp": 1}, bad])
    assert s.count_predictions("BTC") == 0


def test_update_fills_outcomes_in_buffer_and_on_disk(tmp_path: Path):
    s = make(tmp_path, flush_count=4)
    recs = [s.append_prediction({"pair": "BTC", "timestamp": i}) for i in range(6)]  # 4 flushed, 2 buffered
    n = s.update_predictions("BTC", [{"id": recs[0]["id"], "outcome": "up", "timestamp": 999},
                                     {"id": recs[5]["id"], "outcome": "down"},
                                     {"id": "nope", "outcome": "up"}])
    assert n == 2
    by_id = {r["id"]: r for r in s.query_predictions("BTC", limit=None)}
    assert by_id[recs[0]["id"]]["outcome"] == "up" and by_id[recs[0]["id"]]["timestamp"] == 0
    assert by_id[recs[5]["id"]]["outcome"] == "down"
    s.flush()
    reader = Storage.reader(s.data_dir)
    assert {r["id"]: r.get("outcome") for r in reader.query_predictions("BTC", limit=None)}[recs[0]["id"]] == "up"
    with pytest.raises(ValueError):
        s.update_predictions("BTC", [{"outcome": "up"}])


def test_compaction_keeps_every_record_and_order(tmp_path: Path):
    s = make(tmp_path, flush_count=5)
    s.predictions.compact_threshold = 6
    s.predictions.segment_max_records = 40
    for i in range(200):
        s.append_prediction({"pair": "BTC", "timestamp": 10_000 - i * 7 % 1000, "n": i})
    s.flush()
    live, dead = s.predictions.segments("BTC")
    assert not dead
    assert len(live) <= 6 + 4, [seg.name for seg in live]
    assert any(seg.hi > seg.lo for seg in live)  # some are merged ranges
    got = s.query_predictions("BTC", limit=None)
    assert sorted(r["n"] for r in got) == list(range(200))
    assert ts_of(got) == sorted(ts_of(got), reverse=True)
    assert s.query_predictions("BTC", limit=7) == got[:7]


def test_leftovers_of_an_interrupted_compaction_are_ignored_then_removed(tmp_path: Path):
    s = make(tmp_path, flush_count=5)
    for i in range(20):
        s.append_prediction({"pair": "BTC", "timestamp": i})
    s.flush()
    d = s.predictions.pair_dir("BTC")
    originals = {p.name: p.read_bytes() for p in d.iterdir()}
    s.predictions.compact_threshold = 2
    s.predictions.segment_max_records = 40
    assert s.predictions.maybe_compact("BTC") == 4
    assert len(list(d.iterdir())) == 1
    for name, raw in originals.items():  # as if the writer died before deleting the merged files
        (d / name).write_bytes(raw)
    reader = Storage.reader(s.data_dir)
    assert reader.count_predictions("BTC") == 20
    assert len(reader.query_predictions("BTC", limit=None)) == 20
    assert len(reader.predictions.segments("BTC")[1]) == 4
    s.close()
    restarted = make(tmp_path, flush_count=5)  # the next writer's first flush removes them
    restarted.append_prediction({"pair": "BTC", "timestamp": 99})
    restarted.flush()
    assert not restarted.predictions.segments("BTC")[1]
    assert restarted.count_predictions("BTC") == 21
    assert reader.count_predictions("BTC") == 21


def test_split_live_prefers_covering_range_then_fewer_records():
    segs = [Segment(1, 1, 0, 5, 5, "a"), Segment(2, 2, 6, 9, 4, "b"), Segment(1, 2, 0, 9, 9, "c"),
            Segment(3, 3, 10, 20, 8, "d"), Segment(3, 3, 15, 20, 3, "e")]
    live, dead = split_live(segs)
    assert [x.name for x in live] == ["c", "e"]
    assert sorted(x.name for x in dead) == ["a", "b", "d"]


def test_failed_flush_keeps_records_buffered(tmp_path: Path, monkeypatch):
    s = make(tmp_path, flush_count=1000)
    for i in range(5):
        s.append_prediction({"pair": "BTC", "timestamp": i})
    real = segments_module.atomic_write_json

    def failing(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(segments_module, "atomic_write_json", failing)
    with pytest.raises(OSError):
        s.flush()
    assert s.predictions.buffered == 5
    assert len(s.query_predictions("BTC", limit=None)) == 5
    monkeypatch.setattr(segments_module, "atomic_write_json", real)
    assert s.flush() == 5
    assert Storage.reader(s.data_dir).count_predictions("BTC") == 5


def test_reader_cannot_write(tmp_path: Path):
    make(tmp_path).close()
    reader = Storage.reader(tmp_path / "data")
    with pytest.raises(PermissionError):
        reader.append_prediction({"pair": "BTC", "timestamp": 1})
    with pytest.raises(PermissionError):
        reader.update_predictions("BTC", [])


def test_concurrent_threads_lose_nothing(tmp_path: Path):
    s = make(tmp_path, flush_count=37)
    errors = []

    def worker(t: int) -> None:
        try:
            for i in range(300):
                s.append_prediction({"pair": "BTC" if i % 2 else "ETH", "timestamp": i, "t": t, "i": i})
                if i % 50 == 0:
                    s.query_predictions("BTC", limit=10)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    s.flush()
    got = s.query_predictions("BTC", limit=None) + s.query_predictions("ETH", limit=None)
    assert len(got) == 2400 and len({r["id"] for r in got}) == 2400
    assert {(r["t"], r["i"]) for r in got} == {(t, i) for t in range(8) for i in range(300)}


def test_buffered_records_are_flushed_when_the_process_exits(tmp_path: Path):
    data_dir = tmp_path / "data"
    code = ("from ml.storage.store import Storage\n"
            f"s = Storage({str(data_dir)!r}, flush_count=10**6, flush_seconds=10**6)\n"
            "s.append_predictions([{'pair': p, 'timestamp': i} for i in range(42) for p in ('BTC', 'ETH')])\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    reader = Storage.reader(data_dir)
    assert reader.count_predictions("BTC") == 42 and reader.count_predictions("ETH") == 42


def test_flush_where_one_pair_fails_rebuffers_only_that_pair(tmp_path: Path, monkeypatch):
    s = make(tmp_path, flush_count=1000)
    for i in range(4):
        for pair in ("BTC", "ETH", "XMR"):
            s.append_prediction({"pair": pair, "timestamp": i})
    real = segments_module.atomic_write_json

    def eth_fails(path, *a, **k):
        if "/ETH/" in str(path):
            raise OSError("bad sector")
        return real(path, *a, **k)

    monkeypatch.setattr(segments_module, "atomic_write_json", eth_fails)
    with pytest.raises(OSError, match="bad sector"):
        s.flush()
    assert s.predictions.buffered == 4
    reader = Storage.reader(s.data_dir)
    assert [reader.count_predictions(p) for p in ("BTC", "ETH", "XMR")] == [4, 0, 4]
    monkeypatch.setattr(segments_module, "atomic_write_json", real)
    assert s.flush() == 4
    assert [reader.count_predictions(p) for p in ("BTC", "ETH", "XMR")] == [4, 4, 4]
    assert [s.count_predictions(p) for p in ("BTC", "ETH", "XMR")] == [4, 4, 4]
