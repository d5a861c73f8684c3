"""Choosing which parameters adapt in the inner loop (expressed once, used by any algorithm).

An *adapt mask* is a pytree of Python bools with the structure of the model
parameters: ``True`` leaves are adapted by the inner loop, ``False`` leaves are
shared across tasks and only updated by the outer loop.

Example:
  >>> params = {"body": {"w": 1.0}, "head": {"w": 2.0, "b": 0.0}}
  >>> mask_by_path(params, lambda path: path[0] == "head")
  {'body': {'w': False}, 'head': {'b': True, 'w': True}}
  >>> last_module_mask(params)
  {'body': {'w': False}, 'head': {'b': True, 'w': True}}
"""

from __future__ import annotations

from typing import Any, Callable

import jax

PyTree = Any


def key_name(entry) -> str:
    """The name of one pytree key-path entry: a dict key, attribute name or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def mask_by_path(params: PyTree, predicate: Callable[[tuple[str, ...]], bool]) -> PyTree:
    """A mask with ``predicate(path)`` at each leaf; ``path`` is a tuple of key names."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(predicate(tuple(key_name(p) for p in path))), params)


def last_module_mask(params: PyTree) -> PyTree:
    """Adapts only the head of a params dict: top-level entries named ``head*`` if there
    are any, else the last top-level entry (the output layer of a Flax model).

    Flax linen names submodules in creation order (``Dense_0``, ``Dense_1``, ...), so for the
    built-in backbones the last top-level key is the output layer.
    """
    if not isinstance(params, dict) or not params:
        raise TypeError("last_module_mask needs a non-empty dict of parameters; "
                        "build the mask with mask_by_path for other structures.")
    if any(str(k).startswith("head") for k in params):  # e.g. Conv4's head_kernel/head_bias
        return mask_by_path(params, lambda path: path[0].startswith("head"))
    head = _last_key(params)
    return mask_by_path(params, lambda path: path[0] == head)


def _last_key(params: dict) -> str:
    def order(name: str):
        prefix, _, index = name.rpartition("_")
        return (prefix, int(index)) if index.isdigit() else (name, -1)

    keys = list(params)
    numbered = [k for k in keys if k.rpartition("_")[2].isdigit()]
    # Prefer Flax's creation order (highest index) when every key is numbered; else dict order.
    return max(numbered, key=lambda k: order(k)[1]) if len(numbered) == len(keys) else keys[-1]
