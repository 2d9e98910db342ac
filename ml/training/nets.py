"""The four sequence models and the torch helpers around them, plain PyTorch and Ray-free.

Every model maps a window of feature rows, shape (N, seq_len, n_features), to one LOGIT per
configured horizon, shape (N, n_horizons), and, with ``volatility=True`` (every new model), after
them one log-variance ratio o_h = ln(predicted per-bar variance / naive trailing variance) per
horizon: shape (N, 2 * n_horizons), see ml.training.volatility. P(up) is sigmoid(logit) after
calibration (see ml.training.calibration); the models themselves never apply the sigmoid, so
training can use the numerically stable BCEWithLogitsLoss.

* ``lstm`` / ``gru`` - a stacked recurrent net; the hidden state after the last row feeds a linear head.
* ``cnn`` - a causal 1-D temporal convolution stack (kernel 3, dilation doubling per layer, residual
  connections), then the last time step and the mean over time feed the head.
* ``transformer`` - a linear input projection, sinusoidal positional encoding, a self-attention
  encoder (``layers`` x nn.TransformerEncoderLayer, pre-norm), then the last time step and the mean
  over time feed the head.

``layers``, ``hidden``, ``dropout`` come from the profile (quick 1 x 32, seq 30; full 2 x 50, seq 60,
dropout 0.2); ``seq_len`` sizes the positional table.

The helpers (deterministic kernels, weights to and from bytes, eval-mode logits) are shared by the
training loop, Ray Train workers, the backtest and the registry's loader.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

MODEL_TYPES = ("lstm", "gru", "cnn", "transformer")


class RecurrentNet(nn.Module):
    """LSTM or GRU over the window; the last hidden state of the top layer -> logits."""

    def __init__(self, cell: str, n_features: int, n_horizons: int, *, layers: int, hidden: int,
                 dropout: float):
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_cls(n_features, hidden, num_layers=layers, batch_first=True,
                           dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_horizons)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(self.dropout(out[:, -1, :]))


class _CausalConvBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, dilation: int, dropout: float,
                 kernel: int = 3):
        super().__init__()
        self.left_pad = (kernel - 1) * dilation
        self.conv = nn.Conv1d(channels_in, channels_out, kernel, dilation=dilation)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv1d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, T)
        y = self.conv(nn.functional.pad(x, (self.left_pad, 0)))  # causal: row t sees rows <= t only
        return self.skip(x) + self.dropout(self.act(y))


class TemporalCNN(nn.Module):
    """Causal dilated 1-D convolutions over time (features are the channels)."""

    def __init__(self, n_features: int, n_horizons: int, *, layers: int, hidden: int, dropout: float):
        super().__init__()
        blocks = []
        for i in range(layers):
            blocks.append(_CausalConvBlock(n_features if i == 0 else hidden, hidden, 2**i, dropout))
        # One extra block so even a 1-layer profile has a receptive field wider than 3 rows.
        blocks.append(_CausalConvBlock(hidden, hidden, 2**layers, dropout))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * hidden, n_horizons)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, F)
        h = self.blocks(x.transpose(1, 2))  # (N, hidden, T)
        pooled = torch.cat([h[:, :, -1], h.mean(dim=2)], dim=1)
        return self.head(pooled)


class PositionalEncoding(nn.Module):
    """The fixed sinusoidal table of "Attention is all you need", added to the projected inputs."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)[:, : d_model // 2]
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, d)
        if x.shape[1] > self.pe.shape[0]:
            raise ValueError(f"sequence of {x.shape[1]} rows is longer than the positional table "
                             f"({self.pe.shape[0]})")
        return x + self.pe[: x.shape[1]].unsqueeze(0)


def _n_heads(d_model: int) -> int:
    for heads in (4, 2, 1):
        if d_model % heads == 0 and d_model // heads >= 8:
            return heads
    return 1


class TransformerNet(nn.Module):
    """Self-attention encoder over the window (pre-norm layers, GELU feed-forward of 2 x hidden)."""

    def __init__(self, n_features: int, n_horizons: int, *, layers: int, hidden: int, dropout: float,
                 seq_len: int):
        super().__init__()
        self.input = nn.Linear(n_features, hidden)
        self.positional = PositionalEncoding(hidden, max_len=max(seq_len, 1))
        layer = nn.TransformerEncoderLayer(hidden, _n_heads(hidden), dim_feedforward=2 * hidden,
                                           dropout=dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(2 * hidden, n_horizons)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.encoder(self.positional(self.input(x))))
        return self.head(torch.cat([h[:, -1, :], h.mean(dim=1)], dim=1))


def build_model(model_type: str, n_features: int, n_horizons: int, *, layers: int, hidden: int,
                dropout: float = 0.0, seq_len: int = 60, volatility: bool = False) -> nn.Module:
    """A freshly initialised model that returns (N, n_horizons) direction logits, followed by
    n_horizons log-variance ratios when `volatility` (one shared body, one linear head)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; one of {', '.join(MODEL_TYPES)}")
    if n_features < 1 or n_horizons < 1 or layers < 1 or hidden < 1:
        raise ValueError("n_features, n_horizons, layers and hidden must all be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    n_out = 2 * n_horizons if volatility else n_horizons
    if model_type in ("lstm", "gru"):
        return RecurrentNet(model_type, n_features, n_out, layers=layers, hidden=hidden, dropout=dropout)
    if model_type == "cnn":
        return TemporalCNN(n_features, n_out, layers=layers, hidden=hidden, dropout=dropout)
    return TransformerNet(n_features, n_out, layers=layers, hidden=hidden, dropout=dropout,
                          seq_len=seq_len)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, fix threads and use deterministic kernels for the duration (restored after)."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def state_to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


@torch.no_grad()
def predict_logits(model: nn.Module, X: np.ndarray, batch_size: int = 2048,
                   cols: np.ndarray | None = None) -> np.ndarray:
    """Raw outputs (N, n_outputs) float64 in eval mode (direction logits, then log-variance ratios).

    cols: the input columns of X the model reads (a selected feature subset), None = all.
    """
    core = unwrap(model)
    was_training = core.training
    core.eval()
    out = []
    for i in range(0, len(X), batch_size):
        chunk = X[i:i + batch_size]
        if cols is not None:
            chunk = chunk[:, :, cols]
        xb = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        out.append(core(xb).double().numpy())
    core.train(was_training)
    if not out:
        return np.empty((0, 0))
    return np.concatenate(out)
