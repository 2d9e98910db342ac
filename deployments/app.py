"""The Serve application: `build_app(args)` (the `import_path` of serve_config.yaml).

    ingress (FastAPI)  ->  predictor (multiplexed models, @serve.batch)  ->  features
          \\______________________________________________________________/
                      (features endpoint, on a features-cache miss)

`args` are validated by `deployments.args.AppArgs` (unknown keys are errors). Resources,
replicas and autoscaling live in one place, serve_config.yaml's `deployments` list: the code
declares none. `build_app` starts every deployment from those options (so a Python deploy without
the config file gets them too); `serve deploy` / `serve run serve_config.yaml` apply the file's
options on top, and from Python `args["deployments"]` overrides them per deployment
(`app_from_config` turns the YAML into exactly that, so tests and the benchmark deploy what the
config file says).

    serve run serve_config.yaml            # local, blocking
    serve deploy serve_config.yaml         # to a running cluster (docs/serving.md)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from ray.serve import Application

from deployments.args import DEPLOYMENT_NAMES, AppArgs
from deployments.features import FeatureDeployment
from deployments.ingress import Ingress
from deployments.predictor import PredictorDeployment

CONFIG_FILE = Path(__file__).resolve().parent.parent / "serve_config.yaml"


def config_options(path: str | Path = CONFIG_FILE, app_name: str | None = None) -> dict[str, dict[str, Any]]:
    """{deployment name: its options} of one application of the config file (default: the first)."""
    spec = _app_spec(load_config(path), path, app_name)
    out: dict[str, dict[str, Any]] = {}
    for d in spec.get("deployments") or []:
        d = copy.deepcopy(d)
        out[d.pop("name")] = d
    return out


def _options(cfg: AppArgs) -> dict[str, dict[str, Any]]:
    """Per deployment: the config file's options, overridden by `args.deployments` (key by key). None
    from the file when it is not there (a cluster whose working dir lacks it: `serve deploy` then
    applies the deployed file's options)."""
    base = config_options() if CONFIG_FILE.is_file() else {}
    out = {}
    for name in DEPLOYMENT_NAMES:
        opts = {**base.get(name, {}), **(cfg.deployments.get(name) or {})}
        opts.pop("name", None)
        out[name] = opts
    return out


def _with_options(deployment, options: dict[str, dict[str, Any]], name: str):
    opts = options[name]
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
    opts = _options(cfg)
    features = _with_options(FeatureDeployment, opts, "Features").bind(plain)
    predictor = _with_options(PredictorDeployment, opts, "Predictor").bind(features, plain)
    return _with_options(Ingress, opts, "Ingress").bind(features, predictor, plain)


def build_predictor_app(args: dict[str, Any] | None = None) -> Application:
    """Predictor + features only (no HTTP): for handle clients and tests (`route_prefix=None`)."""
    cfg = AppArgs.model_validate(args or {})
    _check(cfg)
    plain = cfg.model_dump(exclude={"deployments"})
    opts = _options(cfg)
    features = _with_options(FeatureDeployment, opts, "Features").bind(plain)
    return _with_options(PredictorDeployment, opts, "Predictor").bind(features, plain)


def load_config(path: str | Path = CONFIG_FILE) -> dict[str, Any]:
    """serve_config.yaml as a dict (no Ray)."""
    return yaml.safe_load(Path(path).read_text())


def _app_spec(doc: dict[str, Any], path: str | Path, app_name: str | None) -> dict[str, Any]:
    apps = doc.get("applications") or []
    if not apps:
        raise ValueError(f"{path} defines no application")
    spec = next((a for a in apps if a.get("name") == app_name), None) if app_name else apps[0]
    if spec is None:
        raise ValueError(f"{path} has no application named {app_name!r}")
    return spec


def app_from_config(path: str | Path = CONFIG_FILE, *, app_name: str | None = None,
                    args: dict[str, Any] | None = None,
                    deployments: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What `serve run` would deploy for one application of the config file, for `serve.run`.

    Returns {"app", "name", "route_prefix", "http_options", "logging_config", "args"}: the config's
    args updated with `args`, and its per-deployment options (merged with `deployments`) passed as
    `args["deployments"]`.
    """
    doc = load_config(path)
    spec = _app_spec(doc, path, app_name)
    merged_args = copy.deepcopy(spec.get("args") or {})
    merged_args.update(copy.deepcopy(args or {}))
    per_dep = config_options(path, app_name)
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
