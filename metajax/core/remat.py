"""What ``InnerLoop(remat="dots")`` keeps of each inner step for the second-order backward pass.

:func:`dots_policy` is a ``jax.checkpoint`` policy: it saves matrix products and convolutions
(as ``jax.checkpoint_policies.dots_saveable`` does) and recomputes the element-wise ops
around them, with two refinements for meta-learning, where the inner step itself is a
backward pass:

- a product with a transposed right operand (``a @ b.T``: both operands contract their last
  axis, no batch axes) is not saved. In a backward pass those are the input gradients
  ``cotangent @ W^T``; in a convolution that product is the ``kh*kw`` times larger patch
  cotangent, which only feeds the linear col2im;
- values named :data:`REMAT_SAVE_NAME` (``jax.ad_checkpoint.checkpoint_name``) are saved: the
  fused convolution block (:mod:`metajax.models.layers`) names its input gradient after
  col2im, so the backward pass reads that instead of recomputing it from a stored patch
  cotangent. Models can name any value they want kept the same way;
- a product with a short contraction (at most :data:`SHORT_CONTRACTION` multiply-adds per
  output element) and a large output (at least :data:`LARGE_OUTPUT` elements) is not saved:
  recomputing it costs about as much as reading it back, and keeping it costs a zero-filled
  stacked residual written and re-read in DRAM. That is the single-channel first layer of
  the Omniglot Conv4 (9 patch features) on large support sets: (d) +3-4%, (c) (5 images
  per support set, below the size) unchanged.

Measured (``benchmarks/maml_step.py`` configs compiled in one process and timed in interleaved
rounds, 2 CPU cores): config (c) +6-10% tasks/s against ``dots_saveable``, (d) +1-3%; the
stored residuals of the 20-way Conv4 shrink from 5 x (980 + 320 + 80) x 576 patch rows per
task to the 5 x (20 x 14 x 14 + ...) x 64 input gradients.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from metajax.core.remat import dots_policy
  >>> f = jax.checkpoint(lambda w, x: jnp.tanh(x @ w) @ w.T, policy=dots_policy)
  >>> jax.grad(lambda w: f(w, jnp.ones((2, 3))).sum())(jnp.eye(3)).shape
  (3, 3)
"""

from __future__ import annotations

import jax
from jax import lax

REMAT_SAVE_NAME = "metajax_remat_save"

_save_named = jax.checkpoint_policies.save_only_these_names(REMAT_SAVE_NAME)


def _is_transposed_rhs_product(avals, dimension_numbers) -> bool:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    return (not lhs_batch and not rhs_batch and len(avals) == 2
            and tuple(lhs_contract) == (avals[0].ndim - 1,)
            and tuple(rhs_contract) == (avals[1].ndim - 1,))


# Products cheaper to recompute than to keep: at most this many multiply-adds per output
# element, and outputs of at least this many elements (beyond the L2 cache, where keeping
# them means writing, zero-filling and re-reading a stacked residual in DRAM).
SHORT_CONTRACTION = 16
LARGE_OUTPUT = 1 << 17


def _is_cheap_large_product(avals, dimension_numbers) -> bool:
    (lhs_contract, rhs_contract), (_, rhs_batch) = dimension_numbers
    if len(avals) != 2:
        return False
    lhs, rhs = avals
    contraction = 1
    for axis in lhs_contract:
        contraction *= lhs.shape[axis]
    output = 1
    for axis, size in enumerate(lhs.shape):
        if axis not in lhs_contract:
            output *= size
    for axis, size in enumerate(rhs.shape):
        if axis not in rhs_contract and axis not in rhs_batch:
            output *= size
    return contraction <= SHORT_CONTRACTION and output >= LARGE_OUTPUT


def dots_policy(prim, *avals, **params) -> bool:
    """``jax.checkpoint`` policy of ``remat="dots"`` (see the module docstring)."""
    if prim is lax.dot_general_p:
        dims = params["dimension_numbers"]
        return (not _is_transposed_rhs_product(avals, dims)
                and not _is_cheap_large_product(avals, dims))
    if prim is lax.conv_general_dilated_p:
        return True
    return bool(_save_named(prim, *avals, **params))
