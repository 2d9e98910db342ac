"""The training pipeline: learning is real, no invented edge, determinism, resume, cancel."""

import numpy as np
import pytest

from ml.config import load_settings
from ml.data.synthetic import ORIGIN_TS, generate_candles, rule_accuracy
from ml.registry.versions import promotion_decision
from ml.training.config import TrainConfig
from ml.training.dataset import pack_dataset, prepare_dataset, unpack_dataset
from ml.training.local import train_local
from ml.training.loop import TrainingCancelled, fit, new_model

BAR_MS = 300_000
LEARN_BARS = 20_000


def candles(n: int, strength: float, seed: int = 42):
    return generate_candles("BTC", n, seed=seed, signal_strength=strength, end_ts=ORIGIN_TS + (n + 100) * BAR_MS)


def quick_cfg(**kw) -> TrainConfig:
    base = {"pair": "BTC", "model_type": "lstm", "epochs": 10, "patience": 5, "seed": 7, "threads": 1,
            "layers": 1, "hidden": 32, "seq_len": 30, "dropout": 0.0, "horizons": [5]}
    return TrainConfig(**{**base, **kw})


def test_learning_is_real_on_the_planted_signal():
    c = candles(LEARN_BARS, 0.12)
    res = train_local(quick_cfg(), c)
    m = res.metrics
    acc = m["model"]["accuracy"]
    rule_acc, n = rule_accuracy(c, horizon=5, lookback=10, ts=res.test_ts)
    assert n == len(res.test_ts) == m["n"]["test"] > 2000
    up_share = m["horizons"]["5"]["model"]["positive_rate"]
    majority = max(up_share, 1 - up_share)
    print(f"\nplanted signal: model {acc:.4f} rule {rule_acc:.4f} majority {majority:.4f} "
          f"base-rate baseline {m['baseline']['accuracy']:.4f} brier {m['model']['brier']:.5f} "
          f"vs {m['baseline']['brier']:.5f} epochs {res.epochs_run} best {res.best_epoch}")
    assert abs(acc - rule_acc) <= 0.03
    assert acc >= majority + 0.03
    assert acc >= m["baseline"]["accuracy"] + 0.03
    assert m["model"]["brier"] < m["baseline"]["brier"] - 0.002
    assert promotion_decision(m)["promoted"]


def test_no_invented_edge_on_a_signal_free_series():
    res = train_local(quick_cfg(), candles(LEARN_BARS, 0.0))
    m = res.metrics
    decision = promotion_decision(m)
    edge = m["baseline"]["brier"] - m["model"]["brier"]
    print(f"\nno signal: model acc {m['model']['accuracy']:.4f} baseline acc {m['baseline']['accuracy']:.4f} "
          f"brier {m['model']['brier']:.5f} vs {m['baseline']['brier']:.5f} promoted {decision['promoted']}")
    # It may be promoted only if its Brier ties the base rate's; it never shows a real edge.
    assert (not decision["promoted"]) or abs(edge) < 1e-3
    assert edge < 1e-3


@pytest.fixture(scope="module")
def small_dataset():
    cfg = quick_cfg(epochs=2, batch_size=128, seq_len=16, hidden=16)
    return cfg, prepare_dataset(candles(2500, 0.12), cfg)


def test_same_seed_gives_the_same_probabilities(small_dataset):
    cfg, _ = small_dataset
    c = candles(2500, 0.12)
    a, b = train_local(cfg, c), train_local(cfg, c)
    assert np.array_equal(a.test_probs, b.test_probs)
    other = train_local(cfg.model_copy(update={"seed": 8}), c)
    assert not np.array_equal(a.test_probs, other.test_probs)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(small_dataset):
    cfg, ds = small_dataset
    cfg3 = cfg.model_copy(update={"epochs": 3, "patience": 10})
    straight = new_model(cfg3, len(ds.feature_names))
    fit(straight, ds, cfg3)

    states = []
    first = new_model(cfg3, len(ds.feature_names))
    fit(first, ds, cfg3.model_copy(update={"epochs": 2}), on_checkpoint=states.append)
    resumed = new_model(cfg3, len(ds.feature_names))
    r = fit(resumed, ds, cfg3, start_state=states[-1])
    assert r.epochs_run == 3 and len(r.history) == 3
    for k, v in straight.state_dict().items():
        assert np.array_equal(v.numpy(), resumed.state_dict()[k].numpy()), k


def test_early_stopping_restores_the_best_weights(small_dataset):
    cfg, ds = small_dataset
    seen = []
    model = new_model(cfg, len(ds.feature_names))
    r = fit(model, ds, cfg.model_copy(update={"epochs": 12, "patience": 1, "learning_rate": 0.05}),
            on_epoch=seen.append)
    assert r.stopped in ("early_stopping", "completed")
    assert [e["epoch"] for e in seen] == list(range(1, r.epochs_run + 1))
    assert {"epoch", "total", "loss", "val_loss", "elapsed_s", "eta_s"} <= set(seen[0])
    assert r.best_val_loss == min(e["val_loss"] for e in seen)
    from ml.training.loop import validation_losses
    from ml.training.nets import predict_logits

    # early stopping watches the validation TOTAL: BCE + vol_loss_weight x the gamma loss
    parts = validation_losses(predict_logits(model, ds.X_val), ds.y_val.astype(float), ds.q_val, cfg.vol_loss_weight)
    assert parts["total"] == pytest.approx(r.best_val_loss)
    assert parts["total"] == pytest.approx(parts["bce"] + cfg.vol_loss_weight * parts["vol"])
    assert seen[0]["val_vol"] is not None


