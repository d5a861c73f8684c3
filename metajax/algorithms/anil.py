"""ANIL (Raghu et al. 2020): almost no inner loop, only the head adapts."""

from __future__ import annotations

from typing import Any, Optional

from metajax.algorithms.maml import MAML
from metajax.core.masks import last_module_mask

PyTree = Any


def ANIL(apply_fn, loss_fn, params: PyTree, *, head_mask: Optional[PyTree] = None,
         **maml_kwargs) -> MAML:
    """MAML that adapts only the head; the body is shared and updated by the outer loop only.

    Args:
      apply_fn, loss_fn: as for :class:`MAML`.
      params: the model parameters (to build the mask).
      head_mask: which leaves adapt (default: the last top-level module, see
        :func:`metajax.core.masks.last_module_mask`).
      **maml_kwargs: any other :class:`MAML` field (``inner``, ``metric_fns``, ...).

    Example:
      >>> import jax, metajax as mj
      >>> model, params = mj.models.init_mlp(jax.random.key(0))
      >>> anil = mj.ANIL(model, mj.mse, params)
      >>> anil.adapt_mask["Dense_0"]["kernel"], anil.adapt_mask["Dense_2"]["kernel"]
      (False, True)
    """
    mask = last_module_mask(params) if head_mask is None else head_mask
    return MAML(apply_fn=apply_fn, loss_fn=loss_fn, adapt_mask=mask, **maml_kwargs)
