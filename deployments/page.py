"""The status page at `/`: one static file (deployments/static/status.html) that reads the JSON API of
its own origin in the browser. Read-only, so no token; its Content-Security-Policy lets it load and
fetch from its own origin only, so it works offline and nothing it shows leaves the cluster."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from starlette.responses import Response

PAGE_FILE = Path(__file__).resolve().parent / "static" / "status.html"
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@cache
def _page() -> bytes:
    return PAGE_FILE.read_bytes()  # once per replica: the file ships with the code


def status_page() -> Response:
    return Response(_page(), media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP})
