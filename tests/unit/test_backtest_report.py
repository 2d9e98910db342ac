"""`ml.evaluation.report`: the Markdown + PNG report of a real (small) walk-forward backtest.

One backtest per module (3,000 synthetic bars, 2 folds, 2 epochs: a few seconds); the tests check
that the files are there and well-formed, that every table is complete, and that the verdict says
what the numbers say — never more.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from ml.data.synthetic import ORIGIN_TS, generate_candles
from ml.evaluation.backtest import NAMES, BacktestConfig, BacktestResult, edge_summary, run_backtest
from ml.evaluation.report import (
    DASH,
    FILES,
    N_BINS,
    fmt_ci,
    fmt_num,
    fmt_pct,
    label,
    metric_row,
    reliability_bins,
    render_markdown,
    utc,
    verdict_sentence,
    write_report,
)
from ml.metrics import ece
from ml.storage.atomic import is_temp_file

TF = 300_000
END = ORIGIN_TS + 9_000 * TF  # a fixed bar: the data never depends on the clock
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("reliability", "folds", "returns")


@pytest.fixture(scope="module")
def result() -> BacktestResult:
    candles = generate_candles("ETH", 3_000, seed=31, end_ts=END)
    cfg = BacktestConfig(model_type="lstm", horizons=[2, 5], horizon=5, folds=2, epochs=2, seed=3, hidden=16,
                         check_causality=False)  # the look-ahead check has its own tests
    return run_backtest(candles, cfg, source="synthetic ETH seed 31")


@pytest.fixture(scope="module")
def report(result, tmp_path_factory) -> tuple[dict[str, Path], str]:
    out = tmp_path_factory.mktemp("bt") / "nested" / "report"  # does not exist yet
    paths = write_report(result, out)
    return paths, paths["report"].read_text(encoding="utf-8")


def _table(md: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after `heading`, header row included."""
    lines = md.splitlines()
    start = lines.index(heading)
    rows, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            if not re.fullmatch(r"\|( ?:?-{3,}:? ?\|)+", line.replace(" ", "")):
                rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif seen:
            break
    return rows


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_files_exist_and_pngs_are_valid(report):
    paths, _ = report
    assert set(paths) == set(FILES)
    for key, path in paths.items():
        assert path.name == FILES[key] and path.is_file() and path.stat().st_size > 0
    for key in PLOTS:
        width, height = _png_size(paths[key].read_bytes())
        assert width > 100 and height > 100
        assert paths[key].read_bytes().endswith(b"IEND\xaeB`\x82")  # not truncated
    assert not [p for p in paths["report"].parent.iterdir() if is_temp_file(p)]


def test_rewriting_replaces_the_files_in_place(result, report):
    paths, md = report
    again = write_report(result, paths["report"].parent, title="Second run")
    assert again == paths
    assert again["report"].read_text(encoding="utf-8").startswith("# Second run\n")
    assert sorted(p.name for p in paths["report"].parent.iterdir()) == sorted(FILES.values())
    write_report(result, paths["report"].parent)  # back to the module's version
    assert paths["report"].read_text(encoding="utf-8") == md


def test_markdown_links_every_plot_relatively(report):
    paths, md = report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(FILES[k] for k in PLOTS)
    for link in links:
        assert not Path(link).is_absolute()
        assert (paths["report"].parent / link).is_file()


def test_data_section_names_rows_range_in_utc_and_source(result, report):
    _, md = report
    assert md.startswith("# Walk-forward backtest: lstm, horizon 5 bars, 2 folds\n")
    assert f"- rows: {result.data['rows']:,} candles" in md
    assert f"- range: {utc(result.data['start'])} → {utc(result.data['end'])} UTC" in md
    assert utc(ORIGIN_TS) == "2025-01-01 00:00"
    assert "- source: synthetic ETH seed 31" in md


def test_config_table_lists_every_setting(result, report):
    _, md = report
    rows = _table(md, "## Configuration")
    assert rows[0] == ["setting", "value"]
    assert [r[0].strip("`") for r in rows[1:]] == list(result.config)
    as_dict = {r[0].strip("`"): r[1] for r in rows[1:]}
    assert as_dict["horizon"] == "5" and as_dict["folds"] == "2" and as_dict["model_type"] == "lstm"
    assert as_dict["train_bars"] == DASH  # None: expanding window


