"""Pydantic request and response models of the HTTP API (docs/api.md): camelCase, times in epoch ms.

Request bodies are strict (`extra="forbid"`, pydantic strict mode, ranges checked): no coercion, so
`false`, `"0"` or `null` is never read as a number (a destructive request with such a value deletes
nothing); a bad body is a 4xx with a message, never a 500. Response models document the shapes in OpenAPI (`/docs`) and are what the tests
validate answers against; they allow extra fields, so adding a field never breaks a client.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ml.queue import requests as rq
from ml.storage import retention as rt


def _integral(value: Any) -> Any:
    """2.0 is an integer in JSON (and in the document's JSON Schema): read it as 2. Nothing else is
    converted (a bool or a string stays what it is and is refused by strict mode)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------------------- errors


class ErrorResponse(_Out):
    error: str = Field(description="machine-readable code, e.g. pair_not_found, validation_error")
    message: str
    details: list[dict[str, Any]] | None = None
    availablePairs: list[str] | None = None


# --------------------------------------------------------------------------------------- bodies


class TrainBody(_Body):
    """The POST /api/train body; its limits are the training queue's (ml.queue.requests)."""

    epochs: int | None = Field(None, ge=rq.EPOCHS_MIN, le=rq.EPOCHS_MAX)
    batchSize: int | None = Field(None, ge=rq.BATCH_SIZE_MIN, le=rq.BATCH_SIZE_MAX)
    learningRate: float | None = Field(None, gt=0, le=rq.LEARNING_RATE_MAX)
    priority: int = Field(rq.DEFAULT_PRIORITY, ge=rq.PRIORITY_MIN, le=rq.PRIORITY_MAX, description="1 runs first")
    maxAttempts: int | None = Field(None, ge=rq.MAX_ATTEMPTS_MIN, le=rq.MAX_ATTEMPTS_MAX)
    horizon: int | None = Field(None, ge=rq.HORIZON_MIN, le=rq.HORIZON_MAX, description="bars ahead")

    _integral_ints = field_validator("epochs", "batchSize", "priority", "maxAttempts", "horizon",
                                     mode="before")(_integral)


class BuildBody(_Body):
    """The POST /api/train/{pair}/ensemble body: an ensemble is built from existing versions, so it
    takes the queue's scheduling fields only (no epochs, batch size, learning rate or horizon)."""

    priority: int = Field(rq.DEFAULT_PRIORITY, ge=rq.PRIORITY_MIN, le=rq.PRIORITY_MAX, description="1 runs first")
    maxAttempts: int | None = Field(None, ge=rq.MAX_ATTEMPTS_MIN, le=rq.MAX_ATTEMPTS_MAX)

    _integral_ints = field_validator("priority", "maxAttempts", mode="before")(_integral)


class PromoteBody(_Body):
    version: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    reason: str | None = Field(None, max_length=500)


class RollbackBody(_Body):
    version: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                                description="default: the version production had before")
    reason: str | None = Field(None, max_length=500)


class CancelBody(_Body):
    reason: str | None = Field(None, max_length=500)


class EmergencyStopBody(_Body):
    reason: str | None = Field(None, max_length=500)


class ClearCooldownsBody(_Body):
    pair: str | None = Field(None, max_length=15)
    modelType: str | None = Field(None, max_length=32)


