"""Refusing FSDP2 units inside a wrapper.

``fully_shard`` on a module inside a wrapper (``fully_shard(wrapper.module.Fm)``)
cannot work: the wrapper records the parameters of the modules it wraps at forward
time, while FSDP2 swaps that module's parameters for gathered copies around each of
its calls, and the wrapper's recomputation in backward runs on copies it did not
record. Those parameters would silently get no gradient. A wrapper that is itself a
unit, or sits inside one, is sharded as a whole and works (docs/distributed.rst).
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["refuse_sharded_submodules"]

# Where FSDP2's module class lives: torch >= 2.6, then torch 2.4 and 2.5 (where
# torch.distributed.fsdp holds FSDP1 and has no FSDPModule).
_FSDP_PACKAGES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")

_fsdp_module: type | None = None


def _fsdp_module_class() -> type | None:
    """FSDP2's ``FSDPModule``, or ``None`` while FSDP2 has not been imported.

    Looked up among the modules already imported, never imported here: no module can
    be an FSDP2 unit before ``fully_shard`` was imported (which imports its package),
    and a process without ``torch.distributed`` never has it. Cached once found; not
    cached while absent, since FSDP2 may be imported later.
    """
    global _fsdp_module
    if _fsdp_module is None:
        for name in _FSDP_PACKAGES:
            found = getattr(sys.modules.get(name), "FSDPModule", None)
            if isinstance(found, type):
                _fsdp_module = found
                break
    return _fsdp_module


def _qualified_type(module: nn.Module, fsdp: type) -> str:
    """The module's own class, ``package.module.Class``, not the class ``fully_shard``
    made for it (``FSDPClass``, a subclass of ``FSDPModule`` and the own class)."""
    cls = next(
        (c for c in type(module).__mro__ if issubclass(c, nn.Module) and not issubclass(c, fsdp)),
        type(module),
    )
    return f"{cls.__module__}.{cls.__qualname__}"


def refuse_sharded_submodules(layer: str, modules: list[nn.Module]) -> None:
    """Raise if any of ``modules`` (the wrapped module and those under it) is an FSDP2
    unit, before the wrapper runs or frees anything.

    Parameters
    ----------
    layer : str
        The wrapper, as its error messages name it.
    modules : list of nn.Module
        The wrapped module and every module under it.

    Raises
    ------
    RuntimeError
        Naming the sharded module's type, why it cannot work, and the fix.
    """
    fsdp = _fsdp_module_class()
    if fsdp is None:
        return
    for index, module in enumerate(modules):
        if isinstance(module, fsdp):
            if index == 0:
                where = f"the wrapped module ({_qualified_type(module, fsdp)})"
            else:
                name = next((n for n, m in modules[0].named_modules() if m is module), "")
                where = (
                    f"the module {name!r} inside the wrapped module "
                    f"({_qualified_type(module, fsdp)})"
                )
            raise RuntimeError(
                f"{layer}: {where} is an FSDP2 unit "
                "(fully_shard was called on it). The wrapper records its parameters at "
                "forward time and recomputes the block in backward, while FSDP2 replaces "
                "them with gathered copies around each call of the unit: those parameters "
                "would silently get no gradient. Call fully_shard on the wrapper itself, "
                "or on a module that holds it, instead"
            )
