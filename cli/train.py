"""`tbml train`: train a model, through the running cluster's queue or in-process.

    tbml train --pair P [--model lstm] [--epochs N] [--priority K] [--wait] [--address A] [--namespace NS]
        Queues the job on the cluster's TrainingQueue (the same gate as the HTTP API and
        `ray job submit`) and prints its id; with --wait follows it to the end, one line per change.
        Exit 0 queued/completed, 1 failed/cancelled, 2 refused (duplicate, cooldown, paused) or no
        running queue.
    tbml train --local --pair P [--model lstm] [--epochs N] [--bars B] [--data-dir D]
        Trains in this process without a cluster (ml.training.local.train_local), registers the version in
        the local data directory and prints the metrics as JSON.
        `--model ensemble` trains nothing: it builds the stack of the local production versions of the
        enabled types (ml.training.ensemble) and registers it under the ensemble's promotion rule.

Shares its request options and follow loop with cluster/submit_training.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli import UsageError


def register(subparsers) -> None:
    from cluster.submit_training import add_cluster_arguments, add_request_arguments

    p = subparsers.add_parser("train", help="train a model (through the cluster's queue, or --local)")
    add_request_arguments(p)
    add_cluster_arguments(p)
    p.add_argument("--wait", action="store_true", help="follow the queued job until it ends")
    p.add_argument("--local", action="store_true", help="train in-process without a cluster")
    p.add_argument("--bars", type=int, default=None, help="--local: candles to train on (default: source's)")
    p.add_argument("--data-dir", default=None, help="--local: data directory (default: TBML_DATA_DIR / settings)")
    p.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.submit_training import QueueNotRunning, request_from_args
    from ml.queue.requests import InvalidRequest

    try:
        request = request_from_args(args)
    except InvalidRequest as exc:
        raise UsageError(str(exc)) from None
    if args.local:
        return _train_local(args, request)
    if args.bars is not None or args.data_dir is not None:
        raise UsageError("--bars and --data-dir apply to --local only (the cluster uses its own settings)")
    from cluster.submit_training import connect, find_queue, submit_and_follow

    try:
        ns = connect(args.address, args.namespace)
        queue = find_queue(ns, args.queue_name)
    except QueueNotRunning as exc:
        print(f"tbml: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"tbml: error: no Ray cluster at {args.address} ({exc}); start it with `tbml up`, "
              "or use --local", file=sys.stderr)
        return 2
    return submit_and_follow(queue, request, wait=args.wait, timeout_s=args.timeout)


def _train_local(args: argparse.Namespace, request) -> int:
    from ml.config import get_settings
    from ml.registry.versions import Registry
    from ml.storage.store import Storage
    from ml.training.config import TrainConfig
    from ml.training.ensemble import ENSEMBLE_TYPE
    from ml.training.local import train_local

    settings = get_settings()
    data_dir = Path(args.data_dir) if args.data_dir else Path(settings.data_dir)
    if request.model_type == ENSEMBLE_TYPE:
        if args.bars is not None:  # the members' validation and test rows decide which candles it reads
            raise UsageError("--bars does not apply to --model ensemble (it reads the candles its members' "
                             "validation and test rows need)")
        return _build_ensemble_local(request, settings, data_dir)
    try:
        cfg = TrainConfig.from_settings(
            request.pair, request.model_type, settings=settings, epochs=request.epochs,
            batch_size=request.batch_size, learning_rate=request.learning_rate, horizon=request.horizon,
            bars=args.bars,
        )
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    storage = Storage(data_dir)

    def on_epoch(info: dict) -> None:
        print(f"epoch {info['epoch']}/{info['total']} loss={info['loss']:.4f} val_loss={info['val_loss']:.4f} "
              f"eta={info.get('eta_s', 0):.0f}s", file=sys.stderr, flush=True)

    from ml.data.store import CandleStore

    result = train_local(cfg, settings=settings, store=CandleStore(data_dir, settings.timeframe), on_epoch=on_epoch)
    meta = Registry(storage).register(request.pair, result)
    from ml.queue.views import result_summary

    out = {"pair": request.pair, "modelType": request.model_type, **result_summary(meta, result),
           "metrics": result.metrics}  # the full evaluation: model, baseline, per horizon, calibration
    print(json.dumps(out, indent=2, default=_json_default))
    return 0


def _build_ensemble_local(request, settings, data_dir: Path) -> int:
    """`--local --model ensemble`: build the stack of the local production versions (ml.training.ensemble)."""
    from ml.data.store import CandleStore
    from ml.queue.views import result_summary
    from ml.registry.versions import Registry
    from ml.storage.store import Storage
    from ml.training.ensemble import EnsembleError

    registry = Registry(Storage(data_dir))
    try:
        result = registry.build_ensemble(request.pair, settings, store=CandleStore(data_dir, settings.timeframe))
    except EnsembleError as exc:
        print(f"tbml: error: {exc}", file=sys.stderr)
        return 1
    meta = registry.register(request.pair, result)
    out = {"pair": request.pair, "modelType": request.model_type, **result_summary(meta, result),
           "members": result.members, "weights": result.weights, "bestMember": result.best_member,
           "metrics": result.metrics}
    print(json.dumps(out, indent=2, default=_json_default))
    return 0


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(value)
