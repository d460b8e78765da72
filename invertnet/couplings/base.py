"""The coupling engine: one description of a coupling gives its forward, its
inverse, its log-determinant and a fused inverse-plus-backward pass.

A coupling splits its input into two parts and applies a short list of
:class:`Step` objects. Each step updates one part (the *target*) with the output
``m`` of a sub-module evaluated on the other part (the *source*), through an
invertible :class:`Combine` rule such as ``a + m`` or ``a * s + t``. Because the
source of every step is unchanged by that step, the step can be undone from its
output, and the same evaluation of the sub-module that undoes it also serves to
back-propagate through it. That is what makes backward cost one extra forward
(the floor of exact recomputation) instead of memcnn's two.

The steps of a coupling are planned once (:class:`_Plan`): the order each
direction runs them in, which step writes a part last, which faster form of each
rule may be used. One step-runner (:meth:`CouplingBase._run_steps`) then serves
:meth:`~CouplingBase.forward`, :meth:`~CouplingBase.inverse` and
:meth:`~CouplingBase.forward_and_log_det`, and the fused backward
(:meth:`~CouplingBase.inverse_and_vjp`) walks the inverse's plan.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from invertnet._grad_mode import without_grad
from invertnet._runtime.contract import Buffer, InvertibleBlock, as_tuple, declared_with
from invertnet._runtime.rng import call_recorded
from invertnet._runtime.torch_private import gradients, held_only_by_caller

__all__ = ["Combine", "InPlaceCombine", "Step", "CouplingBase"]

ModuleOutput = torch.Tensor | tuple[torch.Tensor, ...]


class Combine:
    """An invertible rule ``a' = apply(a, m)`` used by a coupling step.

    A rule is four methods: :meth:`apply`, its inverse in ``a`` (:meth:`invert`),
    its vector-Jacobian product with respect to ``a`` and ``m`` (:meth:`vjp`), and,
    for normalizing flows, its log-determinant (:meth:`log_det`, with
    :meth:`log_det_vjp` where it depends on ``m``). Two flags describe it to the
    engine. Faster forms that write in place are optional
    (:class:`InPlaceCombine`).
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
        """``a'``, the target after the step."""
        raise NotImplementedError

    def invert(self, a_new: torch.Tensor, m: ModuleOutput) -> torch.Tensor:
        """``a``, the target before the step, from ``a'`` and the same ``m``."""
        raise NotImplementedError

    def vjp(
        self, a: torch.Tensor, m: ModuleOutput, grad: torch.Tensor
    ) -> tuple[torch.Tensor, ModuleOutput]:
        """Return ``(dL/da, dL/dm)`` given ``dL/da'``."""
        raise NotImplementedError

    def log_det(self, a: torch.Tensor, m: ModuleOutput) -> torch.Tensor | None:
        """The per-sample ``log|det da'/da|``, of shape ``(batch,)`` (``None`` for 0).

        Needed only by ``forward_and_log_det``; a rule that does not define it has no
        known log-determinant, and a coupling of it raises there.
        """
        raise NotImplementedError

    def log_det_vjp(self, m: ModuleOutput, grad_log_det: torch.Tensor) -> ModuleOutput | None:
        """The gradient of ``sum(grad_log_det * log_det(a, m))`` with respect to ``m``
        (``None``, or ``None`` entries, where it does not depend on ``m``, as by
        default)."""
        return None

    def output_shapes(self, m: ModuleOutput) -> list[torch.Size]:
        """Shapes of the tensors in ``m``, each of which must equal the target's."""
        return [m.shape] if isinstance(m, torch.Tensor) else [t.shape for t in m]


