"""The runtime floor: what the memory-saving layers share, below all of them.

``wrappers/``, ``couplings/``, ``momentum/`` and ``flows/`` import from here, never
the other way round:

* :mod:`invertnet._runtime.torch_private`: every private PyTorch API invertnet
  uses, behind one small module that ``tests/test_torch_private.py`` checks on
  every release CI covers;
* :mod:`invertnet._runtime.deferred_check`: checks of values on a device without a
  host sync (the wrapper's finite check, the momentum range check);
* :mod:`invertnet._runtime.rng`: recording and replaying the random-number state
  of sub-module calls;
* :mod:`invertnet._runtime.forward_state`: the one record of what a forward pass
  ran under (RNG, autocast, training flags, parameters and buffers with their
  versions), replayed for the recomputation in backward or refused with an error
  that names the cause;
* :mod:`invertnet._runtime.graph`: the leaves a recomputed graph reaches besides
  the tensors a layer knows of;
* :mod:`invertnet._runtime.first_order`: backward passes that cannot themselves be
  differentiated, with an error that names the layer;
* :mod:`invertnet._runtime.contract`: the block contract (``forward``, ``inverse``,
  the fused ``inverse_and_vjp``, ``forward_and_log_det``), the one thing the
  wrapper and ``Flow`` know of the blocks they run.

The package's layers, this floor lowest, are written down in ``tests/test_layers.py``,
which fails on an import that runs up them or round in a cycle.
"""
