"""`tbml up` as a list of steps: a failure part-way stops exactly what the earlier steps recorded,
and the run state each step records is on disk before the next step starts (no Ray, no processes)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from cluster.ops import up as up_module
from cluster.ops.options import UpOptions
from cluster.ops.state import new_state, read_state, remove_state


def _fake_launch(tmp_path):
    state = new_state(tmp_path, "tbml-test", {"mode": "disabled"}, detach=True)
    return SimpleNamespace(state=state, redis_proc=None, data_dir=tmp_path)


def test_a_failing_step_stops_exactly_what_the_earlier_steps_recorded(monkeypatch, tmp_path):
    launch = _fake_launch(tmp_path)
    ran: list[str] = []

    def redis_step(lch) -> None:
        ran.append("redis")
        lch.state["redis"] = {"managed": True, "pid": 12345, "start": 1, "port": 1, "url": "redis://x"}

    def failing_step(_lch) -> None:
        ran.append("ray")
        raise RuntimeError("ray start failed")

    def later_step(_lch) -> None:
        ran.append("later")

    stopped: list[dict] = []
    monkeypatch.setattr(up_module, "prepare", lambda _opts, _out: launch)
    monkeypatch.setattr(up_module, "STEPS", (redis_step, failing_step, later_step))
    monkeypatch.setattr(up_module, "stop", lambda state, out: stopped.append(dict(state)))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    lines: list[str] = []

    with pytest.raises(RuntimeError, match="ray start failed"):
        up_module.up(UpOptions(detach=True), out=lines.append)

    assert ran == ["redis", "ray"]
    assert len(stopped) == 1
    assert stopped[0]["redis"]["pid"] == 12345 and stopped[0]["ray"] is None and stopped[0]["serve"] is None
    assert "start failed; stopping what was started" in lines
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the caller's handlers are back


def test_a_detached_start_runs_every_step_and_stops_nothing(monkeypatch, tmp_path):
    launch = _fake_launch(tmp_path)
    ran: list[str] = []
    monkeypatch.setattr(up_module, "prepare", lambda _opts, _out: launch)
    monkeypatch.setattr(up_module, "STEPS", tuple(lambda _l, n=n: ran.append(n) for n in ("a", "b", "c")))
    monkeypatch.setattr(up_module, "stop", lambda state, out: pytest.fail("nothing may be stopped"))
    lines: list[str] = []

    assert up_module.up(UpOptions(detach=True), out=lines.append) == 0
    assert ran == ["a", "b", "c"]
    assert "running in the background: `tbml down` (or `make stop`) stops it" in lines


def test_the_run_state_round_trips_and_is_removed_with_its_backup(tmp_path):
    from cluster.ops.launch import Launch

    state = new_state(tmp_path, "tbml-test", {"mode": "disabled"}, detach=False)
    launch = Launch(opts=UpOptions(), out=print, settings=None, data_dir=tmp_path, run=tmp_path / "run",
                    state=state, serve=None, redis_port=1, redis_url_given=None, client_port=2, agent_port=3,
                    temp_dir=tmp_path / "ray", auth={"mode": "disabled"}, dashboard_url="http://127.0.0.1:1")
    launch.record("redis", {"managed": False, "url": "redis://elsewhere"})
    on_disk = read_state(tmp_path)
    assert on_disk["redis"] == {"managed": False, "url": "redis://elsewhere"}
    assert on_disk["mode"] == "foreground" and on_disk["owner"]["pid"] > 0 and on_disk["version"] == 1
    remove_state(tmp_path)
    assert read_state(tmp_path) is None


def test_start_up_trains_every_enabled_type_then_builds_the_ensemble_behind_them():
    from cluster.ops.first_training import startup_jobs
    from ml.queue.requests import DEFAULT_PRIORITY

    # priority ascending runs first: the ensemble waits behind its members
    assert startup_jobs(["lstm", "lightgbm"]) == [("lstm", DEFAULT_PRIORITY), ("lightgbm", DEFAULT_PRIORITY),
                                                  ("ensemble", DEFAULT_PRIORITY + 1)]
    assert startup_jobs(["gru"]) == [("gru", DEFAULT_PRIORITY)]  # one type: nothing to combine
