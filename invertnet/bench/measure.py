"""Measure configurations (workload, depth, method); meant for fresh processes.

:func:`measure_here` builds one configuration's model and runs training steps
(forward, a scalar loss, backward): a first one allocates the gradients and counts
the bytes autograd saves for backward (the cross-check); a second is the one whose
peak activation memory the probe (:mod:`invertnet.bench.memory`) measures; then
``warmup`` unmeasured steps and ``repeats`` timed ones, whose median wall time is
the step time.

:func:`time_interleaved` times the methods of one workload and depth in one
process instead, alternating their steps, so that every method sees the same
machine: on a shared machine whose speed changes in spells, methods timed in
separate processes, minutes apart, differ by more than the few per cent that a
time target has to resolve.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

import invertnet
from invertnet.bench.memory import SavedBytes, probe_for
from invertnet.bench.workloads import Batch, build

__all__ = [
    "AUTOCAST",
    "Config",
    "Result",
    "StepTimer",
    "combine_rounds",
    "measure_here",
    "time_interleaved",
    "train_step",
    "with_times",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

#: ``--autocast`` modes: ``None`` (off) or the dtype of :func:`torch.autocast`.
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Config:
    """One benchmark configuration."""

    workload: str
    depth: int
    method: str
    batch_size: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    seed: int = 0
    size: str = "cpu"
    autocast: str | None = None


@dataclass
class Result:
    """What one configuration measured; ``error`` is set instead when it failed."""

    config: Config
    step_times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    saved_bytes: int | None = None
    batch_size: int | None = None
    parameters: int | None = None
    memory_method: str = ""
    warnings: list[str] = field(default_factory=list)
    kept_inputs: int = 0
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        """Median step time in seconds."""
        return statistics.median(self.step_times_s) if self.step_times_s else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        out = asdict(self)
        out["config"] = asdict(self.config)
        out["median_s"] = self.median_s
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """The inverse of :meth:`to_dict`."""
        fields = {k: v for k, v in data.items() if k not in ("config", "median_s")}
        return cls(config=Config(**data["config"]), **fields)


def combine_rounds(rounds: list[Result]) -> Result:
    """Pool the results of one configuration measured in several rounds.

    The step times of all rounds are pooled, so the reported median is over all of
    them; the peak memory is the median of the rounds' peaks (one of them, not an
    average); warnings are merged, and the kept inputs are the most any round saw.
    A failed round makes the whole failed.

    Parameters
    ----------
    rounds : list of Result
        At least one result, all of the same configuration.

    Returns
    -------
    Result
        One result for the configuration.

    Raises
    ------
    ValueError
        If ``rounds`` is empty or mixes configurations.
    """
    if not rounds:
        raise ValueError("combine_rounds: expected at least one result, got none")
    first = rounds[0]
    if any(r.config != first.config for r in rounds):
        raise ValueError(
            "combine_rounds: expected results of one configuration, got "
            + ", ".join(
                sorted({f"{r.config.workload}/{r.config.depth}/{r.config.method}" for r in rounds})
            )
        )
    merged_warnings = sorted({w for r in rounds for w in r.warnings})
    kept = max(r.kept_inputs for r in rounds)
    failed = next((r for r in rounds if r.error is not None), None)
    if failed is not None:
        return Result(
            config=first.config, warnings=merged_warnings, kept_inputs=kept, error=failed.error
        )
    peaks = [r.peak_bytes for r in rounds if r.peak_bytes is not None]
    return Result(
        config=first.config,
        step_times_s=[t for r in rounds for t in r.step_times_s],
        peak_bytes=statistics.median_low(peaks) if peaks else None,
        saved_bytes=first.saved_bytes,
        batch_size=first.batch_size,
        parameters=first.parameters,
        memory_method=first.memory_method,
        warnings=merged_warnings,
        kept_inputs=kept,
    )


def _build(config: Config, device: torch.device) -> tuple[torch.nn.Module, Batch]:
    """The model and batch of ``config``, on ``device``."""
    return build(
        config.workload,
        config.depth,
        config.method,
        batch_size=config.batch_size,
        dtype=DTYPES[config.dtype],
        device=device,
        seed=config.seed,
        size=config.size,
    )


def _sizes(model: torch.nn.Module, batch: Batch) -> tuple[int, int]:
    """The batch size and the number of parameters, as results report them."""
    return int(batch.args[0].shape[0]), sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Time a step on ``device``: wall time on CPU, CUDA events on a GPU.

    On CUDA the step is bracketed by two events recorded on the current stream
    (after a synchronisation, so no earlier work is counted), and the time between
    them is read once the second has completed: the device's time for the step,
    including any gaps where the GPU waited for the host to launch kernels.

    Parameters
    ----------
    device : torch.device or str
        Where the timed steps run.

    Examples
    --------
    >>> timer = StepTimer("cpu")
    >>> timer(lambda: sum(range(1000))) > 0
    True
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def __call__(self, step: Any) -> float:
        """Run ``step()`` and return its time in seconds."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            step()
            return time.perf_counter() - start
        torch.cuda.synchronize(self.device)
        with torch.cuda.device(self.device):
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3  # milliseconds


