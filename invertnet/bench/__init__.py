"""``invertnet bench``: memory and speed of invertnet against plain autograd and
:func:`torch.utils.checkpoint.checkpoint`, side by side, on built-in workloads.

Run ``invertnet bench`` (or ``python -m invertnet.bench``); ``--help`` lists the
options. Each workload (an additive-coupling conv stack, an affine-coupling conv
stack, a MomentumNet of MLP blocks, a Transformer encoder converted with
:func:`invertnet.transform_to_momentumnet`, and a Llama model where ``transformers``
is installed) is built at several depths, at a size (``--size cpu``, ``cpu-large``
or ``gpu``), and trained several ways on the same weights: plain autograd,
checkpointing every block, invertnet, and the peers that are installed (RevLib,
memcnn, momentumnet); see :mod:`invertnet.bench.workloads`.

How it measures
---------------
* Each configuration (workload, depth, method) runs in a fresh process, forked from
  a server that has imported torch and done nothing else (:mod:`invertnet.bench._worker`).
* A first step allocates the gradients, so model and gradient memory is part of
  the baseline and not counted.
* Time: the median wall time of ``--repeats`` training steps (forward, scalar loss,
  backward). Ratios compare configurations of the same run.
* Memory is measured over the second step, time over later ones. On CPU: the peak resident set
  (``VmHWM`` in ``/proc/self/status``, reset by writing ``5`` to
  ``/proc/self/clear_refs``) minus the resident set before the step, read after
  glibc has given its free pages back (``malloc_trim``), so the baseline does not
  hide memory kept in the allocator's free lists; until then glibc maps every
  allocation of 128 KiB or more on its own (``mallopt``), so freed tensors leave
  the resident set at once. The timed steps run with glibc's usual thresholds.
* Memory on CUDA: ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats``, minus ``memory_allocated`` before; time
  on CUDA from CUDA events around each step.
* Warnings are recorded from the model's construction on; a memory-saving method
  that keeps inputs (:class:`invertnet.InputKeptWarning`) or whose memory grows with
  depth is flagged in the report (:func:`invertnet.bench.report.find_alerts`).
* Cross-check: the bytes autograd saves for backward in one forward pass, counted with
  :func:`torch.autograd.graph.saved_tensors_hooks` (distinct storages, parameters
  excluded). For plain autograd it should be close to the measured peak.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``invertnet bench`` with ``argv`` (the arguments after ``bench``).

    Returns
    -------
    int
        The exit status: 0 on success, 1 if a configuration failed, 2 for bad options.
    """
    from invertnet.bench.cli import main as cli_main

    return cli_main(argv)
