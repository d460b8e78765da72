"""Errors the training command reports to its user (and exits on) instead of a traceback."""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "TrainingError"]


class TrainingError(RuntimeError):
    """Something about the command line, the data or the results directory is wrong."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; training stopped before the step was applied."""
