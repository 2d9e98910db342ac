"""The steps of `tbml up`, in order. Each starts one piece and records it in the run state before
the next begins; `down.stop(state)` undoes exactly what was recorded.

The actors need no entry of their own: they live in the Ray head, and stopping the head (after a
graceful kill while its GCS runs) stops them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cluster.ops.driver import connect
from cluster.ops.first_training import queue_first_training
from cluster.ops.launch import Launch
from cluster.ops.options import settings_fresh
from cluster.ops.ray_head import head_env, head_record, ray_start, started_record
from cluster.ops.redis import managed_record, start_redis
from cluster.ops.serve import deploy_serve, wait_api_ping
from cluster.ops.service_actors import start_core_actors, start_feed

Step = Callable[[Launch], None]


def redis_step(launch: Launch) -> None:
    """Use the configured Redis, or start one on 127.0.0.1."""
    if launch.redis_url_given:
        launch.redis_url = launch.redis_url_given
        launch.out(f"using the Redis at {launch.redis_url} (TBML_REDIS_URL / redis.url)")
        launch.record("redis", {"managed": False, "url": launch.redis_url})
        return
    launch.out(f"starting Redis on 127.0.0.1:{launch.redis_port}")
    launch.redis_proc = start_redis(launch.redis_port, launch.run)
    record = managed_record(launch.redis_proc, launch.redis_port, launch.run)
    launch.redis_url = record["url"]
    launch.record("redis", record)


def ray_head_step(launch: Launch) -> None:
    """The Ray head, with the settings in its environment (inherited by every worker on this node)."""
    opts = launch.opts
    launch.env = head_env(opts, launch.data_dir, launch.redis_url, launch.auth)
    os.environ["TBML_DATA_DIR"] = str(launch.data_dir)
    os.environ["TBML_REDIS_URL"] = launch.redis_url
    launch.settings = settings_fresh()
    launch.out(f"starting the Ray head (GCS port {opts.ray_port}, dashboard {launch.dashboard_url}, "
               f"auth {launch.auth['mode']})")
    launch.record("ray", head_record(opts, launch.temp_dir, launch.dashboard_url, launch.client_port,
                                     launch.metrics_port))
    address = ray_start(opts, launch.temp_dir, launch.env, launch.run / "ray-start.log",
                        client_port=launch.client_port, agent_port=launch.agent_port,
                        metrics_port=launch.metrics_port)
    launch.state["ray"].update(started_record(launch.temp_dir, address))
    launch.record()


def actors_step(launch: Launch) -> None:
    """Connect as a driver and create Storage, TrainingQueue and the accuracy monitor."""
    connect(launch.state["ray"]["address"], launch.namespace)
    launch.out("creating the Storage, TrainingQueue and accuracy monitor actors")
    launch.storage, launch.queue = start_core_actors(launch.namespace, str(launch.data_dir),
                                                     launch.opts.timeout_s)


def feed_step(launch: Launch) -> None:
    """The market feed, and its first tick (the candles are current before training is queued)."""
    settings, opts = launch.settings, launch.opts
    launch.out(f"starting the market feed ({settings.data.source}, at each candle close, at the latest every "
               f"{opts.feed_interval_s:g}s) and "
               f"bringing the candles of {', '.join(settings.pairs)} up to date")
    entry = start_feed(launch.namespace, str(launch.data_dir), list(settings.pairs), opts.feed_interval_s,
                       opts.timeout_s)
    launch.record("feed", entry)
    for pair, error in (entry.get("initialErrors") or {}).items():  # it retries; health shows the lag
        launch.out(f"  the market feed could not fetch {pair} yet ({error}); it retries every "
                   f"{settings.data.feed.retry_s:g}s")


def serve_step(launch: Launch) -> None:
    """Deploy the Serve application (when its code exists) and wait for the API to answer."""
    plan = launch.serve
    if not plan.available:
        launch.out(f"warning: Serve not deployed: {plan.reason}")
        launch.record("serve", {"deployed": False, "reason": plan.reason})
        return
    api_url = plan.url
    launch.out(f"deploying {launch.opts.serve_config.name} (HTTP {api_url})")
    launch.record("serve", {"deployed": True, "httpPort": plan.port, "url": api_url, "applications": None})
    apps = deploy_serve(plan.config, launch.run, launch.dashboard_url, launch.env, launch.opts.timeout_s,
                        launch.out)
    launch.state["serve"]["applications"] = apps
    code = wait_api_ping(api_url)
    if code != 200:
        launch.out(f"warning: {api_url}/api/ping answers {code or 'nothing'} although Serve reports RUNNING")
    launch.record()


def training_step(launch: Launch) -> None:
    """Queue the first training of every pair without a production model (unless --no-train)."""
    if launch.opts.train:
        launch.state["training"] = queue_first_training(launch.storage, launch.queue, launch.settings,
                                                        launch.out)
    launch.record()


def supervisor_step(launch: Launch) -> None:
    """Publish the supervisor document for this run (health shows it; a previous run's is replaced):
    active in the foreground, where `cluster.ops.supervisor` takes over once the start is done."""
    import ray

    from cluster.ops.supervisor import initial_document, publish_document

    doc = initial_document(launch.opts.detach, managed_redis=launch.redis_proc is not None)
    try:
        publish_document(ray, launch.namespace, str(launch.data_dir), doc)
    except Exception as exc:  # noqa: BLE001 - health then shows an older document; not worth failing the start
        launch.out(f"warning: could not publish the supervisor document: {exc}")
    launch.record("supervisor", doc)


STEPS: tuple[Step, ...] = (redis_step, ray_head_step, actors_step, feed_step, serve_step, training_step,
                           supervisor_step)