def test_overall_table_has_one_row_per_model_with_the_numbers(result, report):
    _, md = report
    rows = _table(md, "## Overall (all test folds pooled)")
    header, body = rows[0], rows[1:]
    assert header[1:] == ["n", "accuracy [95 % CI]", "balanced acc.", "MCC", "Brier", "log loss", "ECE",
                          "signal rate", "signal acc."]
    assert [r[0] for r in body] == [label(n, result) for n in NAMES]
    for name, row in zip(NAMES, body, strict=True):
        m = result.overall[name]
        assert len(row) == len(header)
        assert row[1] == f"{m['n']:,}"
        assert row[2] == f"{m['accuracy'] * 100:.1f} % {fmt_ci(m['accuracy_ci95'])}"
        assert row[5] == f"{m['brier']:.4f}" and row[6] == f"{m['log_loss']:.4f}"
        assert row[9] == (DASH if m["signal_accuracy"] is None else f"{m['signal_accuracy'] * 100:.1f} %")


def test_fold_table_has_every_fold_with_utc_ranges(result, report):
    _, md = report
    rows = _table(md, "## Per fold (accuracy)")
    header, body = rows[0], rows[1:]
    assert header[:4] == ["fold", "train (UTC)", "test (UTC)", "test rows"]
    assert header[4:] == [label(n, result) for n in NAMES]
    assert len(body) == len(result.folds) == 2
    for fold, row in zip(result.folds, body, strict=True):
        assert row[1] == f"{utc(fold['train'][0])} → {utc(fold['train'][1])}"
        assert row[2] == f"{utc(fold['test'][0])} → {utc(fold['test'][1])}"
        assert row[4].strip("*").startswith(f"{fold['model']['accuracy'] * 100:.1f} % [")
        best = max(fold[n]["accuracy"] for n in NAMES)
        bold = [n for n, cell in zip(NAMES, row[4:], strict=True) if cell.startswith("**")]
        assert bold and all(fold[n]["accuracy"] == best for n in bold)


def test_strategy_table_matches_the_equity_curves(result, report):
    _, md = report
    rows = {r[0]: r for r in _table(md, "## Strategy (acting on the signals)")[1:]}
    curves = result.equity_curves(result.config["cost_bps"])
    for name in ("buy_and_hold", *NAMES):
        assert rows[label(name, result)][1] == fmt_pct(curves[name][-1], 2, signed=True)
    assert rows[label("model", result)][2] == f"{int(np.count_nonzero(result.positions('model'))):,}"


def test_verdict_line_matches_the_numbers(result, report):
    _, md = report
    line = next(s for s in md.splitlines() if s.startswith("**Verdict:** "))
    e = edge_summary(result)
    lo, hi = result.overall["model"]["accuracy_ci95"]
    assert f"[{lo * 100:.1f} %, {hi * 100:.1f} %]" in line
    assert f"accuracy {e['accuracy'] * 100:.1f} %" in line
    assert ("covers 50 %: no evidence of an edge" in line) == e["coversHalf"]
    assert ("beyond noise" in line) == (e["beatsSimpleBeyondNoise"] and not e["coversHalf"] and hi >= 0.5)
    assert ("below 50 %" in line) == (hi < 0.5)
    # the best simple baseline it names is the one edge_summary compared against
    best = max(("majority", "persistence"), key=lambda n: result.overall[n]["accuracy"])
    assert best in line and f"{e['bestSimpleBaseline'] * 100:.1f} %" in line


