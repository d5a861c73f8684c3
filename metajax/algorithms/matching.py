"""Matching Networks (Vinyals et al. 2016).

A query's class distribution is an attention-weighted sum of the support labels,
``P(y | x) = sum_i a(x, x_i) onehot(y_i)`` with ``a`` a softmax over cosine
similarities of embeddings. The loss is the negative log of that probability.

With ``full_context=True`` the embeddings are *full context embeddings* (FCE): the
support embeddings pass through a bidirectional LSTM over the support set (``g``)
and each query embedding through an attention LSTM that reads the support set for
``fce_steps`` steps (``f``), as in the paper's appendix. The FCE parameters live in
``meta_params["fce"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.algorithms.metric_based import MetricLearner, support_class_mask
from metajax.algorithms.protonet import cosine_similarities


def attention_weights(query_embeddings: jax.Array, support_embeddings: jax.Array,
                      support_mask: Optional[jax.Array] = None, scale: float = 1.0) -> jax.Array:
    """Softmax over support examples of cosine similarity; rows sum to one, masked slots get 0."""
    sims = scale * cosine_similarities(query_embeddings, support_embeddings)
    if support_mask is not None:
        sims = jnp.where(support_mask[None, :] > 0, sims, -jnp.inf)
    return jax.nn.softmax(sims, axis=-1)


class FullContextEmbedding(nn.Module):
    """FCE: a bidirectional LSTM over the support set and an attention LSTM for queries."""

    steps: int = 1

    @nn.compact
    def __call__(self, support: jax.Array, query: jax.Array) -> tuple[jax.Array, jax.Array]:
        dim = support.shape[-1]
        forward = nn.RNN(nn.OptimizedLSTMCell(dim), name="g_forward")
        backward = nn.RNN(nn.OptimizedLSTMCell(dim), reverse=True, keep_order=True, name="g_backward")
        g = support + forward(support[None])[0] + backward(support[None])[0]

        # Attention LSTM (paper's appendix): the hidden state is h_{k-1} + r_{k-1}, the input
        # is the query's own embedding, and r_k reads the support set with attention on h_k.
        cell = nn.OptimizedLSTMCell(dim, name="f_attlstm")
        c = jnp.zeros_like(query)
        h, read = query, jnp.zeros_like(query)
        for _ in range(self.steps):
            (c, h_hat), _ = cell((c, h + read), query)
            h = h_hat + query
            read = jax.nn.softmax(h @ g.T, axis=-1) @ g
        return g, h


@dataclasses.dataclass(frozen=True)
class MatchingNet(MetricLearner):
    """Matching Networks.

    Attributes:
      full_context: use full context embeddings (see the module docstring).
      fce_steps: attention-LSTM read steps for the query embeddings.
      scale: multiplies the cosine similarities before the softmax (1 in the paper).

    Example:
      >>> import jax, jax.numpy as jnp, metajax as mj
      >>> match = mj.MatchingNet(lambda p, x: x)
      >>> batch = mj.TaskBatch(jnp.eye(2)[None], jnp.array([[0, 1]]), jnp.eye(2)[None], jnp.array([[0, 1]]))
      >>> float(match.evaluate({"model": {}}, batch)["accuracy"][0, 0])
      1.0
    """

    full_context: bool = False
    fce_steps: int = 1
    scale: float = 1.0

    def init(self, params, *, embedding_dim: Optional[int] = None, key=None) -> dict:
        """Meta-parameters; with ``full_context`` the FCE LSTMs are initialised too."""
        meta_params = {"model": params}
        if self.full_context:
            if embedding_dim is None:
                raise ValueError("full_context=True needs embedding_dim to initialise the LSTMs.")
            key = jax.random.key(0) if key is None else key
            dummy = jnp.zeros((2, embedding_dim))
            meta_params["fce"] = FullContextEmbedding(self.fce_steps).init(key, dummy, dummy)["params"]
        return meta_params

    def logits(self, meta_params, support_embeddings, support_labels, support_mask,
               query_embeddings):
        if self.full_context:
            support_embeddings, query_embeddings = FullContextEmbedding(self.fce_steps).apply(
                {"params": meta_params["fce"]}, support_embeddings, query_embeddings)
        weights = attention_weights(query_embeddings, support_embeddings, support_mask, self.scale)
        onehot, present = support_class_mask(support_labels, support_embeddings.shape[0],
                                             support_mask)
        probabilities = weights @ onehot
        # Log-probabilities as logits: cross-entropy of these is the paper's NLL loss.
        return jnp.log(jnp.maximum(probabilities, 1e-12)) + jnp.where(present, 0.0, -1e9)[None, :]