class CleanupBody(_Body):
    """The POST /api/storage/cleanup body; its limits are the explicit cleanup's (ml.storage.retention).
    Removing records younger than one hour (down to 0: every record) must be asked for explicitly with
    `"force": true`."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"maxAgeHours": {"minimum": rt.MIN_MAX_AGE_HOURS}}},
        {"properties": {"force": {"const": True}}, "required": ["force"]},
    ]})

    force: bool = Field(False, description=f"allow maxAgeHours below {rt.MIN_MAX_AGE_HOURS:g} "
                                           "(0: remove every record)")
    maxAgeHours: float = Field(168, ge=0, le=rt.MAX_MAX_AGE_HOURS,
                               description=f"records older than this are removed; >= {rt.MIN_MAX_AGE_HOURS:g} "
                                           "unless force is true")

    @field_validator("maxAgeHours")
    @classmethod
    def _forced_below_minimum(cls, value: float, info: ValidationInfo) -> float:
        if value < rt.MIN_MAX_AGE_HOURS and info.data.get("force") is not True:
            raise ValueError(f"below {rt.MIN_MAX_AGE_HOURS:g} removes recent history; send \"force\": true "
                             "to mean it")
        return value


# --------------------------------------------------------------------------------------- predictions


class FeatureSample(_Out):
    count: int
    sample: dict[str, float | None]


class HorizonForecast(_Out):
    """One horizon of a prediction, classified on its own (a horizon without an edge is 0.5 / HOLD)."""

    direction: Literal["up", "down", "neutral"]
    probability: float = Field(description="calibrated P(close[t+h] > close[t])")
    confidence: float = Field(description="|p - 0.5| * 2")
    signal: Literal["STRONG_BUY", "BUY", "HOLD", "SELL", "STRONG_SELL"]
    volatility: float | None = Field(description="expected size of the move over the horizon, a fraction of the "
                                                 "price: sqrt(h * predicted per-bar variance) (null in a fallback)")
    targetTime: int | None = Field(description="asOf + h bars (epoch ms)")


class EnsembleInfo(_Out):
    """How `model=ensemble` was answered."""

    promoted: bool = Field(description="a promoted ensemble combined its members (false: one member answered)")
    answeredBy: str | None = Field(description="`ensemble`, or the member type that answered alone (null: none "
                                               "could)")
    reason: str | None = Field(description="why a single member answered (null when the ensemble combined)")
    version: str | None = Field(None, description="the ensemble version (null when there is none)")
    members: dict[str, str] | None = Field(None, description="member type -> version combined (promoted only)")


class Prediction(_Out):
    direction: Literal["up", "down", "neutral"]
    probability: float = Field(description="calibrated P(up) over the horizon")
    confidence: float = Field(description="|p - 0.5| * 2")
    signal: Literal["STRONG_BUY", "BUY", "HOLD", "SELL", "STRONG_SELL"]
    volatility: float | None = Field(description="predicted move over the horizon, a fraction of the price "
                                                 "(null in a fallback)")
    modelType: str
    modelVersion: str | None
    horizon: int = Field(description="bars ahead: the horizon of the top-level fields")
    asOf: int | None = Field(description="close time of the last candle used (epoch ms)")
    targetTime: int | None = Field(description="asOf + horizon bars (epoch ms)")
    stale: bool
    fallback: bool
    reason: str | None = None
    features: FeatureSample
    horizons: dict[str, HorizonForecast] = Field(
        description="every horizon the model predicts, keyed by bars ahead (\"1\", \"3\", ...); the top-level "
                    "fields repeat the entry of `horizon`. A fallback has a neutral entry (0.5, HOLD, volatility "
                    "null) per horizon")
    ensemble: EnsembleInfo | None = Field(None, description="model=ensemble only: who answered and why")


class PredictionResponse(_Out):
    pair: str
    prediction: Prediction
    timestamp: int
    cached: bool
    cacheAge: int | None = Field(None, description="ms since the cached answer was computed (hits only)")
    responseTime: float = Field(description="ms spent in the service")


class PredictionEvent(PredictionResponse):
    """The `data:` of an event of GET /api/stream/predictions (`event: prediction`, `id:` its event id):
    the body of GET /api/predictions/{pair} when the pair's candle closed."""


class SimulationStats(_Out):
    trades: int = Field(description="closed simulated trades kept (the newest 500)")
    winRate: float | None
    equity: float = Field(description="account value, starting at 1.0, net of fees and slippage")
    totalReturn: float
    sharpe: float | None = Field(description="annualised for the timeframe (every bar of the year)")
    maxDrawdown: float
    exposure: float = Field(description="share of bars in a position")
    feesPaid: float
    bars: int


class SimulationResponse(_Out):
    """GET /api/simulations/{pair}: the live simulated account that follows the predictions made at each
    candle close (docs/evaluation.md, "Simulated trading")."""

    pair: str
    open: dict[str, Any] | None = Field(description="the open trade (side, entry, take_profit, stop_loss, ...)")
    trades: list[dict[str, Any]] = Field(description="the newest closed trades, newest first")
    stats: SimulationStats
    buyAndHold: dict[str, Any] | None = Field(description="buying and holding over the same bars")
    equityCurve: list[dict[str, Any]]
    since: int | None = Field(description="open time of the first bar the account saw (epoch ms)")
    updatedAt: int | None
    lastForecast: dict[str, Any] | None = Field(
        None, description="the newest forecast the account saw: ts, signal, horizon, probability, volatility, "
                          "volatilitySource (`model`: the served volatility, `naive`: the trailing forecast)")
    volatilitySources: dict[str, int] = Field(default_factory=dict,
                                              description="forecasts per volatility source (model, naive)")
    config: dict[str, Any]
    timestamp: int


