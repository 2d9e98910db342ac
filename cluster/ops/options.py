"""What `tbml up` can be asked for (`UpOptions`) and the defaults every piece shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"
DEFAULT_RAY_PORT = 6390
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_HTTP_PORT = 8000
DEFAULT_CLIENT_PORT = 10001
DEFAULT_AGENT_PORT = 52365
DEFAULT_OBJECT_STORE_MB = 1024
TEMP_ROOT = Path("/tmp")

Printer = Callable[[str], None]


@dataclass
class UpOptions:
    http_port: int | None = None          # None: the port in serve_config.yaml
    dashboard_port: int = DEFAULT_DASHBOARD_PORT
    dashboard_host: str = "127.0.0.1"
    ray_port: int = DEFAULT_RAY_PORT
    redis_port: int | None = None         # None: settings.redis.port
    train: bool = True
    detach: bool = False
    feed_interval_s: float = 5.0
    num_cpus: int | None = None           # None: the CPUs this process may use
    object_store_mb: int = DEFAULT_OBJECT_STORE_MB
    serve_config: Path = SERVE_CONFIG
    temp_dir: Path | None = None          # None: /tmp/tbml-ray-<ray_port>
    timeout_s: float = 240.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def head_temp_dir(self) -> Path:
        """The Ray head's private temp dir: how `down` finds exactly this head's processes."""
        return Path(self.temp_dir or TEMP_ROOT / f"tbml-ray-{self.ray_port}")


def settings_fresh():
    """The settings as the environment says now (`up` changes TBML_* on the way, so no cached copy)."""
    from ml.config import get_settings

    get_settings.cache_clear()
    return get_settings()
