"""One settings object: defaults from configs/default.yaml, overridden by TBML_* environment variables.

Why one object: every process (CLI, actors, Serve replicas, Ray Train workers) must agree on paths,
pairs and thresholds, and the environment is what Ray propagates to all of them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PAIR_PATTERN = r"^[A-Z0-9]{2,15}$"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
ENV_PREFIX = "TBML_"
ENV_ALIASES = {
    "TBML_DATA_DIR": ("data_dir",),
    "TBML_REDIS_URL": ("redis", "url"),
    "TBML_API_TOKEN": ("api", "token"),
    "TBML_NAMESPACE": ("namespace",),
}
TIMEFRAME_MS = {"1s": 1_000, "1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
                "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticSettings(_Section):
    seed: int = 42
    signal_strength: float = Field(0.12, ge=0.0, le=1.0)
    signal_lookback: int = Field(10, ge=1)
    history_bars: int = Field(20000, ge=300)


class CoreSettings(_Section):
    url: str = "http://127.0.0.1:3000"
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)


class ExchangeSettings(_Section):
    """Candles from a crypto exchange through ccxt (`data.source: exchange`, `tbml data fetch`; docs/data.md)."""

    id: str = Field("binance", pattern=r"^[a-z0-9_]+$", description="a ccxt exchange id")
    quote: str = Field("USDT", pattern=PAIR_PATTERN, description="quote currency: pair BTC is BTC/USDT")
    market_type: Literal["spot", "swap"] = "spot"
    base_url: str | None = Field(None, description="scheme://host[:port] replacing the exchange's REST host "
                                 "in every ccxt URL (mirrors, proxies, testnets); the paths stay the exchange's")
    history_bars: int = Field(20000, ge=1, description="closed candles kept in the store per pair")
    page_limit: int = Field(1000, ge=1, le=10000, description="candles asked for per request")
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(60.0, ge=0)
    max_retry_after_s: float = Field(300.0, ge=0, description="longest Retry-After honoured")

    @field_validator("base_url")
    @classmethod
    def _host_only(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is None:
            return v
        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
                or parts.query or parts.fragment:
            raise ValueError(f"base_url {v!r} must be http(s)://host[:port], without a path")
        return f"{parts.scheme}://{parts.netloc}"


class FeedSettings(_Section):
    """The market feed of a running service (`ml.data.feed`, docs/data.md)."""

    close_delay_s: float = Field(1.0, ge=0, description="after a candle closes, wait this long before "
                                 "fetching it (an exchange prints a closed candle a moment later)")
    retry_s: float = Field(5.0, gt=0, description="while a pair is behind or its last fetch failed, "
                           "try again this often")


class DataSettings(_Section):
    source: str = "synthetic"
    synthetic: SyntheticSettings = SyntheticSettings()
    core: CoreSettings = CoreSettings()
    exchange: ExchangeSettings = ExchangeSettings()
    feed: FeedSettings = FeedSettings()
    # a prediction whose newest candle closed more than this many bars ago is stale (reason "data"); 0: off
    max_lag_bars: int = Field(2, ge=0)

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v not in {"synthetic", "files", "core", "exchange"}:
            raise ValueError(f"unknown data source {v!r} (synthetic, files, core or exchange)")
        return v


class FeatureSettings(_Section):
    warmup_bars: int = Field(200, ge=100)
    select_k: int | None = Field(16, ge=1, description="features a model reads, ranked on training rows "
                                 "(ml.features.selection); None: all")


class LabelSettings(_Section):
    horizons: list[int] = [1, 3, 6, 12]
    default_horizon: int = Field(6, ge=1, description="the horizon answered when a request names none")
    vol_window: int = Field(20, ge=2, description="rows of the naive trailing volatility (ml.training.volatility)")

    @model_validator(mode="after")
    def _default_in_horizons(self) -> LabelSettings:
        if not self.horizons or any(h < 1 for h in self.horizons) or len(set(self.horizons)) != len(self.horizons):
            raise ValueError(f"labels.horizons must be distinct integers >= 1, got {self.horizons}")
        if self.default_horizon not in self.horizons:
            raise ValueError(f"labels.default_horizon ({self.default_horizon}) must be one of labels.horizons "
                             f"{self.horizons}")
        return self


class SplitSettings(_Section):
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15


class ProfileSettings(_Section):
    layers: int = 1
    hidden: int = 32
    seq_len: int = 30
    dropout: float = 0.0


# Trainable model types: the networks of ml.training.nets.MODEL_TYPES and the gradient-boosted trees
# (not imported here: settings load without torch).
KNOWN_MODEL_TYPES = ("lstm", "gru", "cnn", "transformer", "lightgbm")


class LightGbmSettings(_Section):
    """The `lightgbm` model type (ml.training.gbm): boosted trees on the latest feature row and lagged rows."""

    lags: list[int] = Field([0, 1, 2, 4], description="rows back from the window's last row (0 = it) a "
                            "tree row holds side by side")
    num_leaves: int = Field(15, ge=2, le=1024)
    learning_rate: float = Field(0.05, gt=0.0, le=1.0)
    n_estimators: int = Field(300, ge=1, le=10_000, description="boosting rounds at most (early stopping ends sooner)")
    min_child_samples: int = Field(100, ge=1)
    reg_lambda: float = Field(1.0, ge=0.0, description="L2 regularisation of the leaf values")
    reg_alpha: float = Field(0.0, ge=0.0, description="L1 regularisation of the leaf values")
    feature_fraction: float = Field(0.5, gt=0.0, le=1.0, description="columns each tree may use")
    bagging_fraction: float = Field(0.8, gt=0.0, le=1.0, description="training rows each tree sees")
    max_bin: int = Field(63, ge=2, le=1024)
    early_stopping_rounds: int = Field(30, ge=1, description="rounds without a better validation loss before "
                                       "a booster stops")

    @field_validator("lags")
    @classmethod
    def _lags(cls, v: list[int]) -> list[int]:
        if not v or any(k < 0 for k in v) or len(set(v)) != len(v):
            raise ValueError(f"lightgbm lags must be distinct integers >= 0, got {v}")
        return sorted(int(k) for k in v)


class ModelSettings(_Section):
    default_type: str = "lstm"
    enabled_types: list[str] = ["lstm", "lightgbm"]
    profile: str = "quick"
    profiles: dict[str, ProfileSettings] = {
        "quick": ProfileSettings(),
        "full": ProfileSettings(layers=2, hidden=50, seq_len=60, dropout=0.2),
    }
    lightgbm: LightGbmSettings = LightGbmSettings()

    @model_validator(mode="after")
    def _known_types(self) -> ModelSettings:
        unknown = [t for t in [self.default_type, *self.enabled_types] if t not in KNOWN_MODEL_TYPES]
        if unknown:
            raise ValueError(f"unknown model type(s) {', '.join(unknown)}; one of {', '.join(KNOWN_MODEL_TYPES)}")
        if not self.enabled_types or len(set(self.enabled_types)) != len(self.enabled_types):
            raise ValueError(f"model.enabled_types must be distinct and not empty, got {self.enabled_types}")
        return self


class EnsembleSettings(_Section):
    """The stack of the enabled types' production models (ml.training.ensemble)."""

    l2: float = Field(1e-3, ge=0.0, description="L2 penalty on the stacking weights (towards no evidence, 0.5)")
    fit_bias: bool = Field(False, description="also fit a bias per horizon (the validation period's up-rate)")
    min_rows: int = Field(50, ge=10, description="fewest validation / test rows common to every member")