class AllPredictionsResponse(_Out):
    predictions: dict[str, Prediction]
    count: int
    timestamp: int
    cached: dict[str, bool]
    responseTime: float


class HistoryRecord(_Out):
    id: str
    pair: str
    timestamp: int
    direction: str
    probability: float
    confidence: float
    signal: str
    volatility: float | None = Field(None, description="the served volatility of the record's horizon")
    realizedClose: float | None = Field(None, description="close of the target bar (the one closing at targetTime)")
    realizedDirection: Literal["up", "down"] | None = Field(
        None, description="up if realizedClose > the close at asOf, else down; set once the target bar closed")
    correct: bool | None = Field(None, description="direction == realizedDirection (None for neutral)")
    resolvedAt: int | None = Field(None, description="when the accuracy monitor resolved it (epoch ms); "
                                                     "absent while resolved only on the fly")
    outcome: str | None = Field(None, description="realizedDirection (kept for older clients)")


class HistoryResponse(_Out):
    pair: str
    predictions: list[HistoryRecord]
    count: int
    totalCount: int
    timestamp: int


class LiveStats(_Out):
    n: int = Field(description="resolved predictions in the window, each counted once")
    accuracy: float | None = Field(None, description="share of up/down calls that were right")
    brier: float | None = Field(None, description="mean (P(up) - outcome)^2")
    baseRate: float | None = Field(None, description="share of the window that went up")
    baselineBrier: float | None = Field(None, description="Brier of always answering referenceRate on the same rows")
    referenceRate: float | None = Field(None, description="the production version's training up-rate (0.5 if unknown)")
    nDirectional: int = 0
    nCorrect: int = 0
    since: int | None = Field(None, description="asOf of the oldest prediction in the window")
    until: int | None = Field(None, description="asOf of the newest prediction in the window")
    degraded: bool = Field(False, description="n >= live.degraded_min_n and brier > baselineBrier + margin")
    degradedReason: str | None = None


class ModelLiveStats(LiveStats):
    version: str | None = Field(description="the production version these numbers are of (None: no model)")
    n: int = 0


class AccuracyResponse(LiveStats):
    pair: str
    window: int
    modelType: str | None = Field(None, description="the model filter (None: every model type and version)")
    pending: int = Field(0, description="distinct predictions whose target bar has not closed (or has no candle)")
    minN: int
    margin: float
    models: dict[str, ModelLiveStats] = Field(
        default_factory=dict, description="per model type: the production version's numbers (what the "
                                          "accuracy monitor judges)")
    timestamp: int


# --------------------------------------------------------------------------------------- features


class FeatureMetadata(_Out):
    asOf: int
    bars: int
    extractedAt: int


class FeatureBlock(_Out):
    count: int
    names: list[str]
    values: list[float | None]
    metadata: FeatureMetadata


class FeaturesResponse(_Out):
    pair: str
    features: FeatureBlock
    timestamp: int
    cached: bool


# --------------------------------------------------------------------------------------- pairs, health


class PairInfo(_Out):
    pair: str
    configured: bool
    coverage: dict[str, Any] | None
    models: dict[str, dict[str, Any]]


class PairsResponse(_Out):
    pairs: list[PairInfo]
    count: int
    timeframe: str
    source: str
    timestamp: int


class DataSourcePair(_Out):
    source: str
    bars: int | None
    lastCandle: int | None = Field(description="open time of the newest candle in the store (epoch ms)")
    lastClose: int | None = Field(description="its close time")
    lagBars: int | None = Field(description="bars closed since the newest stored candle")
    stale: bool = Field(description="lagBars > data.max_lag_bars (or no candle at all)")
    lastError: str | None = Field(description="the market feed's last failed fetch of this pair")
    lastErrorAt: int | None
    lastSuccessAt: int | None
    failures: int | None = Field(description="failed fetches in a row (null: the feed is not reachable)")


