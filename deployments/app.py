"""The Serve application: `build_app(args)` (the `import_path` of serve_config.yaml).

    ingress (FastAPI)  ->  predictor (multiplexed models, @serve.batch)  ->  features
          \\______________________________________________________________/
                      (features endpoint, on a features-cache miss)

`args` are validated by `deployments.common.AppArgs` (unknown keys are errors). Resources,
replicas and autoscaling come from serve_config.yaml's `deployments` list when deployed with
`serve deploy` / `serve run serve_config.yaml`; from Python, `args["deployments"]` carries the same
per-deployment options (`app_from_config` turns the YAML into exactly that, so tests and the
benchmark deploy what the config file says).

    serve run serve_config.yaml            # local, blocking
    serve deploy serve_config.yaml         # to a running cluster (docs/serving.md)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from ray.serve import Application

from deployments.common import DEPLOYMENT_NAMES, AppArgs
from deployments.features import FeatureDeployment
from deployments.ingress import Ingress
from deployments.predictor import PredictorDeployment

CONFIG_FILE = Path(__file__).resolve().parent.parent / "serve_config.yaml"


def _with_options(deployment, cfg: AppArgs, name: str):
    opts = dict(cfg.deployments.get(name) or {})
    opts.pop("name", None)
    return deployment.options(**opts) if opts else deployment


def _check(cfg: AppArgs) -> None:
    unknown = set(cfg.deployments) - set(DEPLOYMENT_NAMES)
    if unknown:
        raise ValueError(f"unknown deployment(s) in args.deployments: {', '.join(sorted(unknown))}; "
                         f"expected {', '.join(DEPLOYMENT_NAMES)}")


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The whole application: Ingress -> Predictor -> Features."""
    cfg = AppArgs.model_validate(args or {})
    _check(cfg)
    plain = cfg.model_dump(exclude={"deployments"})
    features = _with_options(FeatureDeployment, cfg, "Features").bind(plain)
    predictor = _with_options(PredictorDeployment, cfg, "Predictor").bind(features, plain)
    return _with_options(Ingress, cfg, "Ingress").bind(features, predictor, plain)


def build_predictor_app(args: dict[str, Any] | None = None) -> Application:
    """Predictor + features only (no HTTP): for handle clients and tests (`route_prefix=None`)."""
    cfg = AppArgs.model_validate(args or {})
    _check(cfg)
    plain = cfg.model_dump(exclude={"deployments"})
    features = _with_options(FeatureDeployment, cfg, "Features").bind(plain)
    return _with_options(PredictorDeployment, cfg, "Predictor").bind(features, plain)


def load_config(path: str | Path = CONFIG_FILE) -> dict[str, Any]:
    """serve_config.yaml as a dict (no Ray)."""
    return yaml.safe_load(Path(path).read_text())


def app_from_config(path: str | Path = CONFIG_FILE, *, app_name: str | None = None,
                    args: dict[str, Any] | None = None,
                    deployments: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What `serve run` would deploy for one application of the config file, for `serve.run`.

    Returns {"app", "name", "route_prefix", "http_options", "logging_config", "args"}: the config's
    args updated with `args`, and its per-deployment options (merged with `deployments`) passed as
    `args["deployments"]`.
    """
    doc = load_config(path)
    apps = doc.get("applications") or []
    if not apps:
        raise ValueError(f"{path} defines no application")
    spec = next((a for a in apps if a.get("name") == app_name), None) if app_name else apps[0]
    if spec is None:
        raise ValueError(f"{path} has no application named {app_name!r}")
    merged_args = copy.deepcopy(spec.get("args") or {})
    merged_args.update(copy.deepcopy(args or {}))
    per_dep: dict[str, dict[str, Any]] = {}
    for d in spec.get("deployments") or []:
        d = copy.deepcopy(d)
        per_dep[d.pop("name")] = d
    for name, opts in (deployments or {}).items():
        base = per_dep.setdefault(name, {})
        for key, value in opts.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
    merged_args["deployments"] = {**per_dep, **(merged_args.get("deployments") or {})}
    return {"app": build_app(merged_args), "name": spec.get("name", "default"),
            "route_prefix": spec.get("route_prefix", "/"), "http_options": doc.get("http_options") or {},
            "logging_config": spec.get("logging_config"), "args": merged_args}
