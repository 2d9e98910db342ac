"""The supervisor's bookkeeping without processes: the backoff, and what one failure and one restart
leave in the run state (restarts per piece, the last failure, what is down)."""

from __future__ import annotations

from cluster.ops.state import new_state, read_state
from cluster.ops.supervisor import Backoff, Ledger, exit_reason, initial_document
from ml.config import SupervisorSettings


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap():
    b = Backoff(initial_s=1.0, factor=2.0, max_s=5.0)
    assert [b.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_exit_reasons_name_the_signal():
    assert exit_reason(-9) == "killed by SIGKILL"
    assert exit_reason(1) == "exited with code 1"


def test_a_failure_then_a_restart_are_in_the_run_state(tmp_path):
    state = new_state(tmp_path, "tbml-test", {"mode": "disabled"}, detach=False)
    lines: list[str] = []
    sup = SupervisorSettings(backoff_initial_s=0.0)
    ledger = Ledger(state, tmp_path, ["redis", "feed"], sup, lines.append)
    assert read_state(tmp_path)["supervisor"]["restarts"] == {"redis": 0, "feed": 0}

    ledger.failed("redis", "killed by SIGKILL")
    on_disk = read_state(tmp_path)["supervisor"]
    assert on_disk["down"] == ["redis"] and on_disk["lastFailure"]["piece"] == "redis"
    assert ledger.due("redis") and not ledger.due("feed")
    ledger.restarted("redis", "pid 1")
    on_disk = read_state(tmp_path)["supervisor"]
    assert on_disk["restarts"] == {"redis": 1, "feed": 0} and on_disk["attempts"]["redis"] == 1
    assert on_disk["down"] == [] and on_disk["lastFailure"]["reason"] == "killed by SIGKILL"
    assert any("redis restarted" in line for line in lines)


def test_the_restart_limit_stops_restarting_but_not_the_run(tmp_path):
    state = new_state(tmp_path, "tbml-test", {"mode": "disabled"}, detach=False)
    ledger = Ledger(state, tmp_path, ["feed"], SupervisorSettings(backoff_initial_s=0.0, max_restarts=1),
                    lambda _m: None)
    ledger.failed("feed", "gone")
    assert ledger.due("feed")
    ledger.failed("feed", "recreating failed")
    assert not ledger.due("feed")
    assert read_state(tmp_path)["supervisor"]["gaveUp"] == ["feed"]


def test_a_detached_start_publishes_an_inactive_document():
    assert initial_document(True, managed_redis=True)["active"] is False
    doc = initial_document(False, managed_redis=True)
    assert doc["active"] and doc["restarts"] == {"redis": 0, "feed": 0, "monitor": 0}


def test_consecutive_failures_back_off_and_a_stable_run_starts_anew(tmp_path):
    def ledger(stable_s: float) -> Ledger:
        state = new_state(tmp_path, "tbml-test", {"mode": "disabled"}, detach=False)
        sup = SupervisorSettings(backoff_initial_s=10.0, backoff_factor=2.0, backoff_max_s=25.0, stable_s=stable_s)
        return Ledger(state, tmp_path, ["redis"], sup, lambda _m: None)

    flappy = ledger(stable_s=3600.0)
    delays = []
    for _ in range(3):
        flappy.failed("redis", "killed by SIGKILL")
        delays.append(flappy.pieces["redis"].delay_s)
        flappy.pieces["redis"].due = 0.0  # due now (no sleeping in tests)
        assert flappy.due("redis")
        flappy.restarted("redis", "pid 1")
    assert delays == [10.0, 20.0, 25.0]

    steady = ledger(stable_s=1e-9)  # every run counts as stable: each failure is a first one
    for _ in range(3):
        steady.failed("redis", "killed by SIGKILL")
        assert steady.pieces["redis"].delay_s == 10.0
        steady.pieces["redis"].due = 0.0
        assert steady.due("redis")
        steady.restarted("redis", "pid 1")


def test_the_health_block_of_the_supervisor_document():
    from ml.serving.views import supervisor_view

    assert supervisor_view(None) == {"active": False, "restarts": {}, "lastFailure": None, "gaveUp": [],
                                     "down": [], "updatedAt": None}
    doc = initial_document(False, managed_redis=True) | {
        "restarts": {"redis": 1, "feed": 0, "monitor": 0},
        "lastFailure": {"piece": "redis", "at": 1, "reason": "killed by SIGKILL"}}
    view = supervisor_view(doc)
    assert view["active"] and view["restarts"]["redis"] == 1 and view["lastFailure"]["piece"] == "redis"
