"""ReversibleSequential's chain path (consecutive blocks under one wrapper call).

In training, consecutive blocks the stack wrapped run as one
:class:`~invertnet._block_chain.ReversibleSequentialChain` under one wrapper call. These tests run
the usage patterns of ``tests/test_trust.py`` on a stack and assert, in float64,
either plain autograd's result (the same stack deep-copied with ``disable=True``:
outputs and gradients to rel 1e-10, ``.grad is None`` exactly where plain autograd
leaves it ``None``, the caller's tensors bit-identical afterwards) or the same kind
of clear error. Where it helps they also compare bit for bit against the per-block
path (every block under its own wrapper), forced by a no-op global forward hook.

A spy on ``ReversibleSequentialChain.forward`` (the ``chains`` fixture) records the stack positions
of the blocks of every chain run, so that each test asserts the chain path was
taken where it should be, and not taken in the fallback cases (hooks, shared
modules, affine couplings, debug mode, ``keep_input=True``, eval mode).
"""

from __future__ import annotations

import copy
import pickle
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

import invertnet
from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    InvertibleModuleWrapper,
    ReversibleSequential,
)
from invertnet._block_chain import ReversibleSequentialChain
from invertnet.models.transformer import ReversibleTransformerBlock
from invertnet.reversible_sequential import _chain_gradient_budget
from tests._core_helpers import activation_bytes
from tests._trust_helpers import (
    ATOL,
    F64,
    HOW,
    RTOL,
    H,
    N,
    assert_same,
    caller_input,
    data,
    detached,
    grads,
    loss_of,
    net,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTH = 4
WHOLE = [tuple(range(DEPTH))]  # one chain of every block (one merged output)
ALL_BUT_LAST = [tuple(range(DEPTH - 1))]  # two streams returned: the last runs alone


# -- helpers ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def chains(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The stack positions of the blocks of each chain run, one entry per call of
    ``ReversibleSequentialChain.forward`` (a chain's forward pass; its fused backward does not call
    it, so a recomputation in backward would show up as an extra entry)."""
    calls: list[tuple[int, ...]] = []
    original = ReversibleSequentialChain.forward

    def spy(self: ReversibleSequentialChain, *xs: torch.Tensor, **kwargs: Any) -> Any:
        calls.append(tuple(int(name) for name, _ in self.named_children()))
        return original(self, *xs, **kwargs)

    monkeypatch.setattr(ReversibleSequentialChain, "forward", spy)
    return calls


@contextmanager
def per_block() -> Iterator[None]:
    """Every block under its own wrapper: a global module hook (even a no-op one)
    makes the stack run each block on its own."""
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        yield
    finally:
        handle.remove()


def couplings(depth: int = DEPTH, *middle: nn.Module, form: str = "coupling") -> list[Any]:
    """``depth`` blocks, each F and G with its own copy of ``middle``: additive
    couplings, or RevLib's ``(F, G)`` pairs (``form="pair"``)."""
    blocks: list[Any] = []
    for _ in range(depth):
        fm = net(*copy.deepcopy(middle))
        gm = net(*copy.deepcopy(middle))
        blocks.append(AdditiveCoupling(fm, gm) if form == "coupling" else (fm, gm))
    return blocks


def affine(fm: nn.Module | None = None, gm: nn.Module | None = None) -> AffineCoupling:
    return AffineCoupling(
        net() if fm is None else fm, net() if gm is None else gm, adapter=AffineAdapterNaive
    )


def stack_of(*blocks: Any, **kwargs: Any) -> ReversibleSequential:
    return ReversibleSequential(*blocks, **kwargs).double()


def plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose stacks run plain autograd."""
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if isinstance(m, ReversibleSequential):
            m.disable = True
    return copied


def buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in module.buffers()]


def assert_identical(got: list[Any], want: list[Any]) -> None:
    """Bit for bit, and ``None`` in the same places."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"entry {i}: {g is None=} but {w is None=}"
        if g is not None:
            assert g.dtype == w.dtype and torch.equal(g, w), f"entry {i} differs: {g} vs {w}"


def step(
    model: nn.Module,
    how: str = "activation",
    seed: int = 7,
    between: Callable[[], None] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """One forward and backward pass (the dropout masks drawn after
    ``manual_seed(seed)``); returns the outputs, the input's gradient and the
    parameters' gradients, after checking that the caller's leaf is unchanged."""
    model.zero_grad(set_to_none=True)
    x, inp, before = caller_input(how)
    torch.manual_seed(seed)
    y = model(inp, **kwargs)
    if between is not None:
        between()
    loss_of(y).backward()
    assert x.shape == before.shape and torch.equal(x.detach(), before)
    return [*detached(y), x.grad, *grads(model)]


def three_ways(
    model: nn.Module, chains: list[tuple[int, ...]], run: Callable[[nn.Module], Any]
) -> tuple[Any, Any, Any, list[tuple[int, ...]]]:
    """``run`` on the chain path, on plain autograd and on the per-block path (each
    on its own copy of ``model``, made before any runs); returns the three results
    and the chains the chain path ran."""
    reference, per_block_copy = plain(model), copy.deepcopy(model)
    got = run(model)
    ran = list(chains)
    want = run(reference)
    with per_block():
        blockwise = run(per_block_copy)
    assert len(chains) == len(ran), "plain autograd or the per-block path ran a chain"
    return got, want, blockwise, ran


# -- 1. dropout with default arguments ------------------------------------------------


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("form", ["coupling", "pair"])
def test_dropout_with_default_arguments_matches_plain(chains, form: str, how: str):
    """Dropout in F and G: the chain's gradients equal plain autograd's, and are bit
    for bit those of the per-block path."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5), form=form))
    got, want, blockwise, ran = three_ways(model, chains, lambda m: step(m, how))
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got, blockwise)
    assert all(g is not None for g in got[2 if how == "batch" else 1 :])
    # Guards the comparison: other dropout masks give other gradients.
    other = step(plain(model), how, seed=8)
    assert not torch.allclose(other[-1], want[-1])


# -- 2. BatchNorm ------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_batchnorm_running_stats_are_updated_once(chains, how: str):
    """BatchNorm in F and G: gradients equal plain autograd's, and the running
    statistics after one step are plain autograd's (updated by the forward pass only,
    not again by a recomputation)."""

    def run(m: nn.Module) -> tuple[list[Any], list[torch.Tensor]]:
        return step(m, how), buffers(m)

    model = stack_of(*couplings(DEPTH, nn.BatchNorm1d(H)))
    (got, got_stats), (want, want_stats), (blockwise, block_stats), ran = three_ways(
        model, chains, run
    )
    assert ran == WHOLE
    assert_same(got, want)
    assert_same(got_stats, want_stats)
    assert_identical(got, blockwise)
    assert_identical(got_stats, block_stats)
    counts = [int(b) for b in got_stats if b.dtype == torch.long]
    assert len(counts) == 2 * DEPTH and all(c == 1 for c in counts)


# -- 3. eval() between forward and backward -------------------------------------------------


@pytest.mark.parametrize("inner", ["batchnorm", "dropout"])
@pytest.mark.parametrize("how", HOW)
def test_eval_between_forward_and_backward_matches_plain(chains, how: str, inner: str):
    """``model.eval()`` between forward and backward: the recomputation runs as the
    forward pass did (in training mode), so gradients and running statistics equal
    plain autograd's."""
    middle = nn.BatchNorm1d(H) if inner == "batchnorm" else nn.Dropout(0.5)

    def run(m: nn.Module) -> tuple[list[Any], list[torch.Tensor]]:
        found = step(m, how, between=m.eval)
        assert not m.training
        return found, buffers(m)

    model = stack_of(*couplings(DEPTH, middle))
    (got, got_stats), (want, want_stats), (blockwise, _), ran = three_ways(model, chains, run)
    assert ran == WHOLE
    assert_same(got, want)
    assert_same(got_stats, want_stats)
    assert_identical(got, blockwise)


def test_eval_mode_runs_no_chain(chains):
    """In eval mode no block frees its input, so no chain runs; outputs and gradients
    equal plain autograd's."""
    model = stack_of(*couplings(DEPTH, nn.BatchNorm1d(H), nn.Dropout(0.5))).eval()
    reference = plain(model)
    assert_same(step(model), step(reference))
    assert chains == []


# -- 4. parameters written between forward and backward --------------------------------------


def _modify(model: nn.Module, how_modified: str, opt: torch.optim.Optimizer) -> None:
    if how_modified == "no_grad_add":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1)
    else:
        opt.step()


