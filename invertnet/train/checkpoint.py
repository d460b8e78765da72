"""Training checkpoints: written atomically, checked against the run that reads them."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from invertnet.train.errors import TrainingError

__all__ = ["CheckpointError", "FORMAT", "load_checkpoint", "save_atomically", "check_identity"]

#: Version of the checkpoint layout; bumped when the layout changes.
FORMAT = 1

#: Keys that must match between a checkpoint and the run resuming from it.
IDENTITY_KEYS = ("model", "dataset", "num_classes", "model_kwargs")


class CheckpointError(TrainingError):
    """A checkpoint cannot be used by this run."""


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` with :func:`torch.save` so that ``path`` is never left half-written.

    The state goes to a temporary file in the same directory, is flushed to disk, and
    then replaces ``path`` in one :func:`os.replace`; a crash at any moment leaves
    either the previous checkpoint or the new one.

    Parameters
    ----------
    state : dict
        What to save.
    path : pathlib.Path
        Destination.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by the training command.

    Raises
    ------
    CheckpointError
        If the file cannot be read or was not written by ``invertnet train``.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises many types; all mean "unusable"
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}; "
            "pass --fresh to discard it and start again"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an invertnet training checkpoint (format {FORMAT}); "
            "pass --fresh to discard it, or choose another --results-dir"
        )
    return state


def check_identity(state: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint belongs to this run.

    Parameters
    ----------
    state : dict
        The loaded checkpoint.
    expected : dict
        This run's values of :data:`IDENTITY_KEYS`.
    path : pathlib.Path
        The checkpoint's path, for the message.
    """
    differences = [
        f"{key} {state.get(key)!r} (this run: {expected[key]!r})"
        for key in IDENTITY_KEYS
        if state.get(key) != expected[key]
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run: "
            + "; ".join(differences)
            + ". Pass --fresh to discard it, or choose another --results-dir"
        )
