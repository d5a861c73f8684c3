"""Task losses and metrics, and how the core reduces them.

A *task loss* is any function ``loss_fn(predictions, targets) -> per-example
losses`` whose result has the example axis first, shape ``(N,)`` or
``(N, ...)`` (trailing axes are averaged). optax's losses already have this
form, so ``optax.softmax_cross_entropy_with_integer_labels`` or
``lambda p, t: optax.l2_loss(p, t)`` plug in unchanged. Returning per-example
values is what lets the core honour the masks of imbalanced tasks; a loss that
returns a scalar is accepted only when the task has no mask.

Metrics (``accuracy`` below) follow the same per-example convention.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[jax.Array, PyTree], jax.Array]


def masked_mean(values: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """Mean of per-example ``values`` (example axis first) over the examples ``mask`` keeps.

    Trailing axes of ``values`` are averaged first. With ``mask=None`` this is a plain mean.
    """
    values = jnp.asarray(values)
    if values.ndim == 0:
        if mask is not None:
            raise ValueError(
                "the task loss returned a scalar but the task has a mask; return per-example "
                "losses of shape (num_examples,) so padded examples can be left out.")
        return values
    if values.ndim > 1:
        values = jnp.mean(values.reshape(values.shape[0], -1), axis=1)
    if mask is None:
        return jnp.mean(values)
    if mask.shape != values.shape:
        raise ValueError(
            f"the task loss returned {values.shape[0]} per-example values but the mask has shape "
            f"{mask.shape}; the loss must keep the example axis first.")
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example mean squared error (trailing axes averaged)."""
    err = jnp.square(predictions - targets)
    return err.reshape(err.shape[0], -1).mean(axis=1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0/1 correctness of the arg-max class."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