@pytest.mark.parametrize("path", ["chain", "per_block"])
@pytest.mark.parametrize("how_modified", ["no_grad_add", "sgd_step"])
@pytest.mark.parametrize("how", HOW)
def test_parameter_modified_in_place_before_backward_is_refused(
    chains, how: str, how_modified: str, path: str
):
    """A parameter written in place between forward and backward: backward raises
    before anything is lost (the caller's input comes back bit for bit), on the chain
    path as on the per-block path; plain autograd refuses it too."""
    for disable in (False, True):
        model = stack_of(*couplings(DEPTH), disable=disable)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_of(model(data(5))).backward()  # a previous step: the optimizer has gradients
        chains.clear()
        x, inp, before = caller_input(how)
        if path == "chain":
            y = model(inp)
        else:
            with per_block():
                y = model(inp)
        assert chains == ([] if disable or path == "per_block" else WHOLE)
        _modify(model, how_modified, opt)
        match = None if disable else r"was modified in place between the forward pass and backward"
        with pytest.raises(RuntimeError, match=match):
            loss_of(y).backward()
        assert x.shape == before.shape and torch.equal(x.detach(), before)


# -- 5. torch.func.functional_call ------------------------------------------------------------


def _shifted(model: nn.Module) -> dict[str, torch.Tensor]:
    """New leaf tensors for the parameters, with other values than the module's own."""
    g = torch.Generator().manual_seed(21)
    return {
        n: (p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)).requires_grad_()
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("with_buffers", [False, True])
@pytest.mark.parametrize("how", HOW)
def test_functional_call_with_new_parameters(chains, how: str, with_buffers: bool):
    """``functional_call(stack, new_tensors, (x,))``: the new parameters get plain
    autograd's gradients, the stack's own parameters none; buffers passed in are
    updated as plain autograd updates them, the stack's own left alone."""
    model = stack_of(*couplings(DEPTH, nn.BatchNorm1d(H), nn.Dropout(0.5)))

    def run(m: nn.Module) -> list[Any]:
        own_buffers = buffers(m)
        tensors = _shifted(m)
        passed = {n: b.clone() for n, b in m.named_buffers()} if with_buffers else {}
        x, inp, before = caller_input(how)
        torch.manual_seed(7)
        y = functional_call(m, {**tensors, **passed}, (inp,))
        loss_of(y).backward()
        assert all(p.grad is None for p in m.parameters())
        if with_buffers:
            assert_identical(buffers(m), own_buffers)
        assert torch.equal(x.detach(), before)
        names = sorted(tensors)
        return [
            *detached(y),
            x.grad,
            *(tensors[n].grad for n in names),
            *(passed[n] for n in sorted(passed)),
        ]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got, blockwise)
    assert all(g is not None for g in got[2:])


# -- 6. hooks on one block ----------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward"])
@pytest.mark.parametrize("where", ["wrapper", "module"])
def test_hook_on_one_block_runs_once_and_the_others_still_chain(chains, where: str, hook: str):
    """A hook on block 1's wrapper or coupling: it runs once per pass (as under plain
    autograd), gradients equal plain autograd's, block 1 runs on its own and blocks
    2 and 3 still run as a chain."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    reference = plain(model)
    counts = []
    for m in (model, reference):
        target = m.layers[1] if where == "wrapper" else m.layers[1].module
        seen: list[str] = []
        if hook == "forward":
            target.register_forward_hook(lambda mod, args, out, seen=seen: seen.append("f"))
        elif hook == "forward_pre":
            target.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append("p"))
        else:
            target.register_full_backward_hook(lambda mod, gi, go, seen=seen: seen.append("b"))
        counts.append(seen)
    got = step(model)
    assert chains == [(2, 3)]
    want = step(reference)
    assert_same(got, want)
    assert len(counts[0]) == len(counts[1]) == 1


# -- 7. the caller's input ----------------------------------------------------------------------


def _stream_inputs(how: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(the caller's tensors, what is passed to the stack, copies of the caller's values)."""
    if how in ("batch", "leaf"):
        x = data(1, requires_grad=how == "leaf")
        return [x], [x], [x.detach().clone()]
    if how == "streams":
        xs = [data(1, shape=(N, H)), data(2, shape=(N, H))]
        return xs, xs, [x.detach().clone() for x in xs]
    # Two views of one tensor (requiring grad or not), as x.chunk(2, dim=1) gives them.
    x = data(1, requires_grad=how == "views")
    return [x], list(x.chunk(2, dim=1)), [x.detach().clone()]


@pytest.mark.parametrize("how", ["batch", "leaf", "streams", "views", "batch_views"])
def test_the_callers_input_comes_back_bit_identical(chains, how: str):
    """The caller's tensors (one tensor with or without grad, two streams, two views
    of one tensor) are bit-identical after backward, with their version counters
    unchanged, and the gradients equal plain autograd's.

    Against the per-block path they are bit-identical for one tensor (both paths
    copy its halves and rebuild the copies). Not so, in general, for two streams
    the caller holds: the per-block path hands them to block 0's wrapper as they
    are, which keeps them (views) or hides them (leaves) and recomputes block 0
    from the exact values, while the chain copies them and rebuilds block 0's
    input by inversion, so the gradients may differ in the last bits (2e-15 seen
    with views); they are compared to rel 1e-10 there.
    """

    def run(m: nn.Module) -> list[Any]:
        mine, passed, before = _stream_inputs(how)
        versions = [t._version for t in (*mine, *passed)]
        torch.manual_seed(7)
        y = m(*passed)
        loss_of(y).backward()
        for t, b in zip(mine, before):
            assert t.shape == b.shape and torch.equal(t.detach(), b)
        assert [t._version for t in (*mine, *passed)] == versions
        return [*detached(y), *(t.grad for t in mine), *grads(m)]

    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", invertnet.InputKeptWarning)  # per-block, views
        got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == (WHOLE if how in ("batch", "leaf") else ALL_BUT_LAST)
    assert_same(got, want)
    if how in ("batch", "leaf"):
        assert_identical(got, blockwise)
    else:
        assert_same(got, blockwise)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_the_same_batch_reused_for_three_steps(chains, requires_grad: bool):
    """One batch reused for three SGD steps: each step's loss and gradients equal
    plain autograd's, and the batch is unchanged throughout."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    reference = plain(model)
    batch = data(11, requires_grad=requires_grad)
    before, version = batch.detach().clone(), batch._version
    seen = []
    for m in (model, reference):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        steps = []
        for k in range(3):
            opt.zero_grad(set_to_none=False)
            if batch.grad is not None:
                batch.grad = None
            torch.manual_seed(k)
            loss = loss_of(m(batch))
            loss.backward()
            steps.append([loss.detach(), batch.grad, *(p.grad.clone() for p in m.parameters())])
            opt.step()
            assert torch.equal(batch.detach(), before) and batch._version == version
        seen.append(steps)
    assert chains == WHOLE * 3
    for got, want in zip(*seen):
        assert_same(got, want)


# -- 8. a sub-module writing over its input ------------------------------------------------------


@pytest.mark.parametrize("streams", [False, True], ids=["one-tensor", "two-streams"])
@pytest.mark.parametrize("position", [0, 1, DEPTH - 1])
def test_sub_module_writing_over_its_input_is_refused(chains, position: int, streams: bool):
    """F = ReLU(inplace=True) then Linear in one block: the forward pass raises,
    naming the block by its position in the stack where it runs in a chain, and the
    caller's input is left as it was."""
    blocks = couplings(DEPTH)
    blocks[position] = AdditiveCoupling(
        nn.Sequential(nn.ReLU(inplace=True), nn.Linear(H, H)), net()
    )
    model = stack_of(*blocks)
    x, inp, before = caller_input("leaf")
    in_chain = not (streams and position == DEPTH - 1)
    where = (
        rf"ReversibleSequential block {position} \(AdditiveCoupling\)"
        if in_chain
        else (r"InvertibleModuleWrapper\(AdditiveCoupling\)")
    )
    with pytest.raises(RuntimeError, match=where + r"\.forward wrote over its input"):
        model(*(inp.chunk(2, dim=1) if streams else (inp,)))
    assert chains == ([tuple(range(DEPTH - 1 if streams else DEPTH))])
    assert x.shape == before.shape and torch.equal(x.detach(), before)
    # The stack is usable again once the block is fixed.
    model.layers[position].module.Fm[0].inplace = False
    assert_same(step(model), step(plain(model)))


# -- 9. the stack's output written before backward -----------------------------------------------


def _write(y: torch.Tensor, mode: str) -> None:
    if mode == "no_grad":
        with torch.no_grad():
            y.mul_(2)
    else:
        y.mul_(2)


