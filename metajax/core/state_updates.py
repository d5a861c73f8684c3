"""State updates: meta-parameter leaves a meta-loss sets instead of the optimizer.

A meta-loss may return, under the metrics key :data:`STATE_UPDATES`, new values for
meta-parameter leaves that are state rather than weights (e.g. MAML++'s batch-norm
running statistics): a dict from the leaf's ``"/"``-joined key path to its new value.
The outer step (:func:`metajax.make_train_step`) writes them in place of the optimizer's
update, in the same compiled call, like Flax's mutable collections.

Example:
  >>> import jax.numpy as jnp
  >>> params = {"bn": {"mean": jnp.zeros(2)}, "w": jnp.ones(2)}
  >>> list(leaf_paths(params))
  ['bn/mean', 'w']
  >>> apply_state_updates(params, {"bn/mean": jnp.full(2, 0.5)})["bn"]["mean"].tolist()
  [0.5, 0.5]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from metajax.core.masks import key_name

PyTree = Any

STATE_UPDATES = "state_updates"


def _path_name(path) -> str:
    return "/".join(key_name(k) for k in path)


def leaf_paths(tree: PyTree) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for the leaves of a pytree of dicts (the state-update key format)."""
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def apply_state_updates(params: PyTree, updates: dict | None) -> PyTree:
    """``params`` with the leaves named in ``updates`` (see ``STATE_UPDATES``) replaced."""
    if not updates:
        return params
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_path_name(path) for path, _ in flat]
    unknown = sorted(set(updates) - set(names))
    if unknown:
        raise KeyError(f"state updates name leaves the meta-parameters do not have: {unknown}; "
                       f"valid paths look like {names[:3]}.")
    leaves = []
    for name, (_, leaf) in zip(names, flat):
        new = updates.get(name, leaf)
        if jnp.shape(new) != jnp.shape(leaf):
            raise ValueError(f"state update for {name!r} has shape {jnp.shape(new)}, the leaf "
                             f"has {jnp.shape(leaf)}.")
        leaves.append(jnp.asarray(new, jnp.result_type(leaf)))
    return jax.tree_util.tree_unflatten(treedef, leaves)
