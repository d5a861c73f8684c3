"""Reptile (Nichol et al. 2018): move the initialisation towards the adapted weights.

For each task the inner loop runs ``k`` steps of SGD or Adam on the support set;
the meta-update is ``theta <- theta + epsilon * mean_tasks(phi_task - theta)``.
It is expressed as a meta-loss whose gradient is exactly ``theta - mean(phi)``:
``0.5 * ||theta - stop_gradient(mean(phi))||^2``, so any optax outer optimizer
applies it (``optax.sgd(epsilon)`` is the paper's update) and the same train
steps drive it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from metajax.algorithms.fine_tune import FineTuneEvaluation
from metajax.core.inner_loop import ApplyFn, InnerLoop, adapt
from metajax.core.losses import LossFn
from metajax.core.task_map import TaskMap, map_over_tasks
from metajax.core.tasks import TaskBatch, as_tasks, validate_task_batch

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Reptile(FineTuneEvaluation):
    """Reptile over the core inner loop.

    Example:
      >>> import jax, optax, metajax as mj
      >>> model, params = mj.models.init_mlp(jax.random.key(0))
      >>> reptile = mj.Reptile(model, mj.mse, inner=mj.InnerLoop(steps=5, optimizer=optax.adam(1e-3)))
      >>> batch = mj.data.sample_sinusoid_tasks(jax.random.key(1), 4, 10, 10)
      >>> loss, metrics = reptile.meta_loss(reptile.init(params), batch)
      >>> sorted(metrics)
      ['distance', 'query_loss', 'support_loss']
    """

    apply_fn: ApplyFn
    loss_fn: LossFn
    inner: InnerLoop = InnerLoop(steps=5, learning_rate=0.01)
    metric_fns: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    task_map: TaskMap = "vmap"

    def init(self, params: PyTree) -> dict:
        return {"model": params}

    def mean_adapted(self, meta_params: dict, batch: TaskBatch) -> tuple[PyTree, dict]:
        """Mean over tasks of the adapted parameters (no gradient flows through them)."""
        validate_task_batch(batch)
        inner = dataclasses.replace(self.inner, first_order=True)

        def per_task(params, task):
            out = adapt(params, task, apply_fn=self.apply_fn, loss_fn=self.loss_fn, inner=inner,
                        metric_fns=self.metric_fns, track_query=True)
            metrics = {"support_loss": out.support_loss[0], "query_loss": out.query_loss[-1]}
            return out.params, metrics

        adapted, metrics = map_over_tasks(per_task, jax.lax.stop_gradient(meta_params["model"]),
                                          as_tasks(batch), self.task_map)
        mean = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), adapted)
        return mean, jax.tree_util.tree_map(jnp.mean, metrics)

    def meta_loss(self, meta_params: dict, batch: TaskBatch,
                  rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        """``0.5 ||theta - mean(phi)||^2``; its gradient is Reptile's ``theta - mean(phi)``."""
        del rng
        target, metrics = self.mean_adapted(meta_params, batch)
        diffs = jax.tree_util.tree_map(lambda p, t: p - jax.lax.stop_gradient(t),
                                       meta_params["model"], target)
        sq = sum(jnp.sum(jnp.square(d)) for d in jax.tree_util.tree_leaves(diffs))
        metrics["distance"] = jnp.sqrt(sq)
        return 0.5 * sq, metrics
