"""Shared machinery of embedding-based (metric) meta-learners.

A metric learner embeds support and query examples with one network and turns
(support embeddings, support labels, query embeddings) into query logits; there
is no inner loop. :class:`MetricLearner` supplies the episode loss, metrics and
the per-task evaluation in the same shape as the gradient-based algorithms
(``(tasks, 1)`` arrays: "after 0 inner steps"), so experiments and the
evaluation loop treat every algorithm alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from metajax.core.losses import LossFn, accuracy, cross_entropy, masked_mean
from metajax.core.task_map import TaskMap, map_over_tasks
from metajax.core.tasks import Task, TaskBatch, as_tasks, validate_task_batch

PyTree = Any
LogitsFn = Callable[..., jax.Array]


def support_class_mask(labels: jax.Array, num_slots: int,
                       mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """One-hot ``(N, num_slots)`` of support labels (masked) and which classes are present."""
    onehot = jax.nn.one_hot(labels, num_slots)
    if mask is not None:
        onehot = onehot * mask.astype(onehot.dtype)[:, None]
    return onehot, onehot.sum(axis=0) > 0


def hard_labels(targets: PyTree) -> jax.Array:
    """The class labels of targets: the array itself, or the ``"labels"`` entry of pytree
    targets such as distillation's ``{"labels", "teacher_logits"}``."""
    return targets["labels"] if isinstance(targets, dict) else targets


@dataclasses.dataclass(frozen=True)
class MetricLearner:
    """Base: subclasses define :meth:`logits` (and may add parameters in :meth:`init`).

    Attributes:
      embed_fn: the embedding network ``embed_fn(params, inputs) -> (N, D)``.
      loss_fn: per-example loss on the query logits (default cross-entropy).
      task_map: how tasks are batched (``"vmap"``, ``"map"`` or a chunk size).
      accuracy_fn: per-example accuracy of query logits against the query targets; set it
        with a loss over pytree targets, e.g. ``distillation_loss`` with
        ``distillation_accuracy`` (prototypes/attention use the ``"labels"`` entry of
        pytree support targets, see :func:`hard_labels`).
      embed_jointly: embed support and query examples in one batch (``True``, as the
        ProtoNet authors' code does) instead of two. It matters for networks with
        batch-statistics batch norm: jointly, both sets are normalised with the statistics
        of the whole episode, so the support embeddings of a 20-example 1-shot support set
        are not normalised with those 20 examples alone.
    """

    embed_fn: Callable[[PyTree, PyTree], jax.Array]
    loss_fn: LossFn = cross_entropy
    task_map: TaskMap = "vmap"
    accuracy_fn: Callable[[jax.Array, PyTree], jax.Array] = accuracy
    embed_jointly: bool = False

    def init(self, params: PyTree) -> dict:
        return {"model": params}

    def logits(self, meta_params: dict, support_embeddings: jax.Array, support_labels: jax.Array,
               support_mask: Optional[jax.Array], query_embeddings: jax.Array) -> jax.Array:
        raise NotImplementedError

    def task_logits(self, meta_params: dict, task: Task) -> jax.Array:
        """Query logits of one task, shape ``(N_query, N_support)``: one column per label value
        a support example could carry; absent classes get ``-inf``-like logits."""
        embed = lambda x: self.embed_fn(meta_params["model"], x)
        if self.embed_jointly:
            n = jax.tree_util.tree_leaves(task.support_inputs)[0].shape[0]
            both = embed(jax.tree_util.tree_map(lambda s, q: jnp.concatenate([s, q]),
                                                task.support_inputs, task.query_inputs))
            support, query = both[:n], both[n:]
        else:
            support, query = embed(task.support_inputs), embed(task.query_inputs)
        return self.logits(meta_params, support, hard_labels(task.support_targets),
                           task.support_mask, query)

    def task_loss(self, meta_params: dict, task: Task) -> tuple[jax.Array, dict]:
        logits = self.task_logits(meta_params, task)
        loss = masked_mean(self.loss_fn(logits, task.query_targets), task.query_mask)
        acc = masked_mean(self.accuracy_fn(logits, task.query_targets), task.query_mask)
        return loss, {"query_loss": loss, "query_accuracy": acc}

    def meta_loss(self, meta_params: dict, batch: TaskBatch,
                  rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        """Mean query loss over the episodes of ``batch``."""
        del rng
        validate_task_batch(batch)
        losses, metrics = map_over_tasks(lambda p, t: self.task_loss(p, t), meta_params,
                                         as_tasks(batch), self.task_map)
        return jnp.mean(losses), jax.tree_util.tree_map(jnp.mean, metrics)

    def evaluate(self, meta_params: dict, batch: TaskBatch, *, steps: Optional[int] = None,
                 learning_rate: Optional[float] = None) -> dict:
        """Per-task query ``loss`` and ``accuracy``, arrays ``(tasks, 1)`` (no inner steps)."""
        del steps, learning_rate  # nothing adapts
        validate_task_batch(batch)
        params = jax.lax.stop_gradient(meta_params)

        def per_task(p, task):
            _, metrics = self.task_loss(p, task)
            return {"loss": metrics["query_loss"][None], "accuracy": metrics["query_accuracy"][None]}

        return map_over_tasks(per_task, params, as_tasks(batch), self.task_map)


NEG_INF = -1e9  # logit for classes absent from the support set (finite: keeps gradients clean)
