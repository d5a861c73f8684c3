"""Meta-SGD (Li et al. 2017): MAML with a learned inner learning rate per parameter."""

from __future__ import annotations

import dataclasses
from typing import Optional

from metajax.algorithms.maml import MAML


@dataclasses.dataclass(frozen=True)
class MetaSGD(MAML):
    """MAML whose inner step is ``theta - alpha (elementwise) grad``, with ``alpha`` meta-learned.

    ``init`` adds ``"inner_rates"`` (same shapes as the params, all ``inner.learning_rate``)
    to the meta-parameters; the outer optimizer updates them with the model.

    Example:
      >>> import jax, metajax as mj
      >>> model, params = mj.models.init_mlp(jax.random.key(0))
      >>> meta_sgd = mj.MetaSGD(apply_fn=model, loss_fn=mj.mse)
      >>> sorted(meta_sgd.init(params))
      ['inner_rates', 'model']
    """

    learn_inner_rates: Optional[str] = "per_parameter"
