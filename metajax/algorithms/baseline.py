"""Baseline and Baseline++ (Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019).

Training is ordinary supervised learning: an embedding network and a classifier over
*all* meta-training classes, trained with cross-entropy on batches whose targets are
the dataset's class ids (``EpisodeSampler(..., labels="dataset")``; every support and
query example of every task in the batch is a training example). No episodes are
simulated.

At test time the backbone is frozen. Each task's support and query sets are embedded
once, and a new ``n``-way head is fitted on the support embeddings by the core inner
loop (:func:`metajax.core.meta_objective.evaluate_adaptation` over a task batch of
embeddings), i.e. logistic regression by a few jitted steps of gradient descent.
Accuracy is reported after every fitting step, like the gradient-based algorithms.

Heads (``classifier``):

* ``"linear"`` (Baseline): ``logits = f @ W + b``. The new head starts at zero.
* ``"cosine"`` (Baseline++): ``logits = scale * cos(f, w_c)`` (plus a bias when fitting
  a new head); the class weights are directions, which reduces intra-class variation.
  The new head starts at the class means of the support embeddings (prototypes), so
  before any step it is a cosine prototype classifier; fitting then refines it.

The MAML paper's "pretrain on all tasks" baseline is :class:`metajax.MultiTaskPretrain`
(joint training on episodes, then fine-tuning the whole network).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from metajax.algorithms.metric_based import NEG_INF
from metajax.algorithms.protonet import class_prototypes
from metajax.core.inner_loop import InnerLoop, task_loss_and_metrics
from metajax.core.losses import LossFn, cross_entropy
from metajax.core.meta_objective import evaluate_adaptation
from metajax.core.task_map import TaskMap, map_over_tasks
from metajax.core.tasks import TaskBatch, as_tasks, merged_task_examples, validate_task_batch

PyTree = Any
CLASSIFIERS = ("linear", "cosine")


def _unit(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    # Not x / norm(x): the gradient of norm is NaN at 0 (the zero kernel of an absent class).
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def classifier_logits(head: dict, features: jax.Array, kind: str, scale: float) -> jax.Array:
    """Logits ``(N, C)`` of a linear (``kernel (D, C)``, ``bias (C,)``) or cosine head
    (``kernel (D, C)`` class directions; ``scale * cos``)."""
    if kind == "linear":
        return features @ head["kernel"] + head["bias"]
    return scale * (_unit(features) @ _unit(head["kernel"].T).T)


@dataclasses.dataclass(frozen=True)
class ClassifierBaseline:
    """Chen et al.'s Baseline (``classifier="linear"``) and Baseline++ (``"cosine"``).

    Attributes:
      embed_fn: the backbone ``embed_fn(params, inputs) -> (N, D)`` (e.g. Conv4 with ``ways=None``).
      num_classes: classes of the training classifier (the meta-training classes).
      loss_fn: per-example loss on logits (cross-entropy).
      classifier: ``"linear"`` or ``"cosine"``.
      cosine_scale: the fixed scale of cosine logits.
      finetune: how the new head is fitted at test time (steps, step size or any optax
        optimizer); ``evaluate(steps=..., learning_rate=...)`` overrides it.
      metric_fns, task_map: as for :class:`metajax.MAML`.

    Example:
      >>> import jax, jax.numpy as jnp, metajax as mj
      >>> embed = lambda p, x: x                        # identity "backbone" on 2-d points
      >>> algo = mj.ClassifierBaseline(embed, num_classes=3, finetune=mj.InnerLoop(steps=20, learning_rate=1.0),
      ...                              metric_fns={"accuracy": mj.accuracy})
      >>> meta = algo.init({}, feature_dim=2, key=jax.random.key(0))
      >>> x = jnp.array([[[1., 0.], [0., 1.]]])       # one task, one example per class
      >>> batch = mj.TaskBatch(x, jnp.array([[0, 1]]), x, jnp.array([[0, 1]]))
      >>> acc = algo.evaluate(meta, batch)["accuracy"]   # (tasks, steps + 1)
      >>> acc.shape, float(acc[0, -1])
      ((1, 21), 1.0)
    """

    embed_fn: Callable[[PyTree, PyTree], jax.Array]
    num_classes: int
    loss_fn: LossFn = cross_entropy
    classifier: str = "linear"
    cosine_scale: float = 10.0
    finetune: InnerLoop = InnerLoop(steps=100, learning_rate=0.5)
    metric_fns: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    task_map: TaskMap = "vmap"

    def __post_init__(self):
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}.")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (the training classes), "
                             f"got {self.num_classes!r}.")
        if not self.cosine_scale > 0:
            raise ValueError(f"cosine_scale must be > 0, got {self.cosine_scale!r}.")

    def init(self, params: PyTree, *, feature_dim: int, key: jax.Array) -> dict:
        """``{"model": params, "classifier": {"kernel", "bias"}}`` (normal(0, 1/sqrt(D)) kernel)."""
        kernel = jax.random.normal(key, (feature_dim, self.num_classes)) / jnp.sqrt(feature_dim)
        return {"model": params, "classifier": {"kernel": kernel,
                                                "bias": jnp.zeros((self.num_classes,))}}

    def _logits(self, head: dict, features: jax.Array) -> jax.Array:
        return classifier_logits(head, features, self.classifier, self.cosine_scale)

    def meta_loss(self, meta_params: dict, batch: TaskBatch,
                  rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        """Cross-entropy of the all-class classifier on every example of ``batch``, whose
        targets are class ids in ``[0, num_classes)``."""
        del rng
        validate_task_batch(batch)
        apply = lambda p, x: self._logits(p["classifier"], self.embed_fn(p["model"], x))

        def per_task(params, task):
            inputs, targets, mask = merged_task_examples(task)
            return task_loss_and_metrics(params, inputs, targets, mask, apply_fn=apply,
                                         loss_fn=self.loss_fn, metric_fns=self.metric_fns)

        losses, metrics = map_over_tasks(per_task, meta_params, as_tasks(batch), self.task_map)
        metrics = {f"train_{k}": v for k, v in metrics.items()}
        metrics["train_loss"] = losses
        return jnp.mean(losses), jax.tree_util.tree_map(jnp.mean, metrics)

    def evaluate(self, meta_params: dict, batch: TaskBatch, *, steps: Optional[int] = None,
                 learning_rate: Optional[float] = None) -> dict:
        """Per-task query ``loss`` and metrics after 0..steps head-fitting steps ``(tasks, steps+1)``."""
        validate_task_batch(batch)
        body = jax.lax.stop_gradient(meta_params["model"])
        embed = lambda p, task: (self.embed_fn(p, task.support_inputs),
                                 self.embed_fn(p, task.query_inputs))
        support_f, query_f = map_over_tasks(embed, body, as_tasks(batch), self.task_map)
        features = dataclasses.replace(batch, support_inputs=support_f, query_inputs=query_f)
        ways = batch.num_support  # label slots: an upper bound on the classes of a task
        support_mask = (batch.support_mask if batch.support_mask is not None
                        else jnp.ones(batch.support_targets.shape))
        protos, present = jax.vmap(lambda f, y, m: class_prototypes(f, y, ways, m))(
            support_f, batch.support_targets, support_mask)
        # Slots of labels absent from the support set get a -1e9 bias: never predicted,
        # and (the softmax underflowing there) never updated.
        bias = jnp.where(present, 0.0, NEG_INF)
        kernel = jnp.swapaxes(protos, 1, 2)  # (tasks, D, ways)
        if self.classifier == "linear":
            kernel = jnp.zeros_like(kernel)
        head = {"kernel": kernel, "bias": bias}
        inner = self.finetune.with_overrides(steps=steps, learning_rate=learning_rate)
        return evaluate_adaptation(head, features, apply_fn=self._head_logits,
                                   loss_fn=self.loss_fn, inner=inner, metric_fns=self.metric_fns,
                                   task_map=self.task_map, params_per_task=True)

    def _head_logits(self, head: dict, features: jax.Array) -> jax.Array:
        logits = classifier_logits(head, features, self.classifier, self.cosine_scale)
        return logits if self.classifier == "linear" else logits + head["bias"]