class TrainingSettings(_Section):
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    patience: int = 5
    seed: int = 7
    vol_loss_weight: float = Field(0.5, ge=0.0, description="weight of the volatility (gamma) loss beside the "
                                   "direction BCE (ml.training.loop)")
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    max_failures: int = Field(2, ge=-1, description="Ray Train worker-group failures a run recovers from (resuming "
                              "from its last epoch checkpoint); -1 = unlimited")
    start_timeout_s: float = Field(120, gt=0, allow_inf_nan=False, description="Ray Train's wait for the run's "
                                   "workers (their CPUs) before the attempt fails")


class SignalSettings(_Section):
    strong: float = 0.7
    weak: float = 0.55
    expire_hours: float = 48


class QueueSettings(_Section):
    """The training queue's numbers, defined once: ml.queue.state.QueueConfig is this section, checked
    for the state machine, and the queue actor's overrides take these keys."""

    max_concurrent: int = 1
    cooldown_minutes: float = 30
    max_attempts: int = 2
    retry_base_s: float = 30
    history_limit: int = 1000
    retrain_interval_minutes: float = 0
    start_timeout_s: float = Field(600, gt=0, allow_inf_nan=False, description="a started run whose training "
                                   "workers have not come up by then is stopped and the attempt fails (retried)")


