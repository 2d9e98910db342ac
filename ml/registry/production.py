"""The one reader of a pair/model type's production version: pointer plus the version's metadata.

Serving, the accuracy monitor, the training queue and `tbml up` all ask here, so they agree on
what "the production model" is and on the metadata keys (the registry writes `trainedAt`).
`storage` is anything with `get_production` and `get_version_meta` (`ml.storage.store.Storage`,
its read-only `Storage.reader()`, or the Storage actor's client).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class ProductionSource(Protocol):
    def get_production(self, pair: str, model_type: str) -> dict | None: ...

    def get_version_meta(self, pair: str, model_type: str, version: str) -> dict | None: ...


@dataclass(frozen=True)
class Production:
    """The production version of one pair/model type and what serving and monitoring need of it."""

    version: str
    trained_at: int | None
    promoted_at: int | None
    reason: str | None
    previous: str | None
    meta: dict[str, Any] = field(repr=False)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics") or {}

    @property
    def horizons(self) -> list[int]:
        return [int(h) for h in (self.meta.get("model") or {}).get("horizons") or []]

    @property
    def seq_len(self) -> int | None:
        return (self.meta.get("model") or {}).get("seq_len")

    def age_ms(self, now: int) -> int | None:
        """How long ago the version was trained (its training time, not its promotion time)."""
        return None if self.trained_at is None else max(0, now - int(self.trained_at))


def production_from(pointer: dict | None, meta: dict | None) -> Production | None:
    """Combine a production pointer and its version's metadata; None if either is missing."""
    if not pointer or not pointer.get("version") or meta is None:
        return None
    trained_at = meta.get("trainedAt")
    return Production(
        version=str(pointer["version"]),
        trained_at=int(trained_at) if trained_at is not None else None,
        promoted_at=pointer.get("promotedAt"),
        reason=pointer.get("reason"),
        previous=pointer.get("previous"),
        meta=meta,
    )


def read_production(storage: ProductionSource, pair: str, model_type: str) -> Production | None:
    """The production version of pair/model type, or None (no pointer, or a damaged one: the
    doctor repairs it, and a reader treats it as "no model" rather than failing)."""
    try:
        pointer = storage.get_production(pair, model_type)
        if not pointer or not pointer.get("version"):
            return None
        meta = storage.get_version_meta(pair, model_type, pointer["version"])
    except Exception as exc:  # noqa: BLE001 - unreadable pointer or meta: no model
        log.warning("production of %s/%s unreadable: %s", pair, model_type, exc)
        return None
    return production_from(pointer, meta)
