"""The MLP of the MAML paper's sinusoid experiment (two hidden layers of 40 ReLU units)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

from metajax.models.functional import FunctionalModel, from_linen


class MLP(nn.Module):
    """A ReLU multi-layer perceptron (Flax linen)."""

    hidden_sizes: Sequence[int] = (40, 40)
    output_dim: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.output_dim)(x)


def init_mlp(key: jax.Array, input_dim: int = 1, output_dim: int = 1,
             hidden_sizes: Sequence[int] = (40, 40)) -> tuple[FunctionalModel, Any]:
    """The paper's sinusoid MLP as ``(apply_fn, params)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> apply_fn, params = init_mlp(jax.random.key(0))
      >>> apply_fn(params, jnp.zeros((7, 1))).shape
      (7, 1)
    """
    return from_linen(MLP(hidden_sizes=tuple(hidden_sizes), output_dim=output_dim), key,
                      jax.numpy.zeros((1, input_dim)))
