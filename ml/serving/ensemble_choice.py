"""What `model=ensemble` answers for a pair, decided from its production versions alone (Ray-free).

* A production `ensemble` version (the registry points production at one only when its test Brier
  beat every member's, `ml.registry.versions.ensemble_promotion_decision`, or when an operator
  promoted it): the members its document lists (`members: {type: version}`) are each asked like
  any model (cached per version and candle) and their forecasts combined by
  `ml.serving.ensemble.combine(document, outputs)`.
* Otherwise (none built yet, or none beat its members) the best single member answers: among the
  member types with a production version, the lowest test Brier (the newest ensemble document's
  numbers on its common test rows when it was built from today's production versions, else each
  version's own test metrics), first in `model.enabled_types` order on a tie or without numbers.
  The answer says so: `ensemble: {promoted: false, answeredBy, reason}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ml.registry.production import Production


@dataclass(frozen=True)
class EnsembleChoice:
    """`combine`: call `members` and combine them with the document `meta` (version `version`);
    else `answered_by` answers alone (None: no member has a production version)."""

    combine: bool
    horizons: list[int]
    version: str | None = None
    members: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] | None = field(default=None, repr=False)
    answered_by: str | None = None
    reason: str | None = None

    def block(self) -> dict[str, Any]:
        """The `ensemble` block of the answer."""
        if self.combine:
            return {"promoted": True, "version": self.version, "answeredBy": "ensemble",
                    "members": dict(self.members), "reason": None}
        return {"promoted": False, "version": self.version, "answeredBy": self.answered_by, "reason": self.reason}


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def version_brier(meta: Mapping[str, Any] | None) -> float | None:
    """A version's test Brier (`metrics.model.brier`), None when it has none."""
    return _finite((((meta or {}).get("metrics") or {}).get("model") or {}).get("brier"))


def member_briers(ensemble_meta: Mapping[str, Any] | None) -> dict[str, float]:
    """The members' test Brier on the ensemble's common test rows, as the document records them
    (`metrics.members.{type}.brier`, or `.model.brier` under it); empty without a document."""
    members = (((ensemble_meta or {}).get("metrics") or {}).get("members")) or {}
    out = {}
    for mt, m in members.items():
        if isinstance(m, Mapping):
            b = _finite(m.get("brier"))
            if b is None and isinstance(m.get("model"), Mapping):
                b = _finite(m["model"].get("brier"))
            if b is not None:
                out[str(mt)] = b
    return out


def best_member(member_types: Sequence[str], production: Mapping[str, Production | None],
                briers: Mapping[str, float] | None = None) -> tuple[str | None, float | None]:
    """(type, its test Brier) of the member that answers alone; (None, None) without any model."""
    briers = briers or {}
    best: tuple[str | None, float | None] = (None, None)
    for mt in member_types:
        prod = production.get(mt)
        if prod is None:
            continue
        b = briers.get(mt, version_brier(prod.meta))
        if best[0] is None or (b is not None and (best[1] is None or b < best[1])):
            best = (mt, b)
    return best


def choose(pair: str, member_types: Sequence[str], production: Mapping[str, Production | None],
           ensemble: Production | None, default_horizons: Sequence[int],
           newest: Mapping[str, Any] | None = None) -> EnsembleChoice:
    """The answer of `model=ensemble` for `pair` (see the module docstring). `newest` is the meta of
    the newest ensemble version (promoted or not): when it was built from today's production
    versions its test numbers pick the member and its promotion reason says why it does not answer."""
    meta = ensemble.meta if ensemble is not None else None
    members = {str(k): str(v) for k, v in ((meta or {}).get("members") or {}).items()}
    if ensemble is not None and len(members) >= 2:
        horizons = ensemble.horizons or next(
            (p.horizons for mt, p in production.items() if mt in members and p is not None and p.horizons),
            [int(h) for h in default_horizons])
        return EnsembleChoice(combine=True, horizons=list(horizons), version=ensemble.version, members=members,
                              meta=dict(meta or {}))
    briers: dict[str, float] = {}
    if ensemble is not None:
        why = f"the ensemble version {ensemble.version} lists fewer than two members"
    elif newest:
        built = {str(k): str(v) for k, v in (newest.get("members") or {}).items()}
        current = {mt: p.version for mt in built if (p := production.get(mt)) is not None}
        detail = (newest.get("promotion") or {}).get("reason")
        why = f"the newest ensemble {newest.get('version')} was not promoted" + (f" ({detail})" if detail else "")
        if built and built == current:  # its members are today's production: its common test rows decide
            briers = member_briers(newest)
        else:
            why += "; it was built from other member versions than production's"
    else:
        why = f"no ensemble built for {pair} yet (POST /api/train/{pair}/ensemble)"
    mt, brier = best_member(member_types, production, briers)
    if mt is None:
        reason = f"{why}, and no member type ({', '.join(member_types)}) has a production model"
        return EnsembleChoice(combine=False, horizons=[int(h) for h in default_horizons],
                              version=ensemble.version if ensemble else None, reason=reason)
    score = f"test Brier {brier:.4f}" if brier is not None else "no test Brier recorded"
    rows = " on the ensemble's test rows" if mt in briers else ""
    reason = f"{why}: {mt} answers, the best single member ({score}{rows})"
    prod = production[mt]
    horizons = (prod.horizons if prod is not None else []) or [int(h) for h in default_horizons]
    return EnsembleChoice(combine=False, horizons=list(horizons), version=ensemble.version if ensemble else None,
                          answered_by=mt, reason=reason)


__all__ = ["EnsembleChoice", "best_member", "choose", "member_briers", "version_brier"]
