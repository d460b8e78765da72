"""Optional dependencies: import them where used, with an error naming the extra.

The core of invertnet (the wrapper, the couplings, the checker, MomentumNet and its
transform) needs only torch. The benchmark, the training command, the bundled
models and the plots need more; ``pip install "invertnet[EXTRA]"`` installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or fail with an error saying which extra installs it.

    Parameters
    ----------
    module : str
        The module to import, for example ``"tqdm"`` or ``"torchvision.models"``.
    extra : str
        The extra of the ``invertnet`` package that installs it, for example ``"bench"``.
    purpose : str
        What needs it, for the message, for example ``"invertnet bench's progress bar"``.

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    ImportError
        If it cannot be imported; the message names the package and the extra.

    Examples
    --------
    >>> require("json", "bench", "a doctest").__name__
    'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise ImportError(
            f"{purpose} needs {package}, which is not installed (or failed to import: {exc}); "
            f'install it with: pip install "invertnet[{extra}]"',
            name=package,
        ) from exc
