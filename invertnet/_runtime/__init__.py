"""The runtime floor: what the memory-saving layers share, below all of them.

``wrappers/``, ``couplings/``, ``momentum/`` and ``flows/`` import from here, never
the other way round:

* :mod:`invertnet._runtime.rng`: recording and replaying the random-number state
  of sub-module calls;
* :mod:`invertnet._runtime.forward_state`: the one record of what a forward pass
  ran under (RNG, autocast, training flags, parameters and buffers with their
  versions), replayed for the recomputation in backward or refused with an error
  that names the cause;
* :mod:`invertnet._runtime.graph`: the leaves a recomputed graph reaches besides
  the tensors a layer knows of;
* :mod:`invertnet._runtime.first_order`: backward passes that cannot themselves be
  differentiated, with an error that names the layer.
"""