class DataSourceHealth(_Out):
    status: Literal["healthy", "degraded"]
    type: str
    timeframe: str
    maxLagBars: int
    pairs: dict[str, DataSourcePair]
    pairsWithoutData: list[str]
    stalePairs: list[str]
    failingPairs: list[str]
    sourceReachable: bool | None = Field(description="core / exchange: the market feed's last fetches "
                                         "succeeded (null: not known, or a source without an upstream)")
    feed: dict[str, Any] = Field(description="the market feed actor: reachable, error, ticks, nextDueAt")


class HealthResponse(_Out):
    status: Literal["healthy", "degraded", "unhealthy"]
    service: str
    version: str
    timestamp: int
    uptime: str
    components: dict[str, dict[str, Any]] = Field(description="ray, redis, storage, trainingQueue and "
                                                  "dataSource (its shape: DataSourceHealth)")
    models: dict[str, Any]
    predictions: dict[str, Any]
    training: dict[str, Any]
    performance: dict[str, Any]
    storage: dict[str, Any]
    supervisor: dict[str, Any] | None = Field(None, description="restarts and the last failure seen by a "
                                              "foreground `tbml up` (docs/operations.md)")


class PingResponse(_Out):
    ok: bool


# --------------------------------------------------------------------------------------- models


class LiveStatus(_Out):
    available: bool = Field(description="false until the accuracy monitor has scored this version")
    version: str | None
    n: int
    accuracy: float | None
    brier: float | None
    baseRate: float | None
    baselineBrier: float | None
    degraded: bool
    reason: str | None
    testAccuracy: float | None = Field(description="test accuracy the version was promoted with")
    testBrier: float | None
    testBaselineBrier: float | None
    updatedAt: int | None


class NewestEnsemble(_Out):
    version: str
    trainedAt: int | None
    members: dict[str, str] = Field(description="the member versions it was built from, per type")
    production: bool = Field(description="true when this version is the production ensemble")
    promotion: dict[str, Any] | None = Field(
        description="the registry's decision when it was built: {promoted, reason} (null: none recorded)")
    metrics: dict[str, Any] = Field(description="its test metrics (the same fields as a production's)")


class EnsembleStatus(_Out):
    promoted: bool = Field(description="true: a production ensemble combines its members")
    version: str | None = Field(description="the production ensemble version (null: none)")
    answeredBy: str | None = Field(description="`ensemble`, or the single member type that answers model=ensemble")
    members: dict[str, str] | None = None
    reason: str | None = Field(description="why a single member answers (null when the ensemble combines)")
    newest: NewestEnsemble | None = Field(description="the newest built ensemble version (null: none built)")


class ModelTypeStatus(_Out):
    hasModel: bool
    modelInfo: dict[str, Any]
    production: dict[str, Any] | None
    versions: int
    training: dict[str, Any]
    live: LiveStatus | None = Field(None, description="live accuracy of the production version (None: no model)")
    ensemble: EnsembleStatus | None = Field(
        None, description="only under `ensemble`: what model=ensemble answers and the newest built version")


class ModelStatusResponse(_Out):
    pair: str
    featureCount: int
    models: dict[str, ModelTypeStatus]
    trainingQueue: dict[str, Any]
    timestamp: int


class VersionsResponse(_Out):
    pair: str
    models: dict[str, dict[str, Any]]
    timestamp: int


class PromoteResponse(_Out):
    success: bool
    message: str
    pair: str
    modelType: str
    version: str
    previousVersion: str | None
    timestamp: int


# --------------------------------------------------------------------------------------- training


class TrainAccepted(_Out):
    message: str
    jobId: str
    pair: str
    modelType: str
    status: str
    queuePosition: int | None
    canTrain: dict[str, Any] | None
    queueStatus: dict[str, Any] | None
    timestamp: int


class QueueResponse(_Out):
    queue: dict[str, Any]
    timestamp: int


class JobResponse(_Out):
    job: dict[str, Any]
    timestamp: int


class ActionResponse(_Out):
    success: bool
    message: str
    timestamp: int


# --------------------------------------------------------------------------------------- storage


class StorageStatsResponse(_Out):
    storage: dict[str, Any]
    performance: dict[str, Any]
    timestamp: int


class SaveResponse(_Out):
    success: bool
    message: str
    savedCount: int
    durationMs: float
    timestamp: int


class CleanupResponse(_Out):
    success: bool
    message: str
    cleanedCount: int
    maxAgeHours: float
    timestamp: int
