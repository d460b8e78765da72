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


def _tokens_per_layer(cache: Any) -> list[int] | None:
    """How many tokens each layer's entry of ``cache`` holds, or None if it cannot tell.

    ``transformers`` caches (from 4.56) hold one entry per layer in ``layers``; an
    encoder-decoder cache holds them in its ``self_attention_cache``.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        layers = getattr(getattr(cache, "self_attention_cache", None), "layers", None)
    if not isinstance(layers, (list, tuple)) or not layers:
        return None
    try:
        return [int(layer.get_seq_length()) for layer in layers]
    except (AttributeError, TypeError):
        return None


def _filled_cache_message(value: Any, path: Slot, tokens: int) -> str:
    """The error for a cache that holds tokens when the stage is called for training.

    When only the leading layers' entries hold tokens, a layer run before the stage
    filled the cache in this very pass: most often the first layer that
    :func:`~invertnet.transform_to_momentumnet` keeps outside the stage by default
    (``keep_first_layer=True``), run with the model's default ``use_cache=True``.
    The message then names that cause and ``keep_first_layer=False``.
    """
    start = (
        f"MomentumNet(use_backprop=False): {describe_slot(path)} is a key/value cache "
        f"({type(value).__name__}) that already holds {tokens} token(s). "
    )
    why = (
        "Training without stored activations calls every layer again in backward, and a "
        "layer appends to the cache each time it runs, so the replay would not see what the "
        "forward pass saw. "
    )
    first_layer = (
        "transform_to_momentumnet's default keep_first_layer=True runs the first layer "
        "before the stage, and with use_cache on that layer fills the cache"
    )
    per_layer = _tokens_per_layer(value)
    filled = 0  # how many leading layers' entries hold tokens
    while per_layer is not None and filled < len(per_layer) and per_layer[filled]:
        filled += 1
    if per_layer is not None and 0 < filled < len(per_layer) and not any(per_layer[filled:]):
        return (
            start + f"Only the entries of its first {filled} layer(s) (of {len(per_layer)}) hold "
            f"tokens: a layer run before the momentum stage filled it in this pass "
            f"({first_layer}). "
            + why
            + "Convert with keep_first_layer=False (transformer layers keep the shape of "
            "their input, so the first layer can join the stage), or train with "
            "use_cache=False (or model.config.use_cache = False)"
        )
    fixes = (
        "Train without a filled cache (past_key_values=None, use_cache=False), run under "
        "torch.no_grad() for inference or generation, or convert with use_backprop=True"
    )
    if per_layer is None:
        # Which layers hold the tokens is unknown: a kept first layer may have filled it.
        fixes += (
            f"; if no cache was passed in, a layer run before the stage filled it ({first_layer}"
            "): convert with keep_first_layer=False"
        )
    return start + why + fixes


def _without(value: Any, path: Slot, dropped: list[Slot]) -> Any:
    if is_kv_cache(value):
        tokens = _cached_tokens(value)
        if tokens:
            raise ValueError(_filled_cache_message(value, path, tokens))
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
