"""HTTP serving benchmark: the Serve app of serve_config.yaml under a loopback load generator.

What it does, all on this machine and torn down at the end:

1. A private local Ray cluster (2 CPUs, dashboard on, namespace `tbml-bench`), its own redis-server,
   a temporary data directory with synthetic candles for the configured pairs and one trained
   `lstm` model for BTC (promoted), the Storage and TrainingQueue actors.
2. The application exactly as serve_config.yaml describes it (args, deployments, autoscaling,
   fractional CPUs, logging), with Serve's HTTP proxy on a free port.
3. The idle cluster's memory (after one prediction, so the model is loaded, then no traffic): the
   summed PSS and RSS of every process of the cluster (GCS, raylet, dashboard, Serve
   controller/proxy/replicas, actors, workers) plus Redis. PSS is what the processes occupy
   together; summed RSS counts every shared page once per process (an upper bound).
4. For 1 and 32 concurrent clients (keep-alive HTTP/1.1 connections on asyncio, one per client),
   each route for a fixed time after a warm-up: the no-op anchor `GET /api/ping`, cached
   predictions `GET /api/predictions/BTC`, uncached predictions `...?bypassCache=true` and features
   `GET /api/features/BTC`. Latency p50/p99, throughput and errors (non-200, or a prediction that
   is a fallback). Every figure sits beside the no-op route of the same run.

Targets, each against the no-op route of the same run: cached prediction p50 <= 1.3x the no-op's,
uncached prediction p50 <= 2.5x, prediction throughput at 32 clients >= 0.6x the no-op's; no errors;
the idle cluster <= 3 GB.

The load generator shares the 2 cores with the cluster, as a client on the same host would.
Run: `python -m bench.bench_http [--quick] [--json]` (or `make bench`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BenchResult, bench_main, percentile

SECTION = "http"
PAIR = "BTC"
NAMESPACE = "tbml-bench"
APP = "tbml"
ROUTES = {
    "no-op": "/api/ping",
    "cached prediction": f"/api/predictions/{PAIR}",
    "uncached prediction": f"/api/predictions/{PAIR}?bypassCache=true",
    "features": f"/api/features/{PAIR}",
}
CHECKS = {"cached prediction": b'"fallback":false', "uncached prediction": b'"fallback":false'}
CONCURRENCY = (1, 32)
RSS_TARGET_GB = 3.0


# ----------------------------------------------------------------------------------- load generator


@dataclass
class LoadResult:
    route: str
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)  # the answers' own `responseTime`
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    i = lower.find(b"content-length:")
    if i >= 0:
        j = lower.find(b"\r\n", i)
        body = await reader.readexactly(int(lower[i + 15:j]))
    elif b"transfer-encoding: chunked" in lower:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = b""
    return status, body


async def _client(host: str, port: int, path: str, start: float, stop: float, out: LoadResult,
                  check: bytes | None) -> None:
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n"
               "Accept: application/json\r\n\r\n").encode()
    reader = writer = None
    while True:
        now = time.perf_counter()
        if now >= stop:
            break
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            t0 = time.perf_counter()
            writer.write(request)
            status, body = await _read_response(reader)
            t1 = time.perf_counter()
            ok = status == 200 and (check is None or check in body)
            if t0 >= start:  # warm-up requests are not recorded
                if ok:
                    out.latencies_ms.append((t1 - t0) * 1000)
                    k = body.find(b'"responseTime":')
                    if k >= 0:
                        end = body.find(b"}", k)
                        out.server_ms.append(float(body[k + 15:end].split(b",")[0]))
                else:
                    out.errors += 1
                    if len(out.error_samples) < 3:
                        out.error_samples.append(f"{status}: {body[:160]!r}")
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if time.perf_counter() >= start:
                out.errors += 1
                if len(out.error_samples) < 3:
                    out.error_samples.append(f"{type(exc).__name__}: {exc}")
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def load(host: str, port: int, route: str, clients: int, seconds: float, warmup: float = 1.0) -> LoadResult:
    """`clients` concurrent keep-alive connections sending `route` for `seconds` after a warm-up."""
    path = ROUTES.get(route, route)
    loop_start = time.perf_counter()
    start = loop_start + warmup
    stop = start + seconds
    out = LoadResult(route=route, clients=clients, seconds=seconds)
    await asyncio.gather(*(_client(host, port, path, start, stop, out, CHECKS.get(route))
                           for _ in range(clients)))
    return out


def run_load(host: str, port: int, route: str, clients: int, seconds: float, warmup: float = 1.0) -> LoadResult:
    try:
        import uvloop

        return uvloop.run(load(host, port, route, clients, seconds, warmup))
    except ImportError:
        return asyncio.run(load(host, port, route, clients, seconds, warmup))


# ----------------------------------------------------------------------------------- memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_of(pids: list[int]) -> dict[str, float]:
    """Summed RSS and PSS (GB) of the processes, and the largest ones by RSS."""
    rows = []
    for pid in pids:
        rss = _kb(f"/proc/{pid}/status", "VmRSS:")
        pss = _kb(f"/proc/{pid}/smaps_rollup", "Pss:")
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
        except OSError:
            name = "?"
        rows.append((rss, pss, pid, name))
    rows.sort(reverse=True)
    return {"rss_gb": sum(r[0] for r in rows) / 1024 ** 2, "pss_gb": sum(r[1] for r in rows) / 1024 ** 2,
            "processes": len(rows), "top": [(round(r[0] / 1024), r[3]) for r in rows[:6]]}


# ----------------------------------------------------------------------------------- cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_data(data_dir: Path, pairs: list[str], settings) -> str:
    """Synthetic candles for every pair, and a trained production lstm for PAIR (returns its version)."""
    from ml.data.sources import synthetic_candles
    from ml.data.store import CandleStore

    store = CandleStore(data_dir, settings.timeframe)
    for pair in pairs:
        store.write(pair, synthetic_candles(pair, settings, bars=3000))
    return ""


def _train_model(storage_handle) -> str:
    import ray

    from ml.data.sources import synthetic_candles
    from ml.registry.versions import Registry
    from ml.training.config import TrainConfig
    from ml.training.local import train_local

    class Remote:
        def __getattr__(self, name):
            def call(*args, **kwargs):
                return ray.get(getattr(storage_handle, name).remote(*args, **kwargs), timeout=120)

            return call

    cfg = TrainConfig.from_settings(PAIR, "lstm", epochs=2, bars=3000, threads=1)
    result = train_local(cfg, synthetic_candles(PAIR, bars=3000))
    meta = Registry(Remote()).register(PAIR, result)
    version = meta["version"]
    if not meta["promotion"]["promoted"]:  # the benchmark needs a production model either way
        ray.get(storage_handle.set_production.remote(PAIR, "lstm", version, "bench: forced"))
    return version


def _wait_http(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(32).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the Serve proxy did not answer /api/ping")


@contextlib.contextmanager
def cluster(deployments: dict | None = None, prepare=None, train=None):
    """Ray + Redis + data + the Serve app of serve_config.yaml (per-deployment option overrides:
    `deployments`, for experiments; `prepare`/`train`: other data than _prepare_data/_train_model's
    synthetic candles); yields (port, info)."""
    from bench.bench_cache import redis_server

    saved_env = {k: os.environ.get(k) for k in ("TBML_DATA_DIR", "TBML_REDIS_URL", "TBML_NAMESPACE")}
    with tempfile.TemporaryDirectory(prefix="tbml-bench-http-") as tmp, redis_server() as redis_url, \
            _restore_env(saved_env):
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        os.environ.update({"TBML_DATA_DIR": str(data_dir), "TBML_REDIS_URL": redis_url,
                           "TBML_NAMESPACE": NAMESPACE})
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        from ml.config import get_settings

        get_settings.cache_clear()
        settings = get_settings()
        (prepare or _prepare_data)(data_dir, list(settings.pairs), settings)

        import ray
        from ray import serve

        from actors.storage import get_or_create_storage_actor
        from actors.training_queue import get_or_create_queue_actor
        from deployments.app import app_from_config

        ray.init(num_cpus=2, namespace=NAMESPACE, include_dashboard=True, log_to_driver=False,
                 object_store_memory=200 * 1024 * 1024)
        try:
            storage = get_or_create_storage_actor(data_dir=str(data_dir), namespace=NAMESPACE)
            version = (train or _train_model)(storage)
            queue = get_or_create_queue_actor(NAMESPACE, str(data_dir))
            ray.get(queue.ping.remote(), timeout=120)
            # the accuracy monitor is part of the service (the ingress creates it): it is measured too
            app_args = {"data_dir": str(data_dir), "namespace": NAMESPACE, "redis_url": redis_url}
            spec = app_from_config(args=app_args, deployments=deployments)
            port = _free_port()
            http = dict(spec["http_options"], host="127.0.0.1", port=port)
            serve.start(http_options=http, proxy_location="HeadOnly")
            serve.run(spec["app"], name=spec["name"], route_prefix=spec["route_prefix"],
                      logging_config=spec["logging_config"])
            _wait_http(port)
            redis_pid = _redis_pid(redis_url)
            yield port, {"version": version, "redis_pid": redis_pid, "data_dir": data_dir}
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


@contextlib.contextmanager
def _restore_env(saved: dict[str, str | None]):
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        from ml.config import get_settings

        get_settings.cache_clear()


def _redis_pid(url: str) -> int | None:
    port = url.rsplit(":", 1)[1].split("/")[0]
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"redis-server" in cmd and port.encode() in cmd:
            return pid
    return None


# ----------------------------------------------------------------------------------- results


def _results(runs: dict[tuple[str, int], LoadResult], mem: dict, quick: bool) -> list[BenchResult]:
    out: list[BenchResult] = []
    for c in CONCURRENCY:
        noop = runs[("no-op", c)]
        out.append(BenchResult(SECTION, f"no-op p50, {c} client(s)", noop.p50, "ms",
                               note=f"p99 {noop.p99:.2f} ms, {noop.throughput:,.0f} req/s, n={noop.n}"))
        for route, target in (("cached prediction", 1.3), ("uncached prediction", 2.5), ("features", None)):
            r = runs[(route, c)]
            ratio = r.p50 / noop.p50 if noop.p50 else None
            out.append(BenchResult(
                SECTION, f"{route} p50, {c} client(s)", r.p50, "ms", f"no-op p50, {c} client(s)", noop.p50,
                f"<= {target}x no-op" if target else "", (ratio is not None and ratio <= target) if target else None,
                f"p99 {r.p99:.2f} ms (no-op {noop.p99:.2f}), n={r.n}"
                + (f", in handler p50 {percentile(r.server_ms, 50):.2f} ms" if r.server_ms else "")))
        for route in ("cached prediction", "uncached prediction", "features"):
            r = runs[(route, c)]
            target = 0.6 if c == 32 and route != "features" else None
            ratio = r.throughput / noop.throughput if noop.throughput else None
            out.append(BenchResult(
                SECTION, f"{route} throughput, {c} client(s)", r.throughput, "req/s",
                f"no-op throughput, {c} client(s)", noop.throughput,
                ">= 0.6x no-op" if target else "", (ratio is not None and ratio >= target) if target else None))
    errors = sum(r.errors for r in runs.values())
    samples = [s for r in runs.values() for s in r.error_samples][:3]
    out.append(BenchResult(SECTION, "errors (all runs)", errors, "requests", target="0", ok=errors == 0,
                           note="; ".join(samples) or f"{sum(r.n for r in runs.values()):,} requests, none failed"))
    largest = ", ".join(f"{mb} MB {name.split()[0].rsplit('/', 1)[-1]}" for mb, name in mem["top"][:4])
    out.append(BenchResult(
        "memory", "idle local cluster memory, sum of PSS (Ray + Serve + Redis)", mem["pss_gb"], "GB",
        target=f"<= {RSS_TARGET_GB:g} GB", ok=mem["pss_gb"] <= RSS_TARGET_GB,
        note=f"{mem['processes']} processes after one prediction (model loaded); PSS splits each shared page "
             f"among the processes that map it, so the sum is the memory the cluster occupies"))
    out.append(BenchResult(
        "memory", "idle local cluster memory, sum of RSS (upper bound)", mem["rss_gb"], "GB",
        target=f"<= {RSS_TARGET_GB:g} GB", ok=mem["rss_gb"] <= RSS_TARGET_GB,
        note="counts a shared page once per process that maps it (the dashboard's ~10 forked module "
             f"processes share most of their pages); largest: {largest}"))
    return out


def _merge(parts: list[LoadResult]) -> LoadResult:
    out = LoadResult(route=parts[0].route, clients=parts[0].clients, seconds=sum(p.seconds for p in parts))
    for p in parts:
        out.latencies_ms += p.latencies_ms
        out.server_ms += p.server_ms
        out.errors += p.errors
        out.error_samples += p.error_samples
    return out


def measure(port: int, seconds: float, rounds: int) -> dict[tuple[str, int], LoadResult]:
    """Every route at every concurrency, in `rounds` interleaved rounds of seconds/rounds each, so a
    change of background load on the machine hits all routes alike."""
    parts: dict[tuple[str, int], list[LoadResult]] = {}
    for c in CONCURRENCY:
        for _ in range(rounds):
            for route in ROUTES:
                parts.setdefault((route, c), []).append(
                    run_load("127.0.0.1", port, route, c, seconds / rounds, warmup=0.5))
        for route in ROUTES:
            r = _merge(parts[(route, c)])
            inner = f"  (in handler p50 {percentile(r.server_ms, 50):.2f} ms)" if r.server_ms else ""
            print(f"  {route:20s} c={c:<3d} p50 {r.p50:7.2f} ms  p99 {r.p99:7.2f} ms  "
                  f"{r.throughput:8.0f} req/s  errors {r.errors}{inner}", flush=True)
    return {k: _merge(v) for k, v in parts.items()}


def run(quick: bool = False) -> list[BenchResult]:
    seconds, rounds = (4.0, 2) if quick else (12.0, 4)
    load_before = os.getloadavg()[0]
    with cluster() as (port, info):
        # Idle = deployed, one prediction served (its model loaded), then no traffic.
        run_load("127.0.0.1", port, "cached prediction", 1, 0.5, warmup=0.0)
        time.sleep(5 if quick else 15)
        cluster_pids = [p for p in descendants(os.getpid()) if p != info["redis_pid"]]
        pids = cluster_pids + ([info["redis_pid"]] if info["redis_pid"] else [])
        mem = memory_of(pids)
        runs = measure(port, seconds, rounds)
        results = _results(runs, mem, quick)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2-core machine: above ~2 " \
           "other processes compete with the cluster and the load generator)"
    results[0].note = f"{results[0].note}; {load}"
    return results


if __name__ == "__main__":
    raise SystemExit(bench_main(run, __doc__))
