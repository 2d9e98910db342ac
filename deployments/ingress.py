"""The HTTP ingress (FastAPI on Ray Serve): the routes of the API, documented in OpenAPI (`/docs`).

Each route parses its input (`deployments.params`), calls the domain and answers with a view of
`ml.serving.views`. A prediction goes through `deployments.predictions` (per-replica snapshot,
the replica's L1, Redis, the predictor deployment); the served prediction is buffered
(`deployments.history`) and sent to the Storage actor in the background, so the response never
waits for it. Actor calls go through `deployments.clients`.

Live accuracy (`/history`, `/accuracy`, the `live` block of model status): records carry their
realized outcome (`ml.evaluation.live`), persisted by the accuracy monitor actor (which the ingress
creates in the background when it is missing) and resolved on the fly by the same rule for what the
monitor has not reached yet.

`GET /api/ping` answers `{"ok": true}` touching nothing: the anchor of every latency figure.
Mutating routes need `Authorization: Bearer <TBML_API_TOKEN>` when a token is configured (the
`bearerAuth` security scheme of the OpenAPI document). Bodies are JSON whatever their content type,
OPTIONS lists a path's methods, CORS follows `api.cors_origins` (`deployments.http`); the OpenAPI
document is built per replica from its settings (`deployments.openapi`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from starlette.responses import Response

from deployments import errors, http, openapi, page
from deployments.args import AppArgs
from deployments.clients import ActorClients
from deployments.errors import JSON, ApiError
from deployments.history import HistoryBuffer
from deployments.metrics import ServeMetrics
from deployments.params import Params, short
from deployments.predictions import Predictions
from deployments.replica import apply_env, direct, replica_tag
from deployments.schemas import (
    AccuracyResponse,
    ActionResponse,
    AllPredictionsResponse,
    BuildBody,
    CancelBody,
    CleanupBody,
    CleanupResponse,
    ClearCooldownsBody,
    EmergencyStopBody,
    ErrorResponse,
    FeaturesResponse,
    HealthResponse,
    HistoryResponse,
    JobResponse,
    ModelStatusResponse,
    PairsResponse,
    PingResponse,
    PredictionResponse,
    PromoteBody,
    PromoteResponse,
    QueueResponse,
    RollbackBody,
    SaveResponse,
    SimulationResponse,
    StorageStatsResponse,
    TrainAccepted,
    TrainBody,
    VersionsResponse,
)
from deployments.simulations import Simulations
from deployments.status import StatusReports
from deployments.stream import PAIRS_PATTERN, STREAM_DOC, EventStream, PredictionStream, stream_responses
from ml.clock import now_ms
from ml.evaluation.live import accuracy_summary, reference_rate, with_outcomes
from ml.serving import views
from ml.serving.events import EVENT_ID_PATTERN
from ml.serving.history import history_record
from ml.serving.model_ids import ENSEMBLE, accepted_types
from ml.serving.prediction import prediction_body, round_ms
from ml.serving.snapshot import Snapshots

log = logging.getLogger(__name__)

_PING_BODY = b'{"ok":true}'
ACCURACY_SCAN = 20_000  # newest history records the accuracy endpoint scores
ENSEMBLE_DOC = "true: the same as model=ensemble (a different explicit model is a 422 conflicting_parameters)"


def _settings():
    from ml.config import get_settings

    return get_settings()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("trading-bot-ml")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0.0.0"


app = FastAPI(
    title="trading-bot-ml",
    version=_version(),
    description="ML price-direction predictions for crypto pairs, served by Ray Serve. "
                "Errors are JSON: {error, message, ...}. Mutating endpoints need "
                "`Authorization: Bearer <token>` when TBML_API_TOKEN is set.",
    redirect_slashes=False,
)
errors.install(app)
# innermost first: the body as JSON, its size limit, OPTIONS, then CORS around everything
app.add_middleware(http.JsonBodyMiddleware)
app.add_middleware(errors.BodyLimitMiddleware, limit=lambda: _settings().api.max_body_bytes)
app.add_middleware(http.OptionsMiddleware, routes=lambda: app.routes)
app.add_middleware(http.CorsMiddleware, origins=lambda: _settings().api.cors_origins)
openapi.install(app, _settings)  # the replica's settings: enums of what it validates

_BEARER = HTTPBearer(auto_error=False, scheme_name=openapi.SCHEME,
                     description="TBML_API_TOKEN (api.token): needed by every mutating endpoint when set")


async def require_token(request: Request,
                        _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None) -> None:
    errors.check_token(_settings().api.token, request.headers.get("authorization"))


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


AUTH = [Depends(require_token)]
E404 = _errors(404)
E422 = _errors(422)
E503 = _errors(503)
EAUTH = _errors(401, 413)
ETRAIN = {**E404, **E422, **EAUTH, **_errors(409, 429, 503)}


class IngressImpl:
    """The ingress replica (FastAPI routes below); deployed as `Ingress` (end of module)."""

    def __init__(self, features, predictor, args: dict[str, Any] | None = None) -> None:
        self.args = AppArgs.model_validate(args or {})
        self.settings = s = apply_env(self.args.replica_env())
        from ml.cache.client import Cache
        from ml.data.store import CandleStore
        from ml.storage.store import Storage

        self.cache = Cache.from_settings(s)
        self.store = CandleStore(s.data_dir, s.timeframe)
        self.reader = Storage.reader(s.data_dir)
        self.namespace = self.args.namespace or s.namespace
        self.tf = s.timeframe_ms
        self.model_types = list(s.model.enabled_types)
        self.accepted_types = accepted_types(self.model_types)  # + ensemble with two or more
        self.default_model = s.model.default_type if s.model.default_type in self.model_types \
            else self.model_types[0]
        default_seq_len = int(s.model.profiles[s.model.profile].seq_len) if s.model.profile in s.model.profiles \
            else 30
        self.params = Params(s, self.store, self.accepted_types, self.default_model)
        self.snapshots = Snapshots(self.store, self.reader, self.accepted_types, self.tf,
                                   live_source=s.data.source != "files", interval_s=self.args.snapshot_interval_s,
                                   default_horizons=list(s.labels.horizons))
        self.actors = ActorClients(self.args, self.namespace, str(self.reader.data_dir))
        self.predictions_ = Predictions(s, direct(predictor, self.args.handle_grpc),
                                        direct(features, self.args.handle_grpc), self.cache, self.snapshots,
                                        default_seq_len, self.model_types)
        self.metrics_ = self.predictions_.metrics = ServeMetrics(s.metrics.enabled)  # deployments/metrics.py

        async def append(batch: list[dict]) -> None:
            await self.actors.storage_call("append_predictions", batch)

        self.history_ = HistoryBuffer(append, flush_s=self.args.history_flush_s,
                                      max_batch=self.args.history_max_batch,
                                      max_buffer=self.args.history_max_buffer,
                                      after_flush=self.actors.ensure_monitor)  # history to resolve now
        self.status = StatusReports(settings=s, cache=self.cache, reader=self.reader, actors=self.actors,
                                    snapshots=self.snapshots, predictions=self.predictions_, history=self.history_,
                                    model_types=self.model_types, tag=replica_tag(), namespace=self.namespace,
                                    version=app.version)
        self.stream_ = PredictionStream(self)
        self.simulations = Simulations(s, self.store, self.reader, self.actors)
        self.stream_.attach()  # tell the events hub (if there is one yet) which app this is

    def _served(self, pair: str, pred: dict[str, Any], hit: Any, ts: int, *, fallbacks: bool = True) -> None:
        self.predictions_.count(pred, fallbacks=fallbacks)
        self.metrics_.served(pair, pred, hit)
        self.metrics_.redis(self.cache.degraded)
        self.history_.add(history_record(pair, pred, hit is not None, ts))

    async def _flush(self) -> None:
        """Send the buffered history first, so a read sees every prediction served before it."""
        with contextlib.suppress(Exception):
            await self.history_.flush()

    async def _records(self, pair: str, limit: int, since: int | None) -> list[dict]:
        """Stored history of a pair, with realized outcomes."""
        records = await self.actors.storage_call("query_predictions", pair, limit, since)
        def read(first: int, last: int):  # the candle store, for every source (the feed keeps it)
            return self.store.read(pair, start_ts=first, end_ts=last)

        return await asyncio.to_thread(with_outcomes, records, self.tf, now_ms(), read)

    # ================================================================================ predictions

    @app.get("/", include_in_schema=False)
    async def status_page(self) -> Response:
        """The status page (deployments/page.py): signals, charts, live accuracy, the queue."""
        return page.status_page()

    @app.get("/api/ping", response_model=PingResponse, tags=["health"],
             summary="No-op: touches nothing (the latency anchor)")
    async def ping(self) -> Response:
        return Response(content=_PING_BODY, media_type="application/json")

    @app.get("/api/predictions/{pair}", response_model=PredictionResponse, responses={**E404, **E422},
             tags=["predictions"],
             summary="Prediction of one pair: every horizon, one of them at the top (cached per candle and model version)")
    async def prediction(self, pair: str, model: str | None = Query(None, max_length=32),
                         horizon: int | None = Query(None, ge=1, le=10_000),
                         ensemble: bool = Query(False, description=ENSEMBLE_DOC),
                         bypassCache: bool = Query(False, description="skip the cache (recompute)"),
                         fresh: bool = Query(False, description="same as bypassCache")) -> JSON:
        t0 = time.perf_counter()
        p = self.params.pair(pair)
        mt = self.params.model_query(model, ensemble)
        pred, hit = await self.predictions_.predict(p, mt, horizon, bypassCache or fresh)
        ts = now_ms()
        self._served(p, pred, hit, ts)
        self.metrics_.latency("one", time.perf_counter() - t0)
        return JSON(prediction_body(p, pred, hit, time.perf_counter() - t0, ts))

    @app.get("/api/predictions", response_model=AllPredictionsResponse, tags=["predictions"],
             summary="Predictions of every configured pair (a failing pair gets a fallback)")
    async def predictions(self, model: str | None = Query(None, max_length=32),
                          ensemble: bool = Query(False, description=ENSEMBLE_DOC)) -> JSON:
        t0 = time.perf_counter()
        mt = self.params.model_query(model, ensemble)
        pairs = list(self.settings.pairs)
        results = await asyncio.gather(*(self.predictions_.predict(p, mt, None, False) for p in pairs),
                                       return_exceptions=True)
        ts = now_ms()
        out: dict[str, Any] = {}
        cached: dict[str, bool] = {}
        for pair, res in zip(pairs, results, strict=True):
            pred, hit = (self.predictions_.failed(mt, res), None) if isinstance(res, BaseException) else res
            out[pair], cached[pair] = pred, hit is not None
            self._served(pair, pred, hit, ts, fallbacks=False)
        self.metrics_.latency("all", time.perf_counter() - t0)
        return JSON({"predictions": out, "count": len(out), "timestamp": ts, "cached": cached,
                     "responseTime": round_ms(time.perf_counter() - t0)})

    @app.get("/api/predictions/{pair}/history", response_model=HistoryResponse,
             responses={**E404, **E422, **E503},
             tags=["predictions"], summary="Served predictions, newest first, with realized outcomes")
    async def history(self, pair: str, limit: int = Query(100, ge=1, le=10_000),
                      since: int | None = Query(None, ge=0, description="epoch ms")) -> JSON:
        p = self.params.pair(pair)
        await self._flush()
        records, total = await asyncio.gather(self._records(p, limit, since),
                                              self.actors.storage_call("count_predictions", p))
        return JSON({"pair": p, "predictions": records, "count": len(records), "totalCount": total,
                     "timestamp": now_ms()})

    @app.get("/api/simulations/{pair}", response_model=SimulationResponse, responses={**E404, **E503},
             tags=["predictions"], summary="The live simulated account that trades on each close's prediction")
    async def simulation(self, pair: str) -> JSON:
        return JSON(await self.simulations.view(self.params.pair(pair)))

    @app.get("/api/predictions/{pair}/accuracy", response_model=AccuracyResponse,
             responses={**E404, **E422, **E503},
             tags=["predictions"], summary="Rolling live accuracy and Brier of resolved predictions vs the base rate")
    async def accuracy(self, pair: str,
                       window: int | None = Query(None, ge=1, le=10_000,
                                                  description="resolved predictions (default live.window)"),
                       model: str | None = Query(None, max_length=32)) -> JSON:
        p = self.params.pair(pair)
        mt = self.params.model_query(model) if model is not None else None
        live = self.settings.live
        self.actors.ensure_monitor()
        await self._flush()
        records, snap = await asyncio.gather(self._records(p, ACCURACY_SCAN, None), self.snapshots.get(p))
        # per model type: the production version and its training up-rate (the live baseline)
        production = {t: (prod.version, reference_rate(prod.meta)) if (prod := snap.production.get(t)) else None
                      for t in ([mt] if mt else self.model_types)}
        ref = snap.production.get(mt or self.default_model)
        summary = accuracy_summary(records, int(window or live.window), production, model_type=mt,
                                   reference=reference_rate(ref.meta) if ref else None,
                                   min_n=live.degraded_min_n, margin=live.degraded_margin)
        return JSON({"pair": p, **summary, "timestamp": now_ms()})

    @app.get("/api/features/{pair}", response_model=FeaturesResponse, responses={**E404, **E503},
             tags=["features"],
             summary="The latest feature row of a pair (cached per candle)")
    async def features_of(self, pair: str) -> JSON:
        p = self.params.pair(pair)
        block, hit = await self.predictions_.feature_row(p, self.default_model)
        self.metrics_.lookup("features", hit)
        return JSON({"pair": p, "features": block, "timestamp": now_ms(), "cached": hit is not None})

    @app.get("/api/pairs", response_model=PairsResponse, tags=["predictions"],
             summary="Configured pairs with candle coverage and production models")
    async def pairs(self) -> JSON:
        pairs = self.params.known_pairs()
        snaps = await asyncio.gather(*(self.snapshots.get(p) for p in pairs))
        now = now_ms()
        out = [views.pair_view(pair, snap, configured=pair in self.settings.pairs, timeframe_ms=self.tf, now=now,
                               expire_hours=self.settings.signals.expire_hours, horizons=self.snapshots.horizons)
               for pair, snap in zip(pairs, snaps, strict=True)]
        return JSON({"pairs": out, "count": len(out), "timeframe": self.settings.timeframe,
                     "source": self.settings.data.source, "timestamp": now})

    # ================================================================================ stream

    async def on_candle_close(self, closes: dict[str, int], first_id: int) -> list[dict[str, Any]]:
        """Called by the prediction events hub (a handle method, not a route): compute and cache the
        predictions of the closed candles, record them, return their events (`deployments.stream`)."""
        return await self.stream_.on_close(closes, first_id)

    @app.get("/api/stream/predictions", response_class=EventStream,
             responses={**stream_responses(), **E404, **E422}, tags=["predictions"],
             summary="Server-sent events: each prediction made when a candle closes")
    async def stream_predictions(
            self, pairs: str | None = Query(None, max_length=2000, pattern=PAIRS_PATTERN,
                                            description=STREAM_DOC["pairs"]),
            lastEventId: str | None = Query(None, pattern=EVENT_ID_PATTERN, description=STREAM_DOC["lastEventId"]),
            # `str`, not `str | None`: a header is absent or a string (no `null` in the document)
            last_event_id: str = Header(None, alias="Last-Event-ID", pattern=EVENT_ID_PATTERN,
                                        description=STREAM_DOC["Last-Event-ID"])) -> EventStream:
        wanted, last = self.stream_.parse(pairs, last_event_id, lastEventId)
        return await self.stream_.open(wanted, last)

    # ================================================================================ health, status

    @app.get("/api/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}},
             tags=["health"], summary="Service health: components, models, cache, queue, storage")
    async def health(self) -> JSON:
        body = await self.status.health(self.args.actor_timeout_s)
        return JSON(body, status_code=503 if body["status"] == "unhealthy" else 200)

    @app.get("/api/models/{pair}/status", response_model=ModelStatusResponse, responses=E404, tags=["models"],
             summary="Per model type: production version, metrics, versions count, training gate")
    async def model_status(self, pair: str) -> JSON:
        return JSON(await self.status.model_status(self.params.pair(pair)))

    # ================================================================================ models

    @app.get("/api/models/{pair}/versions", response_model=VersionsResponse, responses={**E404, **E422},
             tags=["models"], summary="Every stored version per model type, newest first")
    async def model_versions(self, pair: str, model: str | None = Query(None, max_length=32)) -> JSON:
        p = self.params.pair(pair)
        types = [self.params.model_query(model)] if model is not None else self.accepted_types

        def read() -> dict:
            return {mt: views.versions_view(self.reader.list_versions(p, mt)) for mt in types}

        return JSON({"pair": p, "models": await asyncio.to_thread(read), "timestamp": now_ms()})

    async def _set_production(self, pair: str, mt: str, version: str, reason: str, previous: str | None
                              ) -> JSON:
        if await asyncio.to_thread(self.snapshots.meta, pair, mt, version) is None:
            known = [m.get("version") for m in await asyncio.to_thread(self.reader.list_versions, pair, mt)]
            raise ApiError(404, "version_not_found", f"no version {short(version)!r} of {pair}/{mt}",
                           availableVersions=known[:50])
        pointer = await self.actors.storage_call("set_production", pair, mt, version, reason)
        self.snapshots.invalidate(pair)
        return JSON(views.promotion_view(pair, mt, version, previous, pointer, reason, now_ms()))

    @app.post("/api/models/{pair}/{model}/promote", response_model=PromoteResponse, dependencies=AUTH,
              responses={**E404, **E422, **EAUTH, **E503}, tags=["models"],
              summary="Make a stored version production (the next prediction uses it)")
    async def promote(self, pair: str, model: str, body: PromoteBody) -> JSON:
        p = self.params.pair(pair)
        mt = self.params.model_path(model)
        prod = (await self.snapshots.get(p, force=True)).production.get(mt)
        return await self._set_production(p, mt, body.version, body.reason or "manual promotion (HTTP API)",
                                          prod.version if prod else None)

    @app.post("/api/models/{pair}/{model}/rollback", response_model=PromoteResponse, dependencies=AUTH,
              responses={**E404, **E422, **EAUTH, **E503, **_errors(409)}, tags=["models"],
              summary="Point production back to a version (default: the previous one)")
    async def rollback(self, pair: str, model: str, body: Annotated[RollbackBody | None, Body()] = None) -> JSON:
        p = self.params.pair(pair)
        mt = self.params.model_path(model)
        body = body or RollbackBody()
        prod = (await self.snapshots.get(p, force=True)).production.get(mt)
        current = prod.version if prod else None
        target = body.version or (prod.previous if prod else None)
        if not target:
            raise ApiError(409, "no_previous_version", f"{p}/{mt} has no previous production version; "
                                                       "name one in the body: {\"version\": ...}")
        return await self._set_production(p, mt, target, body.reason or f"rollback from {current} to {target}",
                                          current)

    # ================================================================================ training

    async def _submit(self, pair: str, mt: str, body: TrainBody) -> tuple[int, dict, dict[str, str]]:
        req = {"pair": pair, "model_type": mt, "epochs": body.epochs, "batch_size": body.batchSize,
               "learning_rate": body.learningRate, "priority": body.priority, "max_attempts": body.maxAttempts,
               "horizon": body.horizon}
        out = await self.actors.queue_call("submit", req)
        return views.train_outcome(pair, mt, out, now_ms())

    # Before the generic route (FastAPI matches in order): an ensemble is built, not trained, so its body
    # has no training parameters (the document says so, instead of a schema-valid body being refused).
    @app.post("/api/train/{pair}/ensemble", response_model=TrainAccepted, status_code=202, dependencies=AUTH,
              responses=ETRAIN, tags=["training"],
              summary="Queue the build of the pair's ensemble from the enabled types' production versions (202)")
    async def build_ensemble(self, pair: str, body: Annotated[BuildBody | None, Body()] = None) -> JSON:
        p = self.params.pair(pair)
        mt = self.params.model_path(ENSEMBLE)  # 404 with fewer than two enabled types
        body = body or BuildBody()
        status, payload, headers = await self._submit(p, mt, TrainBody(priority=body.priority,
                                                                       maxAttempts=body.maxAttempts))
        return JSON(payload, status_code=status, headers=headers)

    @app.post("/api/train/{pair}/{model}", response_model=TrainAccepted, status_code=202, dependencies=AUTH,
              responses=ETRAIN, tags=["training"],
              summary="Queue a training job (202; 409 duplicate, 429 cooldown, 503 paused)")
    async def train_model(self, pair: str, model: str, body: Annotated[TrainBody | None, Body()] = None) -> JSON:
        p = self.params.pair(pair)
        mt = self.params.model_path(model)
        status, payload, headers = await self._submit(p, mt, body or TrainBody())
        return JSON(payload, status_code=status, headers=headers)

    @app.post("/api/train/{pair}", response_model=TrainAccepted, status_code=202, dependencies=AUTH,
              responses=ETRAIN, tags=["training"], summary="Queue training of every enabled model type of a pair")
    async def train_all(self, pair: str, body: Annotated[TrainBody | None, Body()] = None) -> JSON:
        p = self.params.pair(pair)
        body = body or TrainBody()
        results = [await self._submit(p, mt, body) for mt in self.model_types]
        status, payload, headers = views.train_all_outcome(p, results)
        return JSON(payload, status_code=status, headers=headers)

    @app.get("/api/training/queue", response_model=QueueResponse, responses={**E422, **E503}, tags=["training"],
             summary="Active, queued and recent jobs, cooldowns, pause flag")
    async def training_queue(self, recent: int = Query(20, ge=0, le=1000)) -> JSON:
        return JSON({"queue": await self.actors.queue_call("view", recent), "timestamp": now_ms()})

    @app.get("/api/training/job/{job_id}", response_model=JobResponse, responses={**E404, **E503},
             tags=["training"],
             summary="One job with its progress (epoch, loss, ETA)")
    async def training_job(self, job_id: str = Path(..., max_length=128)) -> JSON:
        job = await self.actors.queue_call("job", job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"no training job {short(job_id)!r}")
        return JSON({"job": job, "timestamp": now_ms()})

    @app.delete("/api/training/job/{job_id}", response_model=ActionResponse, dependencies=AUTH,
                responses={**E404, **EAUTH, **E503, **_errors(409)}, tags=["training"],
                summary="Cancel a queued or running job (a running one is really stopped)")
    async def cancel_job(self, job_id: str = Path(..., max_length=128),
                         body: Annotated[CancelBody | None, Body()] = None) -> JSON:
        reason = (body.reason if body else None) or "cancelled via HTTP API"
        out = await self.actors.queue_call("cancel", job_id, reason)
        if not out.get("ok"):
            code = out.get("error", "not_found")
            raise ApiError(404 if code == "not_found" else 409, "job_not_found" if code == "not_found" else code,
                           out.get("message", code), jobId=job_id)
        return JSON({"success": True, "message": f"job {job_id} cancelled", "jobId": job_id,
                     "wasRunning": out.get("wasRunning"), "stopped": out.get("stopped"), "job": out.get("job"),
                     "timestamp": now_ms()})

    @app.post("/api/training/emergency-stop", response_model=ActionResponse, dependencies=AUTH,
              responses={**EAUTH, **E503}, tags=["training"],
              summary="Cancel everything queued, stop everything running, pause until resume")
    async def emergency_stop(self, body: Annotated[EmergencyStopBody | None, Body()] = None) -> JSON:
        reason = (body.reason if body else None) or "emergency stop (HTTP API)"
        out = await self.actors.queue_call("emergency_stop", reason)
        return JSON({"success": True, "message": "training stopped and paused until POST /api/training/resume",
                     "paused": True, "cancelledQueued": out.get("cancelledQueued"),
                     "stoppedActive": out.get("stoppedActive"), "timestamp": now_ms()})

    @app.post("/api/training/resume", response_model=ActionResponse, dependencies=AUTH,
              responses={**EAUTH, **E503},
              tags=["training"], summary="Unpause the queue after an emergency stop")
    async def resume(self) -> JSON:
        out = await self.actors.queue_call("resume")
        return JSON({"success": True, "message": "training queue resumed", "paused": False,
                     "wasPaused": out.get("wasPaused"), "timestamp": now_ms()})

    @app.post("/api/training/clear-cooldowns", response_model=ActionResponse, dependencies=AUTH,
              responses={**E404, **EAUTH, **E503}, tags=["training"],
              summary="Lift the cooldown of one PAIR+model, of a pair, or all")
    async def clear_cooldowns(self, body: Annotated[ClearCooldownsBody | None, Body()] = None) -> JSON:
        body = body or ClearCooldownsBody()
        pair = self.params.pair(body.pair) if body.pair is not None else None
        mt = self.params.model_path(body.modelType) if body.modelType is not None else None
        out = await self.actors.queue_call("clear_cooldowns", pair, mt)
        what = f"{pair or 'all pairs'}/{mt or 'all models'}"
        return JSON({"success": True, "message": f"cleared {out.get('cleared', 0)} cooldown(s) of {what}",
                     "cleared": out.get("cleared", 0), "pair": pair, "modelType": mt, "timestamp": now_ms()})

    # ================================================================================ storage

    @app.get("/api/storage/stats", response_model=StorageStatsResponse, responses={**E422, **E503}, tags=["storage"],
             summary="Count and size per category of the shared volume")
    async def storage_stats(self) -> JSON:
        st, counters = await asyncio.gather(self.actors.storage_call("stats"), self.cache.counters())
        try:
            queue = await self.actors.queue_call("summary", timeout=3.0)
        except ApiError:
            queue = None
        return JSON({"storage": views.storage_with_files(st), "performance": views.performance(counters),
                     "trainingQueue": queue, "timestamp": now_ms()})

    @app.post("/api/storage/save", response_model=SaveResponse, dependencies=AUTH,
              responses={**EAUTH, **E422, **E503},
              tags=["storage"], summary="Flush buffered prediction history to disk (atomic writes)")
    async def storage_save(self) -> JSON:
        t0 = time.perf_counter()
        with contextlib.suppress(ApiError):
            await self.history_.flush()
        out = await self.actors.storage_call("save")
        saved = int(out.get("savedCount", 0))
        return JSON({"success": True, "message": f"ML data saved with atomic writes ({saved} records flushed)",
                     "savedCount": saved, "durationMs": round_ms(time.perf_counter() - t0),
                     "timestamp": now_ms()})

    @app.post("/api/storage/cleanup", response_model=CleanupResponse, dependencies=AUTH,
              responses={**E422, **EAUTH, **E503}, tags=["storage"],
              summary="Remove records older than maxAgeHours (>= 1 unless force) and surplus "
                      "non-production versions")
    async def storage_cleanup(self, body: Annotated[CleanupBody | None, Body()] = None) -> JSON:
        body = body or CleanupBody()
        out = await self.actors.storage_call("cleanup", float(body.maxAgeHours),
                                             timeout=max(60.0, self.args.actor_timeout_s))
        n = int(out.get("cleanedCount", 0))
        return JSON({"success": True, "message": f"Cleaned up {n} old ML records", "cleanedCount": n,
                     "maxAgeHours": body.maxAgeHours, "predictions": out.get("predictions"),
                     "trainingRecords": out.get("trainingRecords"), "modelVersions": out.get("modelVersions"),
                     "durationMs": out.get("durationMs"), "timestamp": now_ms()})


# Decorated here, not with @ on the class: Serve pickles the class when the deployment is created,
# and a class that is importable by its name is pickled by reference, so replicas run this very
# module (its globals included) instead of a by-value copy frozen half-way through the import.
# Its options (replicas, resources, max_ongoing_requests) come from serve_config.yaml only.
Ingress = serve.deployment(name="Ingress")(serve.ingress(app)(IngressImpl))
