"""Ray-free pieces of the serving layer: signals, the feature-window codec, model ids, application args,
the JSON error handling (on a small FastAPI app with the same handlers and middleware), the response
views, the history buffer, the replica memo and the per-pair snapshot. Fast; no cluster, no Ray.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fastapi import Body, Depends, FastAPI, Header
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from deployments import errors
from deployments.args import AppArgs
from ml.features.window import decode_window, encode_window, last_row
from ml.serving import signals
from ml.serving.model_ids import model_id, parse_model_id

# ------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("p,direction,signal", [
    (0.0, "down", "STRONG_SELL"), (0.29, "down", "STRONG_SELL"), (0.3, "down", "SELL"), (0.449, "down", "SELL"),
    (0.45, "down", "HOLD"), (0.5, "neutral", "HOLD"), (0.52, "up", "HOLD"), (0.55, "up", "HOLD"),
    (0.551, "up", "BUY"), (0.7, "up", "BUY"), (0.701, "up", "STRONG_BUY"), (1.0, "up", "STRONG_BUY"),
])
def test_signal_thresholds_are_probabilities_of_the_predicted_direction(p, direction, signal):
    s = signals.classify(p)
    assert (s.direction, s.signal) == (direction, signal)
    assert s.confidence == pytest.approx(abs(p - 0.5) * 2)


def test_signals_symmetry_custom_thresholds_and_errors():
    mirror = {"STRONG_BUY": "STRONG_SELL", "BUY": "SELL", "HOLD": "HOLD", "SELL": "BUY", "STRONG_SELL": "STRONG_BUY"}
    for p in np.linspace(0.0025, 0.9975, 200):  # no point sits exactly on a threshold
        up, down = signals.classify(float(p)), signals.classify(float(1 - p))
        assert mirror[up.signal] == down.signal, p
        assert up.confidence == pytest.approx(down.confidence)
    assert signals.classify(0.62, strong=0.6, weak=0.52).signal == "STRONG_BUY"
    assert signals.thresholds_as_confidence(0.7, 0.55) == pytest.approx((0.4, 0.1))
    assert signals.neutral().to_dict() == {"direction": "neutral", "probability": 0.5, "confidence": 0.0,
                                           "signal": "HOLD"}
    for bad in (float("nan"), -0.1, 1.5, True):
        with pytest.raises(ValueError):
            signals.classify(bad)
    with pytest.raises(ValueError):
        signals.classify(0.6, strong=0.55, weak=0.6)
    assert signals.is_stale(0, 49 * 3_600_000, 48) and not signals.is_stale(0, 47 * 3_600_000, 48)
    assert signals.is_stale(None, 0, 48)


# ------------------------------------------------------------------------------------------ codec, args


def test_window_codec_round_trip_is_float32_exact():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(30, 7)), index=pd.Index(np.arange(30) * 300_000 + 10**12, name="ts"),
                         columns=[f"f{i}" for i in range(7)])
    payload = encode_window(frame, pair="BTC", bars=2000, feature_hash="abc")
    json.dumps(payload)  # a JSON value (what Redis stores)
    w = decode_window(payload)
    assert w.shape == (30, 7) and w.dtype == np.float32
    np.testing.assert_array_equal(w, frame.to_numpy(dtype=np.float32))
    np.testing.assert_array_equal(last_row(payload), w[-1])
    assert payload["ts"][-1] == 29 * 300_000 + 10**12


def test_model_ids_and_app_args():
    assert parse_model_id(model_id("BTC", "lstm", "v1-abc")) == ("BTC", "lstm", "v1-abc")
    for bad in ("BTC:lstm", "../x:lstm:v1", "BTC::v1", ""):
        with pytest.raises(ValueError):
            parse_model_id(bad)
    args = AppArgs.model_validate({"pairs": ["BTC", "ETH"], "redis_url": "redis://h:1/0", "api_token": "t",
                                   "env": {"TBML_SIGNALS__WEAK": "0.6"}})
    env = args.replica_env()
    assert json.loads(env["TBML_PAIRS"]) == ["BTC", "ETH"] and env["TBML_REDIS_URL"] == "redis://h:1/0"
    assert env["TBML_API_TOKEN"] == "t" and env["TBML_SIGNALS__WEAK"] == "0.6"
    with pytest.raises(ValueError):
        AppArgs.model_validate({"no_such_arg": 1})


# ------------------------------------------------------------------------------------------ errors


class _Body(BaseModel):
    model_config = {"extra": "forbid"}
    epochs: int = Field(1, ge=1, le=500)


def _app(token: str | None) -> FastAPI:
    app = FastAPI(redirect_slashes=False)
    errors.install(app)
    app.add_middleware(errors.BodyLimitMiddleware, limit=lambda: 100)

    async def auth(authorization: str | None = Header(None)) -> None:
        errors.check_token(token, authorization)

    @app.post("/train", dependencies=[Depends(auth)])
    async def train(body: _Body | None = Body(None)):  # noqa: B008
        return {"epochs": (body or _Body()).epochs}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("kaput")

    @app.get("/known/{pair}")
    async def known(pair: str):
        raise errors.ApiError(404, "pair_not_found", f"unknown {pair}", availablePairs=["BTC"])

    return app


def test_error_handlers_answer_json_for_every_failure():
    c = TestClient(_app(None), raise_server_exceptions=False)
    ok = c.post("/train", json={"epochs": 3})
    assert ok.status_code == 200 and ok.json() == {"epochs": 3}
    assert c.post("/train").json() == {"epochs": 1}
    cases = [
        (c.post("/train", content=b"{oops", headers={"content-type": "application/json"}), 400, "invalid_json"),
        (c.post("/train", json={"epochs": 0}), 422, "validation_error"),
        (c.post("/train", json={"epochs": 1, "x": 1}), 422, "validation_error"),
        (c.post("/train", content=b"{" + b" " * 200 + b"}", headers={"content-type": "application/json"}), 413,
         "payload_too_large"),
        (c.get("/nowhere"), 404, "not_found"),
        (c.get("/train"), 405, "method_not_allowed"),
        (c.get("/boom"), 500, "internal_error"),
        (c.get("/known/ETH"), 404, "pair_not_found"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert body["error"] == code and isinstance(body["message"], str), body
    assert c.get("/known/ETH").json()["availablePairs"] == ["BTC"]
    assert "epochs" in c.post("/train", json={"epochs": 0}).json()["message"]


def test_chunked_body_over_the_limit_is_refused():
    c = TestClient(_app(None))

    def chunks():
        for _ in range(10):
            yield b"{" + b" " * 20

    r = c.post("/train", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_bearer_token():
    c = TestClient(_app("s3cret"))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}, {"Authorization": "Basic x"}):
        r = c.post("/train", json={}, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert c.post("/train", json={}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
