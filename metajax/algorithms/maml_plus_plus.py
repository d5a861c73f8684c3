"""MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019) as library features.

* **Multi-step loss (MSL)** with annealed per-step weights: the meta-loss is a weighted
  sum of the query losses after every inner step; the weights start uniform and are
  annealed towards the final step over ``msl_anneal_steps`` meta-steps.
* **Per-layer per-step learned inner rates (LSLR)**: ``learn_inner_rates="per_tensor_per_step"``.
* **Derivative-order annealing (DOA)**: first order for the first ``first_order_steps``
  meta-steps, then second order. Both orders live in one compiled program behind a
  ``lax.cond`` on the train step, so switching does not recompile.
* **Cosine annealing** of the meta learning rate: :func:`cosine_adam`.

* **Per-step batch-norm weights and biases (BNWB)**: with ``per_step_bn=True``, :meth:`init`
  gives every batch-norm scale/shift (model leaves whose path has a key containing
  ``"bn"``; ``per_step_filter`` changes the rule) a leading axis of ``inner.steps`` copies.
  Inner step ``i`` and the query loss after it use copy ``i``; the copies are meta-learned,
  not adapted in the inner loop (as in the paper's code). Evaluating with more steps than
  were trained reuses the last copy.

* **Per-step batch-norm running statistics (BNRS)**: with ``bn_running_stats=True`` (and a
  model built with running statistics, e.g. ``init_omniglot_conv4(..., running_stats=True)``)
  the running means/variances ``bn{i}_mean`` / ``bn{i}_var`` get ``inner.steps`` copies too.
  Copy ``i`` averages (momentum ``bn_momentum``, PyTorch's convention) the batch statistics of
  every forward pass that uses copy ``i``: the support set at inner step ``i`` and the query
  set after it, averaged over the meta-batch's tasks. They are state, not weights: the outer
  step writes them in (``metajax.core.state_updates.STATE_UPDATES``), they are never adapted and
  get no gradient. Training always normalises with batch statistics, as the paper's code
  does (its ``F.batch_norm`` runs with ``training=True``, so its running statistics never
  change an output). ``eval_bn_mode="running"`` evaluates non-transductively instead: every
  inner step ``i`` and the query after it normalise with running-statistics copy ``i``, so a
  prediction no longer depends on the other examples of its batch.

  Collecting the statistics costs one extra first-order pass over each task per meta-step
  (forward passes on the support and query sets at every step): opt-in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from metajax.algorithms.maml import MAML, resize_per_step_rates
from metajax.core.inner_loop import adapt, select_step
from metajax.core.masks import mask_by_path
from metajax.core.meta_objective import meta_batch_loss
from metajax.core.state_updates import STATE_UPDATES, leaf_paths
from metajax.core.task_map import map_over_tasks
from metajax.core.tasks import Task, TaskBatch, as_tasks


PyTree = Any


def _is_batch_norm(path: tuple[str, ...]) -> bool:
    return any("bn" in key for key in path)


def _is_running_statistic(path: tuple[str, ...]) -> bool:
    """Running mean/variance leaves of batch norm (``bn{i}_mean`` / ``bn{i}_var``)."""
    last = str(path[-1]) if path else ""
    return "bn" in last and (last.endswith("_mean") or last.endswith("_var"))


def _layer_of(name: str) -> tuple[str, str]:
    """``"bn2_mean" -> ("bn2", "mean")``."""
    layer, _, kind = name.rpartition("_")
    return layer, kind


def multi_step_loss_weights(step: jax.Array, inner_steps: int, anneal_steps: int) -> jax.Array:
    """Weights of the query losses after 0..S inner steps at meta-step ``step`` (shape ``(S+1,)``).

    As in the paper's code: every step starts at ``1/S``; non-final weights decay linearly
    to ``0.03/S`` over ``anneal_steps`` while the final weight grows so the sum stays 1.
    Step 0 (the unadapted model) has weight 0.

    Example:
      >>> w = multi_step_loss_weights(0, 4, 100)
      >>> [round(float(x), 3) for x in w]
      [0.0, 0.25, 0.25, 0.25, 0.25]
      >>> [round(float(x), 4) for x in multi_step_loss_weights(10_000, 4, 100)]
      [0.0, 0.0075, 0.0075, 0.0075, 0.9775]
    """
    s = inner_steps
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(anneal_steps, 1), 0.0, 1.0)
    uniform, floor = 1.0 / s, 0.03 / s
    non_final = uniform - (uniform - floor) * progress
    final = 1.0 - (s - 1) * non_final
    return jnp.concatenate([jnp.zeros((1,)), jnp.full((s - 1,), non_final), final[None]])


def cosine_adam(learning_rate: float, total_steps: int, min_learning_rate: float = 1e-5
                ) -> optax.GradientTransformation:
    """Adam with the meta learning rate cosine-annealed to ``min_learning_rate``."""
    schedule = optax.cosine_decay_schedule(learning_rate, total_steps,
                                           alpha=min_learning_rate / learning_rate)
    return optax.adam(schedule)


@dataclasses.dataclass(frozen=True)
class MAMLPlusPlus(MAML):
    """MAML with MSL, LSLR and DOA (see the module docstring).

    Attributes (beyond :class:`MAML`'s):
      msl_anneal_steps: meta-steps over which MSL weights anneal; ``None`` turns MSL off
        (only the final query loss counts).
      first_order_steps: meta-steps trained first order before switching to second order
        (0 = second order from the start).

    Example:
      >>> import jax, metajax as mj
      >>> model, params = mj.models.init_mlp(jax.random.key(0))
      >>> mpp = mj.MAMLPlusPlus(model, mj.mse, inner=mj.InnerLoop(steps=3, learning_rate=0.01))
      >>> batch = mj.data.sample_sinusoid_tasks(jax.random.key(1), 4, 10, 10)
      >>> loss, _ = mpp.meta_loss(mpp.init(params), batch, step=0)
    """

    learn_inner_rates: Optional[str] = "per_tensor_per_step"
    msl_anneal_steps: Optional[int] = 1000
    first_order_steps: int = 0
    per_step_bn: bool = False
    per_step_filter: Callable[[tuple[str, ...]], bool] = _is_batch_norm
    bn_running_stats: bool = False
    bn_momentum: float = 0.1
    eval_bn_mode: str = "batch"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}.")
        if self.eval_bn_mode not in ("batch", "running"):
            raise ValueError(f"eval_bn_mode must be 'batch' or 'running', got {self.eval_bn_mode!r}.")
        if self.eval_bn_mode == "running" and not self.bn_running_stats:
            raise ValueError("eval_bn_mode='running' needs bn_running_stats=True.")

    def _statistics_mask(self, params: PyTree) -> PyTree:
        return mask_by_path(params, _is_running_statistic)

    def init(self, params: PyTree) -> dict:
        """Meta-parameters; per-step batch-norm leaves (BNWB, BNRS) get ``inner.steps`` copies."""
        if (self.per_step_bn or self.bn_running_stats) and self.inner.steps < 1:
            raise ValueError("per_step_bn / bn_running_stats need inner.steps >= 1.")
        if self.per_step_bn and not any(jax.tree_util.tree_leaves(
                mask_by_path(params, self.per_step_filter))):
            raise ValueError("per_step_bn=True but no parameter path matches per_step_filter "
                             "(default: a key containing 'bn'); pass per_step_filter.")
        if self.bn_running_stats and not any(jax.tree_util.tree_leaves(
                self._statistics_mask(params))):
            raise ValueError("bn_running_stats=True but the model has no running statistics "
                             "(bn{i}_mean / bn{i}_var leaves); build it with running_stats=True, "
                             "e.g. init_omniglot_conv4(key, running_stats=True).")
        mask = self._per_step_mask(params)
        if mask is not None:
            params = jax.tree_util.tree_map(
                lambda p, f: jnp.broadcast_to(p, (self.inner.steps,) + p.shape) if f else p,
                params, mask)
        return super().init(params)  # (learned rates of per-step leaves exist but are unused)

    def _per_step_mask(self, params: PyTree) -> Optional[PyTree]:
        masks = []
        if self.per_step_bn:
            masks.append(mask_by_path(params, self.per_step_filter))
        if self.bn_running_stats:
            masks.append(self._statistics_mask(params))
        if not masks:
            return None
        return jax.tree_util.tree_map(lambda *fs: any(fs), *masks)

    def running_statistics(self, meta_params: dict, batch: TaskBatch) -> dict:
        """Per-step batch statistics of ``batch``: ``{"model/bn{i}_mean": (S, C), ...}``.

        Copy ``i`` is the mean over tasks of the statistics of the support set at inner step
        ``i`` and of the query set after it (each with per-step copy ``i`` of the per-step
        leaves), from the same inner loop as training (first order; nothing is differentiated).
        """
        from metajax.models.conv4 import with_bn_mode
        collect = with_bn_mode(self.apply_fn, "collect")
        model, rates = meta_params["model"], meta_params.get("inner_rates")
        kwargs = self._kwargs(model)
        per_step = kwargs["per_step_mask"]
        steps = self.inner.steps

        def per_task(shared, task: Task):
            model, rates = shared
            params = [model]  # phi_0 .. phi_S
            for n in range(1, steps + 1):
                inner = dataclasses.replace(self.inner.with_overrides(steps=n), first_order=True)
                r = rates
                if r is not None and inner.rates_per_step:
                    r = resize_per_step_rates(r, n)
                params.append(adapt(model, task, rates=r, **dict(kwargs, inner=inner)).params)
            copies = []
            for i in range(steps):
                support = collect(select_step(params[i], per_step, i), task.support_inputs)
                query = collect(select_step(params[i + 1], per_step, i), task.query_inputs)
                copies.append(jax.tree_util.tree_map(lambda a, b: 0.5 * (a + b), support, query))
            return jax.tree_util.tree_map(lambda *c: jnp.stack(c), *copies)

        stats = map_over_tasks(per_task, (model, rates), as_tasks(batch), self.task_map)
        stats = jax.lax.stop_gradient(jax.tree_util.tree_map(lambda x: jnp.mean(x, 0), stats))
        return {f"model/{layer}_{kind}": value
                for layer, (mean, var) in stats.items()
                for kind, value in (("mean", mean), ("var", var))}

    def _running_stats_update(self, meta_params: dict, batch: TaskBatch) -> dict:
        current = leaf_paths(meta_params)
        new = self.running_statistics(meta_params, batch)
        missing = sorted(set(new) - set(current))
        if missing:
            raise ValueError(f"the model reports batch-norm layers without running statistics "
                             f"leaves: {missing}.")
        m = self.bn_momentum
        return {k: (1.0 - m) * current[k] + m * v for k, v in new.items()}

    def evaluate(self, meta_params: dict, batch: TaskBatch, *, steps: Optional[int] = None,
                 learning_rate: Optional[float] = None) -> dict:
        """As :meth:`MAML.evaluate`; with ``eval_bn_mode="running"`` non-transductively."""
        if self.eval_bn_mode == "running":
            from metajax.models.conv4 import with_bn_mode
            algo = dataclasses.replace(self, apply_fn=with_bn_mode(self.apply_fn, "running"),
                                       eval_bn_mode="batch")
            return MAML.evaluate(algo, meta_params, batch, steps=steps,
                                 learning_rate=learning_rate)
        return super().evaluate(meta_params, batch, steps=steps, learning_rate=learning_rate)

    def meta_loss(self, meta_params: dict, batch: TaskBatch, rng: Optional[jax.Array] = None,
                  step: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        del rng
        step = jnp.zeros((), jnp.int32) if step is None else step
        weights = None
        if self.msl_anneal_steps is not None and self.inner.steps > 0:
            weights = multi_step_loss_weights(step, self.inner.steps, self.msl_anneal_steps)

        def loss_with(first_order: bool):
            kwargs = self._kwargs(meta_params["model"])  # (structure only)
            kwargs["inner"] = dataclasses.replace(self.inner, first_order=first_order)
            return lambda p: meta_batch_loss(p["model"], batch, task_map=self.task_map,
                                             rates=p.get("inner_rates"), step_weights=weights,
                                             **kwargs)

        if self.first_order_steps <= 0:
            loss, metrics = loss_with(self.inner.first_order)(meta_params)
        else:
            loss, metrics = jax.lax.cond(step < self.first_order_steps, loss_with(True),
                                         loss_with(False), meta_params)
        if self.bn_running_stats:
            metrics = dict(metrics, **{STATE_UPDATES: self._running_stats_update(meta_params, batch)})
        return loss, metrics
