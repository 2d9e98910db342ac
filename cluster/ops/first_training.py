"""First training at start-up: queue a job for every configured pair without a production model.

"Has a production model" is what `ml.registry.production` says (pointer and version metadata),
asked through the Storage actor, the single writer of the registry.
"""

from __future__ import annotations

from typing import Any

from cluster.ops.options import Printer
from ml.registry.production import Production, production_from


def _production(storage, pair: str, model: str) -> Production | None:
    import ray

    pointer = ray.get(storage.get_production.remote(pair, model), timeout=60)
    if not pointer or not pointer.get("version"):
        return None
    meta = ray.get(storage.get_version_meta.remote(pair, model, pointer["version"]), timeout=60)
    return production_from(pointer, meta)


def queue_first_training(storage, queue, settings, out: Printer) -> list[dict[str, Any]]:
    """Submit one start-up job per pair that has no production model; returns one result per pair."""
    import ray

    model = settings.model.default_type
    results = []
    for pair in settings.pairs:
        try:
            prod = _production(storage, pair, model)
        except Exception as exc:  # noqa: BLE001 - report and queue anyway
            prod = None
            out(f"  (could not read the production model of {pair}/{model}: {exc})")
        if prod is not None:
            results.append({"pair": pair, "modelType": model, "status": "skipped",
                            "reason": f"production version {prod.version} exists"})
            continue
        outcome = ray.get(queue.submit.remote({"pair": pair, "model_type": model, "source": "startup"}),
                          timeout=60)
        results.append({"pair": pair, "modelType": model, "status": outcome.get("status"),
                        "jobId": outcome.get("jobId") or outcome.get("job_id"),
                        "message": outcome.get("message")})
    return results