def test_cancel_stops_training(small_dataset):
    cfg, _ = small_dataset
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(TrainingCancelled):
        train_local(cfg.model_copy(update={"epochs": 50}), candles(2500, 0.12), should_stop=should_stop)


def test_pack_unpack_round_trip(small_dataset):
    _, ds = small_dataset
    back = unpack_dataset(pack_dataset(ds))
    for split in ("train", "val", "test"):
        X, y = ds.arrays(split)
        X2, y2 = back.arrays(split)
        assert np.array_equal(np.asarray(X), np.asarray(X2)) and np.array_equal(y, y2)
    assert back.feature_names == ds.feature_names
    for split in ("train", "val", "test"):
        for a, b in zip(ds.vol_arrays(split), back.vol_arrays(split), strict=True):
            assert np.array_equal(a, b)
    assert back.vol_window == ds.vol_window == 16 and back.input_features == ds.input_features
    assert len(unpack_dataset(pack_dataset(ds, splits=("train",))).y_val) == 0


def test_config_from_settings_and_overrides(tmp_path):
    s = load_settings(environ={})
    cfg = TrainConfig.from_settings("ETH", settings=s)
    assert (cfg.model_type, cfg.layers, cfg.hidden, cfg.seq_len, cfg.horizons) == ("lstm", 1, 32, 30, [1, 3, 6, 12])
    assert (cfg.vol_window, cfg.model_vol_window, cfg.vol_loss_weight, cfg.select_k) == (20, 20, 0.5, 16)
    full = TrainConfig.from_settings("ETH", "gru", settings=s, profile="full", epochs=3, batch_size=None, horizon=10)
    assert (full.model_type, full.layers, full.hidden, full.seq_len, full.dropout) == ("gru", 2, 50, 60, 0.2)
    # the body's single horizon joins the configured ones (one network answers all)
    assert full.epochs == 3 and full.batch_size == s.training.batch_size and full.horizons == [1, 3, 6, 10, 12]
    with pytest.raises(ValueError):
        TrainConfig.from_settings("ETH", "svm", settings=s)
    with pytest.raises(ValueError):
        quick_cfg(purge=2)  # purge shorter than the horizon would leak labels


def test_result_payload_is_complete(small_dataset):
    cfg, _ = small_dataset
    res = train_local(cfg, candles(2500, 0.12))
    payload = res.to_registry_payload()
    meta = payload["meta"]
    assert set(payload["files"]) == {"weights.pt", "scaler.json"}
    for key in ("model", "featureNames", "featureHash", "config", "dataRange", "metrics", "calibration",
                "trainedAt", "epochsRun"):
        assert key in meta, key
    assert meta["dataRange"]["start"] < meta["dataRange"]["end"]
    assert meta["metrics"]["baseline"]["brier"] > 0 and meta["metrics"]["model"]["log_loss"] > 0
    assert meta["config"]["seq_len"] == 16 and TrainConfig(**meta["config"]) == cfg
    # the volatility head: 2H outputs, the window of the naive forecast (seq_len 16 < vol_window 20)
    assert meta["model"]["volatility"] is True and meta["model"]["vol_window"] == 16
    assert set(meta["metrics"]["volatility"]) == {"5"}
    v = meta["metrics"]["horizons"]["5"]["volatility"]
    assert {"model_qlike", "naive_qlike", "model_mse_log", "naive_mse_log", "skill"} <= set(v)
    assert v["naive_qlike"] > 0 and np.isfinite(v["model_qlike"])


def test_label_and_model_settings_are_validated(tmp_path):
    s = load_settings(environ={})
    assert (s.labels.horizons, s.labels.default_horizon, s.labels.vol_window) == ([1, 3, 6, 12], 6, 20)
    assert s.model.enabled_types == ["lstm", "lightgbm"] and s.features.select_k == 16
    env = {"TBML_LABELS__HORIZONS": "[1, 2]"}
    with pytest.raises(ValueError, match="default_horizon"):
        load_settings(environ=env)
    assert load_settings(environ={**env, "TBML_LABELS__DEFAULT_HORIZON": "2"}).labels.horizons == [1, 2]
    with pytest.raises(ValueError, match="unknown model type"):
        load_settings(environ={"TBML_MODEL__ENABLED_TYPES": "[lstm, svm]"})
    with pytest.raises(ValueError, match="vol_window"):
        load_settings(environ={"TBML_LABELS__VOL_WINDOW": "40"})  # the quick profile's seq_len is 30


def test_a_volatility_head_not_trained_is_not_served(tmp_path):
    """With vol_loss_weight 0 the loop leaves the head at its random initial weights: the version says
    it has no volatility head, so the loader answers the naive forecast instead of noise."""
    from ml.features import feature_matrix
    from ml.registry.loader import load_model
    from ml.registry.versions import Registry
    from ml.storage.store import Storage
    from ml.training.volatility import naive_variance, served_volatility

    c = candles(2500, 0.12)
    res = train_local(quick_cfg(epochs=1, batch_size=128, seq_len=20, hidden=8, vol_loss_weight=0.0), c)
    assert res.model_spec["volatility"] is False
    storage = Storage(tmp_path)
    meta = Registry(storage).register("BTC", res)
    model = load_model(storage, "BTC", "lstm", meta["version"])
    window = feature_matrix(c).to_numpy()[-model.seq_len:]
    nv = float(naive_variance(window[:, model.feature_names.index("ret_log_1")], model.vol_window))
    naive = served_volatility(np.full(len(model.horizons), nv), model.horizons)
    np.testing.assert_allclose(model.predict_volatility(window), naive, rtol=1e-9)
