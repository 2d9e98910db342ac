"""The human-readable side of a walk-forward backtest (`tbml backtest --report DIR`).

`write_report(result, out_dir)` writes `report.md` (a per-horizon summary first, then the default
horizon's tables) plus three PNGs of the default horizon next to it:

* `reliability.png`: does P(up) = 0.6 come true 60 % of the time? (10 bins, counts shown)
* `folds.png`: accuracy per fold, the model with its Wilson interval, next to every baseline;
* `returns.png`: the cumulative return of acting on the signals, net of the cost per trade.

The verdict in the report is derived from the numbers (`ml.evaluation.backtest.edge_summary`), never written
by hand, so a report cannot claim more than the data shows. Plots use matplotlib's Agg canvas
directly (no pyplot, no global backend switch), so this module is safe to call from any process.
Every file is written atomically (`ml.storage.atomic`): a reader never sees half a report.
Plain Python; no Ray.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.evaluation.backtest import MODEL, NAMES, BacktestResult, edge_summary
from ml.evaluation.baselines import LEARNED_BASELINES
from ml.storage.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DASH = "–"
N_BINS = 10
PLOTTED = (MODEL, *LEARNED_BASELINES)  # the ones with real probabilities to plot
FILES = {"report": "report.md", "reliability": "reliability.png", "folds": "folds.png",
         "returns": "returns.png"}
COLORS = {MODEL: "#1f77b4", "majority": "#7f7f7f", "persistence": "#9467bd", "logistic": "#2ca02c",
          "lightgbm": "#ff7f0e", "buy_and_hold": "#000000"}
DPI = 110


# ----------------------------------------------------------------------------------------- format

def _finite(v: Any) -> float | None:
    """A plain float, or None for None/NaN/inf (which all render as a dash)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_num(v: Any, digits: int = 3) -> str:
    f = _finite(v)
    return DASH if f is None else f"{f:.{digits}f}"


def fmt_pct(v: Any, digits: int = 1, *, signed: bool = False) -> str:
    """A fraction as a percentage ("53.5 %"); None/NaN as a dash."""
    f = _finite(v)
    if f is None:
        return DASH
    return f"{f * 100:+.{digits}f} %" if signed else f"{f * 100:.{digits}f} %"


def fmt_ci(ci: Sequence[Any] | None, digits: int = 1) -> str:
    """A [lo, hi] interval of fractions in percent: "[47.6 %, 59.3 %]"."""
    if not ci or len(ci) != 2 or _finite(ci[0]) is None or _finite(ci[1]) is None:
        return DASH
    return f"[{fmt_pct(ci[0], digits)}, {fmt_pct(ci[1], digits)}]"


def fmt_int(v: Any) -> str:
    f = _finite(v)
    return DASH if f is None else f"{int(f):,}"


