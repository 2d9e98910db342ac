"""The two ways `tbml up/down/status` fail, so the CLI can map them to exit codes 1 and 2."""

from __future__ import annotations


class UpError(RuntimeError):
    """Starting or stopping failed (exit 1)."""


class UsageProblem(UpError):
    """The request cannot be carried out as asked: a busy port, already running (exit 2)."""