@pytest.mark.parametrize("mode", ["no_grad", "in_graph"])
@pytest.mark.parametrize("how", ["batch", "leaf"])
@pytest.mark.parametrize("written", [0, 1])
def test_output_stream_modified_in_place_is_refused(chains, written: int, how: str, mode: str):
    """``y.mul_(2)`` on a stream the stack returned (a two-stream call), before
    backward: it is the last block's output, which its input is rebuilt from, so
    backward raises, and the caller's inputs are handed back bit for bit."""
    model = stack_of(*couplings(DEPTH))
    x1, in1, before1 = caller_input(how, seed=1, shape=(N, H))
    x2, in2, before2 = caller_input(how, seed=2, shape=(N, H))
    ys = model(in1, in2)
    assert chains == ALL_BUT_LAST
    _write(ys[written], mode)
    with pytest.raises(RuntimeError, match=rf"output {written} was modified in place"):
        loss_of(ys).backward()
    for x, before in ((x1, before1), (x2, before2)):
        assert x.shape == before.shape and torch.equal(x.detach(), before)
        torch.testing.assert_close((x + 1).detach(), before + 1)  # usable, not hidden


@pytest.mark.parametrize("mode", ["no_grad", "in_graph"])
@pytest.mark.parametrize("how", ["batch", "leaf"])
def test_merged_output_modified_in_place_matches_plain(chains, how: str, mode: str):
    """``y.mul_(2)`` on the stack's merged output (a one-tensor call) before
    backward: ``y`` is a concatenation the stack made, which neither the chain nor
    plain autograd keeps (the chain keeps the streams it was made from), so
    nothing is refused, and gradients equal plain autograd's."""
    model = stack_of(*couplings(DEPTH))

    def run(m: nn.Module) -> list[Any]:
        x, inp, before = caller_input(how)
        y = m(inp)
        _write(y, mode)
        loss_of(y).backward()
        assert torch.equal(x.detach(), before)
        return [y.detach(), x.grad, *grads(m)]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got, blockwise)


# -- 10. several backward passes -----------------------------------------------------------------


@pytest.mark.parametrize("streams", [False, True], ids=["one-tensor", "two-streams"])
def test_second_backward_is_refused_with_num_bwd_passes(chains, streams: bool):
    """``backward(retain_graph=True)`` twice: the second raises, naming
    ``num_bwd_passes`` (the wrapper's own limit)."""
    model = stack_of(*couplings(DEPTH))
    x, inp, before = caller_input("leaf")
    y = model(*(inp.chunk(2, dim=1) if streams else (inp,)))
    assert chains == (ALL_BUT_LAST if streams else WHOLE)
    loss = loss_of(y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"num_bwd_passes"):
        loss.backward(retain_graph=True)
    assert torch.equal(x.detach(), before)


def test_num_bwd_passes_raised_on_every_block_allows_two_passes(chains):
    """With ``num_bwd_passes=2`` on every block the chain takes it too: two backward
    passes accumulate plain autograd's gradients twice."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    reference = plain(model)
    for layer in model.layers:
        layer.num_bwd_passes = 2
    results = []
    for m in (model, reference):
        x, inp, before = caller_input("activation")
        torch.manual_seed(7)
        loss = loss_of(m(inp))
        loss.backward(retain_graph=True)
        loss.backward()
        assert torch.equal(x.detach(), before)
        results.append([x.grad, *grads(m)])
    assert chains == WHOLE
    assert_same(*results)


# -- 11. siamese use -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_siamese_two_batches_one_backward(chains, how: str):
    """The stack called on two batches (BatchNorm and dropout inside) before one
    backward of the summed losses: gradients and running statistics equal plain
    autograd's (two updates each)."""

    def run(m: nn.Module) -> tuple[list[Any], list[torch.Tensor]]:
        x1, in1, before1 = caller_input(how, seed=1)
        x2, in2, before2 = caller_input(how, seed=2)
        torch.manual_seed(7)
        y1 = m(in1)
        y2 = m(in2)
        (loss_of(y1) + (y1 * y2).sum()).backward()
        assert torch.equal(x1.detach(), before1) and torch.equal(x2.detach(), before2)
        return [y1.detach(), y2.detach(), x1.grad, x2.grad, *grads(m)], buffers(m)

    model = stack_of(*couplings(DEPTH, nn.BatchNorm1d(H), nn.Dropout(0.3)))
    (got, got_stats), (want, want_stats), (blockwise, _), ran = three_ways(model, chains, run)
    assert ran == WHOLE * 2
    assert_same(got, want)
    assert_same(got_stats, want_stats)
    assert_identical(got, blockwise)
    assert all(int(b) == 2 for b in got_stats if b.dtype == torch.long)


# -- 12. modules shared between blocks -----------------------------------------------------------


def _shared_blocks(kind: str) -> tuple[list[nn.Module], set[int]]:
    """Blocks of which some share modules, and the positions of those."""
    if kind == "same_coupling":
        c, c2, c3 = couplings(3)
        return [c, c, c2, c3], {0, 1}
    if kind == "shared_F":
        f = net(nn.Dropout(0.5))
        c1, c2 = AdditiveCoupling(f, net()), AdditiveCoupling(f, net())
        return [c1, c2, *couplings(2)], {0, 1}
    # Two blocks a block apart sharing G.
    g = net()
    c1, c3 = AdditiveCoupling(net(), g), AdditiveCoupling(net(), g)
    return [c1, *couplings(1), c3, *couplings(1)], {0, 2}


@pytest.mark.parametrize("streams", [False, True], ids=["one-tensor", "two-streams"])
@pytest.mark.parametrize("kind", ["same_coupling", "shared_F", "shared_G_apart"])
def test_blocks_sharing_a_module_run_no_chain_together(chains, kind: str, streams: bool):
    """The same coupling twice, or couplings sharing F or G: no chain holds two
    blocks that share a module, and gradients equal plain autograd's."""
    blocks, shared = _shared_blocks(kind)
    model = stack_of(*blocks)

    def run(m: nn.Module) -> list[Any]:
        m.zero_grad(set_to_none=True)
        x = data(1)
        torch.manual_seed(7)
        # Activations, which the per-block path frees and rebuilds too (caller's
        # tensors it would recompute from exactly; see
        # test_the_callers_input_comes_back_bit_identical).
        y = m(*((h * 1 for h in x.chunk(2, dim=1)) if streams else (x * 1,)))
        loss_of(y).backward()
        return [*detached(y), x.grad, *grads(m)]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert all(len(shared & set(chain)) <= 1 for chain in ran)
    assert_same(got, want)
    assert_identical(got, blockwise)


# -- 13. one parameter shared by distinct modules ----------------------------------------------


