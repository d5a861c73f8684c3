"""Multi-task pre-training baseline (the MAML paper's "pretrained on all tasks").

One network is trained on the examples of all tasks jointly, with no inner
loop: the loss is the task loss on every support and query example of the
meta-batch at the shared parameters. At test time it is fine-tuned on each
task's support set with the same core inner loop (:meth:`evaluate`), so it is
compared with MAML under exactly the same adaptation procedure.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from metajax.algorithms.fine_tune import FineTuneEvaluation
from metajax.core.inner_loop import ApplyFn, InnerLoop, task_loss_and_metrics
from metajax.core.losses import LossFn
from metajax.core.task_map import TaskMap, map_over_tasks
from metajax.core.tasks import TaskBatch, as_tasks, merged_task_examples, validate_task_batch

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MultiTaskPretrain(FineTuneEvaluation):
    """Joint training on all tasks; fine-tuning with ``inner`` at evaluation.

    Attributes:
      apply_fn, loss_fn, metric_fns, task_map: as for :class:`metajax.MAML`.
      inner: the fine-tuning procedure used by :meth:`evaluate` (not used in training).
    """

    apply_fn: ApplyFn
    loss_fn: LossFn
    inner: InnerLoop = InnerLoop()
    metric_fns: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    task_map: TaskMap = "vmap"

    def init(self, params: PyTree) -> dict:
        return {"model": params}

    def meta_loss(self, meta_params: dict, batch: TaskBatch,
                  rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        """Mean task loss over every example of every task, no adaptation."""
        del rng
        validate_task_batch(batch)

        def per_task(params, task):
            inputs, targets, mask = merged_task_examples(task)
            return task_loss_and_metrics(params, inputs, targets, mask, apply_fn=self.apply_fn,
                                         loss_fn=self.loss_fn, metric_fns=self.metric_fns)

        losses, metrics = map_over_tasks(per_task, meta_params["model"], as_tasks(batch),
                                         self.task_map)
        metrics = {f"train_{k}": v for k, v in metrics.items()}
        metrics["train_loss"] = losses
        return jnp.mean(losses), jax.tree_util.tree_map(jnp.mean, metrics)
