"""Turning Flax modules into the pure ``apply(params, inputs)`` the core expects.

The core works with any pure function ``apply_fn(params, inputs) -> predictions``
over a parameter pytree. Flax **linen** modules are the primary route
(:func:`from_linen`); Flax **NNX** modules work through :func:`from_nnx`, which
splits the module into a static graph and a parameter state.

Example (linen):
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> apply_fn, params = from_linen(nn.Dense(3), jax.random.key(0), jnp.zeros((1, 2)))
  >>> apply_fn(params, jnp.ones((4, 2))).shape
  (4, 3)

Example (NNX):
  >>> from flax import nnx
  >>> apply_fn, params = from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  >>> apply_fn(params, jnp.ones((4, 2))).shape
  (4, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
    """A pure ``apply(params, inputs)`` wrapper with a readable repr (hashable, jit-friendly)."""

    module: Any
    kind: str  # "linen" or "nnx"
    # Optional input transform applied first (e.g. uint8 pixels -> normalised floats), so a
    # wrapped model stays a FunctionalModel that helpers such as ``with_bn_mode`` can rebuild.
    preprocess: Optional[Callable[[PyTree], PyTree]] = None

    def __call__(self, params: PyTree, inputs: PyTree) -> PyTree:
        if self.preprocess is not None:
            inputs = self.preprocess(inputs)
        if self.kind == "linen":
            return self.module.apply({"params": params}, inputs)
        from flax import nnx
        return nnx.merge(self.module, params)(inputs)


def from_linen(module: nn.Module, key: jax.Array, sample_inputs: PyTree) -> tuple[FunctionalModel, PyTree]:
    """``(apply_fn, params)`` for a linen module initialised on ``sample_inputs``."""
    variables = module.init(key, sample_inputs)
    extra = set(variables) - {"params"}
    if extra:
        raise ValueError(
            f"{type(module).__name__} has variable collections {sorted(extra)} besides 'params'; "
            "the core adapts pure functions of params. Use batch statistics (no running "
            "averages) or pass your own apply_fn that manages that state.")
    return FunctionalModel(module, "linen"), variables["params"]


def from_nnx(module: Any) -> tuple[FunctionalModel, PyTree]:
    """``(apply_fn, params)`` for an NNX module (its ``nnx.Param`` state becomes the params)."""
    from flax import nnx
    graphdef, state = nnx.split(module)
    return FunctionalModel(graphdef, "nnx"), state