@pytest.mark.parametrize("streams", [False, True], ids=["one-tensor", "two-streams"])
@pytest.mark.parametrize("how", HOW)
def test_parameter_shared_by_distinct_modules_in_a_chain(chains, how: str, streams: bool):
    """Two distinct modules in different blocks holding one ``nn.Parameter``: the
    chain runs, and the shared parameter gets the sum of both blocks' gradients, as
    under plain autograd (with two streams returned the last block runs on its own,
    so one parameter is shared between the chain and a lone block)."""
    blocks = couplings(DEPTH, nn.Dropout(0.5))
    blocks[2].Fm[0].weight = blocks[0].Fm[0].weight
    blocks[3].Gm[0].bias = blocks[0].Fm[0].bias
    model = stack_of(*blocks)
    assert model.layers[2].module.Fm[0].weight is model.layers[0].module.Fm[0].weight

    def run(m: nn.Module) -> list[Any]:
        m.zero_grad(set_to_none=True)
        x, inp, before = caller_input(how)
        torch.manual_seed(7)
        y = m(*(inp.chunk(2, dim=1) if streams else (inp,)))
        loss_of(y).backward()
        assert torch.equal(x.detach(), before)
        return [*detached(y), x.grad, *grads(m)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", invertnet.InputKeptWarning)  # per-block, views
        got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == (ALL_BUT_LAST if streams else WHOLE)
    assert_same(got, want)
    if streams:
        # Not bit for bit: the per-block path keeps the caller's views for block 0 and
        # recomputes it from them, the chain rebuilds block 0's input by inversion
        # (see test_the_callers_input_comes_back_bit_identical).
        assert_same(got, blockwise)
    else:
        assert_identical(got, blockwise)


def test_the_stack_hands_each_chain_its_walk(chains, monkeypatch: pytest.MonkeyPatch):
    """The stack walks every block's modules to cut its chains; each chain's wrapper
    takes that walk rather than walk the chain again: the same modules and
    trainable parameters (a parameter two blocks hold, once), and a wrapper that
    walks nothing itself. Gradients equal plain autograd's."""
    from invertnet import _block_chain as block_chain
    from invertnet._runtime.forward_state import submodules_and_trainable_parameters
    from invertnet.wrappers import invertible

    blocks = couplings(DEPTH, nn.Dropout(0.5))
    blocks[2].Fm[0].weight = blocks[0].Fm[0].weight
    model = stack_of(*blocks)
    walked: list[nn.Module] = []
    walk = invertible.submodules_and_trainable_parameters

    def spy(module: nn.Module) -> Any:
        walked.append(module)
        return walk(module)

    monkeypatch.setattr(invertible, "submodules_and_trainable_parameters", spy)
    monkeypatch.setattr(block_chain, "submodules_and_trainable_parameters", spy)
    handed: list[Any] = []
    take = ReversibleSequentialChain.modules_and_trainable_parameters

    def keep(self: ReversibleSequentialChain) -> Any:
        handed.append((self, take(self)))
        return handed[-1][1]

    monkeypatch.setattr(ReversibleSequentialChain, "modules_and_trainable_parameters", keep)

    def run(m: nn.Module) -> list[Any]:
        m.zero_grad(set_to_none=True)
        x, inp, before = caller_input("leaf")
        torch.manual_seed(7)
        y = m(inp)
        loss_of(y).backward()
        return [*detached(y), x.grad, *grads(m)]

    got = run(model)
    assert chains == WHOLE
    assert not any(isinstance(m, ReversibleSequentialChain) for m in walked)
    ((chain, (modules, params)),) = handed
    fresh_modules, fresh_params = submodules_and_trainable_parameters(chain)
    assert modules[0] is chain and len(modules) == len(fresh_modules)
    assert {id(m) for m in modules} == {id(m) for m in fresh_modules}
    assert sorted(map(id, params)) == sorted(map(id, fresh_params))
    assert_same(got, run(plain(model)))


# -- 14. frozen parameters ---------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "between"])
@pytest.mark.parametrize("how", HOW)
def test_frozen_parameters_get_no_gradient(chains, how: str, when: str):
    """Block 1's F frozen before the forward pass, or one parameter of block 1's F and
    one of block 2's G frozen between forward and backward: gradients equal plain
    autograd's, ``None`` exactly where plain autograd leaves ``None``."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def targets(m: nn.Module) -> list[nn.Parameter]:
        if when == "before":
            return list(m.layers[1].module.Fm.parameters())
        return [m.layers[1].module.Fm[0].weight, m.layers[2].module.Gm[0].bias]

    def run(m: nn.Module) -> list[Any]:
        frozen = targets(m)

        def freeze() -> None:
            for p in frozen:
                p.requires_grad_(False)

        if when == "before":
            freeze()
        found = step(m, how, between=freeze if when == "between" else None)
        assert all(p.grad is None for p in frozen)
        assert sum(p.grad is None for p in m.parameters()) == len(frozen)
        return found

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got, blockwise)


# -- 15. an output stream unused by the loss ---------------------------------------------------


@pytest.mark.parametrize("used", [0, 1])
@pytest.mark.parametrize("how", HOW)
def test_output_stream_unused_by_the_loss(chains, how: str, used: int):
    """``y1, y2 = stack(x1, x2)`` with a loss on one stream only: gradients equal
    plain autograd's, ``None`` exactly where plain autograd leaves ``None`` (the
    last block's G for a loss on ``y1``)."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def run(m: nn.Module) -> list[Any]:
        m.zero_grad(set_to_none=True)
        x1, in1, before1 = caller_input(how, seed=1, shape=(N, H))
        x2, in2, before2 = caller_input(how, seed=2, shape=(N, H))
        torch.manual_seed(7)
        ys = m(in1, in2)
        assert isinstance(ys, tuple) and len(ys) == 2
        loss_of(ys[used]).backward()
        assert torch.equal(x1.detach(), before1) and torch.equal(x2.detach(), before2)
        return [*detached(ys), x1.grad, x2.grad, *grads(m)]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == ALL_BUT_LAST
    assert_same(got, want)
    assert_identical(got, blockwise)
    nones = [g is None for g in want[4:]]
    assert any(nones) == (used == 0)


# -- 16. a keyword context (attention mask) ----------------------------------------------------


def _transformer_stack() -> ReversibleSequential:
    return stack_of(
        *(
            ReversibleTransformerBlock(4, heads=2, dropout=0.1, attention_dropout=0.2)
            for _ in range(3)
        ),
        split_dim=-1,
    )


def _tokens(seed: int = 1, requires_grad: bool = True) -> torch.Tensor:
    return data(seed, requires_grad, shape=(N, 5, 8))


@pytest.mark.parametrize("streams", [False, True], ids=["one-tensor", "two-streams"])
def test_attention_mask_keyword_matches_plain(chains, streams: bool):
    """Reversible Transformer blocks called with ``attn_mask=``: the mask reaches every
    block of the chain and its recomputation; gradients equal plain autograd's."""
    mask = torch.rand(N, 1, 5, 5) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    model = _transformer_stack()

    def run(m: nn.Module, attn_mask: torch.Tensor | None = mask) -> list[Any]:
        m.zero_grad(set_to_none=True)
        x = _tokens()
        torch.manual_seed(7)
        if streams:
            y = torch.cat(m(*(h * 1 for h in x.chunk(2, dim=-1)), attn_mask=attn_mask), dim=-1)
        else:
            y = m(x * 1, attn_mask=attn_mask)
        loss_of(y).backward()
        return [y.detach(), x.grad, *grads(m)]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == ([(0, 1)] if streams else [(0, 1, 2)])
    assert_same(got, want)
    assert_identical(got, blockwise)
    # Guards the comparison: the mask changes the gradients.
    assert not torch.allclose(run(plain(model), None)[1], want[1])


def test_attention_mask_requiring_grad_is_refused(chains):
    """A mask passed by keyword that requires grad would get no gradient: refused
    with a ValueError before anything is freed."""
    model = _transformer_stack()
    mask = torch.zeros(N, 1, 5, 5, dtype=F64, requires_grad=True)
    x = _tokens()
    before = x.detach().clone()
    with pytest.raises(ValueError, match=r"keyword argument 'attn_mask' .* requires grad"):
        model(x * 1, attn_mask=mask)
    assert torch.equal(x.detach(), before)
    with pytest.raises(ValueError, match=r"keyword argument 'attn_mask' .* requires grad"):
        model(x, attn_mask=mask)
    assert torch.equal(x.detach(), before)


# -- 17. preserve_rng_state=False ----------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_dropout_without_preserve_rng_state_is_refused(chains, how: str):
    """``preserve_rng_state=False`` with dropout: the forward pass raises, naming
    ``preserve_rng_state``, and the caller's input is left as it was."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)), preserve_rng_state=False)
    x, inp, before = caller_input(how)
    with pytest.raises(RuntimeError, match=r"drew random numbers.*preserve_rng_state"):
        model(inp)
    assert chains == WHOLE
    assert x.shape == before.shape and torch.equal(x.detach(), before)
    assert inp.shape == before.shape and torch.equal(inp.detach(), before)


def test_preserve_rng_state_false_without_randomness_matches_plain(chains):
    """``preserve_rng_state=False`` without random draws: the chain runs, and
    gradients equal plain autograd's."""
    model = stack_of(*couplings(DEPTH), preserve_rng_state=False)
    got, want, blockwise, ran = three_ways(model, chains, step)
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got, blockwise)


# -- 18. affine couplings ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["all_affine", "mixed", "momentum"])
def test_affine_couplings_run_on_their_own(chains, layout: str):
    """Affine couplings may reconstruct non-finite values, which the wrapper checks
    block by block: they never run in a chain (additive neighbours still do), and
    gradients equal plain autograd's."""
    if layout == "all_affine":
        blocks: list[Any] = [affine(net(nn.Dropout(0.5))) for _ in range(DEPTH)]
        expected: list[tuple[int, ...]] = []
    elif layout == "momentum":  # not chainable either (no finite-by-construction inverse)
        blocks = [*couplings(2, nn.Dropout(0.5)), invertnet.MomentumCoupling(net())]
        blocks += couplings(2, nn.Dropout(0.5))
        expected = [(0, 1), (3, 4)]
    else:
        blocks = [*couplings(2, nn.Dropout(0.5)), affine(), *couplings(2, nn.Dropout(0.5))]
        expected = [(0, 1), (3, 4)]
    model = stack_of(*blocks)
    got, want, blockwise, ran = three_ways(model, chains, step)
    assert ran == expected
    assert_same(got, want)
    assert_identical(got, blockwise)


