"""Errors of the HTTP API as JSON: `{"error": code, "message": ..., ...}`, never an HTML page.

* `ApiError` — raised by handlers for expected failures (unknown pair, duplicate job, ...).
* `install(app)` registers the handlers: request validation (malformed JSON -> 400 `invalid_json`,
  other bad input -> 422 `validation_error` with the offending fields), Starlette HTTP errors
  (unknown route -> 404 JSON, wrong method -> 405 JSON with `Allow` listing every method of the
  path, `deployments.http`), and a last-resort handler that answers a
  real bug with a 500 JSON (logged with its traceback) instead of a stack trace.
* `BodyLimitMiddleware` — a pure ASGI middleware: bodies over the limit are refused with 413 before
  any handler runs (declared Content-Length or counted while streaming). GET requests pass straight
  through, so the no-op route pays nothing for it.
* `check_token` — what the mutating routes' dependency checks: when a token is configured,
  `Authorization: Bearer <token>` must match (constant-time compare), else 401 with
  `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from deployments.http import allowed_methods

log = logging.getLogger(__name__)

BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 for a body it cannot decode
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


def _clean(x: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    item = getattr(x, "item", None)
    if callable(item) and type(x).__module__ == "numpy":
        return _clean(item())
    return x


def dumps(content: Any) -> bytes:
    try:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a NaN somewhere: clean (rare path)
        return json.dumps(_clean(content), separators=(",", ":"), allow_nan=False, default=str).encode()
    except TypeError:
        return json.dumps(_clean(content), separators=(",", ":"), allow_nan=False, default=str).encode()


class JSON(Response):
    """A compact JSON response (no pydantic round trip on the hot paths)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


class ApiError(Exception):
    """An expected failure with its HTTP status, error code, message and extra fields."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}

    def response(self) -> JSON:
        return JSON(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSON:
    return JSON({"error": code, "message": message, **extra}, status_code=status, headers=headers)


def _loc(loc: Any) -> str:
    parts = [str(p) for p in (loc or ()) if p not in ("body",)]
    return ".".join(parts) or "body"


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        item = {"field": _loc(err.get("loc")), "message": str(err.get("msg", "")), "type": err.get("type")}
        where = (err.get("loc") or ("",))[0]
        item["in"] = where if where in ("body", "query", "path", "header") else "body"
        out.append(item)
    return out


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSON:
    details = _validation_details(exc)
    if any(d.get("type") == "json_invalid" for d in details):
        return error_response(400, "invalid_json", "the request body is not valid JSON", details=details)
    first = details[0] if details else {"field": "request", "message": "invalid"}
    message = f"{first['in']} {first['field']}: {first['message']}"
    if len(details) > 1:
        message += f" (and {len(details) - 1} more)"
    return error_response(422, "validation_error", message, details=details)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSON:
    status = exc.status_code
    code = STATUS_CODES.get(status, "error")
    if status == 404:
        message = f"no route {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
        methods = allowed_methods(request.app.router.routes, request.scope)
        if methods:  # every route of the path, not only the first one Starlette matched
            return error_response(status, code, message, headers={"Allow": ", ".join(methods)})
    elif status == 400 and exc.detail == BODY_PARSE_ERROR:  # e.g. a body that is not UTF-8
        return error_response(400, "invalid_json", "the request body is not valid JSON")
    else:
        message = str(exc.detail) if exc.detail else code
    return error_response(status, code, message, headers=getattr(exc, "headers", None))


async def _on_api_error(request: Request, exc: ApiError) -> JSON:
    return exc.response()


async def _on_unexpected(request: Request, exc: Exception) -> JSON:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    text = str(exc).strip().splitlines()
    detail = f": {text[-1][:200]}" if text else ""
    return error_response(500, "internal_error", f"internal error: {type(exc).__name__}{detail}")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(Exception, _on_unexpected)


# ----------------------------------------------------------------------------------- body limit


class BodyLimitMiddleware:
    """Refuse request bodies larger than `limit()` bytes with a 413 JSON answer."""

    def __init__(self, app: Callable, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = int(self.limit())
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._refuse(send, 400, "bad_request", "invalid Content-Length header")
                    return
                if declared > limit:
                    await self._refuse(send, 413, "payload_too_large",
                                       f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                                       limit=limit)
                    return
                break
        # Read the whole (small) body here, counting: also catches chunked bodies without a length.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(send, 413, "payload_too_large",
                                   f"request body exceeds the limit of {limit} bytes", limit=limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, status: int, code: str, message: str, **extra: Any) -> None:
        payload = dumps({"error": code, "message": message, **extra})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


# ----------------------------------------------------------------------------------- token


def check_token(expected: str | None, authorization: str | None) -> None:
    """Raise ApiError(401) unless no token is configured or the bearer token matches."""
    if not expected:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "invalid bearer token",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
