"""Arguments kept only so memcnn code keeps running."""

from __future__ import annotations

import warnings

__all__ = ["warn_implementation_args"]


def warn_implementation_args(owner: str, implementation_fwd: int, implementation_bwd: int) -> None:
    """Warn that memcnn's ``implementation_fwd``/``implementation_bwd`` do nothing here."""
    if implementation_fwd != -1 or implementation_bwd != -1:
        warnings.warn(
            f"{owner}: implementation_fwd and implementation_bwd are accepted for memcnn "
            "compatibility and ignored; invertnet has one implementation, and memory "
            "saving is done by InvertibleModuleWrapper",
            FutureWarning,
            stacklevel=3,
        )