def train_step(
    model: torch.nn.Module,
    batch: Any,
    counter: SavedBytes | None = None,
    autocast: str | None = None,
) -> None:
    """One training step as the benchmark times it: forward, a scalar loss, backward.

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`invertnet.bench.workloads.build`.
    batch : Batch
        Its batch: positional and keyword arguments of the forward pass.
    counter : SavedBytes, optional
        Counts the bytes the forward pass saves for backward.
    autocast : str, optional
        A key of :data:`AUTOCAST`: run the forward pass and the loss under
        :func:`torch.autocast` with that dtype (backward runs outside it, as usual).
    """
    # Only the forward pass is counted: what it saves is what a step keeps alive;
    # recomputation in backward saves transient tensors for one block at a time.
    counting = counter.counting() if counter is not None else contextlib.nullcontext()
    if autocast is None:
        casting: Any = contextlib.nullcontext()
    else:
        device_type = batch.args[0].device.type
        casting = torch.autocast(device_type=device_type, dtype=AUTOCAST[autocast])
    with counting, casting:
        out = model(*batch.args, **batch.kwargs)
        loss = out.float().square().mean()
    loss.backward()


class _Recorder:
    """Record the warnings of a block; count the inputs a wrapper kept.

    :class:`invertnet.InputKeptWarning` is emitted once per wrapper that keeps an
    input it was asked to free, so their number is the number of such wrappers.
    """

    def __init__(self) -> None:
        self.messages: set[str] = set()
        self.kept_inputs = 0

    @contextlib.contextmanager
    def recording(self) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                self._add(caught)

    def _add(self, caught: list[warnings.WarningMessage]) -> None:
        kept_category = getattr(invertnet, "InputKeptWarning", None)
        for w in caught:
            self.messages.add(f"{w.category.__name__}: {w.message}")
            if kept_category is not None and issubclass(w.category, kept_category):
                self.kept_inputs += 1


def measure_here(config: Config) -> Result:
    """Measure ``config`` in this process, recording the warnings it raises.

    Warnings are recorded from the start, the model's construction and the
    untimed first steps included: a wrapper warns once, at its first training
    call, that it keeps an input (:class:`invertnet.InputKeptWarning`), and those
    are counted in :attr:`Result.kept_inputs`.

    Parameters
    ----------
    config : Config
        What to build and how often to run it.

    Returns
    -------
    Result
        Step times, peak activation memory, bytes saved for backward, the
        distinct warning messages seen and the number of kept inputs.
    """
    recorder = _Recorder()
    with recorder.recording():
        result = _measure(config)
    result.warnings = sorted(recorder.messages)
    result.kept_inputs = recorder.kept_inputs
    return result


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def time_interleaved(configs: list[Config]) -> list[Result]:
    """Time the methods of one workload and depth against each other, in this process.

    Every method's model is built and run for one step (which allocates its
    gradients) and ``warmup`` more. Then come ``repeats`` rounds of one timed step
    per method, in orders where each method comes right after each other one equally
    often (:func:`_balanced_orders`), so that no method always inherits the state
    one other leaves behind. A method that fails is reported
    failed and left out of the later rounds; the others go on. Each method's
    warnings (and kept inputs) are recorded on its own, from its construction on.
    On CUDA the steps are timed with CUDA events (:class:`StepTimer`).

    Parameters
    ----------
    configs : list of Config
        One per method; all else (workload, depth, size, batch size, dtype,
        autocast, device, threads, repeats, warmup, seed) the same.

    Returns
    -------
    list of Result
        In the order of ``configs``: the step times, or the error; no memory figures.

    Raises
    ------
    ValueError
        If ``configs`` is empty, or its configurations differ in more than the method.
    """
    if not configs:
        raise ValueError("time_interleaved: expected at least one configuration, got none")
    first = configs[0]
    methods = [c.method for c in configs]
    same_but_method = all(replace(c, method=first.method) == first for c in configs)
    if not same_but_method or len(set(methods)) < len(methods):
        raise ValueError(
            "time_interleaved: expected configurations that differ only in their method, got "
            + ", ".join(f"{c.workload}/{c.depth}/{c.method}" for c in configs)
        )
    recorders = [_Recorder() for _ in configs]
    results = _time_interleaved(configs, recorders)
    for result, recorder in zip(results, recorders):
        result.warnings = sorted(recorder.messages)
        result.kept_inputs = recorder.kept_inputs
    return results


