"""The HTTP plumbing of the ingress without Ray (`deployments.http`, `deployments.errors`, the strict
body models of `deployments.schemas`), on a small FastAPI app with the ingress's handlers and
middlewares: bodies are JSON whatever their content type, OPTIONS and 405 list every method of a
path, CORS only for configured origins, and no body value is coerced into a number.
The same behaviour on the live application: tests/ray/test_serving_api.py and tests/ray/test_api_fuzz.py.
"""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import APIRouter, Body, FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deployments import errors, http
from deployments.schemas import CancelBody, CleanupBody, PromoteBody, TrainBody


def _app(origins: list[str] | None = None) -> FastAPI:
    app = FastAPI(redirect_slashes=False)
    errors.install(app)
    app.add_middleware(http.JsonBodyMiddleware)
    app.add_middleware(errors.BodyLimitMiddleware, limit=lambda: 1000)
    app.add_middleware(http.OptionsMiddleware, routes=lambda: app.routes)
    app.add_middleware(http.CorsMiddleware, origins=lambda: origins or [])

    @app.post("/cleanup")
    async def cleanup(body: Annotated[CleanupBody | None, Body()] = None):
        body = body or CleanupBody()
        return {"maxAgeHours": body.maxAgeHours, "force": body.force}

    @app.get("/job/{job_id}")
    async def job(job_id: str):
        return {"job": job_id}

    # included, as Serve includes the ingress class's routes (one router node in app.routes)
    router = APIRouter()

    @router.delete("/job/{job_id}")
    async def cancel(job_id: str, body: Annotated[CancelBody | None, Body()] = None):
        return {"cancelled": job_id, "reason": body.reason if body else None}

    prefixed = APIRouter()

    @prefixed.get("/x/{name}")
    async def named(name: str):
        return {"name": name}

    app.include_router(router)
    app.include_router(prefixed, prefix="/v")
    return app


FORM = {"content-type": "application/x-www-form-urlencoded"}  # what `curl -d` sends


def test_a_json_body_is_read_whatever_its_content_type():
    c = TestClient(_app())
    for headers in (FORM, {}, {"content-type": "text/plain"}, {"content-type": "application/json; charset=utf-8"}):
        r = c.post("/cleanup", content=b'{"maxAgeHours": 168}', headers=headers)
        assert r.status_code == 200 and r.json() == {"maxAgeHours": 168, "force": False}, (headers, r.text)
    r = c.request("DELETE", "/job/J1", content=b'{"reason": "not needed"}', headers=FORM)
    assert r.status_code == 200 and r.json() == {"cancelled": "J1", "reason": "not needed"}, r.text
    assert c.post("/cleanup", content=b"", headers=FORM).json() == {"maxAgeHours": 168, "force": False}
    for bad in (b"maxAgeHours=168", b"{oops", b"\xff\xfe{}"):
        for headers in (FORM, {"content-type": "application/json"}):
            r = c.post("/cleanup", content=bad, headers=headers)
            assert r.status_code == 400 and r.json()["error"] == "invalid_json", (bad, headers, r.text)


@pytest.mark.parametrize("body", [{"maxAgeHours": False}, {"maxAgeHours": True}, {"maxAgeHours": "0"},
                                  {"maxAgeHours": "168"}, {"maxAgeHours": None}, {"maxAgeHours": 0},
                                  {"maxAgeHours": 0.5}, {"maxAgeHours": 0, "force": False},
                                  {"maxAgeHours": 0, "force": "true"}, {"maxAgeHours": 0, "force": 1},
                                  {"maxAgeHours": -1, "force": True}, {"maxAgeHours": 2e6},
                                  {"maxAgeHours": [168]}, {"hours": 168}])
def test_cleanup_body_is_strict_and_below_one_hour_needs_force(body):
    r = TestClient(_app()).post("/cleanup", json=body)
    assert r.status_code == 422 and r.json()["error"] == "validation_error", (body, r.text)
    with pytest.raises(ValidationError):
        CleanupBody.model_validate(body)


def test_cleanup_body_accepts_numbers_and_a_forced_zero():
    c = TestClient(_app())
    assert c.post("/cleanup", json={"maxAgeHours": 1}).json() == {"maxAgeHours": 1, "force": False}
    assert c.post("/cleanup", json={"maxAgeHours": 0, "force": True}).json() == {"maxAgeHours": 0, "force": True}
    assert c.post("/cleanup", json={"maxAgeHours": 0.25, "force": True}).status_code == 200
    # NaN is not JSON, but Python's parser reads it: still refused
    r = c.post("/cleanup", content=b'{"maxAgeHours": NaN}', headers=FORM)
    assert r.status_code == 422, r.text


def test_other_bodies_are_strict_too():
    for model, body in ((TrainBody, {"epochs": "5"}), (TrainBody, {"epochs": True}), (TrainBody, {"priority": 1.5}),
                        (TrainBody, {"learningRate": "0.01"}), (PromoteBody, {"version": 5}),
                        (CancelBody, {"reason": 1})):
        with pytest.raises(ValidationError):
            model.model_validate(body)
    assert TrainBody.model_validate({"epochs": 5, "learningRate": 1}).learningRate == 1.0  # int for a float
    assert TrainBody.model_validate({"epochs": 5.0}).epochs == 5  # an integral number is a JSON integer


def test_options_and_405_list_every_method_of_the_path():
    c = TestClient(_app())
    r = c.options("/job/J1")
    assert r.status_code == 204 and r.headers["allow"] == "GET, DELETE, OPTIONS", r.headers
    r = c.put("/job/J1")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    assert r.headers["allow"] == "GET, DELETE, OPTIONS"
    assert c.options("/cleanup").headers["allow"] == "POST, OPTIONS"
    assert c.options("/v/x/a").headers["allow"] == "GET, OPTIONS"
    assert c.post("/v/x/a").headers["allow"] == "GET, OPTIONS"
    r = c.options("/nowhere")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert "access-control-allow-origin" not in c.get("/job/J1", headers={"Origin": "http://ui"}).headers


def test_cors_only_for_the_configured_origins():
    c = TestClient(_app(["http://ui.example"]))
    r = c.get("/job/J1", headers={"Origin": "http://ui.example"})
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    assert "access-control-allow-origin" not in c.get("/job/J1", headers={"Origin": "http://evil"}).headers
    pre = c.options("/job/J1", headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "DELETE",
                                        "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and "DELETE" in pre.headers["access-control-allow-methods"]
    assert c.options("/job/J1").headers["allow"] == "GET, DELETE, OPTIONS"  # not a preflight
