"""MomentumNet: a stack of residual functions run as a Momentum ResNet."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from invertnet.momentum.arguments import grad_slots
from invertnet.momentum.backward import before_plain_call, run_without_activations
from invertnet.momentum.caches import warn_if_capturing, without_kv_caches
from invertnet.momentum.gamma import Gamma

__all__ = ["MomentumNet"]

#: The dtype in which the plain mode accumulates position and velocity. Holding the
#: state more precisely than the functions compute keeps the two modes within
#: rounding of each other (the exact mode holds it in fixed point).
STATE_DTYPE = torch.float64


def _as_module_list(functions: object) -> nn.ModuleList:
    if isinstance(functions, nn.Module) and not isinstance(
        functions, (nn.Sequential, nn.ModuleList)
    ):
        raise TypeError(
            "MomentumNet: functions must be a list, nn.ModuleList or nn.Sequential of "
            f"modules, got a single {type(functions).__name__}; pass [module] for one layer"
        )
    if not isinstance(functions, Iterable) or isinstance(functions, (str, bytes)):
        raise TypeError(
            "MomentumNet: functions must be a list, nn.ModuleList or nn.Sequential of "
            f"modules, got {type(functions).__name__}"
        )
    modules = list(functions)
    if not modules:
        raise ValueError("MomentumNet: functions is empty; give at least one layer")
    for i, f in enumerate(modules):
        if not isinstance(f, nn.Module):
            raise TypeError(
                f"MomentumNet: functions[{i}] must be an nn.Module, got {type(f).__name__}"
            )
    return nn.ModuleList(modules)


class MomentumNet(nn.Module):
    r"""A Momentum Residual Network (Sander, Ablin, Blondel and Peyré, ICML 2021).

    With functions :math:`f_0, \dots, f_{L-1}` it iterates

    .. math::

        v_{t+1} = \gamma v_t + (1 - \gamma) f_t(x_t), \qquad x_{t+1} = x_t + v_{t+1},

    from :math:`x_0 = x` and :math:`v_0 = 0` (or ``init_function(x)``), and returns
    :math:`x_L`. The iteration can be run backwards in closed form, so with
    ``use_backprop=False`` training keeps no per-layer activations: backward
    reconstructs every :math:`x_t` exactly and evaluates each :math:`f_t` once more.

    Parameters
    ----------
    functions : list, torch.nn.ModuleList or torch.nn.Sequential of torch.nn.Module
        The :math:`f_t`. Each is called as ``f(x, *args, **kwargs)`` with the extra
        arguments given to :meth:`forward`, and must return a tensor of the shape of
        ``x``. One module may appear several times (``[f] * 10``): it then shares
        its weights across those layers.
    gamma : float
        The momentum term, in ``[0, 1]``. It is held as the nearest fraction with
        denominator at most 2**20 (exact for 0.9, 0.99, 0.5, ...), used by both modes.
        ``gamma = 0`` gives the plain ResNet ``x_{t+1} = x_t + f_t(x_t)``.
    init_speed : bool
        Start from ``v_0 = init_function(x)`` instead of 0.
    init_function : torch.nn.Module, optional
        Required when ``init_speed`` is True; maps ``x`` to a tensor of its shape.
    use_backprop : bool
        True: ordinary autograd, which keeps every layer's activations. False: in
        training mode with grad enabled, keep only the final state and a compact
        record of the bits lost to ``gamma``, and reconstruct the rest in backward
        (see Notes). In eval mode, or without grad, both modes run the plain
        iteration (it is what :func:`torch.export.export` and ONNX export trace).
    is_residual : bool
        True: the functions are residual branches, used as :math:`f_t(x)`. False:
        they are whole residual blocks (``x + branch(x)``), used as
        :math:`f_t(x) - x`; with ``gamma = 0`` the network then computes exactly the
        composition of the blocks.

    Raises
    ------
    ValueError
        If ``gamma`` is outside ``[0, 1]``, ``functions`` is empty, or
        ``init_speed`` is True without an ``init_function``.
    TypeError
        If ``functions`` or ``init_function`` are not modules.

    Notes
    -----
    Both modes compute the same function: the state is accumulated in float64 (plain
    mode) or in 64-bit fixed point (``use_backprop=False``), so they differ only by
    the rounding of the inputs given to the functions. The exact mode is described
    in :mod:`invertnet.momentum.exact`.

    With ``use_backprop=False`` every function is called a second time in
    backward, with the same extra arguments, and must find them as it left them
    in forward. A function that changes an argument (appends to a list, sets an
    attribute, writes into a tensor in place), or a caller that changes one
    before backward, makes the forward pass (or backward) raise
    :class:`RuntimeError` naming the argument. Key/value caches of Hugging Face
    models (``transformers`` ``Cache`` objects) are handled instead: the
    training pass runs the functions without them, as ``transformers`` does
    under gradient checkpointing (see :mod:`invertnet.momentum.caches`).

    The second call runs in the state of the first: its random state (dropout
    masks), autocast, the training flags of its modules (``model.eval()`` before
    backward changes nothing), and the tensors its modules held (those
    :func:`torch.func.functional_call` passed get the gradients). A parameter
    changed in place before backward (``optimizer.step()``) raises, as in plain
    autograd; so do double backward, forward-mode AD and :mod:`torch.func`
    transforms in training. The guide's "Between forward and backward" lists
    every pattern.

    Examples
    --------
    The quickstart of momentumnet runs unchanged:

    >>> import torch
    >>> from torch import nn
    >>> from invertnet import MomentumNet
    >>> hidden = 8
    >>> d = 500
    >>> function = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
    >>> mresnet = MomentumNet([function] * 10, gamma=0.9)
    >>> x = torch.randn(10, d)
    >>> mresnet(x).shape
    torch.Size([10, 500])

    Training without storing activations:

    >>> light = MomentumNet([function] * 10, gamma=0.9, use_backprop=False)
    >>> x = x.requires_grad_(True)
    >>> light(x).square().sum().backward()
    """

    def __init__(
        self,
        functions: Iterable[nn.Module] | nn.ModuleList | nn.Sequential,
        gamma: float,
        init_speed: bool = False,
        init_function: nn.Module | None = None,
        use_backprop: bool = True,
        is_residual: bool = True,
    ) -> None:
        super().__init__()
        self._gamma = Gamma.from_value(gamma, "MomentumNet")
        self._functions = _as_module_list(functions)
        if init_speed and init_function is None:
            raise ValueError(
                "MomentumNet: init_speed=True needs an init_function to compute the initial "
                "velocity v0 = init_function(x); pass one, or init_speed=False for v0 = 0"
            )
        if init_function is not None and not isinstance(init_function, nn.Module):
            raise TypeError(
                "MomentumNet: init_function must be an nn.Module, got "
                f"{type(init_function).__name__}"
            )
        if init_function is not None and not init_speed:
            warnings.warn(
                "MomentumNet: init_function is ignored because init_speed=False (v0 = 0); "
                "pass init_speed=True to use it",
                UserWarning,
                stacklevel=2,
            )
        self._init_function = init_function if init_speed else None
        self.init_speed = bool(init_speed)
        self.use_backprop = bool(use_backprop)
        self.is_residual = bool(is_residual)

    # -- public properties ---------------------------------------------------
    @property
    def functions(self) -> nn.ModuleList:
        """The functions :math:`f_t`, one per layer."""
        return self._functions

    @property
    def init_function(self) -> nn.Module | None:
        """The module computing ``v_0`` (``None`` when ``v_0 = 0``)."""
        return self._init_function

    @property
    def gamma(self) -> float:
        """The momentum term, as used (the fraction's value)."""
        return self._gamma.value

    def extra_repr(self) -> str:
        return (
            f"gamma={self._gamma.numerator}/{self._gamma.denominator}, "
            f"init_speed={self.init_speed}, use_backprop={self.use_backprop}, "
            f"is_residual={self.is_residual}"
        )

    # -- evaluation ----------------------------------------------------------
    def _check_shape(self, what: str, out: Any, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"MomentumNet: {what} must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"MomentumNet: {what} maps an input of shape {tuple(x.shape)} to an output of "
                f"shape {tuple(out.shape)}; every function must preserve the shape of x"
            )
        return out

    def call_function(
        self, t: int, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """``f_t(x, *args, **kwargs)``, checked to keep the shape of ``x``."""
        return self._check_shape(f"functions[{t}]", self._functions[t](x, *args, **kwargs), x)

    def call_init(self, x: torch.Tensor) -> torch.Tensor:
        """``init_function(x)``, checked to keep the shape of ``x``."""
        assert self._init_function is not None
        return self._check_shape("init_function", self._init_function(x), x)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Map ``x`` to the network's output :math:`x_L`.

        Parameters
        ----------
        x : torch.Tensor
            The input, a floating-point tensor.
        *args, **kwargs
            Passed to every function after ``x`` (tensors, masks, flags, None...).

        Returns
        -------
        torch.Tensor
            :math:`x_L`, of the shape and dtype of ``x``.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"MomentumNet: x must be a floating-point tensor, got {what}")
        if not self.use_backprop and self._needs_graph(x, args, kwargs):
            args, kwargs = without_kv_caches(args, kwargs)
            warn_if_capturing()
            return run_without_activations(self, x, args, kwargs)
        if not self.use_backprop and self.training and not torch.compiler.is_compiling():
            # Training mode without grad: running statistics are updated.
            before_plain_call(self)
        return self._forward_plain(x, args, kwargs)

    def _needs_graph(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        # Inference (eval mode, or no grad) needs no exact reversal: the plain
        # iteration runs, which torch.export and ONNX export can trace.
        if not self.training or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return False
        # The same search that finds the argument tensors to differentiate, so that
        # whatever makes a graph necessary also gets its gradient.
        return (
            x.requires_grad
            or bool(grad_slots(args, kwargs))
            or any(p.requires_grad for p in self.parameters())
        )

    def _forward_plain(
        self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor:
        keep, mix = self._gamma.value, self._gamma.complement
        position = x.to(STATE_DTYPE)
        # Every function gets a tensor of its own (copy=True): a float64 position
        # converts to itself, and a function that writes over its input
        # (nn.ReLU(inplace=True) first) would otherwise change the state, or the
        # caller's x, in float64 only. The memory-saving mode gives the same.
        if self._init_function is not None:
            velocity = self.call_init(position.to(x.dtype, copy=True)).to(STATE_DTYPE)
        else:
            velocity = torch.zeros_like(position)
        for t in range(len(self._functions)):
            given = position.to(x.dtype, copy=True)
            step = self.call_function(t, given, args, kwargs).to(STATE_DTYPE)
            if not self.is_residual:
                step = step - position
            velocity = keep * velocity + mix * step
            position = position + velocity
        return position.to(x.dtype)