def test_per_horizon_table_has_every_horizon_with_its_own_numbers(result, report):
    """One row per horizon: the network's accuracy and Brier next to the best baseline's (named), its
    simulated trades and the volatility QLIKE, each from that horizon's view; a verdict per horizon."""
    _, md = report
    rows = _table(md, "## Per horizon")
    header, body = rows[0], rows[1:]
    assert header[0] == "horizon" and "vol QLIKE model / naive" in header and len(body) == 2
    assert [r[0] for r in body] == ["2", "5 (default)"]
    for h, row in zip((2, 5), body, strict=True):
        v = result.at(h)
        o, t, vs = v.overall, v.trading["model"], v.vol_score
        assert row[1] == fmt_pct(o["model"]["accuracy"]) and row[3] == fmt_num(o["model"]["brier"], 4)
        best = max((n for n in NAMES if n != "model"), key=lambda n: o[n]["accuracy"])
        assert row[2] == f"{fmt_pct(o[best]['accuracy'])} ({label(best)})"
        lowest = min((n for n in NAMES if n != "model"), key=lambda n: o[n]["brier"])
        assert row[4] == f"{fmt_num(o[lowest]['brier'], 4)} ({label(lowest)})"
        assert row[5] == fmt_num(t["sharpe"], 2) and row[6] == fmt_pct(t["maxDrawdown"], 2)
        assert row[10] == f"{fmt_num(vs['model_qlike'], 3)} / {fmt_num(vs['naive_qlike'], 3)}"
        line = next(s for s in md.splitlines() if s.startswith(f"- h = {h}: "))
        assert verdict_sentence(edge_summary(v)) in line
    assert result.at(2).overall != result.overall and result.at(5).overall == result.overall


def test_how_to_read_explains_the_scales(report):
    _, md = report
    text = md.split("## How to read this", 1)[1]
    assert "0.25 is a coin" in text and "lower is better" in text
    assert "ECE" in text and "n / h = n / 5 effective observations" in text


def _edge(acc: float, lo: float, hi: float, best: float) -> dict:
    return {"accuracy": acc, "bestSimpleBaseline": best, "margin": acc - best, "ci95": [lo, hi],
            "beatsSimpleBeyondNoise": lo > best, "coversHalf": lo <= 0.5 <= hi, "brierSkill": 0.0}


@pytest.mark.parametrize("edge,expected,absent", [
    (_edge(0.53, 0.48, 0.58, 0.51), "[48.0 %, 58.0 %] covers 50 %: no evidence of an edge", "beyond noise"),
    (_edge(0.62, 0.57, 0.67, 0.52), "beats the best simple baseline (majority, 52.0 %) by 10.0 points, beyond noise",
     "no evidence"),
    (_edge(0.56, 0.52, 0.60, 0.55), "lies above 50 % but does not clear the best simple baseline", "beyond noise"),
    (_edge(0.44, 0.40, 0.48, 0.51), "lies below 50 %", "beyond noise"),
    # clears a baseline that is itself below a coin: still no evidence
    (_edge(0.50, 0.49, 0.55, 0.45), "covers 50 %: no evidence of an edge", "beyond noise"),
])
def test_verdict_sentence_branches(edge, expected, absent):
    text = verdict_sentence(edge, "majority")
    assert expected in text and absent not in text


def test_none_and_nan_render_as_a_dash(result):
    assert fmt_pct(None) == fmt_num(float("nan")) == fmt_ci([None, None]) == fmt_ci([float("nan"), 0.5]) == DASH
    assert metric_row("model", {"n": 0, "accuracy": None, "accuracy_ci95": [None, None]})[1:] == ["0"] + [
        f"{DASH} {DASH}"] + [DASH] * 7
    m = {**result.overall["model"], "signal_accuracy": None, "mcc": float("nan"), "ece": float("inf")}
    row = metric_row("model", m, result)
    assert row[9] == DASH and row[4] == DASH and row[7] == DASH
    edited = dataclasses.replace(result, overall={**result.overall, "model": m})
    md = render_markdown(edited)
    assert not re.search(r"\b(None|nan|NaN|inf)\b", md)  # no Python spelling of "missing" in any cell
    model_row = next(r for r in _table(md, "## Overall (all test folds pooled)") if r[0] == label("model", result))
    assert model_row[9] == DASH and model_row[4] == DASH


def test_reliability_bins_are_what_ece_sums(result):
    for name in ("model", "logistic", "lightgbm"):
        p = result.probs[name]
        b = reliability_bins(result.y, p)
        assert len(b["count"]) == N_BINS and int(b["count"].sum()) == len(result.y)
        ok = b["count"] > 0
        gap = float(np.sum(b["count"][ok] * np.abs(b["mean_p"][ok] - b["rate"][ok])) / len(result.y))
        assert math.isclose(gap, ece(result.y, p), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(gap, result.overall[name]["ece"], rel_tol=1e-9, abs_tol=1e-12)