class InPlaceCombine(Combine):
    """A :class:`Combine` with forms of its rule that write where the engine says.

    Optional: the engine uses a form only when no graph is recorded, and only from
    the class that defines the rule it stands for (a subclass that overrides
    :meth:`~Combine.apply` alone keeps its own rule, computed out of place). Each
    form must round exactly as the rule does. By default each computes the rule
    and copies it, or returns it.
    """

    def apply_into(self, a: torch.Tensor, m: ModuleOutput, out: torch.Tensor) -> torch.Tensor:
        """Write :meth:`~Combine.apply` into ``out`` (of ``a``'s shape and dtype, never
        overlapping ``a`` or ``m``) and return it: the engine builds a coupling's
        output in place this way instead of concatenating its halves."""
        return out.copy_(self.apply(a, m))

    def invert_into(self, a_new: torch.Tensor, m: ModuleOutput, out: torch.Tensor) -> torch.Tensor:
        """Write :meth:`~Combine.invert` into ``out``, as :meth:`apply_into` does."""
        return out.copy_(self.invert(a_new, m))

    def apply_over_m(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """:meth:`~Combine.apply`, free to write its result over ``m``, and return it.

        The engine calls it with a one-tensor ``m`` that nothing else holds (a
        sub-module's fresh output, of ``a``'s shape, dtype and layout): writing
        there, where ``m`` was just written and is still in cache, beats writing a
        new tensor (measured on the CPU: 93 against 153 us for a sum of two 2 MB
        halves).
        """
        return self.apply(a, m)

    def invert_over_m(self, a_new: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """:meth:`~Combine.invert`, free to write its result over ``m``."""
        return self.invert(a_new, m)


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


# -- the plan ------------------------------------------------------------------


def _copy_into(rule: Callable[..., torch.Tensor], a: torch.Tensor, m: ModuleOutput, out):
    return out.copy_(rule(a, m))


@functools.cache
def _keeps_finite(combine_type: type) -> bool:
    return bool(combine_type.keeps_finite) and all(
        declared_with(combine_type, rule, "keeps_finite") for rule in ("apply", "invert")
    )


@functools.cache
def _vjp_reads_a(combine_type: type) -> bool:
    return bool(combine_type.vjp_reads_a) or not declared_with(combine_type, "vjp", "vjp_reads_a")


@functools.cache
def _form_trusted(combine_type: type, rule: str, form: str) -> bool:
    """Whether the engine may use ``form`` (``apply_into``, say) for ``rule``: an
    :class:`InPlaceCombine` whose ``rule`` and ``form`` come from one class."""
    return issubclass(combine_type, InPlaceCombine) and declared_with(combine_type, rule, form)


def _overrides(combine_type: type, name: str) -> bool:
    return getattr(combine_type, name) is not getattr(Combine, name)


class _Move:
    """One step as one direction runs it, with its rule's forms resolved."""

    __slots__ = (
        "index",
        "target",
        "source",
        "module",
        "combine",
        "rule",
        "into",
        "over_m",
        "last",
        "plain_shapes",
        "vjp_reads_a",
        "log_det_vjp",
    )

    def __init__(self, index: int, step: Step, inverse: bool, last: bool) -> None:
        combine = step.combine
        kind = type(combine)
        rule, into, over_m = (
            ("invert", "invert_into", "invert_over_m")
            if inverse
            else ("apply", "apply_into", "apply_over_m")
        )
        self.index = index
        self.target, self.source, self.module = step.target, step.source, step.module
        self.combine = combine
        self.rule = getattr(combine, rule)
        # The rule written into a buffer; computed and copied where the class that
        # defines the rule gives no form of its own (its parent's computes another).
        self.into = (
            getattr(combine, into)
            if _form_trusted(kind, rule, into)
            else functools.partial(_copy_into, self.rule)
        )
        self.over_m = getattr(combine, over_m) if _form_trusted(kind, rule, over_m) else self.rule
        #: Whether this step writes its target for the last time in this direction.
        self.last = last
        #: Whether the sub-module's output is checked by its shape alone.
        self.plain_shapes = not _overrides(kind, "output_shapes")
        self.vjp_reads_a = _vjp_reads_a(kind)
        self.log_det_vjp = combine.log_det_vjp if _overrides(kind, "log_det_vjp") else None


class _Plan:
    """A coupling's steps, planned once for each direction."""

    __slots__ = ("steps", "forward", "inverse", "keeps_finite", "no_log_det", "_source_needs")

    def __init__(self, steps: tuple[Step, ...]) -> None:
        self.steps = steps
        self.forward = self._moves(steps, inverse=False)
        self.inverse = self._moves(steps, inverse=True)
        self.keeps_finite = all(_keeps_finite(type(step.combine)) for step in steps)
        #: The first rule without a log-determinant (``None``: every rule has one).
        self.no_log_det = None
        for step in steps:  # a loop, not next(): Dynamo in PyTorch 2.4 traces this
            if not _overrides(type(step.combine), "log_det"):
                self.no_log_det = step.combine
                break
        self._source_needs: dict[tuple[tuple[bool, ...], bool], tuple[bool, ...]] = {}

    @staticmethod
    def _moves(steps: tuple[Step, ...], inverse: bool) -> tuple[_Move, ...]:
        order = list(enumerate(steps))
        if inverse:
            order.reverse()
        last = {step.target: i for i, step in order}  # the last writer of each part
        return tuple(_Move(i, step, inverse, last[step.target] == i) for i, step in order)

    def source_needs(self, part_needs: tuple[bool, ...], has_params: bool) -> tuple[bool, ...]:
        """:func:`_source_gradients_needed` for these steps, remembered."""
        key = (part_needs, has_params)
        found = self._source_needs.get(key)
        if found is None:
            found = self._source_needs[key] = _source_gradients_needed(
                self.steps, part_needs, has_params
            )
        return found


@functools.lru_cache(maxsize=256)
def _shared_plan(steps: tuple[Step, ...]) -> _Plan:
    return _Plan(steps)


def _plan_of(steps: Sequence[Step]) -> _Plan:
    """The plan of ``steps``: one shared by every coupling with equal steps (a coupling
    class's steps are usually one constant tuple), made afresh where they cannot be
    hashed (a :class:`Combine` that defines ``__eq__`` alone)."""
    steps = tuple(steps)
    try:
        return _shared_plan(steps)
    except TypeError:
        return _Plan(steps)


# -- buffers and parts ---------------------------------------------------------


def _detach(m: ModuleOutput) -> ModuleOutput:
    if isinstance(m, torch.Tensor):
        return m.detach()
    return tuple(t.detach() for t in m)


def _fresh_leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A leaf over ``t``'s memory with a version counter of its own.

    The fused backward writes a reconstructed part into the input's memory while a
    sub-module's graph holds another part of that memory, saved for backward. The
    regions are disjoint, but a ``detach()`` alias would share the whole tensor's
    version counter, and autograd would then refuse the saved part as modified.
    """
    # new_empty inherits dtype and device: cheaper to call than torch.empty(0, ...).
    alias = (
        t.new_empty(0)
        if type(t) is torch.Tensor
        else torch.empty(0, dtype=t.dtype, device=t.device)
    )
    with without_grad():
        alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return alias.requires_grad_(requires_grad)


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


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out without gaps or overlaps in one of the usual formats,
    so that a result of its shape can be written over it element for element."""
    if t.is_contiguous():
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return layout is not None and t.is_contiguous(memory_format=layout)


#: The least size of a tensor worth writing a result over (see :func:`_may_write_over`):
#: below it a new tensor costs less than finding out whether anything else holds it
#: (a few microseconds of reference counting per step, on blocks whose arithmetic
#: takes as little).
_WRITE_OVER_MIN_BYTES = 32 * 1024


def _may_write_over(t: ModuleOutput, like: torch.Tensor, references: int) -> bool:
    """Whether a result of ``like``'s shape and dtype may be written over ``t``: one
    plain tensor of that shape, dtype, device and layout, of at least
    :data:`_WRITE_OVER_MIN_BYTES`, that nothing holds but the caller's
    ``references`` Python references (not a module, a hook, autograd, a view: a
    sub-module's fresh output, or a gradient autograd has just returned, which may
    otherwise be the incoming gradient itself or a view of it)."""
    return (
        type(t) is torch.Tensor
        and t.nbytes >= _WRITE_OVER_MIN_BYTES
        and t is not like
        and t.dtype == like.dtype
        and t.shape == like.shape
        and _same_device(t, like)
        and not torch.compiler.is_compiling()
        and _dense(t)
        # And this function's parameter.
        and held_only_by_caller(t, references=references + 1)
    )


def _same_device(t: torch.Tensor, like: torch.Tensor) -> bool:
    # Two CPU tensors without making device objects (which cost more, per step,
    # than the rest of _may_write_over's checks).
    return (t.is_cpu and like.is_cpu) or t.device == like.device


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
    if out is None or a.dtype != out.dtype:
        return False
    if type(m) is torch.Tensor:
        return m.dtype == out.dtype and m.shape == out.shape
    return all(t.dtype == out.dtype and t.shape == out.shape for t in as_tuple(m))


class CouplingBase(InvertibleBlock):
    """Base class of two-part couplings built from :class:`Step` lists.

    A coupling takes either one tensor, split into two equal halves along
    ``split_dim``, and returns one tensor; or two tensors ``(x1, x2)`` and returns
    two. Subclasses implement :meth:`steps`; the engine derives :meth:`forward`,
    :meth:`inverse`, :meth:`forward_and_log_det` and the fused backward
    :meth:`inverse_and_vjp` from them (the block contract,
    :mod:`invertnet._runtime.contract`).

    Parameters
    ----------
    split_dim : int
        Dimension along which a single input tensor is halved.
    """

    #: The fused backward takes ``out`` entries to be taken when first written.
    deferred_out = True

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

    def _plan(self) -> _Plan:
        """The plan of :meth:`steps`, kept while ``steps()`` returns the same object."""
        steps = self.steps()
        # Straight from the instance dictionary: nn.Module.__getattr__ is slow enough
        # to show per block, and the plan is no attribute a user sets.
        plan = self.__dict__.get("_step_plan")
        if plan is None or plan.steps is not steps:
            plan = _plan_of(steps)
            # Kept from eager calls only: Dynamo in PyTorch 2.4 cannot write a
            # module's __dict__ while tracing.
            if not torch.compiler.is_compiling():
                self.__dict__["_step_plan"] = plan
        return plan

    def __getstate__(self) -> dict[str, Any]:
        # The plan is derived state: a copy plans its own steps.
        state = super().__getstate__()
        state.pop("_step_plan", None)
        return state

    def reconstruction_keeps_finite(self) -> bool:
        """Whether the inverse of finite outputs is finite by construction: every
        step's :class:`Combine` keeps finite values finite
        (:attr:`Combine.keeps_finite`), so an
        :class:`~invertnet.InvertibleModuleWrapper` need not check it for NaN/Inf.

        The sub-modules' outputs are finite in backward when they were in forward,
        as a wrapper evaluates them on the same values (and replays the random
        state when asked to); a finite output of ``a + m`` implies a finite ``m``.
        """
        return self._plan().keeps_finite

    # -- splitting -----------------------------------------------------------
    def _split(self, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if len(xs) == 2:
            return list(xs)
        name = type(self).__name__
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
        move: _Move,
        source: torch.Tensor,
        target: torch.Tensor,
        kwargs: dict[str, Any] | None = None,
    ) -> ModuleOutput:
        name = move.module
        if name is None:
            return source
        # A registered sub-module straight from _modules: getattr would go through
        # nn.Module.__getattr__, slow enough to show per block.
        module = self._modules.get(name)
        if module is None:
            module = getattr(self, name)
        if _strided_image_half(source):
            # A convolution would copy it at every use, and its backward takes a
            # slower path on a strided input: one copy, recorded by autograd if needed.
            source = source.contiguous()
        if kwargs:
            # Context for the sub-module (an attention mask): every call gets it.
            module = functools.partial(module, **kwargs)
        # The key holds the coupling itself rather than id(self): under torch.compile
        # an id() makes Dynamo specialise on (and recompile for) every instance.
        m = call_recorded((self, name), module, source)
        if move.plain_shapes and type(m) is torch.Tensor:
            if m.shape != target.shape:
                self._refuse_shape(name, source, target, [m.shape])
            return m
        shapes = move.combine.output_shapes(m)
        if any(s != target.shape for s in shapes):
            self._refuse_shape(name, source, target, shapes)
        return m

    def _refuse_shape(
        self, name: str, source: torch.Tensor, target: torch.Tensor, shapes: list[torch.Size]
    ) -> None:
        # Plain tuples, as the half's shape is written, not torch.Size([...]).
        got = tuple(shapes[0]) if len(shapes) == 1 else [tuple(s) for s in shapes]
        raise ValueError(
            f"{type(self).__name__}: {name} maps a half of shape "
            f"{tuple(source.shape)} to {got}, but its output is combined with a half "
            f"of shape {tuple(target.shape)} (split_dim={self.split_dim}); "
            f"{name} must preserve the shape of its input half"
        )

    def _run_steps(
        self,
        xs: tuple[torch.Tensor, ...],
        moves: tuple[_Move, ...],
        kwargs: dict[str, Any] | None,
        log_det: torch.Tensor | None = None,
    ) -> tuple[ModuleOutput, torch.Tensor | None]:
        """Run ``moves`` (a direction of the plan) on ``xs``; with a ``log_det`` to add
        to, also each step's log-determinant.

        Without a graph, each part's last result is written into a buffer that becomes
        the output (one input tensor: its halves, with no concatenation), and other
        results over the sub-module's fresh output where nothing else holds it.
        """
        parts = self._split(xs)
        n = len(xs)
        out = self._output_buffers(xs)
        out_parts = self._out_parts(out, n)
        recording = torch.is_grad_enabled()  # something may save m for backward
        for move in moves:
            t = move.target
            a = parts[t]
            m = self._evaluate(move, parts[move.source], a, kwargs)
            if log_det is not None:
                term = move.combine.log_det(a, m)
                if term is not None:
                    log_det = log_det + term
            into = _resolve(out_parts[t]) if move.last else None
            if _writes_into(a, m, into):
                parts[t] = move.into(a, m, into)
            elif (
                into is None
                and move.module is not None
                and not recording
                and _may_write_over(m, a, references=1)  # this frame's m
            ):
                parts[t] = move.over_m(a, m)
            else:
                parts[t] = move.rule(a, m)
        return self._merge_into(parts, out_parts, out, n), log_det

    def _run_apart(
        self, xs: tuple[torch.Tensor, ...], moves: tuple[_Move, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`_run_steps` for its commonest call, with less Python per step: two
        parts given apart, without a graph, a log-determinant or compilation (a
        wrapper's forward pass, every block of a chain). The results are those of
        :meth:`_run_steps`: two parts given apart have no buffers to be written
        into, so each step's result goes over the sub-module's fresh output where
        nothing else holds it, and into a new tensor otherwise."""
        parts = list(xs)
        for move in moves:
            t = move.target
            a = parts[t]
            m = self._evaluate(move, parts[move.source], a, kwargs)
            if move.module is not None and _may_write_over(m, a, references=1):
                parts[t] = move.over_m(a, m)
            else:
                parts[t] = move.rule(a, m)
        return tuple(parts)

    def _run(
        self, xs: tuple[torch.Tensor, ...], moves: tuple[_Move, ...], kwargs: dict[str, Any]
    ) -> ModuleOutput:
        if len(xs) == 2 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._run_apart(xs, moves, kwargs)
        return self._run_steps(xs, moves, kwargs)[0]

    def forward(self, *xs: torch.Tensor, **kwargs: Any) -> ModuleOutput:
        return self._run(xs, self._plan().forward, kwargs)

    def inverse(self, *ys: torch.Tensor, **kwargs: Any) -> ModuleOutput:
        return self._run(ys, self._plan().inverse, kwargs)

    def forward_and_log_det(self, *xs: torch.Tensor) -> tuple[ModuleOutput, torch.Tensor]:
        """:meth:`forward` and its log-determinant, the sum of its steps'.

        A step's Jacobian is triangular (its source is unchanged), so its
        log-determinant is that of ``da'/da`` alone, which its :class:`Combine`
        gives (:meth:`Combine.log_det`); the sub-module contributes nothing. For
        :class:`~invertnet.AdditiveCoupling` it is 0 (volume preserving), for
        :class:`~invertnet.AffineCoupling` the sum of ``log|scale|`` of both steps,
        for :class:`~invertnet.MomentumCoupling` ``d log(gamma)`` with ``d`` the
        number of velocity elements per sample.

        Returns
        -------
        y, log_det
            The output of :meth:`forward` and ``log|det dy/dx|`` of shape ``(batch,)``.
        """
        plan = self._plan()
        name = type(self).__name__
        if plan.no_log_det is not None:
            raise TypeError(
                f"{name}: its combine rule {type(plan.no_log_det).__name__} defines no "
                "log_det(a, m), so the coupling's log-determinant is unknown; add one "
                "returning the per-sample log|det da'/da| of shape (batch,)"
            )
        first = self._split(xs)[0]
        if first.dim() < 1:
            raise ValueError(f"{name}.forward_and_log_det needs a batch dimension (dimension 0)")
        if self.split_dim % first.dim() == 0:
            raise ValueError(
                f"{name}.forward_and_log_det: split_dim={self.split_dim} halves the batch "
                "dimension (0), so there is no log-determinant per sample; split another "
                "dimension"
            )
        y, log_det = self._run_steps(xs, plan.forward, None, first.new_zeros(first.shape[0]))
        assert log_det is not None
        return y, log_det

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
            (shape ``(batch,)``, see :meth:`forward_and_log_det`), back-propagated in
            the same pass through the steps whose :class:`Combine` defines
            :meth:`~Combine.log_det_vjp`.
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
        plan = self._plan()
        if inputs_need_grad is None:
            part_needs: tuple[bool, ...] = (True, True)
        elif len(inputs_need_grad) != n:
            raise ValueError(
                f"{type(self).__name__}.inverse_and_vjp: inputs_need_grad has "
                f"{len(inputs_need_grad)} entries for {n} outputs; give one per input"
            )
        elif n == 1:
            # A single input's two halves need a gradient when the input does.
            part_needs = (bool(inputs_need_grad[0]),) * 2
        else:
            part_needs = tuple(bool(f) for f in inputs_need_grad)
        source_needs = plan.source_needs(part_needs, bool(params))
        if out is not None:  # each buffer to be taken is taken once, however often asked
            out = [_Once(o) if callable(o) else o for o in out]
        # Wrappers pass detached outputs: detach only what still has a graph.
        parts = [p.detach() if p.requires_grad else p for p in self._split(outputs)]
        grads = self._split(grad_outputs)
        out_parts = self._out_parts(out, n)
        # A single input's gradient is accumulated straight into the halves of one
        # buffer, not concatenated from them (two inputs get theirs as they are).
        grad_whole = (torch.empty_like(outputs[0]),) if n == 1 and part_needs[0] else None
        grad_buffers = self._out_parts(grad_whole, n)
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        # A leaf over a half of the input's memory needs a version counter of its own
        # (_fresh_leaf): the other half, written later, shares the input's. Two
        # inputs given apart are two tensors, each written once, before it is read.
        shares_input_memory = n == 1 and out is not None
        for move in plan.inverse:
            t, s = move.target, move.source
            into = out_parts[t] if move.last else None
            combine = move.combine
            if move.module is None:
                m: ModuleOutput = parts[s]
                a = _invert(move, parts[t], m, _resolve(into))
                d_a, d_m = combine.vjp(a, m, grads[t])
                if source_needs[move.index]:
                    if grad_log_det is not None and move.log_det_vjp is not None:
                        d_m = _with_log_det_gradient(move, m, d_m, grad_log_det)
                    grads[s] = _accumulate(grads[s], d_m, grad_buffers[s])
            else:
                wanted = source_needs[move.index]
                source = _source_leaf(parts[s], shares_input_memory, requires_grad=wanted)
                with torch.enable_grad():
                    m_graph = self._evaluate(move, source, parts[t], kwargs)
                m = _detach(m_graph)
                # Where the gradients need no `a`, `a` is reconstructed after the
                # sub-module's backward (below), in memory taken after its activations
                # went, rather than held beside them.
                if move.vjp_reads_a:
                    a = _invert(move, parts[t], m, _resolve(into))
                    d_a, d_m = combine.vjp(a, m, grads[t])
                else:
                    d_a, d_m = combine.vjp(None, m, grads[t])  # type: ignore[arg-type]
                if grad_log_det is not None and move.log_det_vjp is not None:
                    d_m = _with_log_det_gradient(move, m, d_m, grad_log_det)
                if type(m_graph) is torch.Tensor:
                    needed = [(m_graph, d_m)] if m_graph.requires_grad else []
                else:
                    needed = [
                        (o, g) for o, g in zip(as_tuple(m_graph), as_tuple(d_m)) if o.requires_grad
                    ]
                if needed:
                    found = gradients(
                        [o for o, _ in needed],
                        (source, *params) if wanted else params,
                        [g for _, g in needed],
                    )
                    # The source's gradient held by one local alone, so that it may be
                    # accumulated into in place.
                    grad_source, found = (found[0], found[1:]) if wanted else (None, found)
                    if grad_source is not None:
                        grads[s] = _accumulate(grads[s], grad_source, grad_buffers[s])
                    for k, g in enumerate(found):
                        if g is not None:
                            grad_params[k] = g if grad_params[k] is None else grad_params[k] + g
                if not move.vjp_reads_a:
                    a = _invert(move, parts[t], m, _resolve(into))
            parts[t] = a
            grads[t] = d_a
        inputs = as_tuple(self._merge_into(parts, out_parts, out, n))
        if n == 1:
            grad_inputs: tuple[torch.Tensor | None, ...] = (
                as_tuple(self._merge_into(grads, grad_buffers, grad_whole, n))
                if part_needs[0]
                else (None,)
            )
        else:
            grad_inputs = tuple(g if need else None for g, need in zip(grads, part_needs))
        return inputs, grad_inputs, grad_params


def _invert(
    move: _Move, a_new: torch.Tensor, m: ModuleOutput, into: torch.Tensor | None
) -> torch.Tensor:
    if _writes_into(a_new, m, into):
        return move.into(a_new, m, into)
    return move.rule(a_new, m)


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
    move: _Move, m: ModuleOutput, d_m: ModuleOutput, grad_log_det: torch.Tensor
) -> ModuleOutput:
    """``d_m`` plus the gradient that ``grad_log_det`` sends to ``m`` through the step's
    log-determinant (:meth:`Combine.log_det_vjp`; ``None`` entries send nothing)."""
    assert move.log_det_vjp is not None
    extra = move.log_det_vjp(m, grad_log_det)
    if extra is None:
        return d_m
    summed = tuple(d if e is None else d + e for d, e in zip(as_tuple(d_m), as_tuple(extra)))
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
