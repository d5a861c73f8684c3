"""The meta-objective: query loss after adaptation, averaged over a task batch.

``jax.grad`` of :func:`meta_batch_loss` with respect to the initial parameters
is the (second-order, unless ``inner.first_order``) MAML meta-gradient.
:func:`evaluate_adaptation` is the one evaluation loop every algorithm uses:
query loss and metrics after 0..S inner steps, per task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from metajax.core.inner_loop import (ApplyFn, InnerLoop, MetricFns, adapt, select_step,
                                     task_loss_and_metrics)
from metajax.core.losses import LossFn
from metajax.core.task_map import TaskMap, map_over_tasks, mean_loss_over_tasks
from metajax.core.tasks import Task, TaskBatch, as_tasks, validate_task_batch

PyTree = Any


def adapted_task_loss(params: PyTree, task: Task, *, apply_fn: ApplyFn, loss_fn: LossFn,
                      inner: InnerLoop, rates: Optional[PyTree] = None,
                      adapt_mask: Optional[PyTree] = None,
                      metric_fns: Optional[MetricFns] = None,
                      step_weights: Optional[jax.Array] = None,
                      per_step_mask: Optional[PyTree] = None) -> tuple[jax.Array, dict]:
    """Query loss of one task after adapting ``params`` on its support set.

    With ``step_weights`` (shape ``(steps + 1,)``) the loss is the weighted sum of the
    query losses after every step (MAML++'s multi-step loss) instead of the final one.

    Returns:
      ``(loss, metrics)`` with metrics ``query_loss``, ``support_loss`` (before adapting),
      and ``query_<name>`` for each metric function, all scalars.
    """
    tracked = step_weights is not None
    out = adapt(params, task, apply_fn=apply_fn, loss_fn=loss_fn, inner=inner, rates=rates,
                adapt_mask=adapt_mask, metric_fns=metric_fns, track_query=tracked,
                per_step_mask=per_step_mask)
    if tracked:
        query_loss = out.query_loss[-1]
        query_metrics = {k: v[-1] for k, v in out.query_metrics.items()}
        loss = jnp.sum(step_weights * out.query_loss)
    else:
        adapted = select_step(out.params, per_step_mask, inner.steps - 1)
        query_loss, query_metrics = task_loss_and_metrics(
            adapted, task.query_inputs, task.query_targets, task.query_mask,
            apply_fn=apply_fn, loss_fn=loss_fn, metric_fns=metric_fns)
        loss = query_loss
    metrics = {"query_loss": query_loss}
    if inner.steps > 0:
        metrics["support_loss"] = out.support_loss[0]
    metrics.update({f"query_{k}": v for k, v in query_metrics.items()})
    return loss, metrics


def meta_batch_loss(params: PyTree, batch: TaskBatch, *, task_map: TaskMap = "vmap",
                    rates: Optional[PyTree] = None, **task_loss_kwargs) -> tuple[jax.Array, dict]:
    """Mean of :func:`adapted_task_loss` over the tasks of ``batch``.

    ``task_loss_kwargs`` are passed to :func:`adapted_task_loss` (apply_fn, loss_fn, inner, ...).
    """
    validate_task_batch(batch)

    def per_task(shared, task):
        p, r = shared
        return adapted_task_loss(p, task, rates=r, **task_loss_kwargs)

    loss, metrics = mean_loss_over_tasks(per_task, (params, rates), as_tasks(batch), task_map)
    return loss, jax.tree_util.tree_map(jnp.mean, metrics)


def evaluate_adaptation(params: PyTree, batch: TaskBatch, *, apply_fn: ApplyFn, loss_fn: LossFn,
                        inner: InnerLoop, rates: Optional[PyTree] = None,
                        adapt_mask: Optional[PyTree] = None,
                        metric_fns: Optional[MetricFns] = None,
                        task_map: TaskMap = "vmap", params_per_task: bool = False,
                        per_step_mask: Optional[PyTree] = None) -> dict:
    """Per-task query loss and metrics after 0, 1, ..., ``inner.steps`` inner steps.

    With ``params_per_task`` every leaf of ``params`` has a leading task axis and task
    ``i`` starts from its own slice (e.g. a head initialised from that task's support set).

    Returns:
      dict with ``"loss"`` and each metric name, arrays of shape ``(tasks, steps + 1)``
      (no gradient is taken, so evaluation runs first-order).
    """
    validate_task_batch(batch)
    eval_inner = dataclasses.replace(inner, first_order=True, remat=False)

    def per_task(shared, task):
        p, r = shared
        out = adapt(p, task, apply_fn=apply_fn, loss_fn=loss_fn, inner=eval_inner, rates=r,
                    adapt_mask=adapt_mask, metric_fns=metric_fns, track_query=True,
                    per_step_mask=per_step_mask)
        return {"loss": out.query_loss, **out.query_metrics}

    params = jax.lax.stop_gradient(params)
    if params_per_task:
        return map_over_tasks(lambda r, pt: per_task((pt[0], r), pt[1]), rates,
                              (params, as_tasks(batch)), task_map)
    return map_over_tasks(per_task, (params, rates), as_tasks(batch), task_map)
