"""The pure helpers of `make chaos` (bench.chaos_report, bench.chaos_load._classify): how one fault's
requests, health polls and doctor report become the numbers of docs/reliability.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not an installed package: import it from this checkout
    sys.path.insert(0, str(REPO))

from bench.chaos_load import _classify  # noqa: E402
from bench.chaos_report import FaultResult, Req, WriteRound, doctor_counts, healthy_again, render, summarize  # noqa: E402


def test_summarize_counts_failures_fallbacks_and_records():
    reqs = [
        Req(0.0, 0.1, 200, records=1),                       # before the fault
        Req(1.0, 1.2, 0, error="ConnectionRefusedError"),    # no answer
        Req(1.1, 1.5, 503, error="503: unavailable"),
        Req(1.3, 1.6, 200, fallback=True, records=2, error="fallback (BTC): x"),
        Req(1.7, 1.9, 200, records=2),                       # first good answer after the fault
        Req(2.0, 2.1, 404),                                  # neither failed nor served
    ]
    s = summarize(reqs, t_fault=1.0)
    assert (s.sent, s.failed, s.fallbacks, s.other) == (6, 2, 1, 1)
    assert s.served_records == 5  # the 200 answers, fallbacks included (they are recorded too)
    assert abs(s.first_ok_s - 0.9) < 1e-9
    assert abs(s.last_bad_s - 1.1) < 1e-9  # the 404 at t1=2.1 is not good either
    assert s.samples[:2] == ["ConnectionRefusedError", "503: unavailable"]


def test_summarize_without_fault_or_good_answer():
    reqs = [Req(0.0, 0.1, 0, error="x")]
    assert summarize(reqs, None).first_ok_s is None
    s = summarize(reqs + [Req(2.0, 2.5, 500)], t_fault=1.0)
    assert s.first_ok_s is None and s.last_bad_s == 1.5


def test_doctor_counts_separates_damage_from_leftovers():
    report = {"problems": [{"kind": "orphan_temp", "path": "a.tmp"},
                           {"kind": "incomplete_version", "path": "models/BTC/lstm/v1"},
                           {"kind": "corrupt_document", "path": "queue/state.json"},
                           {"kind": "missing_dir", "path": "features"}]}
    assert doctor_counts(report) == (1, 2, ["corrupt_document: queue/state.json"])
    assert doctor_counts(None) == (None, None, [])
    assert doctor_counts({"problems": []}) == (0, 0, [])


def test_healthy_again():
    polls = [(0.5, "healthy"), (1.5, "degraded"), (2.0, "error"), (2.5, "healthy"), (3.0, "healthy")]
    assert healthy_again(polls, 1.0) == (True, 1.5)
    assert healthy_again([(1.5, "healthy")], 1.0) == (False, None)
    assert healthy_again([(1.5, "unhealthy")], 1.0) == (True, None)


def test_classify_answers():
    one = json.dumps({"prediction": {"fallback": True, "reason": "prediction failed: gone"}}).encode()
    assert _classify("/api/predictions/BTC", 200, one) == (True, 1, "fallback: prediction failed: gone")
    every = json.dumps({"predictions": {"BTC": {"fallback": False}, "ETH": {"fallback": False}}}).encode()
    assert _classify("/api/predictions", 200, every) == (False, 2, "")
    fallback, records, error = _classify("/api/predictions", 503, b'{"error":"x"}')
    assert (fallback, records) == (False, 0) and error.startswith("503")


def test_render_marks_missing_numbers():
    done = FaultResult("2. Storage actor SIGKILL", target="Storage actor pid 1", restarted_by="Ray",
                       back_s=1.25, summary=summarize([Req(0, 1, 200, records=1)], 0.0), lost=0,
                       health_left=True, health_back_s=None, corrupt=0, leftovers=0)
    failed = FaultResult("4. TrainingQueue actor SIGKILL mid-run", error="no alive TrainingQueue actor",
                         training="job1: no fault injected")
    md = render([done, failed], [WriteRound(55, 0, 0, 0, 0, 2), WriteRound(60, 0, 0, 0, 0, 3)], quick=True,
                elapsed_s=10, config={"settings": "TBML_PAIRS=[BTC]"})
    assert "| 2. Storage actor SIGKILL | Storage actor pid 1 | Ray | 1.2 |" in md
    assert "**never**" in md and "**not found**" in md
    assert "harness: no alive TrainingQueue actor" in md
    assert "| 2 | 55 / 60 / 60 | 0 | 0 | 0 | 0 | 3 |" in md
