"""Prototypical Networks (Snell et al. 2017).

Each class's prototype is the mean embedding of its support examples (respecting
the support mask of imbalanced tasks); a query is classified by a softmax over
negative squared Euclidean distances to the prototypes (or scaled cosine
similarity). Train with more ways than you test (e.g. 60-way episodes for
5-way Omniglot), as in the paper: the episode shape is whatever the sampler gives.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from metajax.algorithms.metric_based import NEG_INF, MetricLearner, support_class_mask


def class_prototypes(embeddings: jax.Array, labels: jax.Array, num_classes: int,
                     mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Per-class mean embeddings ``(num_classes, D)`` and which classes have examples.

    Example:
      >>> import jax.numpy as jnp
      >>> protos, present = class_prototypes(jnp.array([[1.], [3.], [5.]]), jnp.array([0, 0, 1]), 3)
      >>> protos.tolist(), present.tolist()
      ([[2.0], [5.0], [0.0]], [True, True, False])
    """
    onehot, present = support_class_mask(labels, num_classes, mask)
    totals = onehot.T @ embeddings
    return totals / jnp.maximum(onehot.sum(axis=0), 1.0)[:, None], present


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """``(N, M)`` squared Euclidean distances between rows of ``a (N, D)`` and ``b (M, D)``."""
    return (jnp.sum(a * a, -1)[:, None] - 2.0 * a @ b.T + jnp.sum(b * b, -1)[None, :])


def cosine_similarities(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    return norm(a) @ norm(b).T


@dataclasses.dataclass(frozen=True)
class ProtoNet(MetricLearner):
    """Prototypical Networks.

    Attributes:
      distance: ``"euclidean"`` (squared, the paper's default) or ``"cosine"``.
      cosine_scale: logits scale for cosine similarity (a fixed temperature).

    Example:
      >>> import jax, jax.numpy as jnp, metajax as mj
      >>> embed = lambda p, x: x @ p
      >>> proto = mj.ProtoNet(embed)
      >>> batch = mj.TaskBatch(jnp.eye(2)[None], jnp.array([[0, 1]]), jnp.eye(2)[None], jnp.array([[0, 1]]))
      >>> float(proto.evaluate({"model": jnp.eye(2)}, batch)["accuracy"][0, 0])
      1.0
    """

    distance: str = "euclidean"
    cosine_scale: float = 10.0

    def __post_init__(self):
        if self.distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {self.distance!r}.")

    def logits(self, meta_params, support_embeddings, support_labels, support_mask,
               query_embeddings):
        num_slots = support_embeddings.shape[0]  # an upper bound on the classes present
        protos, present = class_prototypes(support_embeddings, support_labels, num_slots,
                                           support_mask)
        if self.distance == "euclidean":
            logits = -squared_distances(query_embeddings, protos)
        else:
            logits = self.cosine_scale * cosine_similarities(query_embeddings, protos)
        return jnp.where(present[None, :], logits, NEG_INF)
