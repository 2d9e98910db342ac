"""`tbml backtest` end to end: a CSV no fixture was tuned on, the store, and every kind of bad input.

The main run goes through `python -m cli` like a user's shell (once per module: a few seconds
on 3,000 bars, 2 folds, 2 epochs); the rest call `cli.main` in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import main
from ml.data.store import CandleStore
from ml.data.synthetic import ORIGIN_TS, generate_candles

REPO = Path(__file__).resolve().parents[2]
TF = 300_000
END = ORIGIN_TS + 12_345 * TF  # a fixed bar: the data never depends on the clock
NAMES = ("model", "majority", "persistence", "logistic", "lightgbm")
METRIC_KEYS = {"n", "accuracy", "balanced_accuracy", "mcc", "brier", "log_loss", "ece", "accuracy_ci95",
               "signal_rate", "signal_accuracy"}
PNGS = ("reliability.png", "folds.png", "returns.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reject_constant(name: str):
    raise AssertionError(f"not strict JSON: {name}")


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity (Python's json accepts them by default)."""
    return json.loads(text, parse_constant=_reject_constant)


@pytest.fixture(scope="module")
def drift_csv(tmp_path_factory) -> tuple[Path, object]:
    """A trending series (seed and drift used by no other fixture) written as a plain OHLCV CSV."""
    candles = generate_candles("SOL", 3_000, seed=8675, drift=0.65, signal_strength=0.08, end_ts=END)
    path = tmp_path_factory.mktemp("csv") / "sol-drift.csv"
    candles.to_csv(path, index=False)
    return path, candles


@pytest.fixture(scope="module")
def cli_run(drift_csv, tmp_path_factory):
    """One real `tbml backtest --file ... --json OUT --report DIR --export FILE` on two horizons, 3 the
    default (no --no-progress: stderr is a pipe)."""
    path, _ = drift_csv
    work = tmp_path_factory.mktemp("run")
    out, report = work / "bt.json", work / "report" / "sol"
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "backtest", "--file", str(path), "--folds", "2", "--epochs", "2",
         "--seed", "11", "--horizons", "1,3", "--horizon", "3", "--cost-bps", "5", "--json", str(out), "--report", str(report),
         "--export", str(work / "rows.parquet")],
        cwd=REPO, env={**os.environ, "TBML_DATA_DIR": str(work / "data")}, capture_output=True, text=True,
        timeout=300)
    return proc, out, report


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_csv_run_exits_0_and_prints_the_summary(cli_run):
    proc, out, report = cli_run
    assert proc.returncode == 0, proc.stderr
    assert "backtest:" not in proc.stderr  # no progress bar when stderr is not a terminal
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sol-drift.csv: lstm, horizon 3 (also 1), 2 folds, 3,000 candles")
    assert any(line.startswith("per horizon") for line in lines)
    assert any(line.startswith("1 ") for line in lines) and any(line.startswith("3 (default)") for line in lines)
    assert any(line.startswith("h = 1: ") for line in lines) and any(line.startswith("h = 3: ") for line in lines)
    for name in ("model (lstm)", "majority", "persistence", "logistic", "LightGBM", "buy & hold"):
        assert any(line.startswith(name) for line in lines), name
    assert any("accuracy interval" in line for line in lines)
    assert f"json: {out}" in lines and f"report: {report / 'report.md'}" in lines


def test_csv_run_json_has_the_contract_keys(cli_run, drift_csv):
    proc, out, _ = cli_run
    assert proc.returncode == 0, proc.stderr
    doc = strict_loads(out.read_text())
    _, candles = drift_csv
    assert {"data", "config", "overall", "folds"} <= set(doc)
    assert {"rows", "start", "end"} <= set(doc["data"])
    assert doc["data"]["rows"] == len(candles) == 3_000
    assert doc["data"]["start"] == int(candles["ts"].iloc[0]) and doc["data"]["end"] == int(candles["ts"].iloc[-1])
    assert doc["config"]["horizon"] == 3 and doc["config"]["folds"] == 2 and doc["config"]["epochs"] == 2
    assert doc["config"]["horizons"] == [1, 3] and doc["config"]["purge"] == doc["config"]["seq_len"] + 3
    assert set(doc["horizons"]) == {"1", "3"} and doc["horizons"]["3"]["overall"] == doc["overall"]
    for h in ("1", "3"):
        block = doc["horizons"][h]
        assert set(NAMES) <= set(block["overall"]) and set(NAMES) <= set(block["trading"])
        assert block["volatility"]["model_qlike"] > 0 and block["volatility"]["naive_qlike"] > 0
    assert doc["config"]["seed"] == 11 and doc["config"]["cost_bps"] == 5
    assert set(NAMES) <= set(doc["overall"])
    for name in NAMES:
        m = doc["overall"][name]
        assert set(m) >= METRIC_KEYS, name
        assert m["n"] > 0 and 0.0 <= m["accuracy"] <= 1.0
        lo, hi = m["accuracy_ci95"]
        assert 0.0 <= lo <= m["accuracy"] <= hi <= 1.0
    assert len(doc["folds"]) == 2
    for fold in doc["folds"]:
        train, test = fold["train"], fold["test"]
        assert len(train) == 2 and len(test) == 2
        assert all(isinstance(t, int) for t in (*train, *test))
        assert train[0] <= train[1] < test[0] <= test[1]  # training strictly before its test block
        assert set(fold["model"]) >= METRIC_KEYS
    assert doc["folds"][0]["test"][1] < doc["folds"][1]["test"][0]
    assert sum(f["model"]["n"] for f in doc["folds"]) == doc["overall"]["model"]["n"]


