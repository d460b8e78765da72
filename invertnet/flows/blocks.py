"""Invertible blocks that normalizing flows need besides couplings.

Every block here follows the block contract (:mod:`invertnet._runtime.contract`)
of a flow block:

* ``forward(x)`` and ``inverse(y)``, as for any invertible module;
* ``forward_and_log_det(x) -> (y, log_det)``, with ``log_det`` the per-sample
  ``log|det dy/dx|`` of shape ``(batch,)``;
* ``inverse_and_vjp(outputs, grad_outputs, params, grad_log_det=...)``, which
  rebuilds the input from the output and back-propagates the gradients of the
  output and of the log-determinant in one pass, in closed form: under
  :class:`~invertnet.InvertibleModuleWrapper` or in a memory-saving
  :class:`~invertnet.flows.Flow`, backward costs no more than one extra forward.

Inputs are batches: dimension 0 is the batch, dimension 1 the channels (or
features), any further dimensions spatial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from invertnet._runtime.contract import FusedResult, InvertibleBlock

__all__ = ["ActNorm", "InvertibleConv1x1", "Permutation", "Squeeze"]

Tensors = tuple[torch.Tensor, ...]


def _check_input(block: nn.Module, x: torch.Tensor, channels: int, min_dim: int = 2) -> None:
    name = type(block).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
    if x.dim() < min_dim or x.shape[1] != channels:
        raise ValueError(
            f"{name}({channels}) expects a batch of shape (batch, {channels}, ...) with "
            f"{channels} channels in dimension 1, got shape {tuple(x.shape)}"
        )


def _channel_view(p: torch.Tensor, dim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against a ``dim``-dimensional batch."""
    return p.reshape((1, -1) + (1,) * (dim - 2))


