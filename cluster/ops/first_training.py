"""First training at start-up: for every configured pair, a job per enabled model type without a
production model, then (with two or more types enabled) an ensemble build behind them.

"Has a production model" is what `ml.registry.production` says (pointer and version metadata),
asked through the Storage actor, the single writer of the registry. The ensemble build is queued one
priority step after the members, so with `queue.max_concurrent` 1 it runs once they have finished;
one that starts too early fails on a missing member and is retried by the queue's rule.
"""

from __future__ import annotations

from typing import Any

from cluster.ops.options import Printer
from ml.queue.requests import DEFAULT_PRIORITY, PRIORITY_MAX, accepted_model_types
from ml.registry.production import Production, production_from


def _production(storage, pair: str, model: str) -> Production | None:
    import ray

    pointer = ray.get(storage.get_production.remote(pair, model), timeout=60)
    if not pointer or not pointer.get("version"):
        return None
    meta = ray.get(storage.get_version_meta.remote(pair, model, pointer["version"]), timeout=60)
    return production_from(pointer, meta)


def startup_jobs(enabled: list[str]) -> list[tuple[str, int]]:
    """(model type, priority) of the start-up jobs of one pair, in submission order."""
    members = [t for t in accepted_model_types(enabled) if t in enabled]
    jobs = [(t, DEFAULT_PRIORITY) for t in members]
    jobs += [(t, min(PRIORITY_MAX, DEFAULT_PRIORITY + 1)) for t in accepted_model_types(enabled) if t not in members]
    return jobs


def queue_first_training(storage, queue, settings, out: Printer) -> list[dict[str, Any]]:
    """Submit the start-up jobs of every pair (startup_jobs) whose type has no production model;
    returns one result per pair and model type."""
    import ray

    results = []
    for pair in settings.pairs:
        for model, priority in startup_jobs(list(settings.model.enabled_types)):
            try:
                prod = _production(storage, pair, model)
            except Exception as exc:  # noqa: BLE001 - report and queue anyway
                prod = None
                out(f"  (could not read the production model of {pair}/{model}: {exc})")
            if prod is not None:
                results.append({"pair": pair, "modelType": model, "status": "skipped",
                                "reason": f"production version {prod.version} exists"})
                continue
            outcome = ray.get(queue.submit.remote({"pair": pair, "model_type": model, "source": "startup",
                                                   "priority": priority}), timeout=60)
            results.append({"pair": pair, "modelType": model, "status": outcome.get("status"),
                            "jobId": outcome.get("jobId") or outcome.get("job_id"),
                            "message": outcome.get("message")})
    return results