def test_csv_run_simulates_trades_and_exports_every_test_row(cli_run, drift_csv):
    """The JSON's `trading` blocks (the simulator of the live service on the walk-forward predictions,
    per horizon) and the Parquet export: one row per pooled test row with, per horizon, every model's
    probability, the volatility, the signal and the simulated position; replaying the simulator on
    the file's own rows gives each horizon's reported trades and equity."""
    import numpy as np
    import pandas as pd

    from ml.serving.signals import classify
    from ml.simulation.trades import Bar, Forecast, SimConfig, simulate

    proc, out, _ = cli_run
    assert proc.returncode == 0, proc.stderr
    doc = strict_loads(out.read_text())
    trading = doc["trading"]
    for name in NAMES:
        t = trading[name]
        assert {"trades", "winRate", "totalReturn", "sharpe", "maxDrawdown", "exposure", "turnover", "feesPaid",
                "buyAndHold"} <= set(t), name
        assert 0.0 <= t["maxDrawdown"] < 1.0 and 0.0 <= t["exposure"] <= 1.0
    assert trading["config"]["feeBps"] == SimConfig().fee_bps
    assert "network's predicted volatility" in trading["config"]["volatility"]
    assert any(line.startswith("simulated trading") for line in proc.stdout.splitlines())

    rows = pd.read_parquet(out.parent / "rows.parquet")
    assert len(rows) == doc["overall"]["model"]["n"]
    per_h = {f"{c}_h{h}" for h in (1, 3) for c in ("vol", "signal", "position")}
    assert {"ts", "ts_ms", "close", "fold", *per_h, *(f"p_{n}_h{h}" for n in NAMES for h in (1, 3))} <= set(rows.columns)
    assert rows["ts_ms"].is_monotonic_increasing
    assert list(rows["signal"]) == list(rows["signal_h3"]) and list(rows["position"]) == list(rows["position_h3"])
    cfg = doc["config"]
    _, candles = drift_csv
    test = candles[candles["ts"] >= rows["ts_ms"].iloc[0]]
    bars = [Bar(int(r.ts), r.open, r.high, r.low, r.close) for r in test.itertuples()]
    for h in (1, 3):
        assert set(rows[f"position_h{h}"].unique()) <= {-1, 0, 1}
        assert (rows[f"vol_h{h}"] > 0).all()
        assert list(rows[f"signal_h{h}"]) == [classify(p, cfg["strong"], cfg["weak"]).signal
                                              for p in rows[f"p_model_h{h}"]]
        traded = 0
        for name in NAMES:  # every model's trades, from the exported probabilities and volatility alone
            signals = [classify(p, cfg["strong"], cfg["weak"]).signal for p in rows[f"p_{name}_h{h}"]]
            forecasts = {int(t): Forecast(int(t), c, sig, v, h) for t, c, sig, v in
                         zip(rows["ts_ms"], rows["close"], signals, rows[f"vol_h{h}"], strict=True)}
            sim = simulate(bars, forecasts, SimConfig())
            reported = doc["horizons"][str(h)]["trading"][name]
            assert len([t for t in sim.trades if not t.open]) == reported["trades"], (h, name)
            assert sim.equity == pytest.approx(reported["equity"]), (h, name)
            traded += reported["trades"]
            if name == "model":
                model_sim = sim
        assert traded > 0, h  # the replay compared real trades
        sim = model_sim
        held = np.zeros(len(rows))
        for t in sim.trades:  # the exported position is the replayed account's after each close
            end = t.closed_ts if t.closed_ts is not None else np.iinfo(np.int64).max
            held[(rows["ts_ms"] >= t.opened_ts) & (rows["ts_ms"] < end)] = 1 if t.side == "LONG" else -1
        assert np.array_equal(held, rows[f"position_h{h}"].to_numpy())
    assert not np.allclose(rows["vol_h1"], rows["vol_h3"])


