"""MAML (Finn et al. 2017), second- and first-order, on the core inner loop.

Meta-parameters are a dict ``{"model": params}``; algorithms that learn inner
learning rates (Meta-SGD, MAML++) add ``"inner_rates"``, which :func:`adapt`
receives as ``rates``.

Example:
  >>> import jax, optax
  >>> import metajax as mj
  >>> model, params = mj.models.init_mlp(jax.random.key(0), input_dim=1, output_dim=1)
  >>> maml = mj.MAML(apply_fn=model, loss_fn=mj.mse, inner=mj.InnerLoop(steps=1, learning_rate=0.01))
  >>> meta_params = maml.init(params)
  >>> batch = mj.data.sample_sinusoid_tasks(jax.random.key(1), num_tasks=4, num_support=10, num_query=10)
  >>> loss, metrics = maml.meta_loss(meta_params, batch)
  >>> sorted(metrics)
  ['query_loss', 'support_loss']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from metajax.core.inner_loop import ApplyFn, Adaptation, InnerLoop, adapt
from metajax.core.losses import LossFn
from metajax.core.meta_objective import evaluate_adaptation, meta_batch_loss
from metajax.core.task_map import TaskMap
from metajax.core.tasks import Task, TaskBatch

PyTree = Any
RATE_KINDS = (None, "per_parameter", "per_tensor", "per_tensor_per_step")


def init_inner_rates(params: PyTree, kind: str, learning_rate: float, steps: int) -> PyTree:
    """Learned inner learning rates, all equal to ``learning_rate`` at initialisation.

    ``"per_parameter"``: one rate per parameter entry (Meta-SGD); ``"per_tensor"``: one per
    leaf; ``"per_tensor_per_step"``: one per leaf and inner step (MAML++ LSLR).
    """
    shapes = {
        "per_parameter": lambda p: p.shape,
        "per_tensor": lambda p: (),
        "per_tensor_per_step": lambda p: (steps,),
    }[kind]
    return jax.tree_util.tree_map(lambda p: jnp.full(shapes(p), learning_rate, p.dtype), params)


def resize_per_step_rates(rates: PyTree, steps: int) -> PyTree:
    """Per-step rates for ``steps`` steps: truncated, or extended by repeating the last step's.

    Lets a model meta-trained with S inner steps be evaluated with more (or fewer) steps.
    """
    def resize(r):
        if steps <= r.shape[0]:
            return r[:steps]
        return jnp.concatenate([r, jnp.repeat(r[-1:], steps - r.shape[0], axis=0)])

    return jax.tree_util.tree_map(resize, rates)


@dataclasses.dataclass(frozen=True)
class MAML:
    """Model-agnostic meta-learning.

    Attributes:
      apply_fn: the model, ``apply_fn(params, inputs) -> predictions``.
      loss_fn: per-example task loss ``loss_fn(predictions, targets)`` (any user function).
      inner: inner-loop settings (steps, step size, optimizer, ``first_order``, ``remat``).
      metric_fns: per-example metrics reported on the query set, e.g. ``{"accuracy": mj.accuracy}``.
      task_map: how tasks are batched: ``"vmap"``, ``"map"``, ``"accumulate"`` (``"map"`` with
        each task's meta-gradient computed inside the loop: memory of one task, the fastest
        on CPU; see :func:`metajax.core.task_map.mean_loss_over_tasks`), an int chunk size,
        or a :class:`metajax.ShardedTasks` (tasks split over devices, e.g. one JAX CPU device
        per core from :func:`metajax.configure_cpu_devices`).
      adapt_mask: optional pytree of bools over the model params; ``False`` leaves are
        not adapted in the inner loop (ANIL adapts only the head).
      learn_inner_rates: ``None`` (fixed step size ``inner.learning_rate``), or learned inner
        rates initialised at ``inner.learning_rate`` and meta-learned with the model:
        ``"per_parameter"`` (Meta-SGD), ``"per_tensor"``, or ``"per_tensor_per_step"``
        (MAML++'s per-layer per-step rates).
    """

    apply_fn: ApplyFn
    loss_fn: LossFn
    inner: InnerLoop = InnerLoop()
    metric_fns: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    task_map: TaskMap = "vmap"
    adapt_mask: Optional[PyTree] = None
    learn_inner_rates: Optional[str] = None

    def __post_init__(self):
        if self.learn_inner_rates not in RATE_KINDS:
            raise ValueError(f"learn_inner_rates must be one of {RATE_KINDS}, "
                             f"got {self.learn_inner_rates!r}.")
        if self.learn_inner_rates == "per_tensor_per_step" and not self.inner.rates_per_step:
            object.__setattr__(self, "inner", dataclasses.replace(self.inner, rates_per_step=True))

    def init(self, params: PyTree) -> dict:
        """Meta-parameters from initial model parameters (plus learned inner rates, if any)."""
        meta_params = {"model": params}
        if self.learn_inner_rates is not None:
            meta_params["inner_rates"] = init_inner_rates(
                params, self.learn_inner_rates, self.inner.learning_rate, self.inner.steps)
        return meta_params

    def _per_step_mask(self, params: PyTree) -> Optional[PyTree]:
        """Which model leaves are per-step parameters (none for MAML; see MAML++)."""
        del params
        return None

    def _kwargs(self, params: PyTree) -> dict:
        per_step = self._per_step_mask(params)
        adapt_mask = self.adapt_mask
        if per_step is not None and adapt_mask is not None:  # per-step leaves never adapt
            adapt_mask = jax.tree_util.tree_map(lambda a, f: a and not f, adapt_mask, per_step)
        return dict(apply_fn=self.apply_fn, loss_fn=self.loss_fn, inner=self.inner,
                    adapt_mask=adapt_mask, metric_fns=self.metric_fns, per_step_mask=per_step)

    def adapt(self, meta_params: dict, task: Task, *, track_query: bool = False) -> Adaptation:
        """Adapts the model to one task (no task axis)."""
        return adapt(meta_params["model"], task, rates=meta_params.get("inner_rates"),
                     track_query=track_query, **self._kwargs(meta_params["model"]))

    def meta_loss(self, meta_params: dict, batch: TaskBatch,
                  rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        """Mean post-adaptation query loss over the batch; ``jax.grad`` of it is the meta-gradient."""
        del rng  # MAML is deterministic given the batch.
        return meta_batch_loss(meta_params["model"], batch, task_map=self.task_map,
                               rates=meta_params.get("inner_rates"),
                               **self._kwargs(meta_params["model"]))

    def evaluate(self, meta_params: dict, batch: TaskBatch, *, steps: Optional[int] = None,
                 learning_rate: Optional[float] = None) -> dict:
        """Per-task query loss/metrics after 0..steps inner steps, arrays ``(tasks, steps+1)``."""
        inner = self.inner.with_overrides(steps=steps, learning_rate=learning_rate)
        rates = meta_params.get("inner_rates")
        if rates is not None and inner.rates_per_step and inner.steps != self.inner.steps:
            rates = resize_per_step_rates(rates, inner.steps)
        kwargs = self._kwargs(meta_params["model"])
        kwargs["inner"] = inner
        return evaluate_adaptation(meta_params["model"], batch, task_map=self.task_map,
                                   rates=rates, **kwargs)
