"""Pair names: the one check every path, key and API input goes through.

Kept free of pandas/numpy so that light processes (the Storage, TrainingQueue and accuracy monitor
actors, the CLI's start-up) can validate pairs without importing the data stack.
"""

from __future__ import annotations

import re

from ml.config import PAIR_PATTERN

_PAIR_RE = re.compile(PAIR_PATTERN)


class InvalidPairError(ValueError):
    """A pair name that does not match ^[A-Z0-9]{2,15}$ (and so may never become a path)."""


def validate_pair(pair: str) -> str:
    """Return the pair if it is a valid base symbol, else raise InvalidPairError."""
    if not isinstance(pair, str) or not _PAIR_RE.fullmatch(pair):
        raise InvalidPairError(
            f"invalid pair {pair!r}: expected 2-15 upper-case letters or digits, e.g. BTC"
        )
    return pair
