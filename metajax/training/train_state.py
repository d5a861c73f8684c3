"""The training state: everything a meta-training run needs to continue exactly."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any


@struct.dataclass
class TrainState:
    """Meta-training state (a pytree, so it can be jitted, donated and checkpointed).

    Attributes:
      step: number of meta-updates applied so far (int32 scalar).
      params: the meta-parameters (e.g. ``{"model": ...}`` for MAML).
      opt_state: the outer optimizer's state.
      rng: PRNG key for everything random in training (task sampling, stochastic losses).
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    rng: jax.Array


def create_train_state(params: PyTree, optimizer: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
    """A fresh :class:`TrainState` at step 0 (holding its own copy of ``params``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metajax import create_train_state
      >>> state = create_train_state({"w": jnp.zeros(3)}, optax.adam(1e-3), jax.random.key(0))
      >>> int(state.step)
      0
    """
    # Own copies: train steps donate the state's buffers, and the caller may reuse ``params``.
    params = jax.tree_util.tree_map(jnp.array, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=rng)
