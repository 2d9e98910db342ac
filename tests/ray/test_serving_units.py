"""The Serve configuration without a cluster: serve_config.yaml is a valid Serve config that fits two
cores, and it is the only home of the deployments' options (the code declares none; `build_app`
starts from the file's). Imports Ray Serve, so it sits with the Ray tests; the Ray-free serving
tests are in tests/unit/test_serving.py.
"""

from __future__ import annotations

from deployments.args import AppArgs


def test_serve_config_yaml_is_a_valid_serve_config_for_two_cores():
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import load_config

    doc = load_config()
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build_app"
    AppArgs.model_validate(app.args)
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"Ingress", "Features", "Predictor"}
    worst = 0.0
    for name, d in deps.items():
        cpus = d.ray_actor_options.num_cpus
        assert 0 < cpus < 1, name
        replicas = d.autoscaling_config["max_replicas"] if isinstance(d.autoscaling_config, dict) else d.num_replicas
        worst += cpus * replicas
    for name in ("Features", "Predictor"):
        auto = deps[name].autoscaling_config
        assert {"min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
                "downscale_delay_s"} <= set(auto)
    assert worst <= 1.0  # a 1-CPU Ray Train worker always fits next to Serve on 2 cores


def test_deployment_options_live_only_in_serve_config():
    from deployments.app import _options, config_options
    from deployments.features import FeatureDeployment
    from deployments.ingress import Ingress
    from deployments.predictor import PredictorDeployment

    yaml_opts = config_options()
    assert _options(AppArgs()) == yaml_opts
    for dep in (Ingress, FeatureDeployment, PredictorDeployment):
        # nothing but the name is set in code: every option is Serve's default until the file's apply
        assert dep._deployment_config.user_configured_option_names <= {"name"}, dep.name
    override = _options(AppArgs.model_validate({"deployments": {"Predictor": {"num_replicas": 2,
                                                                               "autoscaling_config": None}}}))
    assert override["Predictor"]["num_replicas"] == 2 and override["Predictor"]["autoscaling_config"] is None
    assert override["Predictor"]["max_ongoing_requests"] == yaml_opts["Predictor"]["max_ongoing_requests"]
    assert override["Features"] == yaml_opts["Features"]


def test_the_openapi_document_is_built_from_the_settings():
    """deployments.openapi on the ingress's own FastAPI app (no cluster): enums from the settings, an
    error model for every error status, the bearer scheme on the mutating operations (optional when
    no token is configured), 405/OPTIONS-relevant methods as declared."""
    from deployments.ingress import app
    from deployments.openapi import api_document
    from ml.serving.model_ids import accepted_types

    types = accepted_types(["lstm", "cnn"])
    assert types == ["lstm", "cnn", "ensemble"]
    for token_required in (True, False):
        doc = api_document(app, model_types=types, horizons=[3, 5], pairs=["BTC"],
                           token_required=token_required)
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                codes = set(op["responses"])
                assert "500" in codes, (method, path)
                for p in op.get("parameters", []):
                    if p["name"] == "model":  # an ensemble build has its own route, without a training body
                        assert p["schema"]["enum"] == (types[:-1] if path == "/api/train/{pair}/{model}" else types)
                    if p["name"] == "horizon":
                        assert p["schema"] == {"type": "integer", "enum": [3, 5], "title": "Horizon"}
                if method == "get":
                    assert "security" not in op and "401" not in codes, (method, path)
                    continue
                assert {"400", "413"} <= codes, (method, path)
                assert op["security"] == ([{"bearerAuth": []}] if token_required else [{"bearerAuth": []}, {}])
                assert ("401" in codes) is token_required
                for code, resp in op["responses"].items():
                    if int(code) >= 400:
                        assert resp["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        body = doc["components"]["schemas"]["CleanupBody"]
        assert body["additionalProperties"] is False and {"maxAgeHours", "force"} == set(body["properties"])
        assert body["anyOf"][0] == {"properties": {"maxAgeHours": {"minimum": 1.0}}}
        cooldowns = doc["components"]["schemas"]["ClearCooldownsBody"]["properties"]["modelType"]
        assert cooldowns["anyOf"][0]["enum"] == types
        for path in ("/api/predictions/{pair}", "/api/predictions"):  # ?ensemble=true, a boolean
            params = {p["name"]: p for p in doc["paths"][path]["get"]["parameters"]}
            assert params["ensemble"]["schema"]["type"] == "boolean" and params["ensemble"]["in"] == "query"
        build = doc["paths"]["/api/train/{pair}/ensemble"]["post"]["requestBody"]["content"]["application/json"]
        assert set(doc["components"]["schemas"]["BuildBody"]["properties"]) == {"priority", "maxAttempts"}, build
        prediction = doc["components"]["schemas"]["Prediction"]
        assert {"volatility", "horizons", "ensemble"} <= set(prediction["properties"])
        assert prediction["properties"]["horizons"]["additionalProperties"]["$ref"].endswith("/HorizonForecast")
        assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert set(doc["paths"]["/api/training/job/{job_id}"]) == {"get", "delete"}
