"""The deploy files (deploy/): the production Serve config, the KubeRay manifest that embeds it, and
the container image definition. Ray's own Serve schema validates the config, its import path builds
the application, and the image pins what pyproject.toml pins (no cluster: the files are read)."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SERVE_FILE = DEPLOY / "serve_production.yaml"
MANIFEST = DEPLOY / "kuberay" / "rayservice.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"


def _manifest() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def _serve_config() -> dict:
    return yaml.safe_load(SERVE_FILE.read_text())


def _containers(ray_service: dict) -> list[dict]:
    spec = ray_service["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.*]*)", dep.replace(" ", ""))
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_the_manifest_embeds_the_production_serve_config():
    ray_service = _manifest()["RayService"]
    assert yaml.safe_load(ray_service["spec"]["serveConfigV2"]) == _serve_config()


def test_rays_serve_schema_accepts_the_production_config():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_serve_config())
    assert schema.http_options.host == "0.0.0.0"
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    by_name = {d.name: d for d in app.deployments}
    assert set(by_name) == {"Ingress", "Features", "Predictor"}
    for d in by_name.values():  # whole CPUs and more than one replica of everything
        cpus = d.ray_actor_options.num_cpus
        assert float(cpus) == int(cpus) >= 1, (d.name, cpus)
        autoscaling = d.autoscaling_config if isinstance(d.autoscaling_config, dict) else \
            d.autoscaling_config.model_dump()
        assert autoscaling["min_replicas"] >= 2, d.name


def test_the_import_path_builds_the_application_from_the_files_args():
    from ray.serve import Application

    from deployments.args import AppArgs

    (app,) = _serve_config()["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    AppArgs.model_validate(app["args"])  # unknown or invalid args would stop every replica
    built = builder(app["args"])
    assert isinstance(built, Application)


def test_settings_come_from_the_environment_and_the_token_from_a_secret():
    manifest = _manifest()
    env_vars = _serve_config()["applications"][0]["runtime_env"]["env_vars"]
    assert "TBML_API_TOKEN" not in env_vars  # the token is never written into a config file
    containers = _containers(manifest["RayService"])
    assert len(containers) == 2
    volume_claim = manifest["PersistentVolumeClaim"]["metadata"]["name"]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["TBML_API_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
        assert "value" not in env["TBML_API_TOKEN"]
        assert env["TBML_DATA_DIR"]["value"] == env_vars["TBML_DATA_DIR"]
        assert [m["mountPath"] for m in c["volumeMounts"]] == [env_vars["TBML_DATA_DIR"]]
    spec = manifest["RayService"]["spec"]["rayClusterConfig"]
    for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]]
        assert claims == [volume_claim]
    redis_host = re.match(r"redis://([^:/]+)", env_vars["TBML_REDIS_URL"]).group(1)
    assert manifest["Service"]["metadata"]["name"] == redis_host == manifest["Deployment"]["metadata"]["name"]


def test_the_image_pins_what_pyproject_pins():
    import ray

    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    pins = _pyproject_pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["CCXT_VERSION"] == pins["ccxt"]
    assert re.fullmatch(pins["ray"].replace(".", r"\.").replace("*", r"\d+"), args["RAY_VERSION"])
    assert args["RAY_VERSION"] == ray.__version__  # the version these tests ran against
    assert _manifest()["RayService"]["spec"]["rayClusterConfig"]["rayVersion"] == args["RAY_VERSION"]
    assert "download.pytorch.org/whl/cpu" in text  # CPU wheels only: no CUDA
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        assert f"COPY {pattern.rstrip('*')} " in text, pattern  # every package of the project is in the image


@pytest.mark.parametrize("path", [SERVE_FILE, MANIFEST])
def test_deploy_files_name_no_local_only_address(path):
    assert "127.0.0.1" not in path.read_text()
