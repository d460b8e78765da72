"""Key/value caches among a call's arguments: off for the memory-saving training pass.

Decoder models of Hugging Face ``transformers`` pass one cache object to every
layer (``cache=``, ``past_key_values=``, ``layer_past=`` or positionally), and
each layer appends its keys and values to it. ``MomentumNet(use_backprop=False)``
calls every layer a second time in backward; with the cache still attached the
layer would append again and attend over twice the keys, or fail on a mask sized
for the first pass. The training pass that keeps no activations therefore runs
the layers without a cache, as ``transformers`` does under gradient
checkpointing: outputs and gradients are those of the model, and the cache is
left as it was given. A cache that already holds tokens cannot be dropped
without changing the result, and is refused with an error. Generation runs
without grad, where the layers run once, cache included.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from invertnet.momentum.arguments import Slot, describe_slot

__all__ = ["capturing_layer_outputs", "is_kv_cache", "warn_if_capturing", "without_kv_caches"]

#: Keyword arguments that switch caching on in ``transformers`` layers.
_USE_CACHE = "use_cache"


def is_kv_cache(value: Any) -> bool:
    """Whether ``value`` is a key/value cache that layers append to.

    A ``transformers`` ``Cache`` (any class of that name among the value's bases,
    defined in ``transformers``), or any object with the same two methods,
    ``update`` (append a layer's keys and values) and ``get_seq_length``.
    """
    for cls in type(value).__mro__:
        if cls.__name__ == "Cache" and cls.__module__.startswith("transformers"):
            return True
    return callable(getattr(value, "update", None)) and callable(
        getattr(value, "get_seq_length", None)
    )


def _cached_tokens(cache: Any) -> int:
    """How many tokens ``cache`` holds, its cross-attention part included."""
    total = int(cache.get_seq_length())
    cross = getattr(cache, "cross_attention_cache", None)
    if cross is not None and is_kv_cache(cross):
        total += int(cross.get_seq_length())
    return total


def _without(value: Any, path: Slot, dropped: list[Slot]) -> Any:
    if is_kv_cache(value):
        tokens = _cached_tokens(value)
        if tokens:
            raise ValueError(
                f"MomentumNet(use_backprop=False): {describe_slot(path)} is a key/value cache "
                f"({type(value).__name__}) that already holds {tokens} token(s). Training "
                "without stored activations calls every layer again in backward, and a layer "
                "appends to the cache each time it runs, so the replay would not see what the "
                "forward pass saw. Train without a filled cache (past_key_values=None, "
                "use_cache=False), run under torch.no_grad() for inference or generation, or "
                "convert with use_backprop=True"
            )
        dropped.append(path)
        return None
    if isinstance(value, list):
        return [_without(item, (*path, i), dropped) for i, item in enumerate(value)]
    if isinstance(value, tuple):
        items = [_without(item, (*path, i), dropped) for i, item in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        result = {key: _without(item, (*path, key), dropped) for key, item in value.items()}
        if type(value) is not dict:
            copied = value.copy()
            copied.update(result)
            return copied
        return result
    return value


def without_kv_caches(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with empty key/value caches replaced by ``None``.

    ``use_cache=True`` among ``kwargs`` becomes ``False``. The originals are
    unchanged, and returned as they are when they hold no cache.

    Raises
    ------
    ValueError
        If a cache already holds tokens (it cannot be dropped without changing
        what the layers compute).

    Warns
    -----
    UserWarning
        When a cache is dropped: it stays empty, where the original model would
        have filled it.
    """
    dropped: list[Slot] = []
    new_args = _without(args, ("args",), dropped)
    new_kwargs = _without(kwargs, ("kwargs",), dropped)
    if not dropped:
        return args, kwargs
    if new_kwargs.get(_USE_CACHE):
        new_kwargs[_USE_CACHE] = False
    where = ", ".join(describe_slot(path) for path in dropped)
    warnings.warn(
        f"MomentumNet(use_backprop=False): the key/value cache in {where} is not filled in "
        "training (each layer runs again in backward, and would append twice); outputs and "
        "gradients are unaffected, the cache the model returns stays empty. Pass "
        "use_cache=False (or set model.config.use_cache = False) for training to silence this",
        UserWarning,
        stacklevel=4,
    )
    return new_args, new_kwargs


def capturing_layer_outputs() -> bool:
    """Whether a ``transformers`` model is collecting its layers' outputs right now.

    ``output_hidden_states=True`` and ``output_attentions=True`` make
    ``transformers`` 5 record what hooked sub-modules return while the model
    runs. False when ``transformers`` is not imported or records nothing.
    """
    module = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(module, "_active_collector", None)
    get = getattr(collector, "get", None)
    collected = get() if callable(get) else None
    # A dict of lists, one per kind of output requested (empty when none is).
    return isinstance(collected, dict) and any(not str(key).startswith("_") for key in collected)


def warn_if_capturing() -> None:
    """Warn that layer outputs captured in the memory-saving pass carry no gradient."""
    if capturing_layer_outputs():
        warnings.warn(
            "MomentumNet(use_backprop=False): the model collects its layers' outputs "
            "(output_hidden_states or output_attentions); in training without stored "
            "activations the layers run without grad in the forward pass, so what is "
            "collected carries no gradient, and a loss built on it would not train the "
            "layers through it. Use use_backprop=True to train on per-layer outputs",
            UserWarning,
            stacklevel=4,
        )
