"""A reversible stack that carries the two halves of its input from block to block.

A coupling given one tensor halves it and concatenates its two results in every
block: strided half views that each convolution copies, and a concatenation per
block. :class:`ReversibleSequential` splits its input once, passes the two
*streams* through every block as two tensors, and merges them once at the end, as
RevLib's ``ReversibleSequential`` and the reversible Transformers (RevViT, Reformer)
do. Each reversible block runs under an
:class:`~invertnet.InvertibleModuleWrapper`, so the stack keeps activation memory
for about one block whatever its depth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from invertnet._block_chain import ReversibleSequentialChain, chainable
from invertnet._runtime.forward_state import same_objects, submodules_and_trainable_parameters
from invertnet._runtime.torch_private import module_hooks
from invertnet.couplings import AdditiveCoupling
from invertnet.wrappers import InvertibleModuleWrapper, allow_free
from invertnet.wrappers.debug import current_settings

__all__ = ["ReversibleSequential"]

Block = nn.Module | tuple[nn.Module, nn.Module]


def _is_reversible(layer: nn.Module) -> bool:
    return isinstance(layer, InvertibleModuleWrapper)


def _frees(wrapper: InvertibleModuleWrapper, inverse: bool) -> bool:
    """Whether ``wrapper`` frees its inputs in this call (then the stack hands it
    copies of its own rather than views of a tensor someone else may hold)."""
    keep = wrapper.keep_input_inverse if inverse else wrapper.keep_input
    return wrapper.training and not wrapper.disable and not keep and torch.is_grad_enabled()


def _chains_now() -> bool:
    """Whether a call now may run runs of blocks as chains: it records for backward
    (grad on, not in inference mode), eagerly, and outside debug mode, whose checks
    are per block."""
    return (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.is_inference_mode_enabled()
        and current_settings() is None
    )


def _settings(layer: nn.Module) -> tuple[bool, int] | None:
    """The settings a wrapper the stack made runs a chain with (its
    ``preserve_rng_state`` and ``num_bwd_passes``), or ``None`` where it must run on
    its own: it does not free its input now, or something watches it or its module
    call by call (hooks, global ones too), or its module is not :func:`chainable`."""
    if not _frees(layer, inverse=False):
        return None
    fn = layer._modules["_fn"]
    if module_hooks(layer) is not None or module_hooks(fn) is not None or not chainable(fn):
        return None
    return layer.preserve_rng_state, layer.num_bwd_passes


#: The least budget, in bytes, of parameter gradients a chain may hold (see
#: ``ReversibleSequential._runs``): small blocks chain whatever their activations.
_MIN_CHAIN_GRADIENT_BYTES = 64 * 1024
#: Up to this many bytes, a chain may hold a whole input's worth of parameter
#: gradients rather than half (see :func:`_chain_gradient_budget`).
_SMALL_INPUT_BYTES = 1024 * 1024


def _chain_gradient_budget(input_bytes: int) -> int:
    """The bytes of parameter gradients a chain may hold, for a stack input of
    ``input_bytes``.

    Half the input, less than one block's recomputation holds in activations, so
    that memory stays flat in depth; but a whole input's worth up to 1 MiB. The
    chain lets go of its output (an input's worth) once its last block has run its
    backward, before it holds most of its gradients, so its peak stays where it
    was with its output held and half the budget. With small inputs, a chain's own
    work (its record, freeing and rebuilding its input) weighs more against its
    blocks': chains of 14 blocks rather than 7 took invertnet from 1.05x and 1.10x
    RevLib's step time to 0.97x and 0.99x on the benchmark's ``additive-conv``
    (``tools/chain_tradeoff.py``), at a peak memory within 0.1 MB.
    """
    whole = min(input_bytes, _SMALL_INPUT_BYTES)
    return max(input_bytes // 2, whole, _MIN_CHAIN_GRADIENT_BYTES)


_Walk = tuple[list[nn.Module], tuple[nn.Parameter, ...]]


def _cut(
    layers: list[nn.Module],
    start: int,
    stop: int,
    budget: int,
    walks: dict[int, _Walk] | None = None,
) -> list[tuple[int, int]]:
    """``layers[start:stop]`` (wrappers) cut into chains of two or more blocks: a
    chain ends before a block that shares a module with it (each block's
    recomputation then needs its own record of what that module held) and before
    the gradients of its trainable parameters would exceed ``budget`` bytes,
    except that the last block joins the chain before it rather than run alone
    (one block's gradients over the budget cost less than a wrapper call of its
    own: a stack of 8 blocks is one chain, not 7 and 1)."""
    spans = []
    first, seen, held = start, set(), 0
    closed: set[int] | None = None  # the modules of a chain just closed for its budget
    own: set[int] = set()
    for index in range(start, stop):
        modules, params = submodules_and_trainable_parameters(layers[index]._modules["_fn"])
        if walks is not None:  # kept for the chain's wrapper, which then walks none
            walks[index] = (modules, params)
        own = {id(m) for m in modules}
        size = sum(p.nbytes for p in params)
        shares = not seen.isdisjoint(own)
        if shares or (index > first and held + size > budget):
            if index - first >= 2:
                spans.append((first, index))
            closed = seen if index - first >= 2 and not shares else None
            first, seen, held = index, set(), 0
        seen |= own
        held += size
    if stop - first >= 2:
        spans.append((first, stop))
    elif stop - first == 1 and closed is not None and closed.isdisjoint(own):
        spans[-1] = (spans[-1][0], stop)
    return spans


def _owned_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` that a wrapper may free: a copy rather than a view, so that
    nobody else holds its memory (``contiguous()`` would return a half that is
    already contiguous, as a batch of one's channel halves are, as a view), and
    marked, since without a ``grad_fn`` a wrapper would take it for the caller's
    data and only hide it."""
    return allow_free(x.clone(memory_format=torch.contiguous_format))


class ReversibleSequential(nn.Module):
    """Run reversible blocks on two streams, split once and merged once.

    Parameters
    ----------
    *blocks : torch.nn.Module or tuple of two torch.nn.Module
        In order, each one of:

        * an invertible two-stream module, mapping ``(x1, x2)`` to ``(y1, y2)``
          and back with ``inverse``: an :class:`~invertnet.AdditiveCoupling`,
          :class:`~invertnet.AffineCoupling` or
          :class:`~invertnet.MomentumCoupling` (given two tensors, a coupling
          takes them as its two parts), a reversible Transformer block, or your
          own. The stack wraps it in an :class:`~invertnet.InvertibleModuleWrapper`
          with its settings below;
        * a pair ``(F, G)`` of modules mapping a stream to a stream of the same
          shape, as RevLib takes them: the additive coupling
          ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``;
        * an :class:`~invertnet.InvertibleModuleWrapper` of a two-stream module,
          used as it is, with its own settings;
        * any other module: a *non-invertible layer* (a strided convolution or
          pooling that changes the shape, as between the stages of a RevNet). It
          runs on the merged streams under plain autograd, which keeps its input
          for backward, and its output is split again. Each one costs the memory
          of its input; wrap it in :func:`torch.utils.checkpoint.checkpoint`
          yourself to keep only that input and not its activations.
    split_dim : int
        The dimension along which the input is halved into the two streams and
        along which they are merged: 1 for channels of ``(N, C, H, W)``, ``-1``
        for the features of tokens ``(N, L, D)``.
    keep_input : bool
        Keep each block's input instead of freeing it (as the wrapper's
        ``keep_input``): no memory saving, the recomputation runs forward from
        the kept input.
    preserve_rng_state : bool
        Replay the random state of each block's forward pass in backward, so that
        dropout is reproduced exactly (the default).
    disable : bool
        Run every block with plain autograd (no memory saving).

    Notes
    -----
    ``keep_input``, ``preserve_rng_state`` and ``disable`` may be changed on the
    stack at any time; they apply to the wrappers the stack made, not to
    wrappers passed in. Keyword arguments of :meth:`forward` (an attention mask)
    go to every reversible block, are recorded with each block's call and are
    given again to its recomputation; they do not reach non-invertible layers.

    The stack's input is not freed: its halves are copied into the streams (one
    tensor's memory, for the whole stack), and the copies are freed. The stack's
    output is kept, as it must be, to reconstruct the last block's input.

    In training, consecutive blocks the stack wrapped run as one chain under one
    wrapper call, where nothing needs a check between two of them: the
    activations in between belong to the stack alone, so only the chain's input
    is freed and its output kept, and the record of what the forward pass ran
    under (random states, flags, parameters, buffers) is kept once for the chain.
    A block runs on its own, with its own wrapper, where hooks are registered on
    it or its module (or globally), where its settings differ from its
    neighbours' (``keep_input``, ``disable``, ``training``), where its module
    shares a sub-module with another block, or may reconstruct non-finite values
    (the wrapper checks those, an affine coupling say); the last block and all of
    them in debug mode (:func:`~invertnet.debug_reconstruction`) and under
    :func:`torch.compile` too. Gradients, the caller's tensors and every error are
    the same either way.

    Examples
    --------
    >>> import torch
    >>> from invertnet import AdditiveCoupling, ReversibleSequential
    >>> stack = ReversibleSequential(
    ...     *(AdditiveCoupling(torch.nn.Linear(4, 4)) for _ in range(3)),
    ...     (torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)),  # RevLib's (F, G)
    ... )
    >>> x = torch.randn(2, 8, requires_grad=True)
    >>> y = stack(x)
    >>> y.sum().backward()
    >>> torch.allclose(stack.inverse(y.detach()), x.detach(), atol=1e-5)
    True
    """

    def __init__(
        self,
        *blocks: Block,
        split_dim: int = 1,
        keep_input: bool = False,
        preserve_rng_state: bool = True,
        disable: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(split_dim, bool) or not isinstance(split_dim, int):
            raise TypeError(f"split_dim must be an int, got {split_dim!r}")
        self.split_dim = split_dim
        layers: list[nn.Module] = []
        owned: list[bool] = []
        for index, block in enumerate(blocks):
            layer, made = self._layer(index, block, keep_input, preserve_rng_state, disable)
            layers.append(layer)
            owned.append(made)
        self.layers = nn.ModuleList(layers)
        # The wrappers the stack made, whose settings follow the stack's (by
        # identity: a layer may be replaced after construction).
        self._made = tuple(layer for layer, made in zip(layers, owned) if made)
        self._keep_input = keep_input
        self._preserve_rng_state = preserve_rng_state
        self._disable = disable

    @staticmethod
    def _layer(
        index: int, block: Any, keep_input: bool, preserve_rng_state: bool, disable: bool
    ) -> tuple[nn.Module, bool]:
        if isinstance(block, InvertibleModuleWrapper):
            return block, False
        if isinstance(block, (tuple, list)):
            if len(block) != 2 or not all(isinstance(m, nn.Module) for m in block):
                raise TypeError(
                    f"ReversibleSequential: block {index} is a {type(block).__name__} of "
                    f"{len(block)} items; a pair must be two modules (F, G), each mapping a "
                    "stream to a stream of the same shape"
                )
            block = AdditiveCoupling(block[0], block[1])
        elif not isinstance(block, nn.Module):
            raise TypeError(
                f"ReversibleSequential: block {index} is a {type(block).__name__}; expected "
                "an nn.Module (an invertible two-stream module, or a non-invertible layer) "
                "or a pair (F, G) of modules"
            )
        if not callable(getattr(block, "inverse", None)):
            return block, False  # a non-invertible layer, run on the merged streams
        wrapper = InvertibleModuleWrapper(
            block,
            keep_input=keep_input,
            disable=disable,
            preserve_rng_state=preserve_rng_state,
        )
        return wrapper, True

    def _set_owned(self, name: str, value: bool) -> None:
        for wrapper in self._made:
            setattr(wrapper, name, value)

    @property
    def keep_input(self) -> bool:
        """Whether the wrappers the stack made keep their inputs."""
        return self._keep_input

    @keep_input.setter
    def keep_input(self, value: bool) -> None:
        self._set_owned("keep_input", value)
        self._keep_input = value

    @property
    def preserve_rng_state(self) -> bool:
        """Whether the wrappers the stack made replay the random state."""
        return self._preserve_rng_state

    @preserve_rng_state.setter
    def preserve_rng_state(self, value: bool) -> None:
        self._set_owned("preserve_rng_state", value)
        self._preserve_rng_state = value

    @property
    def disable(self) -> bool:
        """Whether the wrappers the stack made run with plain autograd."""
        return self._disable

    @disable.setter
    def disable(self, value: bool) -> None:
        self._set_owned("disable", value)
        self._disable = value

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    def __getitem__(self, index: int) -> nn.Module:
        return self.layers[index]

    def _split(
        self, x: torch.Tensor, nxt: nn.Module | None, inverse: bool = False, copy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Halve ``x`` into the two streams for the layer ``nxt`` (copies that it may
        free where it frees its inputs, or where ``copy``)."""
        size = x.shape[self.split_dim]
        if size % 2:
            raise ValueError(
                f"ReversibleSequential: dimension {self.split_dim} of the input has size "
                f"{size}; it must be even to split into two streams (set split_dim to the "
                "channel or feature dimension)"
            )
        x1, x2 = torch.chunk(x, 2, dim=self.split_dim)
        if not (copy or isinstance(nxt, InvertibleModuleWrapper) and _frees(nxt, inverse)):
            return x1, x2
        return _owned_copy(x1), _owned_copy(x2)

    def _chain_inputs(
        self, merged: torch.Tensor | None, streams: tuple[torch.Tensor, ...] | None, own: bool
    ) -> tuple[tuple[torch.Tensor, ...], bool]:
        """The activations as two streams for a chain, and whether its wrapper keeps
        them rather than free them.

        Streams a block of the stack returned (``own``) are the stack's, freed by
        the chain. Data that needs no gradient (the caller's batch) is held by the
        caller anyway: the chain keeps it, halves as views, and rebuilds nothing
        from it. Other activations (the caller's, a non-invertible layer's) are
        copied and the copies freed: kept, they would hold their memory until
        backward.
        """
        if merged is not None:
            if not merged.requires_grad:
                return self._split(merged, None), True
            return self._split(merged, None, copy=True), False
        assert streams is not None
        if own:
            return streams, False
        if not any(s.requires_grad for s in streams):
            return streams, True
        return tuple(_owned_copy(s) for s in streams), False

    def _runs(
        self, layers: list[nn.Module], merged_output: bool, budget: int
    ) -> dict[int, tuple[int, InvertibleModuleWrapper]]:
        """The chains of two or more blocks this call runs: by the first block's
        position, the position after the chain and the chain's wrapper.

        A chain is made of consecutive wrappers the stack made whose
        :func:`_settings` agree, without the stack's last layer unless the stack
        merges its output (a stream it returns may get no gradient, which a block
        takes on its own: a chain's wrapper would recompute every block with a
        graph). It is cut before a block that shares a module with it, and where
        the gradients of its parameters would exceed ``budget`` bytes: a chain's
        backward returns them all at its end, where separate blocks each return
        theirs at once, so a chain holds them meanwhile.

        A block may run in one chain in a call awaiting backward and in another
        chain, or alone, in the next (another batch size): every wrapper call makes
        the records of its modules awaiting backward keep their buffer values
        first (:func:`~invertnet._runtime.forward_state.keep_awaiting_buffer_values`).
        """
        candidates = layers if merged_output else layers[:-1]
        made = {id(wrapper) for wrapper in self._made}
        settings = [_settings(layer) if id(layer) in made else None for layer in candidates]
        spans: list[tuple[int, int]] = []
        walks: dict[int, _Walk] = {}
        start = 0
        while start < len(settings):
            stop = start + 1
            if settings[start] is not None:
                while stop < len(settings) and settings[stop] == settings[start]:
                    stop += 1
                spans.extend(_cut(layers, start, stop, budget, walks))
            start = stop
        chains = self.__dict__.setdefault("_chains", {})
        runs = {
            start: (stop, self._chain(chains, layers, start, stop, settings[start]))
            for start, stop in spans
        }
        for start, (stop, wrapper) in runs.items():
            # The blocks were walked just now: the chain hands that walk to its
            # wrapper, which then walks none (the cut kept the blocks disjoint).
            wrapper.module.hand_walk([walks[index] for index in range(start, stop)])
        # Chains of other calls (another batch size cuts others) are dropped once
        # their backward has run.
        for key in [key for key in chains if key not in spans]:
            last = chains[key]._last_state
            if last is None or not last.awaiting_backward:
                del chains[key]
        return runs

    @staticmethod
    def _chain(
        chains: dict[tuple[int, int], InvertibleModuleWrapper],
        layers: list[nn.Module],
        start: int,
        stop: int,
        settings: tuple[bool, int] | None,
    ) -> InvertibleModuleWrapper:
        """The wrapper of the chain of ``layers[start:stop]``: made once, kept in
        ``chains`` while the stack holds the same modules there."""
        assert settings is not None
        blocks = [layer._modules["_fn"] for layer in layers[start:stop]]
        cached = chains.get((start, stop))
        if cached is None or not same_objects(cached.module.blocks, blocks):
            named = {str(start + k): block for k, block in enumerate(blocks)}
            chain = ReversibleSequentialChain(named)
            cached = chains[(start, stop)] = InvertibleModuleWrapper(chain)
        cached.preserve_rng_state, cached.num_bwd_passes = settings
        return cached

    def __getstate__(self) -> dict[str, Any]:
        # The chains are remade on the next call (they hold records of calls
        # awaiting backward, which do not pickle).
        state = dict(super().__getstate__())
        state.pop("_chains", None)
        return state

    def _merge(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return torch.cat((x1, x2), dim=self.split_dim)

    def forward(self, *xs: torch.Tensor, **kwargs: Any) -> Any:
        """Run the blocks in order.

        Parameters
        ----------
        *xs : torch.Tensor
            One tensor, halved along ``split_dim`` into the two streams; or the two
            streams themselves.
        **kwargs
            Passed to every reversible block (for example an attention mask).

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            The merged streams given one tensor, the two streams given two.
        """
        if len(xs) not in (1, 2):
            raise TypeError(
                f"ReversibleSequential.forward takes one tensor (halved along split_dim) or "
                f"the two streams, got {len(xs)} positional arguments"
            )
        # The activations are either merged (one tensor) or two streams; each is
        # converted only where the next layer needs the other form, so that a
        # non-invertible layer first (a RevNet stage's strided unit) runs on the
        # input as it is, without a split and a concatenation.
        merged: torch.Tensor | None = xs[0] if len(xs) == 1 else None
        streams: tuple[torch.Tensor, torch.Tensor] | None = None if merged is not None else xs
        own = False  # whether the streams are a block's outputs, the stack's own
        layers = list(self.layers)
        runs = {}
        if _chains_now():
            budget = _chain_gradient_budget(sum(x.nbytes for x in xs))
            runs = self._runs(layers, len(xs) == 1, budget)
        index = 0
        while index < len(layers):
            layer = layers[index]
            run = runs.get(index)
            if run is not None:
                # A chain frees its input: the stack hands it tensors of its own.
                index, layer = run
                inputs, layer.keep_input = self._chain_inputs(merged, streams, own)
                streams = layer(*inputs, **kwargs)
                merged, own = None, True
                continue
            index += 1
            if _is_reversible(layer):
                if streams is None:
                    assert merged is not None
                    streams = self._split(merged, layer)
                streams = layer(*streams, **kwargs)
                merged, own = None, True
            else:
                if merged is None:
                    assert streams is not None
                    merged = self._merge(*streams)
                merged = layer(merged)
                streams = None
        if len(xs) == 1:
            return merged if merged is not None else self._merge(*streams)
        return streams if streams is not None else self._split(merged, None)

    def inverse(self, *ys: torch.Tensor, **kwargs: Any) -> Any:
        """Run the blocks' inverses in reverse order.

        Parameters
        ----------
        *ys : torch.Tensor
            The merged streams, or the two streams.
        **kwargs
            Passed to every reversible block's inverse.

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            The reconstructed input, in the form of ``ys``.

        Raises
        ------
        TypeError
            If the stack holds a non-invertible layer.
        """
        for index, layer in enumerate(self.layers):
            if not _is_reversible(layer):
                raise TypeError(
                    f"ReversibleSequential.inverse: layer {index} "
                    f"({type(layer).__name__}) is not invertible; a stack with "
                    "non-invertible layers has no inverse"
                )
        if len(ys) == 1:
            y1, y2 = self._split(ys[0], self.layers[-1] if len(self.layers) else None, inverse=True)
        elif len(ys) == 2:
            y1, y2 = ys
        else:
            raise TypeError(
                f"ReversibleSequential.inverse takes one tensor or the two streams, got "
                f"{len(ys)} positional arguments"
            )
        for layer in reversed(self.layers):
            y1, y2 = layer.inverse(y1, y2, **kwargs)
        return self._merge(y1, y2) if len(ys) == 1 else (y1, y2)
