"""The coupling engine: one description of a coupling gives its forward, its
inverse and a fused inverse-plus-backward pass.

A coupling splits its input into two parts and applies a short list of
:class:`Step` objects. Each step updates one part (the *target*) with the output
``m`` of a sub-module evaluated on the other part (the *source*), through an
invertible :class:`Combine` rule such as ``a + m`` or ``a * s + t``. Because the
source of every step is unchanged by that step, the step can be undone from its
output, and the same evaluation of the sub-module that undoes it also serves to
back-propagate through it. That is what makes backward cost one extra forward
(the floor of exact recomputation) instead of memcnn's two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from invertnet._grad_mode import without_grad
from invertnet._runtime.rng import call_recorded
from invertnet._torch_private import gradients, held_only_by_caller

__all__ = ["Combine", "Step", "CouplingBase"]

ModuleOutput = torch.Tensor | tuple[torch.Tensor, ...]


class Combine:
    """An invertible rule ``a' = apply(a, m)`` used by a coupling step.

    Subclasses define the rule, its inverse in ``a`` and its vector-Jacobian
    product with respect to ``a`` and ``m``.
    """

    #: Whether :meth:`apply` and :meth:`invert` of finite values are finite, as for a
    #: rule that only adds or subtracts ``m`` (barring a result within rounding of the
    #: dtype's largest value, where the original already was). A rule that divides or
    #: multiplies can turn finite values into NaN or Inf, and is checked: a wrapper's
    #: NaN/Inf check of reconstructions (:func:`invertnet.set_finite_check`) skips
    #: the blocks whose steps all keep values finite, and their sums. Trusted only
    #: from the class that defines both rules, so a subclass overriding either is
    #: checked again unless it says so itself.
    keeps_finite: bool = False

    #: Whether :meth:`vjp` reads ``a``. A rule whose gradients depend on ``m`` and
    #: the incoming gradient alone (``a + m``) says ``False``: the fused backward then
    #: calls ``vjp`` with ``a=None`` and back-propagates through the sub-module before
    #: reconstructing ``a``, so that ``a``'s memory is taken only once the
    #: sub-module's activations are gone, which lowers the peak by one part. Trusted
    #: only from the class that defines :meth:`vjp`.
    vjp_reads_a: bool = True

    def apply(self, a: torch.Tensor, m: ModuleOutput) -> torch.Tensor:
        raise NotImplementedError

    def invert(self, a_new: torch.Tensor, m: ModuleOutput) -> torch.Tensor:
        raise NotImplementedError

    def apply_into(self, a: torch.Tensor, m: ModuleOutput, out: torch.Tensor) -> torch.Tensor:
        """Write :meth:`apply` into ``out`` (of ``a``'s shape and dtype) and return it.

        The engine calls it, when no graph is recorded, to build a coupling's output
        in place instead of concatenating its halves. Override it to compute straight
        into ``out``, rounding exactly as :meth:`apply` does; ``out`` never overlaps
        ``a`` or ``m``.
        """
        return out.copy_(self.apply(a, m))

    def invert_into(self, a_new: torch.Tensor, m: ModuleOutput, out: torch.Tensor) -> torch.Tensor:
        """Write :meth:`invert` into ``out``, as :meth:`apply_into` does for :meth:`apply`."""
        return out.copy_(self.invert(a_new, m))

    def apply_over_m(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """:meth:`apply`, free to write its result over ``m``, and return it.

        The engine calls it, when no graph is recorded, with a one-tensor ``m`` that
        nothing else holds (a sub-module's fresh output, of ``a``'s shape, dtype and
        layout): writing there, where ``m`` was just written and is still in cache,
        beats writing a new tensor (measured on the CPU: 93 against 153 us for a sum of
        two 2 MB halves). Override it to compute in place, rounding exactly as
        :meth:`apply` does; by default it calls :meth:`apply`.
        """
        return self.apply(a, m)

    def invert_over_m(self, a_new: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """:meth:`invert`, free to write its result over ``m``, as :meth:`apply_over_m`
        is for :meth:`apply`."""
        return self.invert(a_new, m)

    def vjp(
        self, a: torch.Tensor, m: ModuleOutput, grad: torch.Tensor
    ) -> tuple[torch.Tensor, ModuleOutput]:
        """Return ``(dL/da, dL/dm)`` given ``dL/da'``."""
        raise NotImplementedError

    def output_shapes(self, m: ModuleOutput) -> list[torch.Size]:
        """Shapes of the tensors in ``m``, each of which must equal the target's."""
        return [m.shape] if isinstance(m, torch.Tensor) else [t.shape for t in m]


@dataclass(frozen=True)
class Step:
    """``parts[target] = combine.apply(parts[target], module(parts[source]))``.

    ``module`` names a sub-module attribute of the coupling, or is ``None`` for the
    identity (the source itself is combined into the target).
    """

    target: int
    source: int
    module: str | None
    combine: Combine


def _detach(m: ModuleOutput) -> ModuleOutput:
    if isinstance(m, torch.Tensor):
        return m.detach()
    return tuple(t.detach() for t in m)


def _as_tuple(m: ModuleOutput) -> tuple[torch.Tensor, ...]:
    return (m,) if isinstance(m, torch.Tensor) else tuple(m)


def _fresh_leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A leaf over ``t``'s memory with a version counter of its own.

    The fused backward writes a reconstructed part into the input's memory while a
    sub-module's graph holds another part of that memory, saved for backward. The
    regions are disjoint, but a ``detach()`` alias would share the whole tensor's
    version counter, and autograd would then refuse the saved part as modified.
    """
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    with without_grad():
        alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return alias.requires_grad_(requires_grad)


@functools.cache
def _defines_together(combine_type: type, rule: str, rule_into: str) -> bool:
    """Whether the class that gives ``combine_type`` its ``rule`` (``apply``) also gives
    it ``rule_into``: a subclass that overrides ``apply`` alone must not inherit a
    parent's ``apply_into``, which computes the parent's rule."""

    def owner(name: str) -> type:
        return next(k for k in combine_type.__mro__ if name in vars(k))

    return owner(rule) is owner(rule_into)


@functools.cache
def _keeps_finite(combine_type: type) -> bool:
    return bool(combine_type.keeps_finite) and all(
        _defines_together(combine_type, rule, "keeps_finite") for rule in ("apply", "invert")
    )


@functools.cache
def _vjp_reads_a(combine_type: type) -> bool:
    return bool(combine_type.vjp_reads_a) or not _defines_together(
        combine_type, "vjp", "vjp_reads_a"
    )


#: What a result may be written into: a tensor, ``None`` (nowhere: a new tensor), or
#: a zero-argument callable that returns the tensor when it is first written.
Buffer = torch.Tensor | Callable[[], torch.Tensor] | None


class _Once:
    """A buffer taken on first use: ``make()`` is called once, when first needed."""

    __slots__ = ("_make", "_value")

    def __init__(self, make: Callable[[], torch.Tensor]) -> None:
        self._make = make
        self._value: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._make()
        return self._value


def _resolve(buffer: Buffer) -> torch.Tensor | None:
    """The tensor of ``buffer``, taking its memory now if it is still to be taken."""
    return buffer() if callable(buffer) else buffer


def _apply_into(combine: Combine, a: torch.Tensor, m: ModuleOutput, out: torch.Tensor):
    if _defines_together(type(combine), "apply", "apply_into"):
        return combine.apply_into(a, m, out)
    return Combine.apply_into(combine, a, m, out)


def _invert_into(combine: Combine, a_new: torch.Tensor, m: ModuleOutput, out: torch.Tensor):
    if _defines_together(type(combine), "invert", "invert_into"):
        return combine.invert_into(a_new, m, out)
    return Combine.invert_into(combine, a_new, m, out)


def _apply_over_m(combine: Combine, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if _defines_together(type(combine), "apply", "apply_over_m"):
        return combine.apply_over_m(a, m)
    return combine.apply(a, m)


def _invert_over_m(combine: Combine, a_new: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if _defines_together(type(combine), "invert", "invert_over_m"):
        return combine.invert_over_m(a_new, m)
    return combine.invert(a_new, m)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out without gaps or overlaps in one of the usual formats,
    so that a result of its shape can be written over it element for element."""
    if t.is_contiguous():
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return layout is not None and t.is_contiguous(memory_format=layout)


def _may_write_over(t: ModuleOutput, like: torch.Tensor, references: int) -> bool:
    """Whether a result of ``like``'s shape and dtype may be written over ``t``: one
    plain tensor of that shape, dtype, device and layout that nothing holds but the
    caller's ``references`` Python references (not a module, a hook, autograd, a
    view: a sub-module's fresh output, or a gradient autograd has just returned,
    which may otherwise be the incoming gradient itself or a view of it)."""
    return (
        isinstance(t, torch.Tensor)
        and t is not like
        and not torch.compiler.is_compiling()
        and t.dtype == like.dtype
        and t.shape == like.shape
        and t.device == like.device
        and _dense(t)
        # And this function's parameter.
        and held_only_by_caller(t, references=references + 1)
    )


def _strided_image_half(part: torch.Tensor) -> bool:
    """Whether ``part`` is a strided half of an image-like tensor (3 dimensions or more).

    A convolution copies such an input at every use (forward, and backward for its
    weight gradient) and takes a slower path in backward (measured on the CPU: a
    third more time in ``convolution_backward``), so sub-modules get a contiguous
    copy. Matrix products take the strided rows of a 2-D half as they are.
    """
    return part.dim() > 2 and not part.is_contiguous()


def _source_leaf(
    part: torch.Tensor, shares_input_memory: bool, requires_grad: bool = True
) -> torch.Tensor:
    """The leaf a sub-module is evaluated on in the fused backward: a contiguous
    copy of a strided image half (:func:`_strided_image_half`), or, over the input's
    memory, a leaf with a version counter of its own (:func:`_fresh_leaf`), which
    the sub-module may save for backward even when it needs no gradient itself."""
    if _strided_image_half(part):
        with without_grad():
            return part.contiguous().requires_grad_(requires_grad)
    if shares_input_memory:
        return _fresh_leaf(part, requires_grad)
    return part.detach().requires_grad_(requires_grad)


def _writes_into(a: torch.Tensor, m: ModuleOutput, out: torch.Tensor | None) -> bool:
    """Whether a combine of ``a`` and ``m`` can be written into ``out`` unchanged: the
    same dtype throughout, so that no promotion is lost."""
    return (
        out is not None
        and a.dtype == out.dtype
        and all(t.dtype == out.dtype and t.shape == out.shape for t in _as_tuple(m))
    )


class CouplingBase(nn.Module):
    """Base class of two-part couplings built from :class:`Step` lists.

    A coupling takes either one tensor, split into two equal halves along
    ``split_dim``, and returns one tensor; or two tensors ``(x1, x2)`` and returns
    two. Subclasses implement :meth:`steps`.

    Parameters
    ----------
    split_dim : int
        Dimension along which a single input tensor is halved.
    """

    def __init__(self, split_dim: int = 1) -> None:
        super().__init__()
        if not isinstance(split_dim, int):
            raise TypeError(
                f"{type(self).__name__}: split_dim must be an int, got {type(split_dim).__name__}"
            )
        self.split_dim = split_dim

    def steps(self) -> Sequence[Step]:
        """The steps of the forward pass, in order."""
        raise NotImplementedError

    def reconstruction_keeps_finite(self) -> bool:
        """Whether the inverse of finite outputs is finite by construction: every
        step's :class:`Combine` keeps finite values finite
        (:attr:`Combine.keeps_finite`), so an
        :class:`~invertnet.InvertibleModuleWrapper` need not check it for NaN/Inf.

        The sub-modules' outputs are finite in backward when they were in forward,
        as a wrapper evaluates them on the same values (and replays the random
        state when asked to); a finite output of ``a + m`` implies a finite ``m``.
        """
        return all(_keeps_finite(type(step.combine)) for step in self.steps())

    # -- splitting -----------------------------------------------------------
    def _split(self, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        name = type(self).__name__
        if len(xs) == 2:
            return list(xs)
        if len(xs) != 1:
            raise ValueError(
                f"{name} takes one tensor (split along split_dim={self.split_dim}) "
                f"or two tensors (x1, x2); got {len(xs)} inputs"
            )
        (x,) = xs
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} expects a tensor input, got {type(x).__name__}")
        if not -x.dim() <= self.split_dim < x.dim():
            raise ValueError(
                f"{name}: split_dim={self.split_dim} is out of range for an input of "
                f"shape {tuple(x.shape)}"
            )
        size = x.shape[self.split_dim]
        if size % 2 != 0:
            raise ValueError(
                f"{name}: the input must have an even size along split_dim={self.split_dim} "
                f"to be halved, got shape {tuple(x.shape)} (size {size})"
            )
        return list(torch.chunk(x, 2, dim=self.split_dim))

    def _merge(self, parts: list[torch.Tensor], n_inputs: int) -> ModuleOutput:
        if n_inputs == 2:
            return tuple(parts)
        return torch.cat(parts, dim=self.split_dim)

    def _out_parts(self, out: Sequence[Buffer] | None, n_inputs: int) -> list[Buffer]:
        """The halves of the buffers a result is to be written into (``None``: none);
        a buffer still to be taken gives halves that take it when first written."""
        if out is None:
            return [None, None]
        if n_inputs == 2:
            return list(out)
        (whole,) = out
        if whole is None:
            return [None, None]
        if not callable(whole):
            return list(torch.chunk(whole, 2, dim=self.split_dim))
        halves = _Once(lambda: torch.chunk(whole(), 2, dim=self.split_dim))
        return [_Once(lambda: halves()[0]), _Once(lambda: halves()[1])]

    def _merge_into(
        self,
        parts: list[torch.Tensor],
        out_parts: list[Buffer],
        out: Sequence[Buffer] | None,
        n_inputs: int,
    ) -> ModuleOutput:
        """Merge ``parts``, into ``out`` where every part was or can be written there;
        a concatenation otherwise (as :meth:`_merge`), which promotes mixed dtypes."""
        if out is None:
            return self._merge(parts, n_inputs)
        if n_inputs == 2:
            merged = []
            for p, buffer in zip(parts, out_parts):
                o = _resolve(buffer)
                merged.append(p if o is None or p is o or p.dtype != o.dtype else o.copy_(p))
            return tuple(merged)
        whole = _resolve(out[0])
        halves = [_resolve(buffer) for buffer in out_parts]
        if whole is None or any(p.dtype != o.dtype for p, o in zip(parts, halves)):
            return self._merge(parts, n_inputs)
        for p, o in zip(parts, halves):
            if p is not o:
                o.copy_(p)
        return whole

    def _output_buffers(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        """Buffers to build the result in, when no graph is recorded (as in a wrapper's
        forward): the halves are then written in place, not concatenated."""
        # Two halves given apart come out apart, as new tensors either way: nothing to
        # save, and each is then allocated after its sub-module ran, in memory just
        # freed. Under torch.compile the compiler fuses the concatenation itself (and
        # Dynamo cannot trace out= into a strided half).
        if len(xs) != 1 or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        return tuple(torch.empty_like(x) for x in xs)

    # -- evaluation ----------------------------------------------------------
    def _evaluate(
        self,
        step: Step,
        source: torch.Tensor,
        target: torch.Tensor,
        kwargs: dict[str, Any] | None = None,
    ) -> ModuleOutput:
        if step.module is None:
            return source
        # A registered sub-module straight from _modules: getattr would go through
        # nn.Module.__getattr__, slow enough to show per block.
        module = self._modules.get(step.module)
        if module is None:
            module = getattr(self, step.module)
        if _strided_image_half(source):
            # A convolution would copy it at every use, and its backward takes a
            # slower path on a strided input: one copy, recorded by autograd if needed.
            source = source.contiguous()
        # The key holds the coupling itself rather than id(self): under torch.compile
        # an id() makes Dynamo specialise on (and recompile for) every instance.
        if kwargs:
            # Context for the sub-module (an attention mask): every call gets it.
            module = functools.partial(module, **kwargs)
        m = call_recorded((self, step.module), module, source)
        shapes = step.combine.output_shapes(m)
        if any(s != target.shape for s in shapes):
            # Plain tuples, as the half's shape is written, not torch.Size([...]).
            got = tuple(shapes[0]) if len(shapes) == 1 else [tuple(s) for s in shapes]
            raise ValueError(
                f"{type(self).__name__}: {step.module} maps a half of shape "
                f"{tuple(source.shape)} to {got}, but its output is combined with a half "
                f"of shape {tuple(target.shape)} (split_dim={self.split_dim}); "
                f"{step.module} must preserve the shape of its input half"
            )
        return m

    def forward(self, *xs: torch.Tensor, **kwargs: Any) -> ModuleOutput:
        parts = self._split(xs)
        steps = self.steps()
        out = self._output_buffers(xs)
        out_parts = self._out_parts(out, len(xs))
        last = _last_writers(tuple(steps), reverse=False)
        for i, step in enumerate(steps):
            t = step.target
            m = self._evaluate(step, parts[step.source], parts[t], kwargs)
            into = _resolve(out_parts[t]) if last[t] == i else None
            if _writes_into(parts[t], m, into):
                parts[t] = _apply_into(step.combine, parts[t], m, into)
            elif (
                into is None
                and step.module is not None
                and not torch.is_grad_enabled()  # nothing recorded may have saved m
                and _may_write_over(m, parts[t], references=1)  # this frame's m
            ):
                parts[t] = _apply_over_m(step.combine, parts[t], m)
            else:
                parts[t] = step.combine.apply(parts[t], m)
        return self._merge_into(parts, out_parts, out, len(xs))

    def inverse(self, *ys: torch.Tensor, **kwargs: Any) -> ModuleOutput:
        parts = self._split(ys)
        steps = self.steps()
        out = self._output_buffers(ys)
        out_parts = self._out_parts(out, len(ys))
        last = _last_writers(tuple(steps), reverse=True)
        for i in reversed(range(len(steps))):
            step, t = steps[i], steps[i].target
            m = self._evaluate(step, parts[step.source], parts[t], kwargs)
            into = _resolve(out_parts[t]) if last[t] == i else None
            if _writes_into(parts[t], m, into):
                parts[t] = _invert_into(step.combine, parts[t], m, into)
            elif (
                into is None
                and step.module is not None
                and not torch.is_grad_enabled()  # nothing recorded may have saved m
                and _may_write_over(m, parts[t], references=1)  # this frame's m
            ):
                parts[t] = _invert_over_m(step.combine, parts[t], m)
            else:
                parts[t] = step.combine.invert(parts[t], m)
        return self._merge_into(parts, out_parts, out, len(ys))

    def inverse_and_vjp(
        self,
        outputs: tuple[torch.Tensor, ...],
        grad_outputs: tuple[torch.Tensor, ...],
        params: tuple[torch.Tensor, ...],
        out: Sequence[Buffer] | None = None,
        grad_log_det: torch.Tensor | None = None,
        inputs_need_grad: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> tuple[
        tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...], list[torch.Tensor | None]
    ]:
        """Reconstruct the inputs and back-propagate through the forward in one pass.

        Each sub-module is evaluated once, with grad, on the very values the forward
        pass gave it; its output both undoes the step and carries the gradient.

        Parameters
        ----------
        outputs : tuple of torch.Tensor
            The forward pass's outputs (detached).
        grad_outputs : tuple of torch.Tensor
            Gradients of the loss with respect to ``outputs``.
        params : tuple of torch.Tensor
            Parameters whose gradients are wanted.
        out : sequence of torch.Tensor, callable or None, optional
            One tensor per input, of its shape and dtype (or ``None``), to write the
            reconstructed inputs into: a wrapper passes the freed inputs' own memory,
            which saves a concatenation and a copy per block. An entry may also be a
            callable without arguments that returns that tensor: it is called once,
            when the input is first written, so that its memory is taken as late as
            possible. Where the dtypes do not allow it, the inputs are returned in
            new tensors instead.
        grad_log_det : torch.Tensor, optional
            Gradient of the loss with respect to the coupling's log-determinant
            (shape ``(batch,)``, see ``forward_and_log_det``), back-propagated in the
            same pass through the steps whose :class:`Combine` defines
            ``log_det_vjp``.
        inputs_need_grad : sequence of bool, optional
            Per input, whether its gradient is wanted (default: every one). A
            sub-module is then not differentiated with respect to a part whose
            gradient serves nothing, such as a first block's input that is the batch
            itself.
        **kwargs
            Context keywords of the forward call (an attention mask, say), passed to
            every sub-module call as :meth:`forward` passed them.

        Returns
        -------
        inputs, grad_inputs, grad_params
            The reconstructed inputs, the gradients with respect to them (``None``
            where not wanted), and one gradient (or ``None`` where unused) per entry
            of ``params``.
        """
        n = len(outputs)
        steps = self.steps()
        if inputs_need_grad is None:
            inputs_need_grad = (True,) * n
        elif len(inputs_need_grad) != n:
            raise ValueError(
                f"{type(self).__name__}.inverse_and_vjp: inputs_need_grad has "
                f"{len(inputs_need_grad)} entries for {n} outputs; give one per input"
            )
        # A single input's two halves need a gradient when the input does.
        part_needs = (
            [bool(inputs_need_grad[0])] * 2 if n == 1 else [bool(f) for f in inputs_need_grad]
        )
        source_needs = _source_gradients_needed(tuple(steps), tuple(part_needs), bool(params))
        if out is not None:  # each buffer to be taken is taken once, however often asked
            out = [_Once(o) if callable(o) else o for o in out]
        # Wrappers pass detached outputs: detach only what still has a graph.
        parts = [p.detach() if p.requires_grad else p for p in self._split(outputs)]
        grads = list(self._split(grad_outputs))
        out_parts = self._out_parts(out, n)
        # A single input's gradient is accumulated straight into the halves of one
        # buffer, not concatenated from them (two inputs get theirs as they are).
        grad_whole = (torch.empty_like(outputs[0]),) if n == 1 and part_needs[0] else None
        grad_buffers = self._out_parts(grad_whole, n)
        last = _last_writers(tuple(steps), reverse=True)
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        for i in reversed(range(len(steps))):
            step = steps[i]
            t, s = step.target, step.source
            into = out_parts[t] if last[t] == i else None
            if step.module is None:
                m: ModuleOutput = parts[s]
                a = self._invert(step, parts[t], m, _resolve(into))
                d_a, d_m = step.combine.vjp(a, m, grads[t])
                if source_needs[i]:
                    d_m = _with_log_det_gradient(step.combine, m, d_m, grad_log_det)
                    grads[s] = _accumulate(grads[s], d_m, grad_buffers[s])
            else:
                source = _source_leaf(
                    parts[s], shares_input_memory=out is not None, requires_grad=source_needs[i]
                )
                with torch.enable_grad():
                    m_graph = self._evaluate(step, source, parts[t], kwargs)
                m = _detach(m_graph)
                # Where the gradients need no `a`, `a` is reconstructed after the
                # sub-module's backward (below), in memory taken after its activations
                # went, rather than held beside them.
                a_later = not _vjp_reads_a(type(step.combine))
                if a_later:
                    d_a, d_m = step.combine.vjp(None, m, grads[t])  # type: ignore[arg-type]
                else:
                    a = self._invert(step, parts[t], m, _resolve(into))
                    d_a, d_m = step.combine.vjp(a, m, grads[t])
                d_m = _with_log_det_gradient(step.combine, m, d_m, grad_log_det)
                outs, d_outs = _as_tuple(m_graph), _as_tuple(d_m)
                needed = [(o, g) for o, g in zip(outs, d_outs) if o.requires_grad]
                if needed:
                    found = gradients(
                        [o for o, _ in needed],
                        (source, *params) if source_needs[i] else params,
                        [g for _, g in needed],
                    )
                    # The source's gradient held by one local alone, so that it may be
                    # accumulated into in place.
                    grad_source, found = (found[0], found[1:]) if source_needs[i] else (None, found)
                    if grad_source is not None:
                        grads[s] = _accumulate(grads[s], grad_source, grad_buffers[s])
                    for k, g in enumerate(found):
                        if g is not None:
                            grad_params[k] = g if grad_params[k] is None else grad_params[k] + g
                if a_later:
                    a = self._invert(step, parts[t], m, _resolve(into))
            parts[t] = a
            grads[t] = d_a
        inputs = _as_tuple(self._merge_into(parts, out_parts, out, n))
        if n == 1:
            grad_inputs: tuple[torch.Tensor | None, ...] = (
                _as_tuple(self._merge_into(grads, grad_buffers, grad_whole, n))
                if part_needs[0]
                else (None,)
            )
        else:
            grad_inputs = tuple(g if need else None for g, need in zip(grads, part_needs))
        return inputs, grad_inputs, grad_params

    def inverse_and_vjp_with_log_det(
        self,
        outputs: tuple[torch.Tensor, ...],
        grad_outputs: tuple[torch.Tensor, ...],
        grad_log_det: torch.Tensor | None,
        params: tuple[torch.Tensor, ...],
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], list[torch.Tensor | None]]:
        """:meth:`inverse_and_vjp` that also back-propagates ``grad_log_det`` (the loss's
        gradient with respect to ``forward_and_log_det``'s log-determinant, or ``None``)
        in the same pass: each sub-module is still evaluated once. A constant
        log-determinant (additive: 0; momentum: ``d log(gamma)``) has no gradient."""
        return self.inverse_and_vjp(outputs, grad_outputs, params, grad_log_det=grad_log_det)

    @staticmethod
    def _invert(
        step: Step, a_new: torch.Tensor, m: ModuleOutput, into: torch.Tensor | None
    ) -> torch.Tensor:
        if _writes_into(a_new, m, into):
            return _invert_into(step.combine, a_new, m, into)
        return step.combine.invert(a_new, m)


def _cached(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` memoised on its arguments where they can be hashed (a coupling
    class's steps are usually one constant tuple, asked about at every block; a
    user's :class:`Combine` that defines ``__eq__`` alone cannot be), computed
    afresh otherwise. Callers must not modify what it returns."""
    memo = functools.lru_cache(maxsize=256)(function)

    @functools.wraps(function)
    def cached(*args: Any, **kwargs: Any) -> Any:
        try:
            return memo(*args, **kwargs)
        except TypeError:  # unhashable arguments
            return function(*args, **kwargs)

    return cached


@_cached
def _last_writers(steps: tuple[Step, ...], reverse: bool) -> dict[int, int]:
    """For each part, the position of the step that writes it last (in the order the
    steps run: reversed for the inverse)."""
    order = list(enumerate(steps))
    if reverse:
        order.reverse()
    return {step.target: i for i, step in order}


@_cached
def _source_gradients_needed(
    steps: tuple[Step, ...], part_needs: tuple[bool, ...], has_params: bool
) -> tuple[bool, ...]:
    """For each step, whether the fused backward needs the gradient with respect to
    its source: whether that part's gradient, from there on, reaches an input whose
    gradient is wanted or a later-run step's sub-module with parameters (which
    needs it as its output's gradient).

    The backward runs the steps last to first; walking them first to last walks it
    from its end, where ``part_needs`` says what is wanted.
    """
    needed = list(part_needs)  # per part: is its gradient needed from here on?
    wanted = []
    for step in steps:
        wanted.append(needed[step.source])
        # Before this step runs, its target's gradient passes on, and feeds the
        # sub-module's backward (for its parameters and its source).
        feeds = wanted[-1] or (step.module is not None and has_params)
        needed[step.target] = needed[step.target] or feeds
    return tuple(wanted)


def _with_log_det_gradient(
    combine: Combine, m: ModuleOutput, d_m: ModuleOutput, grad_log_det: torch.Tensor | None
) -> ModuleOutput:
    """``d_m`` plus the gradient that ``grad_log_det`` sends to ``m`` through the step's
    log-determinant (``combine.log_det_vjp``; ``None`` entries send nothing)."""
    log_det_vjp = getattr(combine, "log_det_vjp", None)
    if grad_log_det is None or log_det_vjp is None:
        return d_m
    summed = tuple(
        d if e is None else d + e
        for d, e in zip(_as_tuple(d_m), _as_tuple(log_det_vjp(m, grad_log_det)))
    )
    return summed[0] if isinstance(d_m, torch.Tensor) else summed


def _accumulate(
    grad: torch.Tensor, extra: torch.Tensor, buffer: torch.Tensor | None
) -> torch.Tensor:
    """``grad + extra``, written into ``buffer`` (``grad`` may already be it) where the
    dtypes agree; without a buffer, over ``extra`` where nothing else holds it (a
    gradient autograd has just returned to the engine, which holds it in one local)."""
    if buffer is None:
        # The engine's local variable and this function's parameter.
        if _may_write_over(extra, grad, references=2):
            return extra.add_(grad)
        return grad + extra
    if not (grad.dtype == extra.dtype == buffer.dtype):
        return grad + extra
    return torch.add(grad, extra, out=buffer)
