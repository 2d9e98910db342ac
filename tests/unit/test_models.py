"""The four model types: shapes, profiles, gradients, and what makes each what it claims to be."""

import pytest
import torch
from torch import nn

from ml.training.nets import MODEL_TYPES, PositionalEncoding, build_model, count_params

PROFILES = {"quick": {"layers": 1, "hidden": 32, "seq_len": 30, "dropout": 0.0},
            "full": {"layers": 2, "hidden": 50, "seq_len": 60, "dropout": 0.2}}
N_FEATURES, N_HORIZONS = 7, 2


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_builds_outputs_logits_per_horizon_and_gradients_flow(model_type, profile):
    torch.manual_seed(0)
    p = PROFILES[profile]
    model = build_model(model_type, N_FEATURES, N_HORIZONS, **p)
    x = torch.randn(5, p["seq_len"], N_FEATURES)
    out = model(x)
    assert out.shape == (5, N_HORIZONS)
    assert torch.isfinite(out).all()
    out.sum().backward()
    grads = [prm.grad for prm in model.parameters() if prm.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert count_params(model) > 1000


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_volatility_head_adds_one_log_variance_ratio_per_horizon(model_type):
    """Outputs (N, 2H): H direction logits, then H log-variance ratios o_h; the loss of one reaches the body."""
    torch.manual_seed(0)
    p = PROFILES["quick"]
    model = build_model(model_type, N_FEATURES, N_HORIZONS, volatility=True, **p)
    plain = build_model(model_type, N_FEATURES, N_HORIZONS, **p)
    out = model(torch.randn(4, p["seq_len"], N_FEATURES))
    assert out.shape == (4, 2 * N_HORIZONS)
    assert count_params(model) > count_params(plain)
    out[:, N_HORIZONS:].sum().backward()  # only the volatility outputs
    body = [prm.grad for name, prm in model.named_parameters() if not name.startswith("head")]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in body)


def test_profiles_shape_the_recurrent_nets():
    quick = build_model("lstm", N_FEATURES, 1, **PROFILES["quick"])
    full = build_model("lstm", N_FEATURES, 1, **PROFILES["full"])
    assert (quick.rnn.num_layers, quick.rnn.hidden_size) == (1, 32)
    assert (full.rnn.num_layers, full.rnn.hidden_size, full.rnn.dropout) == (2, 50, 0.2)
    assert isinstance(build_model("gru", N_FEATURES, 1, **PROFILES["quick"]).rnn, nn.GRU)


def test_transformer_uses_self_attention_and_positional_encoding():
    torch.manual_seed(0)
    model = build_model("transformer", N_FEATURES, 1, **PROFILES["quick"]).eval()
    assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert any(isinstance(m, PositionalEncoding) for m in model.modules())
    # Attention + mean pooling alone would be blind to the order of the rows (besides the last one);
    # the positional encoding makes the order matter.
    x = torch.randn(3, 30, N_FEATURES)
    shuffled = torch.cat([x[:, torch.randperm(29)], x[:, -1:]], dim=1)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(shuffled), atol=1e-6)
        model.positional.pe.zero_()
        # Without it the first 29 rows are an unordered set (up to float rounding).
        assert torch.allclose(model(x), model(shuffled), atol=1e-5)


def test_cnn_is_causal_over_time():
    torch.manual_seed(0)
    model = build_model("cnn", N_FEATURES, 1, **PROFILES["full"]).eval()
    x = torch.randn(2, 60, N_FEATURES)
    with torch.no_grad():
        h1 = model.blocks(x.transpose(1, 2))
        x2 = x.clone()
        x2[:, 40:] += 5.0  # change only rows >= 40
        h2 = model.blocks(x2.transpose(1, 2))
    assert torch.allclose(h1[:, :, :40], h2[:, :, :40])
    assert not torch.allclose(h1[:, :, 40:], h2[:, :, 40:])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown model type"):
        build_model("xgboost", 3, 1, layers=1, hidden=8)
    with pytest.raises(ValueError):
        build_model("lstm", 3, 0, layers=1, hidden=8)
    with pytest.raises(ValueError, match="positional"):
        build_model("transformer", 3, 1, layers=1, hidden=8, seq_len=10)(torch.randn(1, 11, 3))
