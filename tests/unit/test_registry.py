"""Registry on a real Storage: versions, promotion rule, rollback, and reload == in-memory model."""

import copy

import numpy as np
import pytest
import torch

from ml.data.synthetic import ORIGIN_TS, generate_candles
from ml.features import feature_matrix
from ml.registry.loader import FeatureMismatchError, NoModelError, load_model
from ml.registry.versions import Registry, promotion_decision
from ml.storage.store import Storage
from ml.training.config import TrainConfig
from ml.training.local import train_local
from ml.training.nets import predict_logits, state_from_bytes

N_BARS = 2500


@pytest.fixture(scope="module")
def candles():
    return generate_candles("BTC", N_BARS, seed=3, signal_strength=0.12, end_ts=ORIGIN_TS + (N_BARS + 50) * 300_000)


@pytest.fixture(scope="module")
def result(candles):
    cfg = TrainConfig(pair="BTC", epochs=2, batch_size=128, seq_len=16, hidden=16, seed=7, threads=1)
    return train_local(cfg, candles)


@pytest.fixture
def storage(tmp_path):
    s = Storage(tmp_path / "data")
    yield s
    s.close()


def with_briers(result, model_brier: float, base_brier: float):
    r = copy.copy(result)
    r.metrics = copy.deepcopy(result.metrics)
    r.metrics["model"]["brier"] = model_brier
    r.metrics["baseline"]["brier"] = base_brier
    return r


def test_promotion_rule():
    assert promotion_decision({"model": {"brier": 0.24}, "baseline": {"brier": 0.25}})["promoted"]
    assert promotion_decision({"model": {"brier": 0.25}, "baseline": {"brier": 0.25}})["promoted"]  # a tie
    d = promotion_decision({"model": {"brier": 0.2501}, "baseline": {"brier": 0.25}})
    assert not d["promoted"] and "base-rate" in d["reason"]
    assert not promotion_decision({})["promoted"]


def test_register_promote_keep_and_rollback(storage, result):
    reg = Registry(storage)
    good = reg.register("BTC", with_briers(result, 0.24, 0.25), job_id="BTC_lstm_1")
    assert good["promotion"]["promoted"] and good["version"].startswith("v")
    assert reg.production("BTC", "lstm")["version"] == good["version"]

    bad = reg.register("BTC", with_briers(result, 0.26, 0.25), job_id="BTC_lstm_2")
    assert not bad["promotion"]["promoted"]
    assert good["version"] in bad["promotion"]["reason"]  # "production stays <previous>"
    assert reg.production("BTC", "lstm")["version"] == good["version"]
    stored = storage.get_version_meta("BTC", "lstm", bad["version"])
    assert stored["promotion"]["promoted"] is False and stored["promotion"]["previousProduction"] == good["version"]
    assert stored["jobId"] == "BTC_lstm_2"

    versions = reg.versions("BTC", "lstm")
    assert {v["version"] for v in versions} == {good["version"], bad["version"]}
    assert good["version"] != bad["version"]

    reg.rollback("BTC", "lstm", bad["version"])
    prod = reg.production("BTC", "lstm")
    assert prod["version"] == bad["version"] and "rollback" in prod["reason"]
    reg.rollback("BTC", "lstm", good["version"])
    assert reg.production("BTC", "lstm")["version"] == good["version"]
    with pytest.raises(NoModelError):
        reg.rollback("BTC", "lstm", "v00000000000000-deadbeef")


def test_first_version_not_promoted_leaves_no_production(storage, result):
    reg = Registry(storage)
    meta = reg.register("BTC", with_briers(result, 0.30, 0.25))
    assert not meta["promotion"]["promoted"] and "no production version" in meta["promotion"]["reason"]
    assert reg.production("BTC", "lstm") is None
    with pytest.raises(NoModelError):
        load_model(storage, "BTC", "lstm")
    assert load_model(storage, "BTC", "lstm", meta["version"]).version == meta["version"]


def test_reload_gives_the_same_probabilities(storage, result, candles):
    from ml.training.nets import build_model

    reg = Registry(storage)
    meta = reg.register("BTC", with_briers(result, 0.2, 0.25))
    loaded = load_model(storage, "BTC", "lstm")
    assert loaded.version == meta["version"] and loaded.seq_len == 16
    assert loaded.feature_hash == result.feature_hash

    # The in-memory model of the run: its weights, its scaler, its calibration.
    spec = result.model_spec
    model = build_model("lstm", spec["n_features"], spec["n_horizons"], layers=spec["layers"],
                        hidden=spec["hidden"], dropout=spec["dropout"], seq_len=spec["seq_len"],
                        volatility=spec["vol_head"])
    model.load_state_dict(state_from_bytes(result.state_dict))
    from ml.training.calibration import Calibrator
    from ml.training.dataset import StandardScaler

    scaler = StandardScaler.from_json(result.scaler)
    cal = Calibrator.from_dict(result.calibration)

    feats = feature_matrix(candles)
    raw = feats.to_numpy()
    windows = np.stack([raw[e - 15:e + 1] for e in range(len(raw) - 40, len(raw))])
    scaled = scaler.transform(windows.astype(np.float32))
    if result.input_features:  # the selected columns the run trained on
        scaled = scaled[:, :, [result.feature_names.index(n) for n in result.input_features]]
    h = spec["n_horizons"]
    expected = cal.apply(predict_logits(model, scaled)[:, :h])  # direction logits, then the volatility head
    got = loaded.predict_proba(windows)
    assert got.shape == (40, h)
    np.testing.assert_array_equal(got, expected)

    # A DataFrame window (serving) gives the same numbers as the array form, and the saved test
    # probabilities of the run are reproduced for the last test window.
    one = loaded.predict_proba(feats.iloc[:len(raw) - 40 + 1])
    assert one.shape == (h,)
    np.testing.assert_allclose(one, got[0], rtol=0, atol=1e-12)  # batch of 1 vs 40: last-bit BLAS noise
    last_test = int(np.searchsorted(feats.index.to_numpy(), result.test_ts[-1]))
    # float32 forward passes over batches of another size: agreement to float32 noise
    np.testing.assert_allclose(loaded.predict_proba(feats.iloc[:last_test + 1]), result.test_probs[-1], rtol=0,
                               atol=1e-6)

    # Columns in another order are re-ordered; missing or unknown names are a clear error.
    shuffled = feats[list(reversed(feats.columns))]
    np.testing.assert_array_equal(loaded.predict_proba(shuffled), loaded.predict_proba(feats))
    with pytest.raises(FeatureMismatchError, match="missing 1"):
        loaded.predict_proba(feats.drop(columns=[feats.columns[3]]))
    with pytest.raises(FeatureMismatchError, match="unexpected 1"):
        loaded.predict_proba(feats.assign(extra=1.0))
    assert torch.is_tensor(next(iter(loaded.model.state_dict().values())))
