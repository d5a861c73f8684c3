"""iMAML (Rajeswaran et al. 2019): meta-gradients by implicit differentiation.

The inner problem is proximal: ``phi* = argmin L_support(phi) + lam/2 ||phi - theta||^2``,
approximated by the core inner loop with a proximal regulariser. At an exact
minimum, ``d phi*/d theta = (I + H/lam)^-1`` with ``H`` the support-loss Hessian at
``phi*``, so the meta-gradient is ``(I + H/lam)^-1 grad L_query(phi*)``, solved
with conjugate gradient from Hessian-vector products. Nothing is differentiated
through the inner loop, so memory does not grow with the number of inner steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metajax.algorithms.fine_tune import FineTuneEvaluation
from metajax.core.inner_loop import ApplyFn, InnerLoop, adapt, task_loss_and_metrics
from metajax.core.losses import LossFn
from metajax.core.task_map import TaskMap, map_over_tasks
from metajax.core.tasks import Task, TaskBatch, as_tasks, validate_task_batch

PyTree = Any


def proximal_regularizer(center: PyTree, lam: float):
    """``phi -> lam/2 ||phi - center||^2`` (``center`` is held constant)."""
    center = jax.lax.stop_gradient(center)

    def regularizer(phi):
        diffs = jax.tree_util.tree_map(lambda a, b: a - b, phi, center)
        return 0.5 * lam * sum(jnp.sum(jnp.square(d)) for d in jax.tree_util.tree_leaves(diffs))

    return regularizer


@dataclasses.dataclass(frozen=True)
class IMAML(FineTuneEvaluation):
    """Implicit MAML (evaluated by plain, unregularised fine-tuning).

    Attributes:
      apply_fn, loss_fn, metric_fns, task_map: as for :class:`MAML`.
      inner: inner-loop settings for solving the proximal problem (more steps = closer to
        the exact minimiser the implicit gradient assumes).
      lam: proximal regularisation strength ``lambda``.
      cg_steps: conjugate-gradient iterations for the implicit linear system.

    Example:
      >>> import jax, metajax as mj
      >>> model, params = mj.models.init_mlp(jax.random.key(0))
      >>> imaml = mj.IMAML(model, mj.mse, inner=mj.InnerLoop(steps=10, learning_rate=0.01), lam=1.0)
      >>> batch = mj.data.sample_sinusoid_tasks(jax.random.key(1), 4, 10, 10)
      >>> grads = jax.grad(lambda p: imaml.meta_loss(p, batch)[0])(imaml.init(params))
    """

    apply_fn: ApplyFn
    loss_fn: LossFn
    inner: InnerLoop = InnerLoop(steps=10, learning_rate=0.01)
    lam: float = 1.0
    cg_steps: int = 5
    metric_fns: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    task_map: TaskMap = "vmap"

    def __post_init__(self):
        if not self.lam > 0:
            raise ValueError(f"IMAML.lam must be > 0, got {self.lam!r}.")
        if not isinstance(self.cg_steps, int) or self.cg_steps < 1:
            raise ValueError(f"IMAML.cg_steps must be a positive int, got {self.cg_steps!r}.")

    def init(self, params: PyTree) -> dict:
        return {"model": params}

    def _support_loss(self, params, task: Task):
        return task_loss_and_metrics(params, task.support_inputs, task.support_targets,
                                     task.support_mask, apply_fn=self.apply_fn,
                                     loss_fn=self.loss_fn)[0]

    def solve_inner(self, params: PyTree, task: Task) -> PyTree:
        """Approximate minimiser of the proximal inner problem (no gradient flows through it)."""
        inner = dataclasses.replace(self.inner, first_order=True)
        out = adapt(jax.lax.stop_gradient(params), task, apply_fn=self.apply_fn,
                    loss_fn=self.loss_fn, inner=inner,
                    regularizer=proximal_regularizer(params, self.lam))
        return jax.lax.stop_gradient(out.params)

    def implicit_task_gradient(self, params: PyTree, task: Task) -> tuple[PyTree, jax.Array, dict]:
        """``(I + H/lam)^-1 grad L_query(phi*)`` for one task, with the query loss and metrics."""
        phi = self.solve_inner(params, task)

        def query_loss(p):
            return task_loss_and_metrics(p, task.query_inputs, task.query_targets, task.query_mask,
                                         apply_fn=self.apply_fn, loss_fn=self.loss_fn,
                                         metric_fns=self.metric_fns)

        (q_loss, q_metrics), q_grad = jax.value_and_grad(query_loss, has_aux=True)(phi)
        flat_phi, unravel = ravel_pytree(phi)
        flat_loss = lambda v: self._support_loss(unravel(v), task)

        support_grad = jax.grad(flat_loss)

        def matvec(v):
            # Hessian-vector product by reverse over reverse, which needs only VJPs: jvp of
            # grad stopped with "can't apply forward-mode autodiff (jvp) to a custom_vjp
            # function" inside cg on the full fused CPU Conv4 (benchmarks/memory.py).
            hv = jax.grad(lambda p: jnp.vdot(support_grad(p), v))(flat_phi)
            return v + hv / self.lam

        rhs = ravel_pytree(q_grad)[0]
        solution, _ = jax.scipy.sparse.linalg.cg(matvec, rhs, x0=rhs, maxiter=self.cg_steps)
        return unravel(solution), q_loss, q_metrics

    def meta_loss(self, meta_params: dict, batch: TaskBatch,
                  rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        """Mean query loss at ``phi*``; its gradient w.r.t. the model is the implicit meta-gradient."""
        del rng
        validate_task_batch(batch)
        params = meta_params["model"]

        def per_task(p, task):
            grad, loss, metrics = self.implicit_task_gradient(p, task)
            return grad, loss, metrics

        grads, losses, metrics = map_over_tasks(per_task, jax.lax.stop_gradient(params),
                                                as_tasks(batch), self.task_map)
        mean_grad = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
        # Value: the query loss. Gradient: the implicit meta-gradient (a linear surrogate).
        surrogate = sum(jnp.vdot(jax.lax.stop_gradient(g), p - jax.lax.stop_gradient(p))
                        for g, p in zip(jax.tree_util.tree_leaves(mean_grad),
                                        jax.tree_util.tree_leaves(params)))
        metrics = {"query_loss": jnp.mean(losses),
                   **{f"query_{k}": jnp.mean(v) for k, v in metrics.items()}}
        return jnp.mean(losses) + surrogate, metrics