@functools.cache
def _balanced_orders(n: int) -> tuple[tuple[int, ...], ...]:
    """Orders of ``n`` methods in which each method comes right after each other one
    equally often (a Williams design): ``n`` orders for even ``n``, ``2n`` for odd.

    A step leaves the allocator, the caches and the page tables as its method used
    them, and the next step inherits that: a method that always followed one that
    frees hundreds of megabytes (plain autograd at depth 128) would pay for the
    pages its predecessor gave back at every step. Rotating one order does not
    help, as it keeps every method's predecessor.
    """
    if n < 1:  # every method failed: empty rounds
        return ((),)
    # 0, 1, n-1, 2, n-2, ...: its successive differences take every value mod n once.
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [tuple((k + shift) % n for k in first) for shift in range(n)]
    if n % 2:
        orders += [order[::-1] for order in orders]
    return tuple(orders)


def _time_interleaved(configs: list[Config], recorders: list[_Recorder]) -> list[Result]:
    first = configs[0]
    if first.threads is not None:
        torch.set_num_threads(first.threads)
    device = torch.device(first.device)
    timer = StepTimer(device)
    results = [Result(config=c) for c in configs]
    running: dict[int, tuple[torch.nn.Module, Any]] = {}
    for i, config in enumerate(configs):
        try:
            with recorders[i].recording():
                model, batch = _build(config, device)
                for _ in range(1 + config.warmup):
                    train_step(model, batch, autocast=config.autocast)
                _sync(device)
        except Exception as exc:  # reported in the result; the other methods go on
            results[i].error = _error(exc)
            continue
        running[i] = (model, batch)
        results[i].batch_size, results[i].parameters = _sizes(model, batch)
    for round_ in range(first.repeats):
        methods = list(running)
        orders = _balanced_orders(len(methods))
        for i in (methods[k] for k in orders[round_ % len(orders)]):
            model, batch = running[i]
            try:
                with recorders[i].recording():
                    seconds = timer(lambda: train_step(model, batch, autocast=first.autocast))  # noqa: B023
            except Exception as exc:
                results[i].error = _error(exc)
                results[i].step_times_s = []
                del running[i]
                continue
            results[i].step_times_s.append(seconds)
    return results


def with_times(memory: Result, timing: Result) -> Result:
    """One result from a memory run (:func:`measure_here` with no timed steps) and a
    timing run (:func:`time_interleaved`) of the same configuration; either failing
    fails the whole, and inputs kept in either count."""
    failed = memory.error or timing.error
    return replace(
        memory,
        config=timing.config,
        step_times_s=[] if failed else list(timing.step_times_s),
        warnings=sorted(set(memory.warnings) | set(timing.warnings)),
        kept_inputs=max(memory.kept_inputs, timing.kept_inputs),
        error=failed,
    )


def _measure(config: Config) -> Result:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    probe = probe_for(device)
    probe.prepare()
    model, batch = _build(config, device)
    # The first step allocates the gradients (so they count as model memory, not
    # as activations) and counts the bytes autograd saves, the cross-check.
    counter = SavedBytes(model)
    train_step(model, batch, counter, autocast=config.autocast)
    _sync(device)

    probe.start()
    train_step(model, batch, autocast=config.autocast)
    _sync(device)
    peak = probe.peak_bytes()
    probe.finish()

    for _ in range(config.warmup):  # warm caches and the allocator for timing
        train_step(model, batch, autocast=config.autocast)
    _sync(device)
    timer = StepTimer(device)
    times = [
        timer(lambda: train_step(model, batch, autocast=config.autocast))
        for _ in range(config.repeats)
    ]
    batch_size, parameters = _sizes(model, batch)
    return Result(
        config=config,
        step_times_s=times,
        peak_bytes=peak,
        saved_bytes=counter.nbytes,
        batch_size=batch_size,
        parameters=parameters,
        memory_method=probe.method,
    )
