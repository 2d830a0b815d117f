"""Errors the runner raises that the engine treats specially."""

from __future__ import annotations


class RunnerDeadError(RuntimeError):
    """The runner can never step again (e.g. a tensor-parallel worker died): the engine stops
    instead of failing one request after another."""
