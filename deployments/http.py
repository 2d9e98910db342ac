"""HTTP plumbing around the routes of the ingress (pure ASGI middlewares, no Ray):

* `JsonBodyMiddleware` — every request body is JSON, whatever `Content-Type` says: `curl -d '{...}'`
  sends `application/x-www-form-urlencoded`, which FastAPI would not parse (a 422 for a correct body).
  The header is set to `application/json` for the routes, so a body that is not JSON is a 400
  `invalid_json` (the API has no form or upload endpoint).
* `allowed_methods` / `OptionsMiddleware` — the methods a path answers, from every route of that path
  (Starlette's own 405 names only the first route it matched, e.g. GET without the DELETE beside it).
  `OPTIONS` answers 204 with `Allow`; the 405 handler (`deployments.errors`) uses the same list.
* `CorsMiddleware` — CORS for the origins of `api.cors_origins` (read on the first request, after the
  replica applied its settings); none configured: no CORS headers at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from starlette.routing import Match

BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
CORS_HEADERS = ("Authorization", "Content-Type")


def _is_json(content_type: bytes) -> bool:
    main = content_type.split(b";", 1)[0].strip().lower()
    return main == b"application/json" or (main.startswith(b"application/") and main.endswith(b"+json"))


class JsonBodyMiddleware:
    """Declare request bodies of POST/PUT/PATCH/DELETE as JSON (see the module docstring)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") in BODY_METHODS:
            headers = [(k, v) for k, v in scope.get("headers") or () if k != b"content-type"]
            given = [v for k, v in scope.get("headers") or () if k == b"content-type"]
            if not (len(given) == 1 and _is_json(given[0])):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def _walk(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[Any, str]]:
    """(route, path prefix) of every route, also inside included routers: FastAPI >= 0.137 keeps an
    included router as one node (`original_router`), and Serve includes the ingress class's routes so."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from _walk(inner.routes, prefix + str(getattr(context, "prefix", "") or ""))
        else:
            yield route, prefix


def allowed_methods(routes: Iterable[Any], scope: dict) -> list[str]:
    """Methods of every route whose path matches `scope` (+ OPTIONS); [] when no route matches."""
    found: set[str] = set()
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root + "/"):
        path = path[len(root):]
    for route, prefix in _walk(routes):
        methods = getattr(route, "methods", None)
        if not methods or not hasattr(route, "matches") or (prefix and not path.startswith(prefix)):
            continue
        # a bare scope: one that went through routing carries the matched route, which FastAPI reuses
        match, _ = route.matches({"type": "http", "method": "GET", "path": path[len(prefix):], "root_path": ""})
        if match != Match.NONE:
            found |= {m.upper() for m in methods}
    if not found:
        return []
    found.add("OPTIONS")
    return sorted(found, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


class OptionsMiddleware:
    """`OPTIONS <path>`: 204 with `Allow` listing every method of the path; unknown path: the app's 404."""

    def __init__(self, app: Callable, routes: Callable[[], Iterable[Any]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") == "OPTIONS":
            methods = allowed_methods(self.routes(), scope)
            if methods:
                await send({"type": "http.response.start", "status": 204,
                            "headers": [(b"allow", ", ".join(methods).encode())]})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)


class CorsMiddleware:
    """Starlette's CORSMiddleware for `origins()` (a list, "*" allowed), built on the first request;
    a pass-through when the list is empty."""

    def __init__(self, app: Callable, origins: Callable[[], list[str]]) -> None:
        self.app = app
        self.origins = origins
        self._inner: Callable | None = None

    def _build(self) -> Callable:
        from starlette.middleware.cors import CORSMiddleware

        origins = [str(o) for o in (self.origins() or [])]
        if not origins:
            return self.app
        return CORSMiddleware(self.app, allow_origins=origins, allow_methods=list(METHOD_ORDER),
                              allow_headers=list(CORS_HEADERS), expose_headers=["Retry-After", "Allow"],
                              max_age=600)

    async def __call__(self, scope, receive, send) -> None:
        if self._inner is None:
            self._inner = self._build()
        await self._inner(scope, receive, send)