class StorageSettings(_Section):
    keep_versions: int = 10
    prediction_flush_count: int = 200
    prediction_flush_seconds: float = 2.0
    retention_hours: float = Field(168, ge=0, allow_inf_nan=False,
                                   description="prediction/training records older than this are removed on "
                                   "a schedule (0 = keep forever; ml.storage.retention)")
    retention_interval_s: float = Field(3600, gt=0, allow_inf_nan=False,
                                        description="how often the Storage actor applies it")


class BacktestSettings(_Section):
    """Defaults of `tbml backtest` (walk-forward evaluation, docs/evaluation.md)."""

    folds: int = Field(4, ge=1, le=50)
    train_bars: int | None = Field(None, ge=200, description="rows per training block (None: expanding)")
    test_bars: int | None = Field(None, ge=20, description="rows per test block (None: from the data)")
    purge: int | None = Field(None, ge=1, description="rows between training and test (None: seq_len + horizon)")
    epochs: int = Field(15, ge=1, le=500)
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    cost_bps: float = Field(10.0, ge=0.0, description="cost per trade (entry + exit), basis points")
    bars: int = Field(8000, ge=500, description="synthetic/stored bars used with --pair")


class LiveSettings(_Section):
    """Live accuracy tracking of served predictions (the accuracy monitor actor)."""

    resolve_interval_s: float = Field(10.0, gt=0)
    window: int = Field(200, ge=1, description="resolved predictions in the rolling window")
    degraded_min_n: int = Field(100, ge=1, description="resolved predictions needed before judging a model")
    degraded_margin: float = Field(0.01, ge=0.0, description="live Brier above the base rate's by more: degraded")
    retrain_priority: int = Field(3, ge=1, le=10)


class SimulationSettings(_Section):
    """Simulated trades that follow the forecasts (`ml.simulation`, docs/evaluation.md)."""

    tp_mult: float = Field(1.5, gt=0, description="take-profit at this many predicted volatilities from the entry")
    sl_mult: float = Field(1.0, gt=0, description="stop-loss at this many predicted volatilities from the entry")
    fee_bps: float = Field(10.0, ge=0, description="fee per side, basis points of the notional")
    slippage_bps: float = Field(2.0, ge=0, description="market orders (entry, stop, expiry) fill this much worse")


class StreamSettings(_Section):
    """The prediction stream `GET /api/stream/predictions` (server-sent events; docs/api.md)."""

    heartbeat_s: float = Field(15.0, gt=0, description="a comment line this often while no event is sent")
    buffer_events: int = Field(5000, ge=1, description="newest events kept in memory for live delivery")
    replay_limit: int = Field(1000, ge=1, description="most events replayed per pair after Last-Event-ID")
    max_duration_s: float = Field(50.0, gt=0, description="a stream ends cleanly after this long (below Serve's "
                                  "http_options.request_timeout_s, which would cut it); the client reconnects")
    reconnect_ms: int = Field(1000, ge=0, description="the `retry:` sent first: EventSource's reconnect delay")


class CacheSettings(_Section):
    predictions_ttl_s: float = 30
    features_ttl_s: float = 300
    model_status_ttl_s: float = 60
    health_ttl_s: float = 10


class RedisSettings(_Section):
    url: str | None = None
    port: int = 6380