# -- 19. debug mode, keep_input, settings that differ ---------------------------------------------


def test_debug_reconstruction_runs_no_chain(chains):
    """Debug mode checks every block's reconstruction: no chain runs, gradients equal
    plain autograd's."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    reference = plain(model)
    with invertnet.debug_reconstruction(model=model) as report:
        got = step(model)
    assert chains == []
    assert len(report) >= DEPTH  # each block's reconstructions were checked
    assert_same(got, step(reference))


def test_keep_input_runs_no_chain(chains):
    """``keep_input=True`` on the stack: no chain runs, gradients equal plain
    autograd's."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)), keep_input=True)
    assert_same(step(model), step(plain(model)))
    assert chains == []


@pytest.mark.parametrize(
    "setting", ["keep_input", "preserve_rng_state", "num_bwd_passes", "disable"]
)
def test_a_block_with_other_settings_splits_the_chain(chains, setting: str):
    """Block 1 with settings of its own: it runs on its own (or under plain autograd),
    blocks 2 and 3 as a chain, and gradients equal plain autograd's."""
    model = stack_of(*couplings(DEPTH))
    value = {"keep_input": True, "preserve_rng_state": False, "num_bwd_passes": 2, "disable": True}[
        setting
    ]
    setattr(model.layers[1], setting, value)
    got, want, blockwise, ran = three_ways(model, chains, step)
    assert ran == [(2, 3)]
    assert_same(got, want)
    assert_identical(got, blockwise)


def test_no_grad_runs_no_chain(chains):
    """Without grad (``no_grad``, ``inference_mode``) nothing is recorded for
    backward, so no chain runs."""
    model = stack_of(*couplings(DEPTH))
    x = data(1, requires_grad=False)
    with torch.no_grad():
        y = model(x)
    with torch.inference_mode():
        model(x)
    assert chains == []
    with torch.no_grad():
        torch.testing.assert_close(model.inverse(y), x, rtol=RTOL, atol=ATOL)


# -- 20. torch.func ---------------------------------------------------------------------------


@pytest.mark.parametrize("streams", [False, True], ids=["one-tensor", "two-streams"])
def test_torch_func_is_refused(chains, streams: bool):
    """``torch.func.grad`` through the stack raises, naming ``torch.func``, as the
    wrapper does, and leaves the input as it was."""
    model = stack_of(*couplings(DEPTH))
    x = data(1, requires_grad=False)
    before = x.clone()

    def f(v: torch.Tensor) -> torch.Tensor:
        y = model(*(v.chunk(2, dim=1) if streams else (v,)))
        return loss_of(y)

    with pytest.raises(RuntimeError, match=r"InvertibleModuleWrapper\(.*torch\.func"):
        torch.func.grad(f)(x)
    assert torch.equal(x, before)
    # It works with disable=True.
    reference = plain(model)
    got = torch.func.grad(lambda v: loss_of(reference(v)))(x)
    leaf = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss_of(reference(leaf)), leaf)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


# -- 21. copies and pickling -------------------------------------------------------------------


@pytest.mark.parametrize("when", ["after_step", "between"])
@pytest.mark.parametrize("action", ["deepcopy", "pickle"])
def test_copy_or_pickle_of_a_trained_stack_trains_alone(chains, action: str, when: str):
    """A deep copy or a pickled copy of the stack after a training step (or between
    a forward pass and its backward): the original's backward is unaffected, the copy
    runs chains of its own blocks, and a step of it gives the original's gradients on
    the same input without touching the original."""
    model = stack_of(*couplings(DEPTH, nn.BatchNorm1d(H), nn.Dropout(0.5)))
    reference = plain(model)

    def copied(m: nn.Module) -> nn.Module:
        return copy.deepcopy(m) if action == "deepcopy" else pickle.loads(pickle.dumps(m))

    copies: list[nn.Module] = []

    def take() -> None:
        copies.append(copied(model))
        # The running statistics the forward pass left are copied as they are.
        assert_identical(buffers(copies[0]), buffers(model))

    if when == "after_step":
        first, first_plain = step(model), step(reference)
        take()
    else:
        first, first_plain = step(model, between=take), step(reference)
    assert_same(first, first_plain)
    assert chains == WHOLE
    twin = copies[0]
    assert isinstance(twin, ReversibleSequential)
    own_grads = [p.grad.clone() for p in model.parameters()]
    own_stats = buffers(model)
    twin_grads = step(twin)
    assert chains == WHOLE * 2
    # The copy's chain holds the copy's blocks, not the original's: the original's
    # gradients and running statistics are untouched, every copy's parameter has one.
    assert all(p.grad is not None for p in twin.parameters())
    assert_identical(grads(model), own_grads)
    assert_identical(buffers(model), own_stats)
    # Same parameters and statistics, same batch and masks: the same step.
    assert_identical(twin_grads, step(model))
    assert_same(twin_grads, step(reference))


# -- 22. activation memory ---------------------------------------------------------------------


def test_activation_memory_is_flat_in_depth_on_the_chain_path(chains):
    """Activation memory does not grow with depth on the chain path.

    ``activation_bytes`` records the inputs of every ``InvertibleModuleWrapper`` it
    finds with forward pre-hooks; hooks on the stack's own wrappers would make every
    block run on its own. So it is handed the stem and the stack's chain wrappers
    (made by a first call), whose hooks do not stop the chaining, and the chain path
    is measured. The per-block path (the helper given the whole model) is measured
    too: the chain keeps no more than it.
    """
    x = data(1, requires_grad=False, shape=(N, 2 * H))

    def model_of(depth: int) -> nn.Sequential:
        torch.manual_seed(0)
        stem = nn.Linear(2 * H, 2 * H)  # the stack's input comes out of a layer
        return nn.Sequential(stem, ReversibleSequential(*couplings(depth))).double()

    def chained(depth: int) -> int:
        model = model_of(depth)
        model(x).sum().backward()  # makes the chain wrapper
        stack = model[1]
        wrappers = [m for m in stack.__dict__["_chains"].values()]
        assert all(isinstance(w, InvertibleModuleWrapper) for w in wrappers)
        chains.clear()
        holder = nn.ModuleList([model[0], *wrappers])
        found = activation_bytes(holder, lambda: model(x).sum())
        assert chains == [tuple(range(depth))]
        return found

    def blockwise(depth: int) -> int:
        model = model_of(depth)
        chains.clear()
        found = activation_bytes(model, lambda: model(x).sum())
        assert chains == []
        return found

    chain_bytes = {d: chained(d) for d in (2, 8)}
    block_bytes = {d: blockwise(d) for d in (2, 8)}
    one_stream = N * H * 8
    assert chain_bytes[8] == chain_bytes[2]
    assert block_bytes[8] <= block_bytes[2] + 2 * one_stream
    assert chain_bytes[8] <= block_bytes[8]
    # Not flat with disable=True: guards the measurement.
    plain_bytes = {}
    for d in (2, 8):
        model = plain(model_of(d))
        plain_bytes[d] = activation_bytes(model, lambda model=model: model(x).sum())
    assert plain_bytes[8] > 3 * plain_bytes[2]


def test_the_chain_lets_go_of_its_output_after_its_last_block(chains):
    """A chain's backward runs its blocks from the last to the first, and only the
    last block's reads the chain's output: the chain lets go of it then, rather than
    hold two streams' worth of memory through every other block's backward, which
    separate blocks would not. Seen from the first block's recomputation (the last
    thing the chain's backward runs), through weak references to the chain's output
    as its wrapper keeps it; gradients stay plain autograd's."""
    alive_when_first_block_recomputes: list[bool] = []
    refs: list[Any] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():  # the recomputation in backward
                alive_when_first_block_recomputes.append(any(r() is not None for r in refs))
            return self.inner(x)

    blocks = couplings()
    blocks[0] = AdditiveCoupling(Probe(), net())
    model = stack_of(*blocks)
    reference = plain(model)
    x = data(1, shape=(N, 2 * H))
    y = model(x)
    (chain_node,) = {f for f, _ in y.grad_fn.next_functions}  # the merge's one input
    refs.extend(weakref.ref(t) for t in chain_node.call.outputs)
    del chain_node
    loss_of(y).backward()
    assert chains == WHOLE
    assert alive_when_first_block_recomputes == [False]
    y_ref = reference(x.detach().requires_grad_())
    loss_of(y_ref).backward()
    assert_same(grads(model), grads(reference))