def utc(ms: Any, *, seconds: bool = False) -> str:
    """Epoch ms as a UTC date and time (bars are minutes apart, so the date alone says too little)."""
    f = _finite(ms)
    if f is None:
        return DASH
    dt = datetime.fromtimestamp(f / 1000.0, tz=UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def utc_range(pair: Sequence[Any] | None) -> str:
    if not pair or len(pair) != 2:
        return DASH
    return f"{utc(pair[0])} → {utc(pair[1])}"


def label(name: str, result: BacktestResult | None = None) -> str:
    """Display name: the model row says which network it is."""
    if name == MODEL and result is not None:
        return f"model ({result.config.get('model_type', '?')})"
    return {"buy_and_hold": "buy & hold", "lightgbm": "LightGBM"}.get(name, name)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    """A GitHub Markdown table; `align` is one letter per column (l/r), default: first left, rest right."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    esc = [[str(c).replace("|", "\\|") for c in row] for row in (header, *rows)]
    return ["| " + " | ".join(r) + " |" for r in esc[:1]] + ["| " + " | ".join(sep) + " |"] + \
           ["| " + " | ".join(r) + " |" for r in esc[1:]]


# ---------------------------------------------------------------------------------------- verdict

def verdict_sentence(edge: dict[str, Any], best_simple: str | None = None) -> str:
    """The one-line answer to "is there an edge?", from `edge_summary` numbers alone.

    Order matters: an interval that covers 50 % is "no evidence" even when it clears a simple
    baseline (that only happens when the baseline itself is below a coin on the test rows).
    """
    best_simple = best_simple or edge.get("bestSimpleName") or "the best simple baseline"
    lo, hi = edge.get("ci95") or (None, None)
    ci = fmt_ci([lo, hi])
    acc, best = fmt_pct(edge.get("accuracy")), fmt_pct(edge.get("bestSimpleBaseline"))
    margin = _finite(edge.get("margin"))
    points = DASH if margin is None else f"{margin * 100:+.1f} points"
    if edge.get("coversHalf"):
        tail = (f"; it clears {best_simple} ({best}), but that baseline is itself below a coin here"
                if edge.get("beatsSimpleBeyondNoise") else
                f"; {points} against {best_simple} ({best})")
        return (f"The model's accuracy interval {ci} covers 50 %: no evidence of an edge "
                f"(accuracy {acc}{tail}).")
    if (_finite(hi) or 0.0) < 0.5:
        return (f"The model's accuracy interval {ci} lies below 50 %: it is worse than a coin on these "
                f"rows (accuracy {acc}; {best_simple}: {best}); no usable edge (look for a sign error or a "
                f"regime change).")
    if edge.get("beatsSimpleBeyondNoise"):
        return (f"The model beats the best simple baseline ({best_simple}, {best}) by "
                f"{DASH if margin is None else f'{margin * 100:.1f}'} points, beyond noise: its accuracy "
                f"interval {ci} lies above it (accuracy {acc}).")
    return (f"The model's accuracy interval {ci} lies above 50 % but does not clear the best simple "
            f"baseline ({best_simple}, {best}): no evidence of an edge beyond what a simple rule already "
            f"gets (accuracy {acc}; {points}).")


def best_learner(result: BacktestResult) -> tuple[str, float | None]:
    """(name, accuracy) of the most accurate learner: the network, logistic or LightGBM."""
    accs = [(n, _finite(result.overall[n].get("accuracy"))) for n in (MODEL, *LEARNED_BASELINES)
            if n in result.overall]
    accs = [(n, a) for n, a in accs if a is not None]
    return max(accs, key=lambda t: t[1]) if accs else (MODEL, None)


def rule_sentence(result: BacktestResult) -> str | None:
    """The reference rule (e.g. the planted rule of the synthetic data) against the best learner on
    the same rows, or None when the caller set no reference."""
    rule = (result.reference or {}).get("rule") or {}
    rule_acc = _finite(((rule.get("accuracy") or {}).get(str(result.horizon)) or {}).get("accuracy"))
    best_name, best_acc = best_learner(result)
    if rule_acc is None or best_acc is None:
        return None
    gap = (best_acc - rule_acc) * 100
    where = ("level with it" if abs(gap) < 0.05 else
             f"{abs(gap):.1f} points {'above' if gap > 0 else 'below'} it{': the simple rule wins' if gap < 0 else ''}")
    return (f"The {rule.get('label', 'reference rule')}, which no model is told, scores {fmt_pct(rule_acc)} on "
            f"the same rows; the best learner ({label(best_name, result)}, {fmt_pct(best_acc)}) is {where}.")


def verdict(result: BacktestResult) -> list[str]:
    """The verdict paragraph: the edge sentence, then learned baselines, calibration and money."""
    e = edge_summary(result)
    lines = [verdict_sentence(e)]
    o = result.overall
    m_acc = _finite(o[MODEL]["accuracy"])
    learned = [(n, _finite(o[n]["accuracy"])) for n in LEARNED_BASELINES]
    learned = [(n, a) for n, a in learned if a is not None]
    if learned and m_acc is not None:
        top, top_acc = max(learned, key=lambda t: t[1])
        shown = ", ".join(f"{label(n)} {fmt_pct(a)}" for n, a in learned)
        diff = (m_acc - top_acc) * 100
        where = "level with" if abs(diff) < 0.05 else ("above" if diff > 0 else "below")
        amount = "" if where == "level with" else f"{abs(diff):.1f} points "
        lines.append(f"Against the learned baselines on the same folds ({shown}) the model is {amount}"
                     f"{where} the best ({label(top)}).")
    rule = rule_sentence(result)
    if rule:
        lines.append(rule)
    skill = _finite(e.get("brierSkill"))
    if skill is not None:
        lines.append(f"Brier skill against the majority rate: {skill * 100:+.2f} % (above 0 = better "
                     f"probabilities than the training base rate; Brier {fmt_num(o[MODEL]['brier'], 4)} vs "
                     f"{fmt_num(o['majority']['brier'], 4)}).")
    strat = result.strategy_summary()
    cost = _finite(result.config.get("cost_bps"))
    if MODEL in strat:
        trades = int(strat[MODEL]["trades"])
        if trades:
            lines.append(f"Acting on its signals ({fmt_pct(o[MODEL].get('signal_rate'))} of the test bars, "
                         f"{trades:,} trades, signal accuracy {fmt_pct(o[MODEL].get('signal_accuracy'))}) "
                         f"returned {fmt_pct(strat[MODEL]['return'], 2, signed=True)} net of "
                         f"{fmt_num(cost, 1)} bps per trade; buy & hold: "
                         f"{fmt_pct(strat['buy_and_hold']['return'], 2, signed=True)}.")
        else:
            lines.append("Its probabilities never cleared the signal threshold "
                         f"({fmt_pct(result.config.get('weak'), 0)}), so acting on it means never trading.")
    return lines


# ----------------------------------------------------------------------------------------- tables

METRIC_HEADER = ("", "n", "accuracy [95 % CI]", "balanced acc.", "MCC", "Brier", "log loss", "ECE",
                 "signal rate", "signal acc.")


def metric_row(name: str, m: dict[str, Any], result: BacktestResult | None = None) -> list[str]:
    """One overall-metrics row (the same columns in the Markdown report and the CLI summary)."""
    return [label(name, result), fmt_int(m.get("n")),
            f"{fmt_pct(m.get('accuracy'))} {fmt_ci(m.get('accuracy_ci95'))}",
            fmt_pct(m.get("balanced_accuracy")), fmt_num(m.get("mcc")), fmt_num(m.get("brier"), 4),
            fmt_num(m.get("log_loss"), 4), fmt_num(m.get("ece")), fmt_pct(m.get("signal_rate")),
            fmt_pct(m.get("signal_accuracy"))]


def summary_table(result: BacktestResult) -> str:
    """The plain-text table `tbml backtest` prints: overall metrics plus the net return per row."""
    strat = result.strategy_summary()
    header = [*METRIC_HEADER, "net return"]
    rows = [[*metric_row(n, result.overall[n], result),
             fmt_pct(strat.get(n, {}).get("return"), 2, signed=True)] for n in NAMES]
    rows.append([label("buy_and_hold"), fmt_int(len(result.y)), *[""] * (len(METRIC_HEADER) - 2),
                 fmt_pct(strat["buy_and_hold"]["return"], 2, signed=True)])
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    out = []
    for r in (header, *rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _config_rows(config: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, value in config.items():
        if isinstance(value, float):
            text = DASH if _finite(value) is None else f"{value:g}"
        elif value is None:
            text = DASH
        elif key == "feature_hash":
            text = f"`{str(value)[:16]}…`"
        else:
            text = str(value)
        rows.append([f"`{key}`", text])
    return rows


def _fold_rows(result: BacktestResult) -> list[list[str]]:
    rows = []
    for f in result.folds:
        accs = {n: _finite(f[n].get("accuracy")) for n in NAMES}
        best = max((a for a in accs.values() if a is not None), default=None)
        cells = []
        for n in NAMES:
            text = fmt_pct(accs[n])
            if n == MODEL:
                text += f" {fmt_ci(f[n].get('accuracy_ci95'))}"
            if best is not None and accs[n] == best:
                text = f"**{text}**"
            cells.append(text)
        rows.append([str(int(f.get("index", len(rows))) + 1), utc_range(f.get("train")),
                     utc_range(f.get("test")), fmt_int(f.get(MODEL, {}).get("n")), *cells])
    return rows


def _strategy_rows(result: BacktestResult) -> list[list[str]]:
    strat = result.strategy_summary()
    rows = [[label("buy_and_hold"), fmt_pct(strat["buy_and_hold"]["return"], 2, signed=True), DASH]]
    for n in NAMES:
        if n in strat:
            rows.append([label(n, result), fmt_pct(strat[n]["return"], 2, signed=True),
                         fmt_int(strat[n]["trades"])])
    return rows


TRADING_HEADER = ("", "trades", "win rate", "net return", "Sharpe", "max drawdown", "exposure", "turnover",
                  "fees")


def _trading_rows(result: BacktestResult) -> list[list[str]]:
    trading = result.trading or {}
    rows = []
    for n in NAMES:
        t = trading.get(n)
        if not t:
            continue
        rows.append([label(n, result), fmt_int(t["trades"]), fmt_pct(t["winRate"]),
                     fmt_pct(t["totalReturn"], 2, signed=True), fmt_num(t["sharpe"], 2),
                     fmt_pct(t["maxDrawdown"], 2), fmt_pct(t["exposure"]), fmt_num(t["turnover"], 3),
                     fmt_pct(t["feesPaid"], 2)])
    hold = next((t["buyAndHold"] for t in trading.values() if isinstance(t, dict) and "buyAndHold" in t), None)
    if hold:
        rows.append([label("buy_and_hold"), DASH, DASH, fmt_pct(hold["totalReturn"], 2, signed=True),
                     fmt_num(hold["sharpe"], 2), fmt_pct(hold["maxDrawdown"], 2), "100.0 %", DASH, DASH])
    return rows


def trading_table(result: BacktestResult) -> str:
    """The plain-text table of the simulated trades (`ml.evaluation.trading`), one row per model."""
    rows = _trading_rows(result)
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in (TRADING_HEADER, *rows)) for i in range(len(TRADING_HEADER))]
    return "\n".join("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)])
                     .rstrip() for r in (TRADING_HEADER, *rows))


HORIZON_HEADER = ("horizon", "model acc.", "best baseline acc.", "model Brier", "best baseline Brier",
                  "Sharpe", "max drawdown", "turnover", "exposure", "fees", "vol QLIKE model / naive")


def _best_baseline(overall: dict[str, dict[str, Any]], key: str, lower: bool) -> tuple[str, float | None]:
    """(name, value) of the best baseline on `key` (lowest when `lower`), skipping missing values."""
    vals = [(n, _finite(overall[n].get(key))) for n in NAMES if n != MODEL and n in overall]
    vals = [(n, v) for n, v in vals if v is not None]
    if not vals:
        return DASH, None
    return (min if lower else max)(vals, key=lambda t: t[1])


def horizon_rows(result: BacktestResult) -> list[list[str]]:
    """One row per evaluated horizon: the network's accuracy and Brier next to the best baseline's,
    its simulated trades (Sharpe, drawdown, turnover, exposure, fees) and the volatility score;
    the reference (e.g. the planted rule) when the caller set one."""
    views = result.by_horizon or {result.horizon: result}
    ref = (result.reference or {}).get("rule") or {}
    rows = []
    for h, v in sorted(views.items()):
        o = v.overall
        acc_name, acc = _best_baseline(o, "accuracy", lower=False)
        br_name, br = _best_baseline(o, "brier", lower=True)
        t = (v.trading or {}).get(MODEL) or {}
        vs = v.vol_score or {}
        row = [f"{h}{' (default)' if h == result.horizon else ''}", fmt_pct(o[MODEL].get("accuracy")),
               f"{fmt_pct(acc)} ({label(acc_name)})", fmt_num(o[MODEL].get("brier"), 4),
               f"{fmt_num(br, 4)} ({label(br_name)})", fmt_num(t.get("sharpe"), 2), fmt_pct(t.get("maxDrawdown"), 2),
               fmt_num(t.get("turnover"), 3), fmt_pct(t.get("exposure")), fmt_pct(t.get("feesPaid"), 2),
               f"{fmt_num(vs.get('model_qlike'), 3)} / {fmt_num(vs.get('naive_qlike'), 3)}"]
        if ref:
            row.append(fmt_pct(((ref.get("accuracy") or {}).get(str(h)) or {}).get("accuracy")))
        rows.append(row)
    return rows


def horizon_header(result: BacktestResult) -> list[str]:
    ref = (result.reference or {}).get("rule") or {}
    return [*HORIZON_HEADER, *([ref.get("label", "reference rule")] if ref else [])]


def horizon_verdicts(result: BacktestResult) -> list[str]:
    """The verdict sentence of every horizon (so a simple rule that wins is said per horizon)."""
    views = result.by_horizon or {result.horizon: result}
    out = []
    for h, v in sorted(views.items()):
        rule = rule_sentence(v)
        out.append(f"h = {h}: {verdict_sentence(edge_summary(v))}" + (f" {rule}" if rule else ""))
    return out


def horizon_table(result: BacktestResult) -> str:
    """The per-horizon summary as plain text (what `tbml backtest` prints)."""
    header, rows = horizon_header(result), horizon_rows(result)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)])
                     .rstrip() for r in (header, *rows))


HOW_TO_READ = """\
**Accuracy** is the share of test rows whose direction was called right; it only means something
next to the baselines, which saw exactly the same folds: *majority* always calls the more common
direction of its training rows, *persistence* says the next {h} bars go the way the last {h} went,
*logistic* and *LightGBM* learn from the same features as the model. **Balanced accuracy** averages
the hit rates on up and on down moves, so a model cannot score by always calling the common
direction; **MCC** is the correlation between calls and outcomes (0 = no skill).

The **95 % interval** is a Wilson interval computed on n / h = n / {h} effective observations, not
on n: the labels of neighbouring rows share {hm1} of their {h} future bars, so consecutive outcomes
are not independent, and counting every row as a separate trial would make the interval about
√{h} times too narrow. If it covers 50 %, the accuracy is not distinguishable from a coin.

**Brier score** is the mean squared error of the probability: lower is better, 0.25 is a coin (a
constant 0.5). **Log loss** is the same idea in nats: 0.693 is a coin. **ECE** (expected
calibration error) is the average gap between predicted P(up) and the observed up-rate over 10
probability bins (the reliability diagram): 0 means "60 %" really comes true 60 % of the time. A
model can be well calibrated and useless: probabilities that all sit near 50 % are honest, not
informative. For price direction, accuracies of 51-55 % are what a real edge usually looks like;
much more on real data usually means a leak.

A **signal** fires when the probability of the called direction exceeds {weak} (BUY/SELL; the rest is
HOLD); *signal rate* is how often that happens and *signal accuracy* how often those calls were right
({dash} when none fired). The **return** plot puts 1/{h} of the capital on every fired signal for {h}
bars, charges {cost} bps per trade (entry plus exit) and sums simple returns: no compounding,
slippage, funding or position limits. It shows whether the calls are worth acting on, not what an
account would have earned."""


def render_markdown(result: BacktestResult, *, title: str | None = None,
                    plots: dict[str, str] | None = None) -> str:
    """The report as Markdown; `plots` maps plot key -> relative file name to link."""
    cfg, data = result.config, result.data
    h = int(cfg.get("horizon", 1))
    plots = plots if plots is not None else {k: v for k, v in FILES.items() if k != "report"}
    title = title or (f"Walk-forward backtest: {cfg.get('model_type')}, horizon {h} bars, "
                      f"{len(result.folds)} folds")
    lines = [f"# {title}", ""]
    said = verdict(result)
    lines += ["## Verdict", "", f"**Verdict:** {said[0]}", ""]
    if len(said) > 1:
        lines += [" ".join(said[1:]), ""]

    lines += ["## Per horizon", "",
              "Every horizon comes from the same network (one output per horizon), scored on its own; the "
              "best baseline is the best of majority, persistence, logistic and LightGBM on that horizon's "
              "rows. Sharpe, drawdown, turnover, exposure and fees are the network's simulated trades "
              f"(volatility: {((result.trading or {}).get('config') or {}).get('volatility', DASH)}); "
              "QLIKE scores the volatility forecast against the naive trailing one (lower is better).", ""]
    lines += _md_table(horizon_header(result), horizon_rows(result))
    lines += ["", *[f"- {v}" for v in horizon_verdicts(result)], ""]

    lines += ["## Data", ""]
    lines += [f"- rows: {fmt_int(data.get('rows'))} candles ({fmt_int(data.get('featureRows'))} with features, "
              f"{fmt_int(data.get('labelledRows'))} labelled), {fmt_int(len(result.y))} pooled test rows",
              f"- range: {utc(data.get('start'))} → {utc(data.get('end'))} UTC",
              f"- source: {data.get('source') or DASH}"]
    causality = (result.checks or {}).get("causality")
    lines.append("- look-ahead check of the features: " + (
        f"no look-ahead found at {causality.get('cuts', DASH)} cut points of the newest "
        f"{causality.get('bars', DASH)} bars ({causality.get('seconds', DASH)} s)"
        if causality and causality.get("passed") else "not run"))
    lines.append("")

    lines += ["## Configuration", ""]
    lines += _md_table(["setting", "value"], _config_rows(cfg), "ll")
    lines.append("")

    lines += ["## Overall (all test folds pooled)", ""]
    lines += _md_table(METRIC_HEADER, [metric_row(n, result.overall[n], result) for n in NAMES])
    lines.append("")

    lines += ["## Per fold (accuracy)", "",
              "Train is the fold's fit and validation rows; a purge gap of "
              f"{cfg.get('purge', DASH)} rows separates them from the test rows. Times are UTC; the best "
              "accuracy of each fold is in bold.", ""]
    lines += _md_table(["fold", "train (UTC)", "test (UTC)", "test rows", *[label(n, result) for n in NAMES]],
                       _fold_rows(result), "lllr" + "r" * len(NAMES))
    lines.append("")

    lines += ["## Plots", ""]
    captions = {"reliability": "Reliability diagram (10 bins; counts per bin below)",
                "folds": "Accuracy per fold, model with its 95 % interval, baselines, 50 % line",
                "returns": f"Cumulative return of acting on the signals, net of {fmt_num(cfg.get('cost_bps'), 1)} "
                           "bps per trade"}
    for key in ("reliability", "folds", "returns"):
        if key in plots:
            lines += [f"### {captions[key]}", "", f"![{captions[key]}]({plots[key]})", ""]

    lines += ["## Strategy (acting on the signals)", "",
              f"Net of {fmt_num(cfg.get('cost_bps'), 1)} bps per trade (entry plus exit), "
              f"1/{h} of the capital per signal, held {h} bars.", ""]
    lines += _md_table(["", "net return", "trades"], _strategy_rows(result))
    lines.append("")

    sim = (result.trading or {}).get("config") or {}
    lines += ["## Simulated trading (one position at a time)", "",
              f"The simulator of the live service (`ml.simulation`): a BUY opens a long, a SELL a short, at the "
              f"bar's close plus {fmt_num(sim.get('slippageBps'), 1)} bps slippage; take-profit at "
              f"{fmt_num(sim.get('tpMult'), 2)} and stop-loss at {fmt_num(sim.get('slMult'), 2)} predicted "
              f"volatilities ({sim.get('volatility', DASH)}), else out at the close of bar {h}; "
              f"{fmt_num(sim.get('feeBps'), 1)} bps fee per side. Returns compound; Sharpe is annualised "
              "for the timeframe (every bar of the year).", ""]
    lines += _md_table(TRADING_HEADER, _trading_rows(result))
    lines.append("")

    lines += ["## How to read this", "",
              HOW_TO_READ.format(h=h, hm1=h - 1, weak=fmt_pct(cfg.get("weak"), 0), dash=DASH,
                                 cost=fmt_num(cfg.get("cost_bps"), 1)), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots

def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of P(up): count, mean prediction, observed up-rate (NaN where empty).

    Same binning as ml.metrics.ece (left-closed, p = 1 in the last bin), so the plot shows what ECE sums.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    idx = np.minimum((np.clip(p, 0.0, 1.0) * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=n_bins) / count
        rate = np.bincount(idx, weights=y, minlength=n_bins) / count
    return {"count": count, "mean_p": mean_p, "rate": rate}


def _new_figure(size: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def plot_reliability(result: BacktestResult) -> bytes:
    """Mean predicted P(up) vs observed up-rate per bin, with the bin counts in a panel below."""
    fig = _new_figure((7.0, 7.5))
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1.3], sharex=True)
    top.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="perfect calibration")
    width = 1.0 / N_BINS / (len(PLOTTED) + 1)
    centers = (np.arange(N_BINS) + 0.5) / N_BINS
    for i, name in enumerate(PLOTTED):
        b = reliability_bins(result.y, result.probs[name])
        ok = b["count"] > 0
        ece_text = fmt_num(result.overall[name].get("ece"))
        top.plot(b["mean_p"][ok], b["rate"][ok], marker="o", ms=5, lw=1.2, color=COLORS[name],
                 label=f"{label(name, result)} (ECE {ece_text})")
        x = centers + (i - (len(PLOTTED) - 1) / 2) * width
        bars = bottom.bar(x, b["count"], width=width, color=COLORS[name], label=label(name, result))
        bottom.bar_label(bars, labels=[str(c) if c else "" for c in b["count"]], fontsize=6, rotation=90,
                         padding=2)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed up-rate",
            title=f"Reliability: {len(result.y):,} pooled test rows, {N_BINS} bins")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="mean predicted P(up) / bin", ylabel="rows per bin (log)", yscale="log")
    bottom.set_xticks(np.linspace(0, 1, N_BINS + 1))
    bottom.set_ylim(0.8, max(10.0, len(result.y) * 8.0))
    bottom.grid(alpha=0.3, axis="y")
    return _png(fig)


def plot_folds(result: BacktestResult) -> bytes:
    """Accuracy per fold: the model with its Wilson interval as error bars, the baselines beside it."""
    fig = _new_figure((8.0, 4.8))
    ax = fig.subplots()
    k = len(result.folds)
    x = np.arange(1, k + 1, dtype=np.float64)
    step = 0.12
    lows, highs = [0.5], [0.5]
    for i, name in enumerate(NAMES):
        acc = np.array([_finite(f[name].get("accuracy")) or np.nan for f in result.folds], dtype=np.float64)
        xs = x + (i - (len(NAMES) - 1) / 2) * step
        if name == MODEL:
            ci = np.array([[_finite(c) if _finite(c) is not None else np.nan
                            for c in f[name].get("accuracy_ci95") or (None, None)] for f in result.folds],
                          dtype=np.float64).reshape(k, 2)
            yerr = np.vstack([acc - ci[:, 0], ci[:, 1] - acc])
            ax.errorbar(xs, acc, yerr=np.nan_to_num(yerr), fmt="o", ms=7, capsize=4, lw=1.5,
                        color=COLORS[name], label=f"{label(name, result)}, 95 % interval", zorder=3)
            lows.append(np.nanmin(ci[:, 0]) if np.isfinite(ci).any() else 0.5)
            highs.append(np.nanmax(ci[:, 1]) if np.isfinite(ci).any() else 0.5)
        else:
            ax.plot(xs, acc, ls="none", marker="s" if name in LEARNED_BASELINES else "^", ms=6,
                    color=COLORS[name], label=label(name))
        lows.append(np.nanmin(acc) if np.isfinite(acc).any() else 0.5)
        highs.append(np.nanmax(acc) if np.isfinite(acc).any() else 0.5)
    ax.axhline(0.5, color="#d62728", ls="--", lw=1, label="50 % (coin)")
    pad = 0.02
    ax.set_ylim(max(0.0, min(lows) - pad), min(1.0, max(highs) + pad))
    ax.set_xticks(x, [f"fold {int(i)}" for i in x])
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v * 100:.0f} %")
    ax.set(ylabel="accuracy on the fold's test rows",
           title=f"Accuracy per fold (horizon {result.config.get('horizon')} bars)")
    ax.grid(alpha=0.3, axis="y")
    handles, texts = ax.get_legend_handles_labels()
    order = sorted(range(len(texts)), key=lambda j: (not texts[j].startswith("model"), j))
    ax.legend([handles[j] for j in order], [texts[j] for j in order], fontsize=8, loc="best", ncols=2)
    return _png(fig)


def plot_returns(result: BacktestResult) -> bytes:
    """Cumulative return of acting on the signals net of config.cost_bps, plus buy & hold."""
    import matplotlib.dates as mdates

    fig = _new_figure((9.0, 4.8))
    ax = fig.subplots()
    cost = float(result.config.get("cost_bps", 0.0))
    curves = result.equity_curves(cost)
    when = np.asarray(result.ts, dtype="datetime64[ms]")
    for name in ("buy_and_hold", *PLOTTED):
        if name in curves:
            ax.plot(when, curves[name] * 100.0, lw=1.6 if name == MODEL else 1.1, color=COLORS[name],
                    ls=":" if name == "buy_and_hold" else "-",
                    label=f"{label(name, result)} ({fmt_pct(curves[name][-1], 2, signed=True)})")
    starts = [f["test"][0] for f in result.folds[1:] if f.get("test")]
    for s in starts:
        ax.axvline(np.datetime64(int(s), "ms"), color="#bbbbbb", lw=0.8, ls="--")
    ax.axhline(0.0, color="#666666", lw=0.8)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.1f} %")
    ax.set(ylabel="cumulative return (sum, % of capital)", xlabel="UTC (dashed: fold boundaries)",
           title=f"Acting on the signals, net of {cost:g} bps per trade")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


# ------------------------------------------------------------------------------------------ write

def write_report(result: BacktestResult, out_dir: str | Path, *, title: str | None = None) -> dict[str, Path]:
    """Write report.md and the three PNGs into `out_dir` (created if needed); returns key -> path.

    The plots go first and the Markdown last, so a report.md on disk never links to a missing plot.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in FILES.items()}
    for key, render in (("reliability", plot_reliability), ("folds", plot_folds), ("returns", plot_returns)):
        atomic_write_bytes(paths[key], render(result))
    text = render_markdown(result, title=title, plots={k: FILES[k] for k in ("reliability", "folds", "returns")})
    atomic_write_bytes(paths["report"], text.encode("utf-8"))
    return paths
