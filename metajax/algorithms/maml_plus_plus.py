"""MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019) as library features.

* **Multi-step loss (MSL)** with annealed per-step weights: the meta-loss is a weighted
  sum of the query losses after every inner step; the weights start uniform and are
  annealed towards the final step over ``msl_anneal_steps`` meta-steps.
* **Per-layer per-step learned inner rates (LSLR)**: ``learn_inner_rates="per_tensor_per_step"``.
* **Derivative-order annealing (DOA)**: first order for the first ``first_order_steps``
  meta-steps, then second order. Both orders live in one compiled program behind a
  ``lax.cond`` on the train step, so switching does not recompile.
* **Cosine annealing** of the meta learning rate: :func:`cosine_adam`.

* **Per-step batch-norm weights and biases (BNWB)**: with ``per_step_bn=True``, :meth:`init`
  gives every batch-norm scale/shift (model leaves whose path has a key containing
  ``"bn"``; ``per_step_filter`` changes the rule) a leading axis of ``inner.steps`` copies.
  Inner step ``i`` and the query loss after it use copy ``i``; the copies are meta-learned,
  not adapted in the inner loop (as in the paper's code). Evaluating with more steps than
  were trained reuses the last copy.

Per-step batch-norm *running statistics* (BNRS) are not implemented: this library's batch
norm always normalises with the current batch's statistics (see :mod:`metajax.models.conv4`),
so there are no running statistics to keep per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from metajax.algorithms.maml import MAML
from metajax.core.masks import mask_by_path
from metajax.core.meta_objective import meta_batch_loss
from metajax.core.tasks import TaskBatch


PyTree = Any


def _is_batch_norm(path: tuple[str, ...]) -> bool:
    return any("bn" in key for key in path)


def multi_step_loss_weights(step: jax.Array, inner_steps: int, anneal_steps: int) -> jax.Array:
    """Weights of the query losses after 0..S inner steps at meta-step ``step`` (shape ``(S+1,)``).

    As in the paper's code: every step starts at ``1/S``; non-final weights decay linearly
    to ``0.03/S`` over ``anneal_steps`` while the final weight grows so the sum stays 1.
    Step 0 (the unadapted model) has weight 0.

    Example:
      >>> w = multi_step_loss_weights(0, 4, 100)
      >>> [round(float(x), 3) for x in w]
      [0.0, 0.25, 0.25, 0.25, 0.25]
      >>> [round(float(x), 4) for x in multi_step_loss_weights(10_000, 4, 100)]
      [0.0, 0.0075, 0.0075, 0.0075, 0.9775]
    """
    s = inner_steps
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(anneal_steps, 1), 0.0, 1.0)
    uniform, floor = 1.0 / s, 0.03 / s
    non_final = uniform - (uniform - floor) * progress
    final = 1.0 - (s - 1) * non_final
    return jnp.concatenate([jnp.zeros((1,)), jnp.full((s - 1,), non_final), final[None]])


def cosine_adam(learning_rate: float, total_steps: int, min_learning_rate: float = 1e-5
                ) -> optax.GradientTransformation:
    """Adam with the meta learning rate cosine-annealed to ``min_learning_rate``."""
    schedule = optax.cosine_decay_schedule(learning_rate, total_steps,
                                           alpha=min_learning_rate / learning_rate)
    return optax.adam(schedule)


@dataclasses.dataclass(frozen=True)
class MAMLPlusPlus(MAML):
    """MAML with MSL, LSLR and DOA (see the module docstring).

    Attributes (beyond :class:`MAML`'s):
      msl_anneal_steps: meta-steps over which MSL weights anneal; ``None`` turns MSL off
        (only the final query loss counts).
      first_order_steps: meta-steps trained first order before switching to second order
        (0 = second order from the start).

    Example:
      >>> import jax, metajax as mj
      >>> model, params = mj.models.init_mlp(jax.random.key(0))
      >>> mpp = mj.MAMLPlusPlus(model, mj.mse, inner=mj.InnerLoop(steps=3, learning_rate=0.01))
      >>> batch = mj.data.sample_sinusoid_tasks(jax.random.key(1), 4, 10, 10)
      >>> loss, _ = mpp.meta_loss(mpp.init(params), batch, step=0)
    """

    learn_inner_rates: Optional[str] = "per_tensor_per_step"
    msl_anneal_steps: Optional[int] = 1000
    first_order_steps: int = 0
    per_step_bn: bool = False
    per_step_filter: Callable[[tuple[str, ...]], bool] = _is_batch_norm

    def init(self, params: PyTree) -> dict:
        """Meta-parameters; with ``per_step_bn`` the batch-norm leaves get ``inner.steps`` copies."""
        if self.per_step_bn:
            if self.inner.steps < 1:
                raise ValueError("per_step_bn=True needs inner.steps >= 1.")
            mask = mask_by_path(params, self.per_step_filter)
            if not any(jax.tree_util.tree_leaves(mask)):
                raise ValueError("per_step_bn=True but no parameter path matches per_step_filter "
                                 "(default: a key containing 'bn'); pass per_step_filter.")
            params = jax.tree_util.tree_map(
                lambda p, f: jnp.broadcast_to(p, (self.inner.steps,) + p.shape) if f else p,
                params, mask)
        return super().init(params)  # (learned rates of per-step leaves exist but are unused)

    def _per_step_mask(self, params: PyTree) -> Optional[PyTree]:
        return mask_by_path(params, self.per_step_filter) if self.per_step_bn else None

    def meta_loss(self, meta_params: dict, batch: TaskBatch, rng: Optional[jax.Array] = None,
                  step: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        del rng
        step = jnp.zeros((), jnp.int32) if step is None else step
        weights = None
        if self.msl_anneal_steps is not None and self.inner.steps > 0:
            weights = multi_step_loss_weights(step, self.inner.steps, self.msl_anneal_steps)

        def loss_with(first_order: bool):
            kwargs = self._kwargs(meta_params["model"])  # (structure only)
            kwargs["inner"] = dataclasses.replace(self.inner, first_order=first_order)
            return lambda p: meta_batch_loss(p["model"], batch, task_map=self.task_map,
                                             rates=p.get("inner_rates"), step_weights=weights,
                                             **kwargs)

        if self.first_order_steps <= 0:
            return loss_with(self.inner.first_order)(meta_params)
        return jax.lax.cond(step < self.first_order_steps, loss_with(True), loss_with(False),
                            meta_params)