# -- 23. double backward ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["leaf", "activation"])
def test_double_backward_is_refused(chains, how: str):
    """Gradients taken with ``create_graph=True`` and differentiated again: raises,
    naming double backward, as the wrapper does; the input is left as it was."""
    model = stack_of(*couplings(DEPTH))
    x, inp, before = caller_input(how)
    (g,) = torch.autograd.grad(loss_of(model(inp)), x, create_graph=True)
    assert chains == WHOLE
    with pytest.raises(RuntimeError, match=r"InvertibleModuleWrapper\(.*double backward"):
        g.sum().backward()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("how", ["leaf", "activation"])
def test_create_graph_alone_gives_first_order_gradients(chains, how: str):
    """``create_graph=True`` without differentiating again: first-order gradients
    equal plain autograd's."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    results = []
    for m in (model, plain(model)):
        x, inp, before = caller_input(how)
        torch.manual_seed(7)
        loss = loss_of(m(inp))
        found = torch.autograd.grad(loss, [x, *m.parameters()], create_graph=True)
        assert torch.equal(x.detach(), before)
        results.append([g.detach() for g in found])
    assert chains == WHOLE
    assert_same(*results)


# -- more patterns ---------------------------------------------------------------------------


def test_non_invertible_layer_between_stages_splits_the_chains(chains):
    """A non-invertible layer between two stages: the blocks on each side run as
    their own chain, and gradients equal plain autograd's (and the per-block path's,
    bit for bit)."""
    model = stack_of(
        *couplings(2, nn.Dropout(0.5)), nn.Linear(2 * H, 2 * H), *couplings(2, nn.Dropout(0.5))
    )
    got, want, blockwise, ran = three_ways(model, chains, step)
    assert ran == [(0, 1), (3, 4)]
    assert_same(got, want)
    assert_identical(got, blockwise)


def test_a_wrapper_passed_in_runs_on_its_own(chains):
    """A wrapper given to the stack keeps its own settings and runs on its own; the
    blocks the stack wrapped around it still chain."""
    blocks: list[Any] = couplings(DEPTH, nn.Dropout(0.5))
    blocks[1] = InvertibleModuleWrapper(blocks[1])
    model = stack_of(*blocks)
    got, want, blockwise, ran = three_ways(model, chains, step)
    assert ran == [(2, 3)]
    assert_same(got, want)
    assert_identical(got, blockwise)


def test_a_block_replaced_after_a_step_is_used(chains):
    """A block replaced after a step (the chain of the old blocks made and kept):
    the next step runs the new block, which gets its gradients, and the old one
    gets none. The new wrapper is the caller's, used as it is, outside chains."""
    model = stack_of(*couplings(DEPTH))
    reference = plain(model)
    assert_same(step(model), step(reference))
    old = model.layers[2].module
    new = AdditiveCoupling(net(), net()).double()
    model.layers[2] = InvertibleModuleWrapper(copy.deepcopy(new))
    reference.layers[2] = InvertibleModuleWrapper(copy.deepcopy(new), disable=True)
    old.zero_grad(set_to_none=True)
    got, want = step(model), step(reference)
    assert chains == [*WHOLE, (0, 1)]
    assert_same(got, want)
    assert all(p.grad is None for p in old.parameters())
    assert all(p.grad is not None for p in model.layers[2].parameters())


def test_a_hook_added_and_removed_between_steps(chains):
    """A hook registered on block 1 after a chain of every block was made, then
    removed: the chain splits around block 1 while the hook is there and is whole
    again after, with plain autograd's gradients every step."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    reference = plain(model)
    assert_same(step(model), step(reference))
    seen: list[int] = []
    handle = model.layers[1].module.register_forward_hook(lambda *args: seen.append(1))
    assert_same(step(model), step(reference))
    handle.remove()
    assert_same(step(model), step(reference))
    assert seen == [1]
    assert chains == [*WHOLE, (2, 3), *WHOLE]


def test_conversion_to_float64_after_a_step(chains):
    """A stack built and stepped in float32, then converted with ``.double()``: the
    next step runs in float64 with plain autograd's gradients."""
    model = ReversibleSequential(*couplings(DEPTH, nn.Dropout(0.5)))
    x = data(1).float()
    loss_of(model(x * 1)).backward()
    model.double()
    assert_same(step(model), step(plain(model)))
    assert chains == WHOLE * 2


@pytest.mark.parametrize("how", ["leaf", "activation"])
def test_gradients_for_some_tensors_only(chains, how: str):
    """``backward(inputs=...)`` and ``torch.autograd.grad`` for a few tensors: those
    get plain autograd's gradients, the others none."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def run(m: nn.Module) -> list[Any]:
        m.zero_grad(set_to_none=True)
        wanted = [m.layers[1].module.Fm[0].weight, m.layers[3].module.Gm[0].bias]
        x, inp, before = caller_input(how)
        torch.manual_seed(7)
        loss_of(m(inp)).backward(inputs=wanted)
        assert x.grad is None and torch.equal(x.detach(), before)
        found = grads(m)
        assert sum(g is not None for g in found) == 2
        m.zero_grad(set_to_none=True)
        x, inp, before = caller_input(how, seed=2)
        torch.manual_seed(7)
        (gx,) = torch.autograd.grad(loss_of(m(inp)), x)
        assert all(p.grad is None for p in m.parameters())
        assert torch.equal(x.detach(), before)
        return [*found, gx]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE * 2
    assert_same(got, want)
    assert_identical(got, blockwise)


def test_all_parameters_frozen_gradient_for_the_input_only(chains):
    """Every parameter frozen (a feature extractor differentiated for its input):
    the input gets plain autograd's gradient, the parameters none."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5))).requires_grad_(False)
    got, want, blockwise, ran = three_ways(model, chains, lambda m: step(m, "leaf"))
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got, blockwise)
    assert got[1] is not None and all(g is None for g in got[2:])


@pytest.mark.parametrize("how", HOW)
def test_functional_call_with_maml_fast_weights(chains, how: str):
    """MAML: a step taken with ``functional_call`` on fast weights computed from the
    parameters (tensors with a ``grad_fn``): the outer gradients equal plain
    autograd's."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def run(m: nn.Module) -> list[Any]:
        names, params = zip(*m.named_parameters())
        xa, inp_a, before_a = caller_input(how, seed=1)
        torch.manual_seed(7)
        inner = torch.autograd.grad(loss_of(m(inp_a)), params)
        fast = {n: p - 0.1 * g for n, p, g in zip(names, params, inner)}
        xb, inp_b, before_b = caller_input(how, seed=2)
        torch.manual_seed(8)
        outer = loss_of(functional_call(m, fast, (inp_b,)))
        found = torch.autograd.grad(outer, list(m.parameters()))
        assert all(p.grad is None for p in m.parameters())
        assert torch.equal(xa.detach(), before_a) and torch.equal(xb.detach(), before_b)
        return [*inner, outer.detach(), *found]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE * 2
    assert_same(got, want)
    assert_identical(got, blockwise)


@pytest.mark.parametrize("how", ["batch", "leaf"])
def test_callers_input_written_between_forward_and_backward(chains, how: str):
    """The caller writes over its input between forward and backward. A batch
    (no grad) is kept by the chain, halves as views, and the write is refused as
    plain autograd refuses it. An input that requires grad is copied and the
    copies rebuilt, so backward gives the gradients of the forward pass that ran
    (plain autograd's on the unchanged input), as the per-block path does; plain
    autograd, which saved views of the input, refuses instead."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def run(m: nn.Module, write: bool = True) -> list[Any]:
        m.zero_grad(set_to_none=True)
        x = data(1, requires_grad=how == "leaf")
        torch.manual_seed(7)
        y = m(x)
        if write:
            with torch.no_grad():
                x.add_(1)
        loss_of(y).backward()
        return [y.detach(), x.grad, *grads(m)]

    reference = plain(model)
    with pytest.raises(RuntimeError, match=r"modified (by an )?inplace"):
        run(reference)
    if how == "batch":
        with pytest.raises(RuntimeError, match=r"input 0 was modified in place"):
            run(model)
        assert chains == WHOLE
        return
    per_block_copy = copy.deepcopy(model)
    got = run(model)
    assert chains == WHOLE
    with per_block():
        blockwise = run(per_block_copy)
    assert_identical(got, blockwise)
    assert_same(got, run(reference, write=False))


def test_parameter_replaced_between_forward_and_backward(chains):
    """A weight replaced by a new ``nn.Parameter`` between forward and backward
    (late weight tying): the old parameter gets the gradient of the old value, the
    new one none, as under plain autograd."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def run(m: nn.Module) -> list[Any]:
        linear = m.layers[1].module.Fm[0]
        old = linear.weight

        def replace() -> None:
            linear.weight = nn.Parameter(old.detach() + 1)

        found = step(m, between=replace)
        assert linear.weight.grad is None and old.grad is not None
        return [*found, old.grad]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got, blockwise)


@pytest.mark.parametrize("how", ["batch", "leaf"])
def test_buffer_changed_between_forward_and_backward_is_refused(chains, how: str):
    """A running statistic written by hand between forward and backward: backward
    raises naming the buffer (plain autograd raises too), and the caller's input is
    handed back bit for bit."""
    for disable in (False, True):
        model = stack_of(*couplings(DEPTH, nn.BatchNorm1d(H)), disable=disable)
        x, inp, before = caller_input(how)
        y = model(inp)
        with torch.no_grad():
            model.layers[2].module.Gm[1].running_mean.add_(1)
        match = None if disable else r"buffer '.*running_mean' was modified in place"
        with pytest.raises(RuntimeError, match=match):
            loss_of(y).backward()
        assert x.shape == before.shape and torch.equal(x.detach(), before)
    assert chains == WHOLE


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_inside_torch_utils_checkpoint(chains, use_reentrant: bool):
    """The stack inside ``torch.utils.checkpoint`` (with dropout): gradients equal
    plain autograd's, reentrant or not."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def run(m: nn.Module) -> list[Any]:
        x = data(1)
        torch.manual_seed(7)
        y = torch.utils.checkpoint.checkpoint(m, x * 1, use_reentrant=use_reentrant)
        loss_of(y).backward()
        return [y.detach(), x.grad, *grads(m)]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert WHOLE[0] in ran
    assert_same(got, want)
    assert_identical(got, blockwise)


def test_nested_calls_and_gradient_accumulation(chains):
    """``stack(stack(x))``, then a second step accumulated without ``zero_grad``:
    gradients equal plain autograd's."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def run(m: nn.Module) -> list[Any]:
        found = []
        for seed in (1, 2):
            x = data(seed)
            torch.manual_seed(seed)
            y = m(m(x * 1))
            loss_of(y).backward()
            found += [y.detach(), x.grad, *(p.grad.clone() for p in m.parameters())]
        return found

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE * 4
    assert_same(got, want)
    assert_identical(got, blockwise)


def test_tensor_hooks_and_retain_grad_on_input_and_output(chains):
    """Tensor hooks and ``retain_grad()`` on the stack's input and output: each hook
    runs once, a hook's rescaled gradient is the one used, as under plain autograd."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def run(m: nn.Module) -> list[Any]:
        x = data(1)
        inp = x * 1
        inp.retain_grad()
        seen: list[str] = []
        inp.register_hook(lambda g: seen.append("in"))
        torch.manual_seed(7)
        y = m(inp)
        y.retain_grad()
        y.register_hook(lambda g: seen.append("out") or 2 * g)
        loss_of(y).backward()
        assert seen == ["out", "in"]
        return [x.grad, inp.grad, y.grad, *grads(m)]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got, blockwise)


