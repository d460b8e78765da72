"""Build a coupling by name, as memcnn's ``create_coupling`` does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from invertnet.couplings.additive import AdditiveCoupling
from invertnet.couplings.affine import AffineCoupling
from invertnet.couplings.momentum import MomentumCoupling

__all__ = ["create_coupling", "register_coupling", "available_couplings"]

CouplingBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, CouplingBuilder] = {}


def register_coupling(name: str, builder: CouplingBuilder) -> None:
    """Make ``create_coupling(..., coupling=name)`` call ``builder(Fm, Gm, **kwargs)``.

    Parameters
    ----------
    name : str
        The name users pass as ``coupling``.
    builder : callable
        Called as ``builder(Fm, Gm, **kwargs)``; returns the coupling module.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"coupling name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = builder


def available_couplings() -> list[str]:
    """Names accepted by :func:`create_coupling`, sorted."""
    return sorted(_REGISTRY)


def create_coupling(
    Fm: nn.Module,
    Gm: nn.Module | None = None,
    coupling: str = "additive",
    adapter: Callable[[nn.Module], nn.Module] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a coupling module by name.

    Parameters
    ----------
    Fm, Gm : torch.nn.Module
        The coupling's sub-modules (``Gm`` defaults to a deep copy of ``Fm`` where the
        coupling uses one).
    coupling : str
        One of :func:`available_couplings` (``'additive'``, ``'affine'``,
        ``'momentum'``).
    adapter : callable, optional
        Passed to couplings that take one (affine).
    **kwargs
        Further arguments for the coupling, for example ``split_dim`` or ``gamma``.

    Returns
    -------
    torch.nn.Module
        The coupling.

    Raises
    ------
    ValueError
        If ``coupling`` is not a known name.
    """
    try:
        builder = _REGISTRY[coupling]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown coupling {coupling!r}; known couplings: {', '.join(available_couplings())}"
        ) from None
    if adapter is not None:
        kwargs["adapter"] = adapter
    return builder(Fm, Gm, **kwargs)


register_coupling("additive", lambda Fm, Gm, **kw: AdditiveCoupling(Fm, Gm, **kw))
register_coupling("affine", lambda Fm, Gm, **kw: AffineCoupling(Fm, Gm, **kw))


def _build_momentum(Fm: nn.Module, Gm: nn.Module | None, **kwargs: Any) -> nn.Module:
    if Gm is not None:
        raise ValueError(
            "create_coupling(coupling='momentum') takes one sub-module Fm; "
            f"got a Gm ({type(Gm).__name__}) as well"
        )
    return MomentumCoupling(Fm, **kwargs)


register_coupling("momentum", _build_momentum)
