"""`tbml data synth|import` end to end in a temporary data directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli import main
from ml.data.store import CandleStore

REPO = Path(__file__).resolve().parents[2]
TF = 300_000
START = 1_704_067_200_000
SUMMARY_KEYS = {"pair", "file", "format", "imported", "rejected", "rejectedTotal", "duplicates", "gaps",
                "missingBars", "start", "end", "stored"}


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def kline_lines(n: int, start: int = START) -> list[str]:
    rng = np.random.default_rng(11)
    close = np.round(50 + np.cumsum(rng.normal(0, 0.3, n)), 3)
    lines = []
    for i in range(n):
        o = close[i - 1] if i else close[0]
        c = close[i]
        hi, lo = round(max(o, c) + 0.1, 3), round(min(o, c) - 0.1, 3)
        t = start + i * TF
        lines.append(f"{t},{o},{hi},{lo},{c},{10 + i},{t + TF - 1},1000.0,7,5.0,250.0,0")
    return lines


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_end_to_end_with_env_data_dir(tmp_path):
    from ml.data.synthetic import generate_candles

    data_dir = tmp_path / "data"
    proc = run_cli("data", "synth", "--pairs", "BTC,ETH", "--bars", "500", "--seed", "3", "--strength", "0.05",
                   env={"TBML_DATA_DIR": str(data_dir)})
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["pair"] for d in docs] == ["BTC", "ETH"]
    store = CandleStore(data_dir, "5m")
    assert store.pairs() == ["BTC", "ETH"]
    for d in docs:
        assert d["bars"] == 500 and d["seed"] == 3 and d["signalStrength"] == 0.05
        assert d["end"] - d["start"] == 499 * TF
        got = store.read(d["pair"])
        want = generate_candles(d["pair"], 500, seed=3, signal_strength=0.05, lookback=10, end_ts=d["end"])
        pd.testing.assert_frame_equal(got, want)


def test_import_end_to_end(tmp_path):
    data_dir = tmp_path / "data"
    lines = kline_lines(40)
    bad = lines[:]
    fields = bad[5].split(",")
    fields[5] = "-3"                                                # negative volume
    bad[5] = ",".join(fields)
    fields = bad[9].split(",")
    fields[2], fields[3] = fields[3], fields[2]                     # high < low
    bad[9] = ",".join(fields)
    bad.insert(12, bad[11])                                         # duplicate
    bad[20] = "garbage,row"                                         # wrong field count → nan
    del bad[30:33]                                                  # a gap of 3 bars
    path = tmp_path / "BTCUSDT-5m-2024-01.csv"
    path.write_text("\n".join(bad) + "\n")

    proc = run_cli("data", "import", "--pair", "BTC", "--file", str(path), "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc.keys() >= SUMMARY_KEYS
    assert doc["format"] == "binance" and doc["pair"] == "BTC"
    assert doc["rejected"] == {"negative_volume": 1, "high_below_low": 1, "duplicate_ts": 1, "nan": 1}
    assert doc["rejectedTotal"] == 4 and doc["duplicates"] == 1
    assert doc["imported"] == 34  # 40 bars, 3 deleted, 3 rejected (the duplicate is a 41st line)
    assert doc["gaps"] == 4 and doc["missingBars"] == 6
    assert doc["start"] == START and doc["end"] == START + 39 * TF
    assert doc["added"] == doc["stored"] == doc["imported"]

    # Importing the same file again adds nothing; a longer file adds only its new bars.
    again = json.loads(run_cli("data", "import", "--pair", "BTC", "--file", str(path),
                               "--data-dir", str(data_dir)).stdout)
    assert again["added"] == 0 and again["stored"] == doc["stored"]
    longer = tmp_path / "more.csv"
    longer.write_text("\n".join(kline_lines(50)) + "\n")
    proc = run_cli("data", "import", "--pair", "BTC", "--file", str(longer), "--format", "binance",
                   "--data-dir", str(data_dir))
    more = json.loads(proc.stdout)
    assert more["added"] == 50 - doc["stored"] and more["stored"] == 50
    stored = CandleStore(data_dir).read("BTC")
    assert stored["ts"].tolist() == [START + i * TF for i in range(50)]


def test_import_generic_csv_in_process(tmp_path, capsys):
    path = tmp_path / "eth.csv"
    rows = ["Date,Open,High,Low,Close,Volume"]
    for i in range(12):
        t = pd.Timestamp(START + i * 3_600_000, unit="ms", tz="UTC").isoformat()
        rows.append(f"{t},10,11,9,10.5,{i}")
    path.write_text("\n".join(rows) + "\n")
    code, out, err = run_main(capsys, "data", "import", "--pair", "ETH", "--file", str(path),
                              "--timeframe", "1h", "--data-dir", str(tmp_path / "d"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "ohlcv" and doc["imported"] == 12 and doc["timeframe"] == "1h"
    assert CandleStore(tmp_path / "d", "1h").coverage("ETH")["bars"] == 12
    # the same hourly file is not 5m data: insisting on 5m is refused, naming both timeframes
    code, out, err = run_main(capsys, "data", "import", "--pair", "ETH", "--file", str(path),
                              "--timeframe", "5m", "--data-dir", str(tmp_path / "d"))
    assert code == 2 and "1h apart but the timeframe is 5m" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["data", "import", "--pair", "btc", "--file", "x.csv"], "invalid pair 'btc'"),
    (["data", "import", "--pair", "../x", "--file", "x.csv"], "invalid pair"),
    (["data", "import", "--pair", "BTC", "--file", "/nonexistent/x.csv"], "no such file"),
    (["data", "import", "--pair", "BTC", "--file", "x.csv", "--format", "xlsx"], "invalid choice"),
    (["data", "import", "--pair", "BTC", "--file", "x.csv", "--timeframe", "7m"], "invalid choice"),
    (["data", "import", "--file", "x.csv"], "--pair"),
    (["data", "synth", "--pairs", "BTC,eth", "--bars", "10"], "invalid pair 'eth'"),
    (["data", "synth", "--pairs", " , ", "--bars", "10"], "at least one pair"),
    (["data", "synth", "--pairs", "BTC", "--bars", "0"], "--bars must be at least 1"),
    (["data", "synth", "--pairs", "BTC", "--bars", "ten"], "invalid int value"),
    (["data", "synth", "--pairs", "BTC", "--bars", "10", "--strength", "2"], "--strength"),
    (["data", "synth", "--pairs", "BTC", "--bars", "999999999"], "synthetic history starts"),
    (["data", "synth", "--pairs", "BTC", "--bars", "10", "--drift", "10.5"], "--drift must be"),
    (["data", "synth", "--pairs", "BTC", "--bars", "10", "--drift", "-11"], "--drift must be"),
    (["data", "synth", "--pairs", "BTC", "--bars", "10", "--drift", "nan"], "--drift must be"),
    (["data", "synth", "--pairs", "BTC", "--bars", "10", "--drift", "up"], "invalid float value"),
    (["data", "synth", "--pairs", "BTC,ETH", "--bars", "10", "--out", "x.csv"], "--out writes one pair"),
    (["data", "synth", "--pairs", "BTC", "--bars", "10", "--out", " "], "--out needs a file name"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    data_dir = tmp_path / "data"
    code, out, err = run_main(capsys, *args, "--data-dir", str(data_dir))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (data_dir / "candles").exists()


def test_file_without_valid_rows_exits_2_after_summary(tmp_path, capsys):
    path = tmp_path / "allbad.csv"
    path.write_text("ts,open,high,low,close,volume\n1704067200000,1,0.5,2,1,1\n1704067500000,x,2,1,1,1\n")
    code, out, err = run_main(capsys, "data", "import", "--pair", "BTC", "--file", str(path),
                              "--data-dir", str(tmp_path / "data"))
    assert code == 2
    assert json.loads(out)["rejected"] == {"high_below_low": 1, "nan": 1}
    assert err.strip() == f"tbml: error: {path}: no valid candles (2 row(s) rejected)"
    assert not (tmp_path / "data" / "candles").exists()


# ------------------------------------------------------------------------------------------------
# synth --drift / --out
# ------------------------------------------------------------------------------------------------

def test_synth_out_csv_round_trips_through_import(tmp_path, capsys):
    from ml.data.files import import_file
    from ml.data.synthetic import generate_candles

    out = tmp_path / "doge-drift.csv"
    code, stdout, err = run_main(capsys, "data", "synth", "--pairs", "DOGE", "--bars", "3000", "--seed", "977",
                                 "--drift", "-0.8", "--strength", "0.05", "--out", str(out))
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["pair"] == "DOGE" and doc["bars"] == 3000 and doc["drift"] == -0.8 and doc["seed"] == 977
    assert doc["path"] == str(out) and doc["end"] - doc["start"] == 2999 * TF
    assert out.read_text().splitlines()[0] == "ts,open,high,low,close,volume"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left behind

    result = import_file(out, timeframe_ms=TF)
    assert result.rejected_total == 0 and result.gaps == []
    want = generate_candles("DOGE", 3000, seed=977, signal_strength=0.05, drift=-0.8, end_ts=doc["end"])
    pd.testing.assert_frame_equal(result.candles.reset_index(drop=True), want, check_exact=True)

    # and through the command a user would run next
    code, stdout, err = run_main(capsys, "data", "import", "--pair", "DOGE", "--file", str(out),
                                 "--data-dir", str(tmp_path / "data"))
    assert code == 0, err
    imported = json.loads(stdout)
    assert imported["format"] == "ohlcv" and imported["imported"] == imported["stored"] == 3000
    assert imported["rejectedTotal"] == 0
    pd.testing.assert_frame_equal(CandleStore(tmp_path / "data").read("DOGE"), want)


def test_synth_drift_goes_to_the_store(tmp_path, capsys):
    from ml.data.synthetic import generate_candles

    code, stdout, err = run_main(capsys, "data", "synth", "--pairs", "XMR", "--bars", "400", "--seed", "8",
                                 "--drift", "2.5", "--data-dir", str(tmp_path / "data"))
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["drift"] == 2.5
    want = generate_candles("XMR", 400, seed=8, drift=2.5, end_ts=doc["end"])
    pd.testing.assert_frame_equal(CandleStore(tmp_path / "data").read("XMR"), want)
    assert not want["close"].equals(generate_candles("XMR", 400, seed=8, end_ts=doc["end"])["close"])


@pytest.mark.parametrize("where, message", [
    ("missing/x.csv", "does not exist"),
    ("a_file/x.csv", "does not exist"),
    ("", "is a directory"),
])
def test_synth_out_bad_path_exits_2(tmp_path, capsys, where, message):
    (tmp_path / "a_file").write_text("not a directory\n")
    target = str(tmp_path / where) if where else str(tmp_path)
    code, out, err = run_main(capsys, "data", "synth", "--pairs", "BTC", "--bars", "10", "--out", target)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_synth_out_unwritable_directory_exits_2(capsys):
    # /proc takes no new files, not even from root (whom a chmod-ed directory would not stop)
    code, out, err = run_main(capsys, "data", "synth", "--pairs", "BTC", "--bars", "10",
                              "--out", "/proc/tbml-synth.csv")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "/proc/tbml-synth.csv" in lines[0], err
    assert not Path("/proc/tbml-synth.csv").exists()


def test_train_local_ensemble_refuses_bars_with_one_line(tmp_path):
    """An ensemble build reads the candles its members' validation and test rows need: --bars is refused."""
    out = run_cli("train", "--local", "--pair", "BTC", "--model", "ensemble", "--bars", "500",
                  env={"TBML_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "--bars" in out.stderr