def test_forward_mode_ad_and_vmap_are_refused(chains):
    """Forward-mode AD and ``torch.func.vmap`` through the stack raise, naming the
    cause, and leave the input as it was."""
    import torch.autograd.forward_ad as fwAD

    model = stack_of(*couplings(DEPTH))
    x, tangent = data(1, requires_grad=False), data(2, requires_grad=False)
    before = x.clone()
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=r"forward-mode AD"):
        model(fwAD.make_dual(x, tangent))
    assert torch.equal(x, before)
    with pytest.raises(RuntimeError, match=r"torch\.func"):
        torch.func.vmap(lambda v: model(v[None])[0])(x)
    assert torch.equal(x, before)


def test_no_grad_forward_then_backward_and_everything_frozen(chains):
    """A forward pass under ``no_grad`` then a mistaken backward raises as plain
    autograd does; with every parameter frozen and a batch without grad the output
    does not require grad, as under plain autograd."""
    model = stack_of(*couplings(DEPTH))
    for m in (model, plain(model)):
        x = data(1)
        with torch.no_grad():
            y = m(x * 1)
        with pytest.raises(RuntimeError, match=r"does not require grad"):
            y.sum().backward()
        frozen = copy.deepcopy(m).requires_grad_(False)
        batch = data(1, requires_grad=False)
        y = frozen(batch)
        assert not y.requires_grad
        torch.testing.assert_close(y, m(batch).detach(), rtol=RTOL, atol=ATOL)
        assert torch.equal(batch, data(1, requires_grad=False))


def test_a_layer_replaced_by_a_non_invertible_layer(chains):
    """A wrapper of the stack replaced, after construction, by a non-invertible layer
    (``stack.layers[1] = nn.Linear(...)``): it runs on the merged streams, the blocks
    on each side as they would, and gradients equal plain autograd's."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    model.layers[1] = nn.Linear(2 * H, 2 * H).double()
    got, want, blockwise, ran = three_ways(model, chains, step)
    assert ran == [(2, 3)]
    assert_same(got, want)
    assert_identical(got, blockwise)


@pytest.mark.parametrize("kept", [2, 3])
def test_frozen_blocks_at_the_start(chains, kept: int):
    """Blocks 0 and 1 wholly frozen and a batch without grad (a frozen backbone):
    their chain's output needs no gradient; block ``kept`` keeps its input and runs
    on its own; gradients equal plain autograd's, ``None`` for the frozen blocks."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    for layer in model.layers[:2]:
        layer.requires_grad_(False)
    model.layers[kept].keep_input = True
    got, want, blockwise, ran = three_ways(model, chains, lambda m: step(m, "batch"))
    assert ran == ([(0, 1)] if kept == 2 else [(0, 1, 2)])
    assert_same(got, want)
    assert_identical(got, blockwise)
    frozen = sum(1 for layer in model.layers[:2] for _ in layer.parameters())
    assert all(g is None for g in got[2 : 2 + frozen])
    assert all(g is not None for g in got[2 + frozen :])


@pytest.mark.parametrize("how", ["mixed", "same_leaf", "same_activation"])
def test_two_streams_mixed_or_the_same_tensor(chains, how: str):
    """Two streams of which only one requires grad, or the same tensor given as both
    streams: gradients equal plain autograd's (``None`` for the stream without grad),
    and the caller's tensors are unchanged."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))

    def run(m: nn.Module) -> list[Any]:
        a = data(1, shape=(N, H))
        b = data(2, requires_grad=how != "mixed", shape=(N, H))
        before_a, before_b = a.detach().clone(), b.detach().clone()
        if how == "mixed":
            ins = (a, b)
        elif how == "same_leaf":
            ins = (a, a)
        else:
            ins = (a * 1, a * 1)
        torch.manual_seed(7)
        ys = m(*ins)
        loss_of(ys).backward()
        assert torch.equal(a.detach(), before_a) and torch.equal(b.detach(), before_b)
        return [*detached(ys), a.grad, b.grad, *grads(m)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", invertnet.InputKeptWarning)  # per-block, twice
        got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == ALL_BUT_LAST
    assert_same(got, want)
    # Not bit for bit in general: the per-block path recomputes block 0 from the
    # caller's tensors, the chain from its rebuilt input (see
    # test_the_callers_input_comes_back_bit_identical).
    assert_same(got, blockwise)
    if how == "mixed":
        assert got[3] is None and want[3] is None


@pytest.mark.parametrize("norm", ["spectral_norm", "parametrized_spectral_norm", "weight_norm"])
def test_weight_normalisations_in_a_chain(chains, norm: str):
    """Spectral normalisation (a buffer the forward pass reads and updates, as a
    forward pre-hook or a parametrization) and weight normalisation in every block:
    each block's recomputation gets its buffers as its forward pass found them, so
    gradients and buffers equal plain autograd's."""

    def normed() -> nn.Module:
        linear = nn.Linear(H, H)
        if norm == "spectral_norm":
            linear = nn.utils.spectral_norm(linear)
        elif norm == "parametrized_spectral_norm":
            linear = nn.utils.parametrizations.spectral_norm(linear)
        else:
            linear = nn.utils.parametrizations.weight_norm(linear)
        return nn.Sequential(linear, nn.Tanh())

    model = stack_of(*(AdditiveCoupling(normed(), normed()) for _ in range(DEPTH)))

    def run(m: nn.Module) -> tuple[list[Any], list[torch.Tensor]]:
        return step(m), buffers(m)

    (got, got_b), (want, want_b), (blockwise, block_b), ran = three_ways(model, chains, run)
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got_b, want_b)
    assert_identical(got, blockwise)
    assert_identical(got_b, block_b)


