"""Forecast benchmarks: what each model type costs to train and to ask, and what the ensemble adds.

* Training time per model type on 20,000 synthetic BTC bars (the quick profile, the default
  horizons and the default training settings except a fixed epoch budget, so every type does the
  same amount of work): `ml.training.local.train_local` in this process with one torch thread, data
  preparation, the loop, calibration and evaluation included. Anchor: the LSTM. The ensemble's build
  (members' predictions on the validation and test rows, the stacking fit, the evaluation) beside it.
* Inference: p50 of one window through a loaded model's `forecast` (every horizon at once, P(up) and
  volatility) for each type, and of the ensemble (its members' forecasts plus the combination).
  Anchor: the LSTM's forecast. Asking one horizon costs the same forward pass as asking all of them:
  the networks have one output per horizon, so there is no separate "one horizon" figure to take.

No targets: these are the figures an operator needs to choose the enabled types.
Run: `python -m bench.bench_forecast [--quick] [--json]` (or `make bench`).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.common import BenchResult, bench_main, p50, time_calls

SECTION = "forecast"
PAIR = "BTC"
NETWORKS = ("lstm", "gru", "cnn", "transformer")


def _candles(n_bars: int):
    from ml.data.synthetic import ORIGIN_TS, generate_candles

    return generate_candles(PAIR, n_bars, seed=42, signal_strength=0.12,
                            end_ts=ORIGIN_TS + (n_bars + 100) * 300_000)


def run(quick: bool = False) -> list[BenchResult]:
    from ml.config import get_settings
    from ml.registry.loader import load_model
    from ml.registry.versions import Registry
    from ml.storage.store import Storage
    from ml.training.config import TrainConfig
    from ml.training.ensemble import build_ensemble
    from ml.training.local import train_local

    settings = get_settings()
    n_bars = 6_000 if quick else 20_000
    epochs = 2 if quick else 5
    candles = _candles(n_bars)
    types = ("lstm", "lightgbm") if quick else (*NETWORKS, "lightgbm")
    out: list[BenchResult] = []
    seconds: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tbml-bench-forecast-") as tmp:
        storage = Storage(Path(tmp))
        registry = Registry(storage)
        # untimed warm-up: the first run in a process pays torch's and LightGBM's one-time start-up
        for model_type in ("lstm", "lightgbm"):
            train_local(TrainConfig.from_settings(PAIR, model_type, settings=settings, epochs=1, threads=1),
                        candles.iloc[-4000:].reset_index(drop=True))
        for model_type in types:
            # patience > epochs: every network runs the whole budget; LightGBM stops on its own rule
            cfg = TrainConfig.from_settings(PAIR, model_type, settings=settings, epochs=epochs,
                                            patience=epochs + 1, threads=1)
            t0 = time.perf_counter()
            result = train_local(cfg, candles)
            seconds[model_type] = time.perf_counter() - t0
            accuracy[model_type] = float(result.metrics["model"]["accuracy"])
            meta = registry.register(PAIR, result)
            registry.promote(PAIR, model_type, meta["version"], "benchmark member")
        t0 = time.perf_counter()
        built = build_ensemble(storage, PAIR, candles, list(types), load=load_model, l2=settings.ensemble.l2,
                               fit_bias=settings.ensemble.fit_bias, min_rows=settings.ensemble.min_rows,
                               vol_window=settings.labels.vol_window)
        ensemble_s = time.perf_counter() - t0
        doc = built.document()
        stored = registry.register(PAIR, built)

        anchor = seconds["lstm"]
        horizons = ", ".join(str(h) for h in settings.labels.horizons)
        for model_type in types:
            what = f"{epochs} epochs" if model_type in NETWORKS else "early-stopped boosting"
            out.append(BenchResult(
                SECTION, f"training time: {model_type}", seconds[model_type], "s",
                anchor_name="lstm" if model_type != "lstm" else "", anchor_value=anchor if model_type != "lstm" else None,
                note=f"{n_bars} bars, horizons {horizons}, {what}, 1 thread; test accuracy (mean over horizons) "
                     f"{accuracy[model_type]:.4f}"))
        out.append(BenchResult(
            SECTION, "ensemble build (members' predictions, stacking fit, evaluation)", ensemble_s, "s",
            anchor_name="lstm training", anchor_value=anchor,
            note=f"members {', '.join(types)}; test Brier (mean over horizons) ensemble "
                 f"{built.metrics['model']['brier']:.4f}, best member {built.best_member} "
                 f"{built.metrics['members'][built.best_member]['brier']:.4f}; "
                 f"promoted: {stored.get('promotion', {}).get('promoted')}"))

        # inference: one window, every horizon at once
        from ml.features import feature_matrix

        window = feature_matrix(candles.iloc[-400:].reset_index(drop=True)).to_numpy()
        models = {t: load_model(storage, PAIR, t) for t in types}
        repeat = 50 if quick else 300
        from ml.serving.ensemble import combine

        calls = {t: (lambda m=m: m.forecast(window[-m.seq_len:])) for t, m in models.items()}
        calls["ensemble"] = lambda: combine(doc, {t: models[t].forecast(window[-models[t].seq_len:]) for t in types})
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for fn in calls.values():  # warm-up
            time_calls(fn, 1, warmup=3)
        for _ in range(repeat):  # interleaved, so every figure sees the same machine load
            for name, fn in calls.items():
                samples[name] += time_calls(fn, 1, warmup=0)
        lat = {name: p50(v) for name, v in samples.items()}
        ens_ms = lat.pop("ensemble")
    for model_type in types:
        out.append(BenchResult(SECTION, f"forecast p50, one window, all horizons: {model_type}", lat[model_type], "ms",
                               anchor_name="lstm" if model_type != "lstm" else "",
                               anchor_value=lat["lstm"] if model_type != "lstm" else None,
                               note=f"median of {repeat} calls interleaved with the other types', 1 torch thread, P(up) and "
                                    f"volatility per horizon"))
    out.append(BenchResult(SECTION, "forecast p50, one window, all horizons: ensemble", ens_ms, "ms",
                           anchor_name="lstm", anchor_value=lat["lstm"],
                           note=f"its {len(types)} members one after another plus the combination; "
                                f"1-min load average at the end {os.getloadavg()[0]:.1f}"))
    return out


if __name__ == "__main__":
    raise SystemExit(bench_main(run, __doc__))