def _per_sample(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar log-determinant, the same for every sample, as a ``(batch,)`` tensor."""
    return value.to(x.dtype).expand(x.shape[0])


def _spatial_size(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _check_positive_int(block: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{block}: {name} must be a positive int, got {value!r}")
    return value


def _param_grads(
    targets: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    params: Tensors,
) -> list[torch.Tensor | None]:
    """Gradients of ``sum(targets * grads)`` with respect to ``params`` (``None`` if unused)."""
    pairs = [(t, g) for t, g in zip(targets, grads) if t.requires_grad]
    if not params or not pairs:
        return [None] * len(params)
    found = torch.autograd.grad(
        [t for t, _ in pairs], params, [g for _, g in pairs], allow_unused=True
    )
    return list(found)


class _FlowBlock(InvertibleBlock):
    """A flow block: ``forward`` is ``forward_and_log_det`` without the log-determinant.

    Its ``inverse_and_vjp`` builds new tensors, never writing ``out``, so it takes
    ``out`` deferred (``deferred_out``): the wrapper then takes the freed input's
    memory only when it restores the input, after the block's backward.
    """

    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_log_det(x)[0]


class ActNorm(_FlowBlock):
    r"""Activation normalisation (Glow): a per-channel affine map with data-dependent init.

    .. math::

        y = (x + b) \odot e^{s}, \qquad
        \log|\det \partial y / \partial x| = n \sum_c s_c,

    with ``n`` the number of elements per channel of one sample (the spatial size,
    1 for feature vectors). The first forward pass sets ``b`` and ``s`` so that its
    batch comes out with zero mean and unit variance per channel; a flag buffer
    (``initialized``, saved in the ``state_dict``) keeps later passes, and a loaded
    model, from doing it again.

    Parameters
    ----------
    num_features : int
        The number of channels (dimension 1 of the input).
    eps : float
        Added to the standard deviation in the initialisation.

    Examples
    --------
    >>> import torch
    >>> from invertnet.flows import ActNorm
    >>> norm = ActNorm(3)
    >>> x = 5 + 2 * torch.randn(64, 3, 4, 4)
    >>> y, log_det = norm.forward_and_log_det(x)  # the first batch initialises
    >>> abs(y.mean().item()) < 1e-5, round(y.std().item(), 3)
    (True, 1.0)
    >>> log_det.shape
    torch.Size([64])
    >>> torch.allclose(norm.inverse(y), x, atol=1e-5)
    True
    """

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_features = _check_positive_int("ActNorm", "num_features", num_features)
        self.eps = float(eps)
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))
        # A host-side copy of the flag, so that a forward pass on an accelerator
        # does not wait for the device to read the buffer.
        self._initialized_cache = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_cache = False  # read the loaded buffer on the next pass

    def extra_repr(self) -> str:
        return f"{self.num_features}"

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the parameters so that ``x`` comes out with zero mean and unit variance.

        Parameters
        ----------
        x : torch.Tensor
            A batch of shape ``(batch, num_features, ...)``.

        Raises
        ------
        ValueError
            If ``x`` has fewer than two values per channel.
        """
        _check_input(self, x, self.num_features)
        dims = [d for d in range(x.dim()) if d != 1]
        if x.numel() // self.num_features < 2:
            raise ValueError(
                "ActNorm: the data-dependent initialisation needs at least two values per "
                f"channel (a batch of more than one sample), got shape {tuple(x.shape)}"
            )
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)
        self._initialized_cache = True

    def _maybe_initialize(self, x: torch.Tensor) -> None:
        if not self._initialized_cache:
            if bool(self.initialized):
                self._initialized_cache = True
            else:
                self.initialize(x.detach())

    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` and its log-determinant, of shape ``(batch,)``."""
        _check_input(self, x, self.num_features)
        self._maybe_initialize(x)
        d = x.dim()
        y = (x + _channel_view(self.bias, d)) * _channel_view(torch.exp(self.log_scale), d)
        return y, _per_sample(self.log_scale.sum() * _spatial_size(x), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``x = y e^{-s} - b``."""
        _check_input(self, y, self.num_features)
        d = y.dim()
        return y * _channel_view(torch.exp(-self.log_scale), d) - _channel_view(self.bias, d)

    deferred_out = True  # never written (see _FlowBlock)

    def inverse_and_vjp(
        self,
        outputs: Tensors,
        grad_outputs: Tensors,
        params: Tensors,
        *,
        out: Any = None,
        grad_log_det: torch.Tensor | None = None,
        inputs_need_grad: Any = None,
    ) -> FusedResult:
        """Rebuild the input and back-propagate ``grad_outputs`` and ``grad_log_det``.

        Closed form: ``dL/dx = g e^s``, ``dL/db = sum(g e^s)``,
        ``dL/ds = sum(g y) + n sum(grad_log_det)``. The contract's other options
        (``out``, ``inputs_need_grad``) are not needed.
        """
        (y,), (g,) = outputs, grad_outputs
        d = y.dim()
        with torch.no_grad():
            x = self.inverse(y)
            grad_x = g * _channel_view(torch.exp(self.log_scale), d)
            dims = [i for i in range(d) if i != 1]
            grad_bias = grad_x.sum(dim=dims)
            grad_log_scale = (g * y).sum(dim=dims)
            if grad_log_det is not None:
                grad_log_scale = grad_log_scale + grad_log_det.sum() * _spatial_size(y)
        own = {id(self.bias): grad_bias, id(self.log_scale): grad_log_scale}
        grad_params = [own.get(id(p)) for p in params]
        return (x,), (grad_x,), grad_params


def _mix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply the channel-mixing matrix ``weight`` at every position of ``x``.

    A convolution rather than a (faster) batched matrix product, whose output would
    be a reshaped view: a view cannot be freed by the next wrapper.
    """
    d = x.dim()
    if d == 2:
        return F.linear(x, weight)
    kernel = weight.reshape(weight.shape + (1,) * (d - 2))
    if d == 3:
        return F.conv1d(x, kernel)
    if d == 4:
        return F.conv2d(x, kernel)
    if d == 5:
        return F.conv3d(x, kernel)
    raise ValueError(
        f"InvertibleConv1x1 takes inputs of 2 to 5 dimensions, got shape {tuple(x.shape)}"
    )


class InvertibleConv1x1(_FlowBlock):
    r"""Invertible 1x1 convolution (Glow), LU-parameterised.

    A learned channel-mixing matrix ``W`` applied at every position:
    ``y[:, :, p] = W x[:, :, p]``. ``W = P L (U + diag(sign * e^{log_s}))`` with a
    fixed permutation ``P``, a unit lower-triangular ``L`` and a strictly upper
    triangular ``U``, so that

    .. math::

        \log|\det \partial y / \partial x| = n \sum_c \mathrm{log\_s}_c

    costs nothing to evaluate (``n`` is the spatial size) and ``W`` stays
    invertible. ``W`` starts as a random rotation. The parameters and buffers are
    created in the default dtype (:func:`torch.get_default_dtype`), like those of
    :class:`torch.nn.Linear`; convert the block with ``.to(dtype)`` or ``.double()``.

    Parameters
    ----------
    num_channels : int
        The number of channels (dimension 1 of the input); inputs have 2 to 5
        dimensions (feature vectors, sequences, images, volumes).
    generator : torch.Generator, optional
        Draws the initial rotation (the global generator by default).

    Examples
    --------
    >>> import torch
    >>> from invertnet.flows import InvertibleConv1x1
    >>> conv = InvertibleConv1x1(4)
    >>> x = torch.randn(2, 4, 3, 3)
    >>> y, log_det = conv.forward_and_log_det(x)
    >>> torch.allclose(log_det, 9 * torch.linalg.slogdet(conv.weight())[1], atol=1e-5)
    True
    >>> torch.allclose(conv.inverse(y), x, atol=1e-5)
    True
    """

    def __init__(self, num_channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        c = _check_positive_int("InvertibleConv1x1", "num_channels", num_channels)
        self.num_channels = c
        # Factorised in float64, then stored in the default dtype (as nn.Linear's
        # weight is), every parameter and buffer alike: a later .to(dtype) or
        # .double() converts them all together.
        dtype = torch.get_default_dtype()
        rotation = torch.linalg.qr(torch.randn(c, c, generator=generator, dtype=torch.float64))[0]
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation.to(dtype))
        self.register_buffer("sign_s", torch.sign(diagonal).to(dtype))
        self.register_buffer("lower_mask", torch.tril(torch.ones(c, c, dtype=dtype), -1))
        self.lower = nn.Parameter(torch.tril(lower, -1).to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_s = nn.Parameter(torch.log(torch.abs(diagonal)).to(dtype))

    def extra_repr(self) -> str:
        return f"{self.num_channels}"

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(self.num_channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight(self) -> torch.Tensor:
        """The matrix ``W`` (``num_channels x num_channels``), differentiable in the parameters."""
        lower, upper = self._factors()
        return self.permutation @ lower @ upper

    def inverse_weight(self) -> torch.Tensor:
        """``W^{-1}``, by triangular solves (more accurate than inverting ``W``)."""
        lower, upper = self._factors()
        inv_lower_pt = torch.linalg.solve_triangular(
            lower, self.permutation.T, upper=False, unitriangular=True
        )
        return torch.linalg.solve_triangular(upper, inv_lower_pt, upper=True)

    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` and its log-determinant, of shape ``(batch,)``."""
        _check_input(self, x, self.num_channels)
        return _mix(x, self.weight()), _per_sample(self.log_s.sum() * _spatial_size(x), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``x = W^{-1} y`` at every position."""
        _check_input(self, y, self.num_channels)
        return _mix(y, self.inverse_weight())

    deferred_out = True  # never written (see _FlowBlock)

    def inverse_and_vjp(
        self,
        outputs: Tensors,
        grad_outputs: Tensors,
        params: Tensors,
        *,
        out: Any = None,
        grad_log_det: torch.Tensor | None = None,
        inputs_need_grad: Any = None,
    ) -> FusedResult:
        """Rebuild the input and back-propagate ``grad_outputs`` and ``grad_log_det``.

        ``dL/dx = W^T g`` and ``dL/dW = sum_p g_p x_p^T``, carried to the LU factors
        through the small graph that builds ``W``.
        """
        (y,), (g,) = outputs, grad_outputs
        with torch.enable_grad():
            weight = self.weight()
            log_det = self.log_s.sum() * _spatial_size(y)
        with torch.no_grad():
            x = _mix(y, self.inverse_weight())
            grad_x = _mix(g, weight.detach().T)
            if y.dim() == 2:
                grad_weight = g.T @ x
            else:
                grad_weight = (g.flatten(2) @ x.flatten(2).transpose(1, 2)).sum(0)
        targets, grads = [weight], [grad_weight]
        if grad_log_det is not None:
            targets.append(log_det)
            grads.append(grad_log_det.sum().to(log_det.dtype))
        return (x,), (grad_x,), _param_grads(targets, grads, params)


