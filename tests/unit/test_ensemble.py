"""Ensembles (ml.training.ensemble, ml.serving.ensemble): members trained by the real training code on a
small planted-signal series, stacked on their common validation rows, scored on their common test rows.

The strong member is an LSTM that learns the planted signal in 3 epochs; the useless one is a CNN
trained for one epoch at a learning rate of 1e-7 (its weights barely leave their initialisation), on
the same candles, so both have the same splits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.data.synthetic import ORIGIN_TS, generate_candles
from ml.queue.requests import InvalidRequest, TrainRequest, accepted_model_types
from ml.registry.loader import load_model
from ml.registry.versions import Registry, ensemble_promotion_decision
from ml.serving.ensemble import answered_by, combine, members_of
from ml.storage.store import Storage
from ml.training.config import TrainConfig
from ml.training.ensemble import (
    ENSEMBLE_TYPE,
    BuildCancelled,
    EnsembleError,
    build_ensemble,
    fit_stacking,
    intersect,
    load_members,
    logit,
)
from ml.training.local import train_local

N_BARS = 6000
BAR_MS = 300_000
HORIZONS = [1, 3]
TYPES = ["lstm", "cnn"]


def cfg(model_type: str, **kw) -> TrainConfig:
    base = {"pair": "BTC", "model_type": model_type, "batch_size": 128, "seq_len": 20, "hidden": 16, "seed": 7,
            "threads": 1, "horizons": HORIZONS}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def candles():
    return generate_candles("BTC", N_BARS, seed=3, signal_strength=0.3, end_ts=ORIGIN_TS + (N_BARS + 50) * BAR_MS)


@pytest.fixture(scope="module")
def runs(candles):
    strong = train_local(cfg("lstm", learning_rate=3e-3, epochs=3), candles)
    useless = train_local(cfg("cnn", learning_rate=1e-7, epochs=1), candles)
    return {"lstm": strong, "cnn": useless}


def registry_with(tmp_path, results: dict) -> tuple[Storage, Registry]:
    storage = Storage(tmp_path / "data")
    reg = Registry(storage)
    for mt, res in results.items():
        meta = reg.register("BTC", res)
        if not meta["promotion"]["promoted"]:  # a member is whatever production is; an operator's choice here
            reg.promote("BTC", mt, meta["version"], "test: member")
    return storage, reg


@pytest.fixture
def registry(tmp_path, runs):
    storage, reg = registry_with(tmp_path, runs)
    yield storage, reg
    storage.close()


def shuffled_after(candles, ts0: int, seed: int = 11):
    """The candles with every bar at ts >= ts0 moved by another random walk (prices scaled bar by bar)."""
    c = candles.copy()
    k = int(np.searchsorted(c["ts"].to_numpy(), ts0))
    rng = np.random.default_rng(seed)
    scale = np.exp(np.cumsum(rng.normal(0.0, 0.004, len(c) - k)))
    for col in ("open", "high", "low", "close"):
        c.loc[c.index[k:], col] = c[col].to_numpy()[k:] * scale
    return c


def test_strong_member_gets_the_weight_useless_one_none_and_no_promotion_without_beating_it(registry, candles, runs):
    storage, reg = registry
    res = build_ensemble(storage, "BTC", candles, TYPES, load=load_model)
    m = res.metrics
    print("\nensemble vs members on the common test rows (mean over horizons):")
    for name, r in [("ensemble", m["model"]), ("base rate", m["baseline"])] + list(m["members"].items()):
        print(f"  {name:9s} brier {r['brier']:.5f} acc {r['accuracy']:.4f} log loss {r['log_loss']:.5f} n {r['n']}")
    print("  weights", res.weights)
    biased = build_ensemble(storage, "BTC", candles, TYPES, load=load_model, fit_bias=True)
    print(f"  with a fitted bias {biased.bias}: brier {biased.metrics['model']['brier']:.5f}")
    for h, v in m["volatility"].items():
        print(f"  volatility h={h} QLIKE ensemble {v['model_qlike']:.4f} naive {v['naive_qlike']:.4f} members",
              {t: round(q, 4) for t, q in v["members"].items()})
    for h in map(str, HORIZONS):
        w = res.weights[h]
        assert w["lstm"] > 0.5 and w["cnn"] < 0.1 and w["cnn"] < w["lstm"] / 5, w
    # the members were evaluated on exactly the ensemble's rows
    assert m["n"]["test"] == m["model"]["n"] == m["members"]["lstm"]["n"] == m["members"]["cnn"]["n"] > 500
    assert m["members"]["lstm"]["brier"] < m["baseline"]["brier"] - 0.005  # the strong member is strong
    best = min(m["members"], key=lambda t: m["members"][t]["brier"])
    assert res.best_member == best == "lstm"

    meta = reg.register("BTC", res)
    decision = ensemble_promotion_decision(m)
    assert meta["promotion"]["promoted"] is decision["promoted"]
    assert decision["promoted"] is (m["model"]["brier"] < min(v["brier"] for v in m["members"].values())
                                    and m["model"]["brier"] <= m["baseline"]["brier"])
    stored = storage.get_version_meta("BTC", ENSEMBLE_TYPE, meta["version"])
    assert stored["members"] == {t: runs_version(storage, t) for t in TYPES}
    assert stored["bestMember"] == "lstm" and stored["weights"] == res.weights
    pointer = storage.get_production("BTC", ENSEMBLE_TYPE)
    assert (pointer is not None and pointer["version"] == meta["version"]) is decision["promoted"]


def test_an_ensemble_that_does_not_beat_its_members_is_not_promoted(registry, candles):
    storage, reg = registry
    # over-regularised: weights near 0, P(up) near 0.5 on every row, far worse than the strong member
    res = build_ensemble(storage, "BTC", candles, TYPES, load=load_model, l2=100.0)
    m = res.metrics
    assert max(max(w.values()) for w in res.weights.values()) < 0.05
    assert m["model"]["brier"] > m["members"]["lstm"]["brier"] + 0.01
    meta = reg.register("BTC", res)
    assert meta["promotion"]["promoted"] is False
    assert "does not beat every member" in meta["promotion"]["reason"] and "lstm" in meta["promotion"]["reason"]
    assert storage.get_production("BTC", ENSEMBLE_TYPE) is None
    stored = storage.get_version_meta("BTC", ENSEMBLE_TYPE, meta["version"])
    assert stored["bestMember"] == answered_by(stored) == "lstm"
    assert {t: runs_version(storage, t) for t in TYPES} == stored["members"]  # members' production untouched


def runs_version(storage, model_type: str) -> str:
    return storage.get_production("BTC", model_type)["version"]


def test_weights_come_from_validation_rows_only(registry, candles):
    storage, _ = registry
    members = load_members(storage, "BTC", TYPES, load_model)
    test_lo, _ = intersect(members, "test")
    val_lo, val_hi = intersect(members, "val")
    assert val_hi < test_lo
    base = build_ensemble(storage, "BTC", candles, TYPES, load=load_model, members=members)
    changed = build_ensemble(storage, "BTC", shuffled_after(candles, test_lo), TYPES, load=load_model, members=members)
    assert changed.weights == base.weights and changed.bias == base.bias
    assert changed.metrics["val"] == base.metrics["val"]
    # ... while the test rows really changed (so did every test score)
    assert changed.metrics["model"]["brier"] != base.metrics["model"]["brier"]
    assert changed.metrics["members"]["lstm"]["brier"] != base.metrics["members"]["lstm"]["brier"]
    # and changing the validation rows does change the weights
    steps = []
    with pytest.raises(BuildCancelled):  # the queue's cancel reaches the build between steps
        build_ensemble(storage, "BTC", candles, TYPES, load=load_model, members=members,
                       progress=lambda done, total: steps.append((done, total)) or done >= 2)
    assert steps == [(1, 5), (2, 5)]
    moved = build_ensemble(storage, "BTC", shuffled_after(candles, (val_lo + val_hi) // 2), TYPES, load=load_model, members=members)
    assert moved.weights != base.weights


def test_members_on_different_data_fail_the_build(tmp_path, candles, runs):
    early = train_local(cfg("cnn", learning_rate=1e-7, epochs=1), candles.iloc[: N_BARS // 2].reset_index(drop=True))
    storage, _ = registry_with(tmp_path, {"lstm": runs["lstm"], "cnn": early})
    with pytest.raises(EnsembleError, match="train the members on the same data"):
        build_ensemble(storage, "BTC", candles, TYPES, load=load_model)
    storage.close()


def test_missing_member_or_a_single_type_fails(tmp_path, candles, runs):
    storage, _ = registry_with(tmp_path, {"lstm": runs["lstm"]})
    with pytest.raises(EnsembleError, match="no production model of BTC/cnn"):
        build_ensemble(storage, "BTC", candles, TYPES, load=load_model)
    with pytest.raises(EnsembleError, match="at least 2"):
        build_ensemble(storage, "BTC", candles, ["lstm", ENSEMBLE_TYPE], load=load_model)
    storage.close()


def test_stacking_fit_recovers_a_known_logistic_model():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.0, (20_000, 2))
    y = (rng.random(20_000) < 1 / (1 + np.exp(-(0.3 + 1.5 * z[:, 0])))).astype(float)
    w, b = fit_stacking(z, y, l2=0.0, fit_bias=True)
    assert abs(w[0] - 1.5) < 0.08 and w[1] < 0.05 and abs(b - 0.3) < 0.05
    assert fit_stacking(z, y, l2=0.0)[1] == 0.0  # the default: no bias
    w_neg, _ = fit_stacking(-z, y, l2=0.0)  # a member that is anti-correlated gets 0, never a negative weight
    assert w_neg[0] == 0.0
    w_reg, _ = fit_stacking(z, y, l2=1.0)
    assert 0 < w_reg[0] < w[0]  # the penalty shrinks towards the base rate


def test_promotion_rule_of_the_ensemble():
    def metrics(ens: float, base: float, **members: float) -> dict:
        return {"model": {"brier": ens}, "baseline": {"brier": base}, "members": {t: {"brier": b} for t, b in members.items()}}

    assert ensemble_promotion_decision(metrics(0.240, 0.250, lstm=0.242, lightgbm=0.241))["promoted"]
    not_best = ensemble_promotion_decision(metrics(0.2415, 0.250, lstm=0.242, lightgbm=0.241))
    assert not not_best["promoted"] and "lightgbm" in not_best["reason"]
    tie = ensemble_promotion_decision(metrics(0.241, 0.250, lstm=0.242, lightgbm=0.241))
    assert not tie["promoted"]  # beating means strictly lower
    assert not ensemble_promotion_decision(metrics(0.251, 0.250, lstm=0.252, lightgbm=0.253))["promoted"]
    assert not ensemble_promotion_decision({"model": {"brier": 0.2}, "baseline": {"brier": 0.25}})["promoted"]


def test_combine_on_hand_made_outputs():
    doc = {"members": {"lstm": "v1", "lightgbm": "v2"}, "horizons": [1, 6],
           "weights": {"1": {"lstm": 1.0, "lightgbm": 0.5}, "6": {"lstm": 0.0, "lightgbm": 2.0}},
           "bias": {"1": 0.1, "6": -0.2}, "bestMember": "lightgbm"}
    outputs = {"lstm": np.array([0.6, 0.3, 0.01, 0.04]), "lightgbm": np.array([0.55, 0.7, 0.04, 0.01])}
    out = combine(doc, outputs)
    z1 = 0.1 + 1.0 * math.log(0.6 / 0.4) + 0.5 * math.log(0.55 / 0.45)
    z6 = -0.2 + 2.0 * math.log(0.7 / 0.3)
    assert out.shape == (4,)
    assert out[0] == pytest.approx(1 / (1 + math.exp(-z1)))
    assert out[1] == pytest.approx(1 / (1 + math.exp(-z6)))
    assert out[2] == pytest.approx(0.02) and out[3] == pytest.approx(0.02)  # sqrt(0.01 * 0.04): mean log variance
    assert float(logit(np.array([0.5]))[0]) == 0.0
    assert members_of(doc) == {"lstm": "v1", "lightgbm": "v2"} and answered_by(doc) == "lightgbm"
    with pytest.raises(KeyError, match="lightgbm"):
        combine(doc, {"lstm": outputs["lstm"]})
    with pytest.raises(ValueError, match="shape"):
        combine(doc, {"lstm": outputs["lstm"], "lightgbm": np.array([0.5, 0.5])})


def test_queue_accepts_ensemble_only_with_two_enabled_types():
    assert accepted_model_types(["lstm", "lightgbm"]) == ["lstm", "lightgbm", ENSEMBLE_TYPE]
    assert accepted_model_types(["lstm"]) == ["lstm"]
    TrainRequest(pair="BTC", model_type=ENSEMBLE_TYPE).validate(["lstm", "lightgbm"])
    with pytest.raises(InvalidRequest, match="disabled model type 'ensemble'"):
        TrainRequest(pair="BTC", model_type=ENSEMBLE_TYPE).validate(["lstm"])
    with pytest.raises(InvalidRequest, match="built, not trained: epochs"):
        TrainRequest(pair="BTC", model_type=ENSEMBLE_TYPE, epochs=3).validate(["lstm", "lightgbm"])
