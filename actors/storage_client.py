"""RemoteStorage: the Storage interface, forwarded to the Storage actor (blocking on each call).

`ml.registry.versions.Registry` and `ml.registry.loader.load_model` are Ray-free and call plain methods
(`save_model_version`, `list_versions`, `get_version_meta`, `read_model_file`, `set_production`,
`get_production`, ...). Give them a `RemoteStorage(actor)` instead of a `Storage` and every call goes
to the single writer of the shared volume: `getattr(actor, name).remote(*args, **kwargs)` then
`ray.get(..., timeout=...)`.

Reads could also be served by `Storage.reader(data_dir)` directly (a reader never sees a partial
file); writes must go through the actor.
"""

from __future__ import annotations

from typing import Any

import ray

DEFAULT_TIMEOUT_S = 60.0

# The Storage methods the registry and the loader use (listed so typos fail at once).
FORWARDED = (
    "save_model_version", "update_version_meta", "list_versions", "get_version_meta", "read_model_file",
    "set_production", "get_production", "delete_version", "model_keys", "append_training_record",
    "training_history", "put_document", "get_document",
)


class RemoteStorage:
    """A blocking proxy of the Storage actor with the same method names as ml.storage.store.Storage."""

    def __init__(self, actor=None, *, timeout_s: float = DEFAULT_TIMEOUT_S, data_dir: str | None = None,
                 namespace: str | None = None) -> None:
        if actor is None:
            from actors.storage import get_or_create_storage_actor

            actor = get_or_create_storage_actor(data_dir=data_dir, namespace=namespace)
        self.actor = actor
        self.timeout_s = timeout_s

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(getattr(self.actor, method).remote(*args, **kwargs), timeout=self.timeout_s)

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in FORWARDED:
            raise AttributeError(f"RemoteStorage does not forward {name!r}")

        def method(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, *args, **kwargs)

        method.__name__ = name
        return method

    def __repr__(self) -> str:
        return f"RemoteStorage({self.actor!r})"
