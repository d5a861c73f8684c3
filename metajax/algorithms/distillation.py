"""Knowledge distillation as a task loss (Hinton et al. 2015), usable by any algorithm.

Targets carry both the hard labels and the teacher's logits,
``{"labels": (N,), "teacher_logits": (N, C)}``; the loss mixes the hard-label
cross-entropy with the KL divergence between temperature-softened teacher and
student distributions, scaled by ``T^2`` so its gradients keep their size as
``T`` changes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def distillation_loss(temperature: float = 4.0, alpha: float = 0.9
                      ) -> Callable[[jax.Array, dict], jax.Array]:
    """A per-example loss ``loss(student_logits, {"labels", "teacher_logits"})``.

    ``alpha`` weights the soft (teacher) term, ``1 - alpha`` the hard-label term.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = distillation_loss(temperature=2.0, alpha=1.0)
      >>> z = jnp.array([[2.0, 0.0, -1.0]])
      >>> abs(round(float(loss(z, {"labels": jnp.array([0]), "teacher_logits": z})[0]), 6))  # same logits: zero KL
      0.0
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")

    def loss(student_logits: jax.Array, targets: dict) -> jax.Array:
        teacher = jax.nn.softmax(targets["teacher_logits"] / temperature, axis=-1)
        log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
        log_teacher = jnp.log(jnp.maximum(teacher, 1e-12))
        soft = jnp.sum(teacher * (log_teacher - log_student), axis=-1) * temperature ** 2
        hard = optax.softmax_cross_entropy_with_integer_labels(student_logits, targets["labels"])
        return alpha * soft + (1.0 - alpha) * hard

    return loss


def distillation_accuracy(student_logits: jax.Array, targets: dict) -> jax.Array:
    """Per-example accuracy against the hard labels of distillation targets."""
    return (jnp.argmax(student_logits, -1) == targets["labels"]).astype(jnp.float32)
