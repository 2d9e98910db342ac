"""The OpenAPI document of the ingress (`/openapi.json`, `/docs`), made to tell the truth.

FastAPI's own document is the starting point; `api_document` then, per operation:

* documents every status the operation can answer, each error with `ErrorResponse` (FastAPI's default
  422 model is not what `deployments.errors` answers): 500 everywhere (the last-resort handler), 400
  (`invalid_json`, a malformed request) and 413 (`BodyLimitMiddleware`) on every method that takes a
  body, 422 wherever there is a parameter or a body, 401 on the operations behind the token;
* declares `model` (query or path) and `horizon` as enums of what the replica's settings configure
  (`model.enabled_types` plus `ensemble` when two or more are enabled, except in the training path,
  where an ensemble build has its own route and body; `labels.horizons`), and gives the configured
  pairs as examples of `pair`;
* keeps the bearer token as a security scheme on the mutating operations (the Authorize button of
  /docs); without a configured token it is optional there (`{}` alternative) and 401 is not listed.

Built once per replica from its settings (`install`, on the first request), so the document and the
validation read the same values. Ray-free.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ml.serving.model_ids import ENSEMBLE, accepted_types

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
SCHEME = "bearerAuth"
DESCRIPTIONS = {
    400: "The body is not JSON (`invalid_json`) or the request is malformed",
    401: "Missing or wrong `Authorization: Bearer <token>`",
    404: "Unknown pair, model type, version or job (the answer lists what exists)",
    409: "Conflicts with the current state (duplicate job, nothing to roll back to, job already ended)",
    413: "Body larger than api.max_body_bytes",
    422: "A parameter or body field is invalid (`validation_error`, with `details`) or refused",
    429: "The pair and model type are in their training cooldown (`Retry-After`)",
    500: "A bug: JSON `internal_error`, never a stack trace",
    503: "A cluster actor (Storage, TrainingQueue) is unreachable, or the training queue is paused",
}
BODY_METHODS = {"post", "put", "patch", "delete"}
TRAIN_PATH = "/api/train/{pair}/{model}"


def _error(code: int) -> dict[str, Any]:
    return {"description": DESCRIPTIONS.get(code, "Error"), "content": {"application/json": {"schema": ERROR_REF}}}


def _param_schema(param: dict[str, Any], model_types: list[str], horizons: list[int],
                  pairs: list[str]) -> None:
    name = param.get("name")
    if name == "model":
        param["schema"] = {"type": "string", "enum": list(model_types), "title": "Model"}
        param["description"] = "an enabled model type (model.enabled_types), or `ensemble` when two or more are"
    elif name == "horizon":
        param["schema"] = {"type": "integer", "enum": [int(h) for h in horizons], "title": "Horizon"}
        param["description"] = ("bars ahead: the horizon answered at the top (default labels.default_horizon); "
                                "a configured horizon (labels.horizons) the model predicts. Every horizon "
                                "is in `prediction.horizons` either way")
    elif name == "pair" and pairs:
        param["schema"] = {**param.get("schema", {}), "examples": list(pairs)}


def _schema_ref(response: dict[str, Any] | None) -> str:
    """The `$ref` of a response's JSON schema ('' when it has none)."""
    content = (response or {}).get("content") or {}
    return str(((content.get("application/json") or {}).get("schema") or {}).get("$ref", ""))


def _can_be_invalid(op: dict[str, Any]) -> bool:
    """Whether FastAPI's validation can refuse the request: a body, a query parameter, or a path
    parameter with a constraint (a plain path string always validates)."""
    if op.get("requestBody"):
        return True
    for param in op.get("parameters") or []:
        if param.get("in") != "path" or set(param.get("schema") or {}) - {"type", "title", "examples"}:
            return True
    return False


def api_document(app: FastAPI, *, model_types: list[str], horizons: list[int], pairs: list[str],
                 token_required: bool) -> dict[str, Any]:
    """The OpenAPI document of `app` for these settings (see the module docstring)."""
    doc = copy.deepcopy(get_openapi(title=app.title, version=app.version, description=app.description,
                                    routes=app.routes, openapi_version=app.openapi_version))
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if not isinstance(op, dict):
                continue
            responses = op.setdefault("responses", {})
            codes = {int(c) for c in responses if str(c).isdigit()}
            if _can_be_invalid(op):
                codes.add(422)
            elif _schema_ref(responses.get("422")).endswith("/HTTPValidationError"):
                # FastAPI lists 422 for any parameter, also for a free path string that cannot fail
                codes.discard(422)
                responses.pop("422", None)
            if method in BODY_METHODS:
                codes |= {400, 413}
            codes.add(500)
            secured = bool(op.get("security"))
            if secured:
                if token_required:
                    codes.add(401)
                else:
                    op["security"] = [*op["security"], {}]  # optional: no token is configured
                    codes.discard(401)
            for code in sorted(codes):
                if code < 400:
                    continue
                ref = _schema_ref(responses.get(str(code)))
                if ref in ("", ERROR_REF["$ref"]) or ref.endswith("/HTTPValidationError"):
                    responses[str(code)] = _error(code)
                # else: a documented non-error body (health's 503 is the health report itself)
            if not token_required:
                responses.pop("401", None)
            op["responses"] = dict(sorted(responses.items()))
            # a training job of `ensemble` has its own route (`/api/train/{pair}/ensemble`, no training body)
            types = [t for t in model_types if t != ENSEMBLE] if path == TRAIN_PATH else model_types
            for param in op.get("parameters") or []:
                _param_schema(param, types, horizons, pairs)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    cooldowns = schemas.get("ClearCooldownsBody", {}).get("properties", {})
    if "modelType" in cooldowns:
        cooldowns["modelType"] = {"anyOf": [{"type": "string", "enum": list(model_types)}, {"type": "null"}],
                                  "title": "Modeltype", "description": "an enabled model type (default: all)"}
    return doc


def install(app: FastAPI, settings: Callable[[], Any]) -> None:
    """Serve the document of `app` for `settings()` (ml.config.Settings) as /openapi.json (and so
    /docs), built on the first request. Installed on the module's app before Serve copies it for the
    replica (`serve.ingress` pickles the app), and read after the replica applied its environment."""
    cache: dict[str, Any] = {}

    def document() -> dict[str, Any]:
        if "doc" not in cache:
            s = settings()
            cache["doc"] = api_document(app, model_types=accepted_types(list(s.model.enabled_types)),
                                        horizons=[int(h) for h in s.labels.horizons], pairs=list(s.pairs),
                                        token_required=bool(s.api.token))
            app.openapi_schema = cache["doc"]
        return cache["doc"]

    app.openapi_schema = None
    app.openapi = document  # type: ignore[method-assign]