def test_csv_run_writes_the_report_with_three_plots(cli_run):
    proc, _, report = cli_run
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in report.iterdir()) == sorted(["report.md", *PNGS])
    md = (report / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# Backtest of sol-drift.csv: lstm, horizon 3 bars, 2 folds")
    for png in PNGS:
        data = (report / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1_000
        assert f"]({png})" in md


def test_pair_from_the_store_with_json_to_stdout(capsys, tmp_path, drift_csv):
    _, candles = drift_csv
    CandleStore(tmp_path, "5m").write("SOLX", candles)
    code, out, err = run_main(capsys, "backtest", "--pair", "SOLX", "--data-dir", str(tmp_path), "--bars", "2800",
                              "--folds", "2", "--epochs", "1", "--json", "-", "--no-progress")
    assert code == 0, err
    doc = strict_loads(out)  # stdout is the JSON document and nothing else
    assert doc["data"]["rows"] == 2_800 and doc["data"]["end"] == int(candles["ts"].iloc[-1])
    assert doc["data"]["source"].startswith("store ") and doc["data"]["pair"] == "SOLX"
    assert doc["checks"]["causality"]["passed"] is True  # the CLI runs the look-ahead check


@pytest.fixture(scope="module")
def short_csv(drift_csv, tmp_path_factory) -> Path:
    _, candles = drift_csv
    path = tmp_path_factory.mktemp("short") / "short.csv"
    candles.tail(400).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("args,needle", [
    (["--file", "{missing}"], "no such file"),
    (["--file", "{csv}", "--pair", "BTC"], "not allowed with"),
    ([], "one of the arguments --file --pair is required"),
    (["--file", "{csv}", "--horizon", "5", "--purge", "3"], "purge (3) must be >= the horizon (5)"),
    (["--file", "{short}"], "more data"),
    (["--file", "{csv}", "--folds", "40"], "more data"),
    (["--file", "{csv}", "--model", "xgboost"], "unknown model 'xgboost'"),
    (["--file", "{csv}", "--json", "{blocker}/out.json"], "is not a directory"),
    (["--file", "{csv}", "--json", "{tmp}"], "is a directory"),
    (["--file", "{csv}", "--report", "{blocker}/report"], "is not a directory"),
    (["--file", "{csv}", "--export", "{tmp}/rows.csv"], "must end in .parquet"),
    (["--file", "{csv}", "--export", "{blocker}/rows.parquet"], "is not a directory"),
    (["--file", "{csv}", "--epochs", "0"], "--epochs"),
    (["--file", "{csv}", "--train-bars", "10"], "--train-bars"),
    (["--file", "{csv}", "--cost-bps", "nan"], "--cost-bps"),
    (["--file", "{csv}", "--bars", "0"], "--bars"),
    (["--file", "{csv}", "--horizons", "1,x"], "--horizons must be comma-separated integers"),
    (["--file", "{csv}", "--horizons", "1,3", "--horizon", "5"], "horizon 5 is not one of the horizons [1, 3]"),
    (["--file", "{csv}", "--horizons", "3,3"], "--horizons"),
    (["--file", "{csv}", "--select-k", "0"], "--select-k"),
    (["--file", "{garbage}"], "garbage.csv"),
    (["--pair", "../etc"], "invalid pair"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, drift_csv, short_csv, args, needle):
    csv, _ = drift_csv
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("this is not,a candle file\n1,2\n")
    subst = {"missing": tmp_path / "nope.csv", "csv": csv, "short": short_csv, "blocker": blocker,
             "tmp": tmp_path, "garbage": garbage}
    argv = ["backtest", *[a.format(**subst) for a in args], "--no-progress"]
    code, out, err = run_main(capsys, *argv)
    assert code == 2, (out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("tbml: error: "), err
    assert needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "garbage.csv"]  # nothing written


# ------------------------------------------------------------------------------------ timeframes

H1 = 3_600_000


@pytest.fixture(scope="module")
def hourly_csv(tmp_path_factory) -> Path:
    """1h candles (the settings default is 5m): the timeframe must come from the file itself."""
    candles = generate_candles("EURX", 1_500, seed=314, end_ts=ORIGIN_TS + 4_000 * H1, timeframe_ms=H1)
    path = tmp_path_factory.mktemp("hourly") / "eurusd_1h.csv"
    candles.to_csv(path, index=False)
    return path


def test_hourly_file_backtests_without_a_timeframe_flag(capsys, hourly_csv):
    code, out, err = run_main(capsys, "backtest", "--file", str(hourly_csv), "--folds", "2", "--epochs", "1",
                              "--json", "-", "--no-progress")
    assert code == 0, err
    doc = strict_loads(out)
    assert doc["data"]["timeframe"] == "1h" and doc["data"]["rows"] == 1_500
    assert doc["data"]["end"] - doc["data"]["start"] == 1_499 * H1
    assert doc["data"]["import"]["gaps"] == 0  # gaps are counted at the file's 1h, not the default 5m


def test_timeframe_that_contradicts_the_file_is_refused_naming_both(capsys, hourly_csv, tmp_path):
    code, out, err = run_main(capsys, "backtest", "--file", str(hourly_csv), "--timeframe", "5m",
                              "--json", str(tmp_path / "bt.json"), "--no-progress")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("tbml: error: "), err
    assert "1h apart but the timeframe is 5m" in err
    assert list(tmp_path.iterdir()) == []  # refused before any work
    code, out, err = run_main(capsys, "backtest", "--file", str(hourly_csv), "--timeframe", "1h", "--folds", "2",
                              "--epochs", "1", "--json", "-", "--no-progress")
    assert code == 0, err
    assert strict_loads(out)["data"]["timeframe"] == "1h"