class SupervisorSettings(_Section):
    """How a foreground `tbml up` restarts what dies (docs/operations.md, Supervision)."""

    check_interval_s: float = Field(1.0, gt=0, description="seconds between checks of the processes")
    actor_check_interval_s: float = Field(5.0, gt=0, description="seconds between checks of the actors")
    backoff_initial_s: float = Field(1.0, ge=0, description="delay before the first restart")
    backoff_factor: float = Field(2.0, ge=1.0, description="delay growth per consecutive failure")
    backoff_max_s: float = Field(30.0, ge=0, description="longest delay between restarts")
    stable_s: float = Field(60.0, gt=0, description="up this long: the next failure starts the backoff anew")
    max_restarts: int = Field(0, ge=0, description="restart attempts per piece and run; 0 = no limit")


class MetricsSettings(_Section):
    """The service's own numbers in Ray's Prometheus export (docs/metrics.md)."""

    enabled: bool = Field(True, description="record the tbml_* metrics (off: every recording is a no-op)")
    export_port: int = Field(8080, ge=1, le=65535, description="the Ray head's --metrics-export-port "
                             "(`tbml up` moves it to a free port, and says so, when it is taken)")
    storage_interval_s: float = Field(60.0, gt=0, description="how often the Storage actor measures the "
                                      "bytes per category of the data dir")


class ApiSettings(_Section):
    token: str | None = None
    max_body_bytes: int = 65536
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (\"*\": any); "
                                                                     "empty: no CORS headers")


class Settings(_Section):
    data_dir: Path = Path("./data")
    namespace: str = "tbml"
    pairs: list[str] = ["BTC", "ETH", "XMR", "RVN"]
    timeframe: str = "5m"
    data: DataSettings = DataSettings()
    features: FeatureSettings = FeatureSettings()
    labels: LabelSettings = LabelSettings()
    split: SplitSettings = SplitSettings()
    model: ModelSettings = ModelSettings()
    ensemble: EnsembleSettings = EnsembleSettings()
    training: TrainingSettings = TrainingSettings()
    signals: SignalSettings = SignalSettings()
    queue: QueueSettings = QueueSettings()
    storage: StorageSettings = StorageSettings()
    backtest: BacktestSettings = BacktestSettings()
    live: LiveSettings = LiveSettings()
    cache: CacheSettings = CacheSettings()
    stream: StreamSettings = StreamSettings()
    simulation: SimulationSettings = SimulationSettings()
    redis: RedisSettings = RedisSettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    metrics: MetricsSettings = MetricsSettings()
    api: ApiSettings = ApiSettings()

    @model_validator(mode="after")
    def _windows_cover_vol_window(self) -> Settings:
        short = {n: p.seq_len for n, p in self.model.profiles.items() if p.seq_len < self.labels.vol_window}
        if short:
            raise ValueError(f"model profile seq_len {short} shorter than labels.vol_window "
                             f"({self.labels.vol_window}): the naive volatility is computed from the window")
        return self

    @field_validator("timeframe")
    @classmethod
    def _known_timeframe(cls, v: str) -> str:
        if v not in TIMEFRAME_MS:
            raise ValueError(f"unknown timeframe {v!r}; one of {', '.join(TIMEFRAME_MS)}")
        return v

    @property
    def timeframe_ms(self) -> int:
        return TIMEFRAME_MS[self.timeframe]


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot override {'.'.join(path)}: {key} is not a section")
    node[path[-1]] = value


def env_overrides(environ: dict[str, str] | os._Environ) -> dict[str, Any]:
    """TBML_A__B=v becomes {"a": {"b": v}}; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "TBML_CONFIG":
            continue
        path = ENV_ALIASES.get(name) or tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_path(tree, path, value)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(config_file: str | Path | None = None,
                  environ: dict[str, str] | os._Environ | None = None) -> Settings:
    """Read the YAML file, apply environment overrides, validate. Unknown keys are errors."""
    environ = os.environ if environ is None else environ
    path = Path(config_file or environ.get("TBML_CONFIG") or DEFAULT_CONFIG)
    base = yaml.safe_load(path.read_text()) or {}
    merged = _merge(base, env_overrides(environ))
    # Keep only known env-derived top-level sections; unknown ones are typos worth reporting.
    return Settings.model_validate(merged)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached). Tests that change the environment call get_settings.cache_clear()."""
    return load_settings()
