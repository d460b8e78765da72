"""``Flow``: a normalizing flow over a chain of invertible blocks, memory-saving in training."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution

from invertnet._runtime.contract import (
    FLOW_BLOCK_METHODS,
    Buffer,
    FusedResult,
    InvertibleBlock,
    block_traits,
    missing_methods,
)
from invertnet.wrappers import InvertibleModuleWrapper

__all__ = ["Flow"]

Tensors = tuple[torch.Tensor, ...]
_LOG_2PI = math.log(2 * math.pi)


#: The most blocks one wrapper call runs. A group's internal activations are never
#: stored (its forward runs without a graph), so memory does not depend on this;
#: fewer, longer calls save the wrapper's per-call work, shorter ones localise a
#: failed reconstruction (``invertnet.debug_reconstruction``) more finely.
_GROUP_SIZE = 4


def _has_fused_backward(block: nn.Module) -> bool:
    """Whether ``block`` has the contract's fused backward (``inverse_and_vjp``),
    which a flow calls with ``grad_log_det``."""
    return block_traits(type(block)).fused


class _LogDetChain(InvertibleBlock):
    """Consecutive flow blocks seen by :class:`~invertnet.InvertibleModuleWrapper`.

    ``forward(x)`` returns ``(y, log_det)``; ``inverse(y, log_det)`` ignores the
    log-determinant. The wrapper frees ``x`` and, in backward, receives the
    gradients of both outputs.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], first: int, shapes: Sequence[torch.Size]
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.first = first  # index of blocks[0] in the flow, for error messages
        self.shapes = shapes  # the flow's sample shapes, before block i at index i

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = None
        for i, block in enumerate(self.blocks, self.first):
            x, term = block.forward_and_log_det(x)
            _check_step(i, block, x, term, self.shapes[i + 1])
            log_det = term if log_det is None else log_det + term
        return x, log_det

    def inverse(self, y: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y

    def reconstruction_label(self, names: Mapping[int, str]) -> str:
        """How reconstruction errors and debug reports name this run of blocks.

        By the blocks' qualified names in the model given to
        :func:`~invertnet.debug_reconstruction` when they are in it (``names`` maps
        ``id(module)`` to the name), else by their indices in the flow.
        """
        first, last = self.blocks[0], self.blocks[-1]
        if id(first) in names and id(last) in names:
            if first is last:
                return f"'{names[id(first)]}'"
            return f"'{names[id(first)]}' to '{names[id(last)]}'"
        stop = self.first + len(self.blocks) - 1
        if stop == self.first:
            return f"(flow block {stop})"
        return f"(flow blocks {self.first} to {stop})"


class _FusedLogDetChain(_LogDetChain):
    """:class:`_LogDetChain` of blocks with a fused backward (``inverse_and_vjp``): the
    wrapper's fused backward then rebuilds the input and back-propagates both
    gradients block by block, each evaluating its sub-modules once."""

    # The input's memory goes to the first block, which rebuilds the input last:
    # taken when that block first writes it, if the block takes it so.
    deferred_out = True

    def inverse_and_vjp(
        self,
        outputs: Tensors,
        grad_outputs: Tensors,
        params: Tensors,
        *,
        out: Sequence[Buffer] | None = None,
        grad_log_det: torch.Tensor | None = None,
        inputs_need_grad: Any = None,
    ) -> FusedResult:
        """Rebuild the chain's input and back-propagate ``(grad_y, grad_log_det)``.

        The chain's own log-determinant is its second output, so its gradient comes
        in ``grad_outputs``; ``grad_log_det`` (the chain's log-determinant has none of
        its own) and ``inputs_need_grad`` (the input's gradient is cheap) are not
        needed.
        """
        (y, _), (grad_y, grad_of_log_det) = outputs, grad_outputs
        index = {id(p): i for i, p in enumerate(params)}
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        first = self.blocks[0]
        for block in reversed(self.blocks):
            own = tuple(p for p in block.parameters() if id(p) in index)
            options: dict[str, Any] = {"grad_log_det": grad_of_log_det}
            if block is first and out is not None and out[0] is not None:
                buffer = out[0]
                if callable(buffer) and not block_traits(type(block)).deferred_out:
                    buffer = buffer()
                options["out"] = (buffer,)
            (y,), (grad_y,), found = block.inverse_and_vjp((y,), (grad_y,), own, **options)
            for p, g in zip(own, found):
                if g is not None:
                    i = index[id(p)]
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        return (y,), (grad_y,), grad_params


def _check_step(
    i: int, block: nn.Module, y: torch.Tensor, log_det: torch.Tensor, expected: torch.Size
) -> None:
    if y.shape[1:] != expected:
        raise ValueError(
            f"Flow: block {i} ({type(block).__name__}) maps a sample to shape "
            f"{tuple(y.shape[1:])}, expected {tuple(expected)}; a block that changes the "
            "shape must define output_shape(event_shape)"
        )
    if log_det.shape != y.shape[:1]:
        raise ValueError(
            f"Flow: block {i} ({type(block).__name__}) returned a log-determinant of shape "
            f"{tuple(log_det.shape)}; expected one value per sample, {tuple(y.shape[:1])}"
        )


def _groups(blocks: Sequence[nn.Module], keep_every: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` of the blocks each wrapper runs.

    The first block runs alone: its wrapper keeps the caller's input. Then runs of
    blocks with a fused backward, up to ``_GROUP_SIZE`` each; a block without one
    runs alone (inverted, then run forward again, in backward). With ``keep_every``
    a group also starts at every block whose index is a multiple of it, so that
    the wrapper of that group can keep the block's input.
    """
    groups = [(0, 1)]
    for i in range(1, len(blocks)):
        start, stop = groups[-1]
        joinable = (
            start > 0
            and stop - start < _GROUP_SIZE
            and not _kept(i, keep_every)
            and _has_fused_backward(blocks[i])
            and _has_fused_backward(blocks[start])
        )
        groups[-1:] = [(start, i + 1)] if joinable else [(start, stop), (i, i + 1)]
    return groups


def _kept(index: int, keep_every: int | None) -> bool:
    """Whether the input of block ``index`` is kept (the caller's input always is)."""
    return index == 0 or (keep_every is not None and index % keep_every == 0)


def _as_keep_every(keep_every: object) -> int | None:
    if keep_every is None:
        return None
    if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
        raise ValueError(
            "Flow: keep_every must be None (reconstruct every block's input) or a positive "
            "int N (keep the input of every N-th block, so that reconstruction restarts "
            f"from an exact tensor every N blocks), got {keep_every!r}"
        )
    return keep_every


def _as_event_shape(event_shape: object) -> torch.Size:
    if isinstance(event_shape, int) and not isinstance(event_shape, bool):
        event_shape = (event_shape,)
    if not (
        isinstance(event_shape, (tuple, list, torch.Size))
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in event_shape)
    ):
        raise ValueError(
            "Flow: event_shape must be the shape of one sample, a tuple of positive ints "
            f"such as (2,) or (3, 32, 32), got {event_shape!r}"
        )
    return torch.Size(event_shape)


def _as_sample_shape(sample_shape: object) -> torch.Size:
    shape = (sample_shape,) if isinstance(sample_shape, int) else sample_shape
    if isinstance(sample_shape, bool) or not (
        isinstance(shape, (tuple, list, torch.Size))
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ValueError(
            "Flow.sample: sample_shape must be a number of samples or a tuple of "
            f"non-negative ints, got {sample_shape!r}"
        )
    return torch.Size(shape)


class Flow(nn.Module):
    r"""A normalizing flow: invertible blocks that map data ``x`` to a base variable ``z``.

    .. math::

        \log p(x) = \log p_Z(f(x)) + \log|\det \partial f / \partial x|,

    with ``f`` the chain of ``blocks`` and each block adding its own log-determinant.
    In training with ``keep_input=False``, the blocks run under
    :class:`~invertnet.InvertibleModuleWrapper`, a few consecutive blocks per
    wrapper: the activations between blocks are freed (or, inside a wrapper's run,
    never stored) and rebuilt by the blocks' inverses in backward, which
    back-propagates the gradient of the log-determinant in the same pass. A deep
    flow then trains with activation memory that does not grow with depth.

    Parameters
    ----------
    blocks : iterable of torch.nn.Module
        The blocks, applied in order from data to base. Each needs
        ``forward_and_log_det(x) -> (y, log_det)`` and ``inverse(y)``: the couplings
        (:class:`~invertnet.AdditiveCoupling`, :class:`~invertnet.AffineCoupling`,
        :class:`~invertnet.MomentumCoupling`) and the blocks of
        :mod:`invertnet.flows` have them. A block that changes the shape of a sample
        (:class:`~invertnet.flows.Squeeze`) defines ``output_shape(event_shape)``.
    event_shape : int or tuple of int
        The shape of one data sample, such as ``(2,)`` or ``(3, 32, 32)``.
    base : torch.distributions.Distribution, optional
        The distribution of ``z``, with ``event_shape`` equal to the shape the blocks
        map one sample to (:attr:`latent_shape`) and an empty ``batch_shape``. By
        default a standard normal, evaluated in the dtype and on the device of the
        data (a given distribution stays where it was built: move it yourself).
    keep_input : bool
        Keep the activations between blocks for backward as plain autograd does
        (faster by one forward pass, memory growing with depth) instead of freeing
        them.
    keep_every : int, optional
        With ``keep_input=False``: keep the input of every ``keep_every``-th block
        (blocks ``0, N, 2N, ...``) instead of rebuilding it, so that backward's
        reconstruction restarts from an exact tensor every ``N`` blocks and the
        floating-point drift of rebuilt inputs (see Notes) cannot accumulate over
        more than ``N`` blocks. The memory cost is one kept activation (one tensor
        of the shape of the flow's state at that block, for the whole batch) per
        ``N`` blocks, ``ceil(len(blocks) / N) - 1`` in all beyond the caller's
        input; ``None`` (the default) keeps none. Fixed at construction.

    Attributes
    ----------
    blocks : torch.nn.ModuleList
        The blocks.
    event_shape, latent_shape : torch.Size
        The shape of one data sample and of its image ``z``.

    Notes
    -----
    Following :mod:`torch.distributions`, a value may carry any number of leading
    sample dimensions before the event dimensions: ``log_prob`` of an ``(n, m,
    *event_shape)`` tensor has shape ``(n, m)``. ``sample`` runs without grad,
    ``rsample`` keeps the graph for reparameterised gradients.

    Memory is saved only in training mode (``flow.train()``) with grad enabled. The
    caller's own input ``x`` is never freed: the first block keeps it, and rebuilds
    nothing. The blocks' random state is recorded in the forward pass and replayed
    in backward, as :class:`~invertnet.InvertibleModuleWrapper` does by default, so
    dropout masks match; any randomness in a block must be deterministic given the
    random state at the block's sub-module calls.

    A rebuilt input is not bit-identical to the original: every inverse rounds, and
    the next block down is rebuilt from the rounded value, so the error grows with
    depth. In float32 a smooth flow's gradients stay within about 1e-6 (relative)
    of ``keep_input=True``'s; in a deep flow whose networks use ReLU, an input
    rebuilt a relative 1e-6 off can flip a unit whose input was near zero, and the
    gradients then differ by up to 1e-3 (measured at 32 and 48 RealNVP steps).
    float64, or a small ``keep_every``, bounds it. The guide, "Normalizing flows",
    tabulates the measurements; :func:`~invertnet.debug_reconstruction` reports the
    drift of each wrapper in a model of your own.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from invertnet import AffineAdapterNaive, AffineCoupling, Flow
    >>> from invertnet.flows import ActNorm, Permutation
    >>> def net():
    ...     return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> blocks = []
    >>> for _ in range(4):
    ...     blocks += [ActNorm(2), AffineCoupling(net(), adapter=AffineAdapterNaive),
    ...                Permutation.reversed(2)]
    >>> flow = Flow(blocks, event_shape=(2,))
    >>> x = torch.randn(128, 2)
    >>> loss = -flow.log_prob(x).mean()
    >>> loss.backward()
    >>> flow.sample(5).shape
    torch.Size([5, 2])
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        event_shape: int | Sequence[int],
        base: Distribution | None = None,
        keep_input: bool = False,
        keep_every: int | None = None,
    ) -> None:
        super().__init__()
        keep_every = _as_keep_every(keep_every)
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            raise TypeError(
                "Flow: blocks must be a list of modules (or an nn.Sequential / nn.ModuleList), "
                f"got a single {type(blocks).__name__}; pass [block]"
            )
        blocks = list(blocks)
        if not blocks:
            raise ValueError("Flow: blocks is empty; give at least one invertible block")
        self.event_shape = _as_event_shape(event_shape)
        shapes = [self.event_shape]
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"Flow: block {i} must be an nn.Module, got {type(block).__name__}")
            missing = missing_methods(block, FLOW_BLOCK_METHODS)
            if missing:
                raise TypeError(
                    f"Flow: block {i} ({type(block).__name__}) has no {' or '.join(missing)}; "
                    "a flow block needs forward_and_log_det(x) -> (y, log_det) and inverse(y)"
                )
            output_shape = getattr(block, "output_shape", None)
            shapes.append(torch.Size(output_shape(shapes[-1])) if output_shape else shapes[-1])
        self.blocks = nn.ModuleList(blocks)
        self._shapes = shapes
        self.latent_shape = shapes[-1]
        if base is not None:
            if not isinstance(base, Distribution):
                raise TypeError(
                    "Flow: base must be a torch.distributions.Distribution, got "
                    f"{type(base).__name__}"
                )
            if base.event_shape != self.latent_shape or base.batch_shape != torch.Size():
                raise ValueError(
                    f"Flow: base has event_shape {tuple(base.event_shape)} and batch_shape "
                    f"{tuple(base.batch_shape)}; it must have event_shape "
                    f"{tuple(self.latent_shape)} (the shape the blocks map one sample of "
                    f"{tuple(self.event_shape)} to) and batch_shape (); wrap a batch of "
                    "independent distributions in torch.distributions.Independent"
                )
        self.base = base
        self.keep_input = keep_input
        self._keep_every = keep_every
        # The wrappers hold no state of their own; kept out of the module tree so that
        # the state_dict and the parameters are those of the blocks, whatever keep_input.
        self._wrappers: list[InvertibleModuleWrapper] = []
        for start, stop in _groups(blocks, keep_every):
            group = blocks[start:stop]
            fused = all(_has_fused_backward(b) for b in group)
            chain = (_FusedLogDetChain if fused else _LogDetChain)(group, start, shapes)
            wrapper = InvertibleModuleWrapper(
                chain,
                keep_input=_kept(start, keep_every),
            )
            self._wrappers.append(wrapper)

    @property
    def keep_every(self) -> int | None:
        """Every how many blocks an input is kept rather than rebuilt (``None``: never)."""
        return self._keep_every

    def extra_repr(self) -> str:
        every = "" if self._keep_every is None else f", keep_every={self._keep_every}"
        return (
            f"event_shape={tuple(self.event_shape)}, latent_shape={tuple(self.latent_shape)}, "
            f"keep_input={self.keep_input}{every}"
        )

    # -- shapes and dtypes ---------------------------------------------------
    def _reference(self) -> torch.Tensor | None:
        for t in self.parameters():
            return t
        for t in self.buffers():
            if t.is_floating_point():
                return t
        return None

    def _flatten(self, value: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"Flow.{what} expects a tensor, got {type(value).__name__}")
        k = len(shape)
        if value.dim() < k or value.shape[value.dim() - k :] != shape:
            raise ValueError(
                f"Flow.{what}: expected a tensor of shape (..., {', '.join(map(str, shape))}) "
                f"ending in the shape of one sample {tuple(shape)}, got {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"Flow.{what} expects a floating-point tensor, got {value.dtype}")
        ref = self._reference()
        if ref is not None and (value.dtype != ref.dtype or value.device != ref.device):
            raise ValueError(
                f"Flow.{what}: the tensor is {str(value.dtype)[6:]} on {value.device} but the "
                f"flow's parameters are {str(ref.dtype)[6:]} on {ref.device}; convert one "
                "to the other (flow.to(x) or x.to(...))"
            )
        return value.reshape((-1,) + tuple(shape))

    def _memory_saving(self) -> bool:
        return not self.keep_input and self.training and torch.is_grad_enabled()

    # -- the flow --------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map data to the base variable.

        Parameters
        ----------
        x : torch.Tensor
            Data of shape ``(*sample_shape, *event_shape)``.

        Returns
        -------
        z : torch.Tensor
            Of shape ``(*sample_shape, *latent_shape)``.
        log_det : torch.Tensor
            ``log|det dz/dx|`` of shape ``sample_shape``.
        """
        return self._forward(x, "forward")

    def _forward(self, x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        leading = x.shape[: x.dim() - len(self.event_shape)] if isinstance(x, torch.Tensor) else ()
        h = self._flatten(x, self.event_shape, what)
        log_det = h.new_zeros(h.shape[0])
        if self._memory_saving():
            for wrapper in self._wrappers:
                h, term = wrapper(h)
                log_det = log_det + term
        else:
            for i, block in enumerate(self.blocks):
                h, term = block.forward_and_log_det(h)
                _check_step(i, block, h, term, self._shapes[i + 1])
                log_det = log_det + term
        return h.reshape(leading + self.latent_shape), log_det.reshape(leading)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Map base variables back to data.

        Parameters
        ----------
        z : torch.Tensor
            Of shape ``(*sample_shape, *latent_shape)``.

        Returns
        -------
        torch.Tensor
            ``x`` of shape ``(*sample_shape, *event_shape)``.
        """
        leading = z.shape[: z.dim() - len(self.latent_shape)] if isinstance(z, torch.Tensor) else ()
        h = self._flatten(z, self.latent_shape, "inverse")
        for block in reversed(self.blocks):
            h = block.inverse(h)
        return h.reshape(leading + self.event_shape)

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log p_Z(z)`` of base variables ``z`` of shape ``(*sample_shape, *latent_shape)``."""
        if self.base is not None:
            return self.base.log_prob(z)
        k = len(self.latent_shape)
        squares = z.square().sum(dim=tuple(range(z.dim() - k, z.dim())))
        return -0.5 * squares - 0.5 * self.latent_shape.numel() * _LOG_2PI

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """The log-density of data ``x``.

        Parameters
        ----------
        x : torch.Tensor
            Data of shape ``(*sample_shape, *event_shape)``.

        Returns
        -------
        torch.Tensor
            ``log p(x)`` of shape ``sample_shape``.
        """
        z, log_det = self._forward(x, "log_prob")
        return self.base_log_prob(z) + log_det

    def rsample(self, sample_shape: int | Sequence[int] = ()) -> torch.Tensor:
        """Draw samples, differentiable in the parameters (reparameterised).

        Parameters
        ----------
        sample_shape : int or tuple of int
            The number of samples, or the shape of the batch of samples.

        Returns
        -------
        torch.Tensor
            Of shape ``(*sample_shape, *event_shape)``.
        """
        shape = _as_sample_shape(sample_shape)
        if self.base is not None:
            z = self.base.rsample(shape) if self.base.has_rsample else self.base.sample(shape)
        else:
            ref = self._reference()
            dtype = ref.dtype if ref is not None else torch.get_default_dtype()
            device = ref.device if ref is not None else None
            z = torch.randn(shape + self.latent_shape, dtype=dtype, device=device)
        return self.inverse(z)

    def sample(self, sample_shape: int | Sequence[int] = ()) -> torch.Tensor:
        """Draw samples without grad.

        Parameters
        ----------
        sample_shape : int or tuple of int
            The number of samples, or the shape of the batch of samples.

        Returns
        -------
        torch.Tensor
            Of shape ``(*sample_shape, *event_shape)``.
        """
        with torch.no_grad():
            return self.rsample(sample_shape)