def test_forward_hook_on_a_sub_module_of_a_block(chains):
    """A forward hook on a sub-module inside a block (feature capture) does not stop
    the chain; it runs as often on the chain path as on the per-block path (once in
    the forward pass and once in the recomputation: twice, where plain autograd
    runs it once), and gradients equal plain autograd's."""
    model = stack_of(*couplings(DEPTH, nn.Dropout(0.5)))
    counts: list[int] = []

    def run(m: nn.Module) -> list[Any]:
        seen: list[int] = []
        handle = m.layers[1].module.Fm[0].register_forward_hook(lambda *a: seen.append(1))
        found = step(m)
        handle.remove()
        counts.append(len(seen))
        return found

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE
    assert_same(got, want)
    assert_identical(got, blockwise)
    chain_count, plain_count, block_count = counts
    assert plain_count == 1
    assert chain_count == block_count


@pytest.mark.parametrize("order", ["chain_first", "alone_first"])
def test_siamese_calls_chained_differently(chains, order: str):
    """Two calls before one backward, block 1 running in a chain in one call and on
    its own in the other (a hook registered on it between the calls), with
    BatchNorm inside: gradients and running statistics equal plain autograd's."""
    model = stack_of(*couplings(DEPTH, nn.BatchNorm1d(H), nn.Dropout(0.3)))

    def run(m: nn.Module) -> tuple[list[Any], list[torch.Tensor]]:
        x1, x2 = data(1), data(2)
        torch.manual_seed(7)
        handle = None
        if order == "alone_first":
            handle = m.layers[1].register_forward_hook(lambda *a: None)
        y1 = m(x1 * 1)
        if handle is None:
            handle = m.layers[1].register_forward_hook(lambda *a: None)
        else:
            handle.remove()
            handle = None
        y2 = m(x2 * 1)
        if handle is not None:
            handle.remove()
        (loss_of(y1) + (y1 * y2).sum()).backward()
        return [y1.detach(), y2.detach(), x1.grad, x2.grad, *grads(m)], buffers(m)

    (got, got_stats), (want, want_stats), (blockwise, block_stats), ran = three_ways(
        model, chains, run
    )
    assert ran == ([WHOLE[0], (2, 3)] if order == "chain_first" else [(2, 3), WHOLE[0]])
    assert_same(got, want)
    assert_same(got_stats, want_stats)
    assert_identical(got, blockwise)
    assert_identical(got_stats, block_stats)
    assert all(int(b) == 2 for b in got_stats if b.dtype == torch.long)


def test_siamese_calls_with_batches_cut_into_other_chains(chains):
    """A chain holds at most half an input's worth of parameter gradients (64 KiB
    at least), so wider blocks are cut into shorter chains for a small batch
    than for a large one. Two calls before one backward, a small batch then a large one, with
    BatchNorm inside: gradients and running statistics equal plain autograd's.
    (Width 32 here, for blocks of about 17 KiB of gradients.)"""
    width, depth = 32, 6

    def wide() -> nn.Module:
        return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh())

    model = stack_of(*(AdditiveCoupling(wide(), wide()) for _ in range(depth)))

    def run(m: nn.Module) -> tuple[list[Any], list[torch.Tensor]]:
        small = data(1, shape=(4, 2 * width))
        large = data(2, shape=(1024, 2 * width))
        torch.manual_seed(7)
        y1 = m(small * 1)
        y2 = m(large * 1)
        (loss_of(y1) + loss_of(y2)).backward()
        return [y1.detach(), y2.detach(), small.grad, large.grad, *grads(m)], buffers(m)

    (got, got_stats), (want, want_stats), (blockwise, block_stats), ran = three_ways(
        model, chains, run
    )
    # The small batch's blocks are cut into shorter chains, the large one's are not.
    assert len(ran) >= 3 and all(len(c) < depth for c in ran[:-1])
    assert ran[-1] == tuple(range(depth))
    assert_same(got, want)
    assert_same(got_stats, want_stats)
    assert_identical(got, blockwise)
    assert_identical(got_stats, block_stats)


@pytest.mark.parametrize(
    ("depth", "shared_last", "expected"),
    [
        (4, False, [(0, 1, 2, 3)]),  # 3 blocks fill the budget; the 4th joins them
        (5, False, [(0, 1, 2), (3, 4)]),
        (4, True, [(0, 1, 2)]),  # the 4th is the 1st again: it runs alone
    ],
)
def test_last_block_joins_the_chain_before_it(chains, depth, shared_last, expected):
    """A chain is cut where its blocks' gradients would exceed the budget, but the
    last block joins the chain before it rather than run alone, unless it shares a
    module with it. (Width 32 in float64: 17.5 KiB of gradients a block, 3 blocks
    to the 64 KiB budget of a small batch.) Results, BatchNorm's running statistics
    included (the repeated block updates them twice), equal plain autograd's."""
    width = 32

    def wide() -> nn.Module:
        return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh())

    blocks = [AdditiveCoupling(wide(), wide()) for _ in range(depth)]
    if shared_last:
        blocks[-1] = blocks[0]
    model = stack_of(*blocks)

    def run(m: nn.Module) -> tuple[list[Any], list[torch.Tensor]]:
        x = data(1, shape=(4, 2 * width))
        y = m(x * 1)
        loss_of(y).backward()
        return [y.detach(), x.grad, *grads(m)], buffers(m)

    (got, got_stats), (want, want_stats), (blockwise, block_stats), ran = three_ways(
        model, chains, run
    )
    assert ran == expected
    assert_same(got, want)
    assert_same(got_stats, want_stats)
    assert_identical(got, blockwise)
    assert_identical(got_stats, block_stats)


@pytest.mark.parametrize(
    ("input_bytes", "budget"),
    [
        (1000, 64 * 1024),  # the floor
        (256 * 1024, 256 * 1024),  # small: a whole input's worth
        (1024 * 1024, 1024 * 1024),
        (1536 * 1024, 1024 * 1024),  # between: 1 MiB, no step down at the bound
        (4 * 1024 * 1024, 2 * 1024 * 1024),  # large: half
    ],
)
def test_chain_gradient_budget(input_bytes, budget):
    """A chain holds at most half the stack input's bytes of parameter gradients, a
    whole input's worth up to 1 MiB, 64 KiB at least."""
    assert _chain_gradient_budget(input_bytes) == budget


def test_a_small_input_chains_a_whole_input_worth_of_gradients(chains):
    """Below 1 MiB of input a chain may hold the whole input's worth of parameter
    gradients: width 56 in float64 is 49.9 KiB of gradients a block and a batch of
    300 a 262.5 KiB input, so the 4 blocks run as one chain (with half the input,
    131 KiB, they would run as two chains of 2). Gradients equal plain autograd's."""
    width, batch = 56, 300

    def branch() -> nn.Module:
        return nn.Sequential(nn.Linear(width, width), nn.Tanh())

    model = stack_of(*(AdditiveCoupling(branch(), branch()) for _ in range(4)))

    def run(m: nn.Module) -> tuple[list[Any], list[torch.Tensor]]:
        x = data(1, shape=(batch, 2 * width))
        y = m(x * 1)
        loss_of(y).backward()
        return [y.detach(), x.grad, *grads(m)], buffers(m)

    (got, _), (want, _), (blockwise, _), ran = three_ways(model, chains, run)
    assert ran == [(0, 1, 2, 3)]
    assert_same(got, want)
    assert_identical(got, blockwise)


def test_under_torch_compile_no_chain_runs(chains):
    """Under ``torch.compile`` (the eager backend: Dynamo traces the stack) every
    block runs on its own; gradients equal plain autograd's."""
    model = stack_of(*couplings(DEPTH))
    reference = plain(model)
    compiled = torch.compile(model, backend="eager")
    results = []
    for m, params in ((compiled, model), (reference, reference)):
        x = data(1)
        y = m(x * 1)
        loss_of(y).backward()
        results.append([y.detach(), x.grad, *grads(params)])
    assert chains == []
    assert_same(*results)


def test_cpu_autocast_in_bfloat16(chains):
    """A float32 stack under CPU autocast to bfloat16, with dropout: the chain
    replays autocast in its backward as the per-block path does (bit for bit), and
    gradients equal plain autograd's."""

    def branch() -> nn.Module:
        return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Dropout(0.2))

    model = ReversibleSequential(*(AdditiveCoupling(branch(), branch()) for _ in range(DEPTH)))

    def run(m: nn.Module) -> list[Any]:
        x = data(1, shape=(2, 4, 6, 6)).float().detach().requires_grad_()
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x * 1)
        loss_of(y.float()).backward()
        return [y.detach(), x.grad, *grads(m)]

    got, want, blockwise, ran = three_ways(model, chains, run)
    assert ran == WHOLE
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert_identical(got, blockwise)
