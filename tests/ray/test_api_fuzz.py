"""The live application against its own OpenAPI document, over the real Serve proxy: strict bodies on
the destructive cleanup, curl-style bodies without a JSON content type (every `-d` line of README.md),
OPTIONS, the configured enums, and schemathesis (its Python API, every check) fuzzing every operation.

The fuzzer runs destructive operations (cleanup, emergency stop, promote, cancel), so this module
deploys its own application on the session's Ray cluster: a throwaway data directory (not the session
one, which other modules' models live in), its own namespace (so its own Storage actor, training
queue and no accuracy monitor) and one pair, FZA (candles, no model until the fuzzer trains one). Its
settings are the cluster's (the training queue reads the same), so the enums the document must show
are `model.enabled_types` and `labels.horizons` of `ml.config`. Serve itself is one per cluster: the module starts
it on a free port and shuts it down at the end, as tests/ray/test_serving_api.py does.

Bounded for 2 cores: a few examples per operation, no shrinking, no Hypothesis deadline; training runs
it starts are tiny (`TINY`) and a 30-minute cooldown keeps each pair and model type to one.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from polling import free_port, wait_for

pytestmark = pytest.mark.ray

TOKEN = "fuzz-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAIR = "FZA"
APP = "tbml-fuzz-test"
BARS = 1200
TINY = {"bars": 600, "seq_len": 8, "hidden": 8, "batch_size": 256, "patience": 1}
EXAMPLES_PER_OPERATION = 12
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def fuzz_app(ray_cluster, redis_server, tmp_path_factory):
    import httpx
    import ray
    from ray import serve

    from deployments.app import app_from_config
    from ml.data.sources import synthetic_candles
    from ml.data.store import CandleStore

    data_dir = tmp_path_factory.mktemp("fuzz-data")
    assert Path(data_dir).resolve() != Path(ray_cluster["data_dir"]).resolve()
    ns = f"tbml-fuzz-{uuid.uuid4().hex[:8]}"
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    CandleStore(data_dir, "5m").write(PAIR, synthetic_candles(PAIR, bars=BARS))

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from ray.serve.context import _get_global_client

    port = int(_get_global_client().get_serve_details().get("http_options", {}).get("port") or port)
    tiny = {"ray_actor_options": {"num_cpus": 0.05}}
    queue_name = f"tq-fuzz-{uuid.uuid4().hex[:8]}"
    spec = app_from_config(
        args={"data_dir": str(data_dir), "namespace": ns, "redis_url": redis_server.url, "api_token": TOKEN,
              "pairs": [PAIR], "snapshot_interval_s": 0.2, "queue_name": queue_name, "actor_timeout_s": 60,
              "monitor": False, "env": {"TBML_STREAM__MAX_DURATION_S": "1"},  # each fuzzed stream ends in 1 s
              "queue_overrides": {"tick_s": 0.2, "cooldown_minutes": 30, "train_overrides": TINY, "num_workers": 1,
                                  "cpus_per_worker": 0.5, "max_attempts": 1}},
        deployments={"Ingress": tiny, "Features": tiny,
                     "Predictor": {**tiny, "autoscaling_config": None, "num_replicas": 1}},
    )
    serve.run(spec["app"], name=APP, route_prefix="/", logging_config=spec["logging_config"])
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=60)
    wait_for(lambda: client.get("/api/ping").status_code == 200, 120, "the HTTP proxy", retry_errors=True)
    try:
        yield {"base": base, "client": client, "data_dir": data_dir, "namespace": ns, "queue_name": queue_name}
    finally:
        client.close()
        for name in (queue_name, "tbml-storage"):
            with contextlib.suppress(Exception):
                handle = ray.get_actor(name, namespace=ns)
                if name == queue_name:
                    ray.get(handle.emergency_stop.remote("test teardown"), timeout=60)
                ray.kill(handle, no_restart=True)
        with contextlib.suppress(Exception):
            serve.shutdown()


def _json(r):
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text[:300])
    return r.json()


def _history_count(c) -> int:
    assert c.post("/api/storage/save", headers=AUTH).status_code == 200  # what is buffered, on disk
    return _json(c.get(f"/api/predictions/{PAIR}/history", params={"limit": 1}))["totalCount"]


# ============================================================================================ cleanup


@pytest.mark.parametrize("body", [{"maxAgeHours": False}, {"maxAgeHours": "0"}, {"maxAgeHours": None},
                                  {"maxAgeHours": 0}, {"maxAgeHours": 0.5}, {"maxAgeHours": 0, "force": "true"},
                                  {"maxAgeHours": True}, {"maxAgeHours": "168"}])
def test_a_malformed_cleanup_is_refused_and_deletes_nothing(fuzz_app, body):
    c = fuzz_app["client"]
    for _ in range(2):
        assert c.get(f"/api/predictions/{PAIR}").status_code == 200  # history records to lose
    before = _history_count(c)
    stats = _json(c.get("/api/storage/stats"))["storage"]
    assert before >= 2
    for headers in (AUTH, {**AUTH, "content-type": "application/x-www-form-urlencoded"}):
        r = c.post("/api/storage/cleanup", content=json.dumps(body).encode(), headers=headers)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert _json(r)["error"] == "validation_error" and "maxAgeHours" in r.json()["message"] + json.dumps(
            r.json()["details"]), r.text
    assert _history_count(c) == before
    after = _json(c.get("/api/storage/stats"))["storage"]
    for cat in ("predictions", "training", "models"):
        assert after[cat]["count"] == stats[cat]["count"], (cat, stats[cat], after[cat])


def test_a_forced_zero_cleanup_removes_the_history(fuzz_app):
    c = fuzz_app["client"]
    assert c.get(f"/api/predictions/{PAIR}").status_code == 200
    assert _history_count(c) >= 1
    r = c.post("/api/storage/cleanup", json={"maxAgeHours": 0, "force": True}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = _json(r)
    assert body["success"] is True and body["maxAgeHours"] == 0 and body["cleanedCount"] >= 1, body
    assert _history_count(c) == 0
    r = c.post("/api/storage/cleanup", content=b'{"maxAgeHours": 168}', headers=AUTH)  # as `curl -d` sends it
    assert r.status_code == 200 and _json(r)["maxAgeHours"] == 168, r.text


# ============================================================================================ README curl lines


def _readme_body_lines() -> list[str]:
    lines = [line.strip() for line in README.read_text().splitlines() if line.strip().startswith("curl ")]
    return [line for line in lines if " -d " in line]


def _curl(base: str, line: str, *, json_type: bool) -> tuple[int, dict]:
    """Run a README curl line against `base` (with the token; its content-type header only if
    `json_type`); returns (status, JSON body)."""
    words = shlex.split(line.split("  #")[0])
    out: list[str] = []
    skip = False
    for i, w in enumerate(words):
        if skip:
            skip = False
            continue
        if w == "-H" and words[i + 1].lower().startswith("content-type"):
            skip = True
            continue
        out.append(re.sub(r"^(https?://)?localhost:8000", base, w))
    out += ["-H", f"Authorization: Bearer {TOKEN}", "-w", "\n%{http_code}", "--max-time", "60"]
    if json_type:
        out += ["-H", "content-type: application/json"]
    text = subprocess.run(out, capture_output=True, text=True, timeout=90, check=True).stdout
    body, _, status = text.rpartition("\n")
    return int(status), json.loads(body)


def test_every_readme_body_works_without_a_json_content_type(fuzz_app):
    """`curl -d` sends application/x-www-form-urlencoded: every body the README shows is read as JSON
    anyway (the README's pair is this module's), and a stateless line answers exactly what it answers
    with `content-type: application/json`."""
    if shutil.which("curl") is None:
        pytest.fail("curl not found (the README's examples use it)")
    lines = [line.replace("/BTC", f"/{PAIR}").replace('"BTC"', f'"{PAIR}"') for line in _readme_body_lines()]
    assert len(lines) >= 6 and any("/api/training/job/" in line and "-X DELETE" in line for line in lines)
    base = fuzz_app["base"]
    c = fuzz_app["client"]
    job_id = None
    for line in lines:
        status, body = _curl(base, line, json_type=False)
        assert status not in (400, 415, 422), (line, status, body)
        if "/api/train/" in line:  # queues a job: the body's numbers are the job's
            assert status == 202, (line, status, body)
            job_id = body["jobId"]
            job = _json(c.get(f"/api/training/job/{job_id}"))["job"]
            sent = json.loads(re.search(r"-d '(.*)'", line).group(1))
            assert job["priority"] == sent["priority"], (line, job)
            if "epochs" in sent:
                assert job["params"]["epochs"] == sent["epochs"], (line, job)
            continue
        again_status, again = _curl(base, line, json_type=True)
        assert (status, body.get("error")) == (again_status, again.get("error")), (line, body, again)
        if "/api/storage/cleanup" in line:
            assert status == 200 and body["maxAgeHours"] == 168, body
        elif "clear-cooldowns" in line:
            assert status == 200 and body["pair"] == PAIR, body
        elif "/promote" in line or "/rollback" in line or "-X DELETE" in line:
            # the README's placeholders name nothing stored: found to be missing, so the body was read
            assert status == 404 and body["error"] in ("version_not_found", "job_not_found"), (line, body)
        if "-X DELETE" in line and job_id:  # the README's cancel of the job its train line queued
            reason = json.loads(re.search(r"-d '(.*)'", line).group(1))["reason"]
            real = re.sub(r"/api/training/job/\S+", f"/api/training/job/{job_id}", line)
            status, body = _curl(base, real, json_type=False)
            assert status == 200 and body["success"] is True, body
            assert _json(c.get(f"/api/training/job/{job_id}"))["job"]["cancelReason"] == reason
    assert job_id is not None


# ============================================================================================ document


def test_the_document_shows_the_configured_enums_the_security_and_every_method(fuzz_app):
    from ml.config import get_settings
    from ml.serving.model_ids import accepted_types

    settings = get_settings()  # the enabled types, and `ensemble` when two or more are enabled
    model_types, horizons = accepted_types(list(settings.model.enabled_types)), list(settings.labels.horizons)
    c = fuzz_app["client"]
    doc = _json(c.get("/openapi.json"))
    paths = doc["paths"]
    seen = {"model": 0, "horizon": 0}
    for path, ops in paths.items():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                if param["name"] == "model":  # an ensemble build has its own route (no training body)
                    want = [t for t in model_types if t != "ensemble"] if path == "/api/train/{pair}/{model}" \
                        else model_types
                    assert param["schema"]["enum"] == want, (path, param)
                    seen["model"] += 1
                if param["name"] == "horizon":
                    assert param["schema"]["enum"] == horizons, (path, param)
                    seen["horizon"] += 1
            responses = op["responses"]
            assert "500" in responses, (method, path)
            for code, resp in responses.items():
                if int(code) >= 400 and not (path == "/api/health" and code == "503"):
                    assert resp["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)
            if method != "get":
                assert op.get("security") == [{"bearerAuth": []}], (method, path)
                assert {"400", "401", "413"} <= set(responses), (method, path, sorted(responses))
            else:
                assert "security" not in op, (method, path)
    assert seen["model"] >= 6 and seen["horizon"] == 1, seen  # 3 queries, 3 paths
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer"), scheme
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert paths["/api/storage/cleanup"]["post"]["responses"]["422"]
    assert "swagger" in c.get("/docs").text.lower()

    # OPTIONS and 405 list every method of a path, DELETE included where it exists
    r = c.options("/api/training/job/X_lstm_1")
    assert r.status_code == 204 and r.headers["allow"] == "GET, DELETE, OPTIONS", r.headers
    r = c.put("/api/training/job/X_lstm_1")
    assert r.status_code == 405 and r.headers["allow"] == "GET, DELETE, OPTIONS" and _json(r)["error"] == \
        "method_not_allowed"
    assert c.options("/api/storage/cleanup").headers["allow"] == "POST, OPTIONS"
    for path, ops in paths.items():
        concrete = path.replace("{pair}", PAIR).replace("{model}", "lstm").replace("{job_id}", "X_lstm_1")
        allow = {m.strip().lower() for m in c.options(concrete).headers["allow"].split(",")}
        assert allow == set(ops) | {"options"}, (path, allow)
    # no CORS origin is configured: no CORS headers
    r = c.get("/api/ping", headers={"Origin": "http://ui.example"})
    assert "access-control-allow-origin" not in r.headers

    # what the enums say is what is validated
    for model in model_types:
        assert c.get(f"/api/predictions/{PAIR}", params={"model": model}).status_code == 200
    for bad in ("LSTM", "", "nosuchmodel"):
        r = c.get(f"/api/predictions/{PAIR}", params={"model": bad})
        assert r.status_code == 422 and _json(r)["error"] == "invalid_model" and r.json()["availableModels"] == \
            model_types, (bad, r.text)
    r = c.post(f"/api/train/{PAIR}/nosuchmodel", json={}, headers=AUTH)
    assert r.status_code == 404 and _json(r)["error"] == "model_not_found", r.text
    for h in horizons:
        assert _json(c.get(f"/api/predictions/{PAIR}", params={"horizon": h}))["prediction"]["horizon"] == h
    r = c.get(f"/api/predictions/{PAIR}", params={"horizon": 7})
    assert r.status_code == 422 and _json(r)["error"] == "invalid_horizon", r.text


# ============================================================================================ fuzzing


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    import schemathesis

    config = schemathesis.Config.from_dict({
        "generation": {"max-examples": EXAMPLES_PER_OPERATION, "no-shrink": True, "deterministic": True,
                       "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        # every check; 503 is an answer, not a bug (a paused queue, an actor away), and must be documented
        # (status_code_conformance); a 500 fails
        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
        "auth": {"openapi": {"bearerAuth": {"bearer": TOKEN}}},
        "request-timeout": 60,
    })
    return schemathesis.openapi.from_url(f"{fuzz_app['base']}/openapi.json", config=config)


def test_the_live_api_conforms_to_its_openapi_document(api_schema, fuzz_app):
    """Every operation of the live document, positive and negative examples (EXAMPLES_PER_OPERATION of
    each, no shrinking) through every check of schemathesis: no server error, no undocumented status,
    every answer matches its schema, invalid input is refused, valid input accepted, auth not ignored.
    Then every method a path does not document: 405 with `Allow` naming exactly the documented ones.
    (Schemathesis's own pytest wrapper, `schemathesis.pytest.from_fixture`, does not run on this
    pytest version, so each operation's strategy is driven by Hypothesis here; the checks are the same.)"""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    counts = {"requests": 0}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                counts["requests"] += 1
                query = case.query or {}
                positive = mode == GenerationMode.POSITIVE  # noqa: B023 - run() is called in this iteration
                if positive and str(query.get("ensemble")).lower() == "true" \
                        and query.get("model") not in (None, "ensemble"):
                    # ensemble=true with another model is a 422 (docs/api.md) that a document cannot
                    # express: send the valid form of that request instead (test_serving_api has the 422)
                    query["model"] = "ensemble"
                case.call_and_validate(headers=AUTH, timeout=60)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid: no parameter, or only a free path string
                assert mode == GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect every failure, fail once
                failures.append(f"{operation.label} [{mode.value}]: {str(exc)[:1500]}")
    c = fuzz_app["client"]
    doc = api_schema.raw_schema
    for path, ops in doc["paths"].items():
        concrete = path.replace("{pair}", PAIR).replace("{model}", "lstm").replace("{job_id}", "X_lstm_1")
        declared = {m.upper() for m in ops} | {"OPTIONS"}
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - declared:
            r = c.request(method, concrete, headers=AUTH)
            allow = {m.strip() for m in r.headers.get("allow", "").split(",") if m.strip()}
            if r.status_code != 405 or allow != declared:
                failures.append(f"{method} {path}: {r.status_code} Allow={sorted(allow)}, documented {sorted(declared)}")
    assert not failures, f"{len(failures)} failing operation(s) of {len(operations)} ({counts['requests']} " \
                         "requests):\n" + "\n\n".join(failures)