class _Rearrangement(_FlowBlock):
    """A block that moves elements without changing them (volume preserving, no
    parameters): its inverse rearranges the gradient back the same way."""

    deferred_out = True  # never written (see _FlowBlock)

    def inverse_and_vjp(
        self,
        outputs: Tensors,
        grad_outputs: Tensors,
        params: Tensors,
        *,
        out: Any = None,
        grad_log_det: torch.Tensor | None = None,
        inputs_need_grad: Any = None,
    ) -> FusedResult:
        """Rebuild the input; the gradient is rearranged back by :meth:`inverse` too
        (a permutation's Jacobian is its own inverse transposed), and the constant
        log-determinant has none."""
        (y,), (g,) = outputs, grad_outputs
        return (self.inverse(y),), (self.inverse(g),), [None] * len(params)


class Permutation(_Rearrangement):
    """A fixed permutation of the channels (dimension 1); volume preserving.

    Parameters
    ----------
    permutation : int or sequence of int or torch.Tensor
        The new order of the channels (``y[:, i] = x[:, permutation[i]]``), or a
        number of channels, for a random order drawn from ``generator``.
    generator : torch.Generator, optional
        Draws the random order (the global generator by default).

    Examples
    --------
    >>> import torch
    >>> from invertnet.flows import Permutation
    >>> flip = Permutation.reversed(3)
    >>> flip(torch.tensor([[1.0, 2.0, 3.0]]))
    tensor([[3., 2., 1.]])
    """

    def __init__(
        self,
        permutation: int | Sequence[int] | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(permutation, int) and not isinstance(permutation, bool):
            n = _check_positive_int("Permutation", "the number of channels", permutation)
            perm = torch.randperm(n, generator=generator)
        else:
            perm = torch.as_tensor(permutation)
            if perm.dim() != 1 or perm.dtype.is_floating_point or perm.dtype == torch.bool:
                raise ValueError(
                    f"Permutation: expected an int or a 1-D sequence of ints, got {permutation!r}"
                )
            perm = perm.long()
            if not torch.equal(torch.sort(perm).values, torch.arange(len(perm))):
                raise ValueError(
                    f"Permutation: {perm.tolist()} is not a permutation of 0..{len(perm) - 1}"
                )
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    @classmethod
    def reversed(cls, num_channels: int) -> Permutation:
        """The permutation that reverses the order of ``num_channels`` channels."""
        _check_positive_int("Permutation", "num_channels", num_channels)
        return cls(torch.arange(num_channels - 1, -1, -1))

    def extra_repr(self) -> str:
        return f"{len(self.perm)}"

    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` and its log-determinant, zeros of shape ``(batch,)``."""
        _check_input(self, x, len(self.perm))
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Put the channels back in their original order."""
        _check_input(self, y, len(self.perm))
        return y.index_select(1, self.inverse_perm)


class Squeeze(_Rearrangement):
    """Space to depth: ``(N, C, H, W) -> (N, C f^2, H / f, W / f)``; volume preserving.

    Each ``f x f`` patch of every channel becomes ``f^2`` channels at one position,
    as in RealNVP and Glow, so that couplings that split channels mix space.

    Parameters
    ----------
    factor : int
        The side of the patches; ``H`` and ``W`` must be divisible by it.

    Examples
    --------
    >>> import torch
    >>> from invertnet.flows import Squeeze
    >>> Squeeze()(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 12, 16, 16])
    >>> Squeeze().output_shape((3, 32, 32))
    torch.Size([12, 16, 16])
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = _check_positive_int("Squeeze", "factor", factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def output_shape(self, event_shape: Sequence[int]) -> torch.Size:
        """The shape of one output sample given that of one input sample ``(C, H, W)``."""
        c, h, w = self._check_event(tuple(event_shape))
        f = self.factor
        return torch.Size((c * f * f, h // f, w // f))

    def _check_event(self, event: tuple[int, ...]) -> tuple[int, int, int]:
        f = self.factor
        if len(event) != 3 or event[1] % f or event[2] % f:
            raise ValueError(
                f"Squeeze(factor={f}) takes images (batch, C, H, W) with H and W divisible "
                f"by {f}; got a sample of shape {event}"
            )
        return event  # type: ignore[return-value]

    def _squeeze(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                "Squeeze takes images of shape (batch, C, H, W), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        n, (c, h, w), f = x.shape[0], self._check_event(tuple(x.shape[1:])), self.factor
        x = x.reshape(n, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, c * f * f, h // f, w // f)

    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` and its log-determinant, zeros of shape ``(batch,)``."""
        return self._squeeze(x), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Depth to space: ``(N, C f^2, H, W) -> (N, C, H f, W f)``."""
        f = self.factor
        if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[1] % (f * f):
            raise ValueError(
                f"Squeeze(factor={f}).inverse takes (batch, C * {f * f}, H, W), got "
                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
            )
        n, c, h, w = y.shape
        x = y.reshape(n, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c // (f * f), h * f, w * f)
