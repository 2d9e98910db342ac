"""`tbml features`: names and the latest row, from the store, a file, or the configured source."""

import json
import os
import subprocess
import sys

import pytest

from ml.data.synthetic import generate_candles
from ml.features import FEATURE_NAMES, feature_matrix

END = 1_767_225_600_000  # 2026-01-01T00:00Z, a fixed bar so the test never depends on the clock


def _tbml(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture
def candle_csv(tmp_path):
    candles = generate_candles("ETH", 800, seed=3, end_ts=END)
    path = tmp_path / "eth.csv"
    candles.to_csv(path, index=False)
    return path, candles


def test_features_from_file_json_matches_the_matrix(candle_csv, tmp_path):
    path, candles = candle_csv
    r = _tbml("features", "--pair", "ETH", "--file", str(path), "--json", env_extra={"TBML_DATA_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["names"] == FEATURE_NAMES and out["count"] == len(FEATURE_NAMES) >= 84
    expected = feature_matrix(candles).iloc[-1]
    assert out["asOf"] == int(candles["ts"].iloc[-1])
    for name in FEATURE_NAMES:
        assert out["latest"][name] == pytest.approx(float(expected[name]), rel=1e-9, abs=1e-12)


def test_features_from_store_after_synth(tmp_path):
    env = {"TBML_DATA_DIR": str(tmp_path)}
    r = _tbml("data", "synth", "--pairs", "BTC", "--bars", "600", "--seed", "5", env_extra=env)
    assert r.returncode == 0, r.stderr
    r = _tbml("features", "--pair", "BTC", env_extra=env)
    assert r.returncode == 0, r.stderr
    assert "store" in r.stdout.splitlines()[0]
    assert len(r.stdout.splitlines()) == 1 + len(FEATURE_NAMES)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--pair", "../x"], "invalid pair"),
        (["--pair", "BTC", "--file", "/nonexistent/x.csv"], "no such file"),
        (["--pair", "BTC", "--bars", "0"], "--bars"),
        (["--pair", "BTC", "--bars", "50"], "warm-up"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    r = _tbml("features", *args, env_extra={"TBML_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert needle in r.stderr


def test_garbage_file_exits_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\x00\x01garbage\xff\n")
    r = _tbml("features", "--pair", "BTC", "--file", str(bad), env_extra={"TBML_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_features_from_a_15m_file_need_no_timeframe_flag(tmp_path):
    candles = generate_candles("ETH", 600, seed=9, end_ts=END, timeframe_ms=900_000)
    path = tmp_path / "eth_15m.csv"
    candles.to_csv(path, index=False)
    env = {"TBML_DATA_DIR": str(tmp_path)}
    r = _tbml("features", "--pair", "ETH", "--file", str(path), "--json", env_extra=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["timeframe"] == "15m" and out["asOf"] == int(candles["ts"].iloc[-1])
    r = _tbml("features", "--pair", "ETH", "--file", str(path), "--timeframe", "1h", env_extra=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "15m apart but the timeframe is 1h" in r.stderr
