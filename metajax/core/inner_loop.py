"""The one inner loop: adapt parameters to a task's support set.

Every gradient-based algorithm in metajax (MAML, FOMAML, Meta-SGD, ANIL,
MAML++, Reptile, the fine-tuning baselines, evaluation) calls :func:`adapt`.
It is a ``lax.scan`` over inner steps, so it is differentiable end to end:
``jax.grad`` of a query loss taken after :func:`adapt` is the second-order
MAML meta-gradient, and ``first_order=True`` puts a ``stop_gradient`` on the
inner gradients (FOMAML).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from metajax import InnerLoop, adapt, mse
  >>> from metajax.core.tasks import Task
  >>> apply_fn = lambda w, x: x @ w
  >>> x = jnp.ones((5, 2)); task = Task(x, x @ jnp.array([[1.], [2.]]), x, x @ jnp.array([[1.], [2.]]))
  >>> out = adapt(jnp.zeros((2, 1)), task, apply_fn=apply_fn, loss_fn=mse,
  ...             inner=InnerLoop(steps=3, learning_rate=0.1))
  >>> out.support_loss.shape
  (3,)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import optax
from flax import struct

from metajax.core.losses import LossFn, masked_mean
from metajax.core.remat import dots_policy
from metajax.core.tasks import Task

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree], PyTree]
MetricFns = Mapping[str, Callable[[PyTree, PyTree], jax.Array]]
REMAT_MODES = ("auto", "none", "full", "dots")


def _check_remat(remat) -> None:
    if not (isinstance(remat, bool) or (isinstance(remat, str) and remat in REMAT_MODES)):
        raise ValueError(f"remat must be one of {REMAT_MODES} (or a bool: True is 'full', "
                         f"False is 'none'); got {remat!r}.")


def resolve_remat(remat: Union[bool, str], *, steps: int, first_order: bool,
                  backend: Optional[str] = None) -> str:
    """The concrete rematerialisation mode (``"none"``, ``"full"`` or ``"dots"``) of an inner loop.

    ``"auto"`` is ``"dots"`` on CPU when the loop is differentiated (second order) through
    more than one step. Measured with ``benchmarks/maml_step.py`` configurations compiled
    in one process and timed in interleaved rounds (2 CPU cores): (d) 20-way 5 steps
    6.26 tasks/s with ``"dots"`` against 5.50 with ``"none"`` (+14%, ``"full"`` 6.18), (c)
    5-way 5 steps 15.9 against 14.8 (+7%, ``"full"`` 15.0); with one step (a) there is no
    scan to stack intermediates over and it made no difference, so one-step loops keep
    ``"none"``. On accelerators it is ``"none"``; ``backend`` defaults to
    ``jax.default_backend()``.

    Example:
      >>> resolve_remat("auto", steps=5, first_order=False, backend="cpu")
      'dots'
      >>> resolve_remat("auto", steps=1, first_order=False, backend="cpu"), resolve_remat(True, steps=1, first_order=False)
      ('none', 'full')
    """
    _check_remat(remat)
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat != "auto":
        return remat
    on_cpu = (backend or jax.default_backend()) == "cpu"
    return "dots" if on_cpu and steps > 1 and not first_order else "none"


def resolve_unroll(unroll: Union[bool, int], *, steps: int) -> int:
    """Inner steps per iteration of the inner ``lax.scan``: ``True`` is all ``steps``, ``False`` 1.

    Unrolled, XLA schedules the steps and their backward pass as straight-line code, without
    the stacked per-step residuals of a scan (zero-filled, written and sliced back each
    step). Measured with ``benchmarks/maml_step.py`` configurations compiled in one process
    and timed in interleaved rounds (2 CPU cores): (d) 20-way 1-shot, 5 steps, fully
    unrolled: +3% to +12% tasks/s (runs an hour apart), but 82 MiB of XLA temporaries
    instead of 49 (``compiled.memory_analysis()``; XLA then keeps the steps' intermediates
    alive whatever ``remat`` says), which puts the process above learn2learn's peak memory;
    (c) 5-way 1-shot, 5 steps: 0.95-1.00x. So the default stays rolled (1).

    Example:
      >>> resolve_unroll(True, steps=5), resolve_unroll(False, steps=5), resolve_unroll(2, steps=5)
      (5, 1, 2)
    """
    if isinstance(unroll, bool):
        return max(steps, 1) if unroll else 1
    return int(unroll)


def _check_unroll(unroll) -> None:
    if not (isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1)):
        raise ValueError(f"InnerLoop.unroll must be a bool or an int >= 1 (inner steps per "
                         f"scan iteration); got {unroll!r}.")


@dataclasses.dataclass(frozen=True)
class InnerLoop:
    """Static settings of task adaptation (hashable, so it can be closed over by ``jit``).

    Attributes:
      steps: number of inner gradient steps ``S`` (0 means no adaptation).
      learning_rate: step size ``alpha`` of the default inner optimizer ``optax.sgd``.
      optimizer: any ``optax.GradientTransformation`` used instead of SGD. When learned
        rates are passed to :func:`adapt`, they *multiply* this optimizer's updates, so
        the optimizer should then have unit step size (the default becomes ``optax.sgd(1.0)``).
      first_order: stop gradients through the inner gradients (FOMAML).
      rates_per_step: learned rates carry a leading axis of length ``steps`` (one rate
        pytree per step, as in MAML++'s LSLR).
      remat: what the second-order backward pass keeps of each inner step
        (:func:`resolve_remat`): ``"none"`` (or ``False``) keeps every intermediate;
        ``"full"`` (or ``True``) keeps nothing and recomputes the step
        (``jax.checkpoint``), so memory does not grow with the number of steps;
        ``"dots"`` keeps only the matmul outputs and recomputes the element-wise ops,
        im2col and batch norm around them (less memory, and faster for several
        second-order steps on CPU, where writing and re-reading the stacked
        intermediates costs more than recomputing them); ``"auto"`` (the default) is
        ``"dots"`` on CPU for second-order loops of more than one step, else ``"none"``
        (what ``"dots"`` keeps exactly: :mod:`metajax.core.remat`).
      unroll: inner steps per iteration of the inner ``lax.scan`` (:func:`resolve_unroll`):
        1 (the default), ``True`` (fully unrolled: a few % faster for second-order loops on
        large support sets, more memory) or an int. Results are the same either way.
    """

    steps: int = 1
    learning_rate: float = 0.01
    optimizer: Optional[optax.GradientTransformation] = None
    first_order: bool = False
    rates_per_step: bool = False
    remat: Union[bool, str] = "auto"
    unroll: Union[bool, int] = 1

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"InnerLoop.steps must be a non-negative int, got {self.steps!r}.")
        if self.optimizer is None and not self.learning_rate > 0:
            raise ValueError(
                f"InnerLoop.learning_rate must be > 0, got {self.learning_rate!r}; "
                "use steps=0 for no adaptation.")
        _check_remat(self.remat)
        _check_unroll(self.unroll)

    def with_overrides(self, steps: Optional[int] = None,
                       learning_rate: Optional[float] = None) -> "InnerLoop":
        """A copy with ``steps`` and/or ``learning_rate`` replaced (``None`` keeps the value)."""
        changes = {k: v for k, v in (("steps", steps), ("learning_rate", learning_rate))
                   if v is not None}
        return dataclasses.replace(self, **changes)

    def transformation(self, learned_rates: bool) -> optax.GradientTransformation:
        if self.optimizer is not None:
            return self.optimizer
        return optax.sgd(1.0 if learned_rates else self.learning_rate)


@struct.dataclass
class Adaptation:
    """What :func:`adapt` returns.

    Attributes:
      params: the adapted parameters after ``steps`` updates.
      support_loss: ``(steps,)`` support loss *before* each update.
      query_loss: ``(steps + 1,)`` query loss after 0..steps updates, or ``None`` when
        the query set was not tracked.
      query_metrics: dict of ``(steps + 1,)`` arrays for each metric, or ``None``.
    """

    params: PyTree
    support_loss: jax.Array
    query_loss: Optional[jax.Array] = None
    query_metrics: Optional[dict] = None


def task_loss_and_metrics(params: PyTree, inputs: PyTree, targets: PyTree,
                          mask: Optional[jax.Array], *, apply_fn: ApplyFn, loss_fn: LossFn,
                          metric_fns: Optional[MetricFns] = None) -> tuple[jax.Array, dict]:
    """Masked mean loss (and metrics) of ``apply_fn(params, inputs)`` against ``targets``."""
    predictions = apply_fn(params, inputs)
    loss = masked_mean(loss_fn(predictions, targets), mask)
    metrics = {name: masked_mean(fn(predictions, targets), mask)
               for name, fn in (metric_fns or {}).items()}
    return loss, metrics


def _split_by_mask(tree: PyTree, adapt_mask: Optional[PyTree]):
    """Splits leaves into (adapted, frozen) lists plus a function that merges them back."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if adapt_mask is None:
        flags = [True] * len(leaves)
    else:
        flags = treedef.flatten_up_to(adapt_mask)
        for f in flags:
            if not isinstance(f, bool):
                raise TypeError(
                    "adapt_mask leaves must be Python bools (True = adapted in the inner loop); "
                    f"got {type(f).__name__}. Build it with jax.tree_util.tree_map on the params.")
    adapted = [leaf for leaf, f in zip(leaves, flags) if f]
    frozen = [leaf for leaf, f in zip(leaves, flags) if not f]

    def merge(adapted_leaves, frozen_leaves):
        a, z = iter(adapted_leaves), iter(frozen_leaves)
        return jax.tree_util.tree_unflatten(treedef, [next(a) if f else next(z) for f in flags])

    return adapted, frozen, flags, merge


def _slice_step(leaf: jax.Array, index) -> jax.Array:
    return leaf[jnp.clip(index, 0, leaf.shape[0] - 1)]


def select_step(params: PyTree, per_step_mask: Optional[PyTree], index) -> PyTree:
    """``params`` with every per-step leaf (``per_step_mask`` True) sliced at ``index``
    (clamped to its length): the parameters the model sees at inner step ``index``."""
    if per_step_mask is None:
        return params
    return jax.tree_util.tree_map(lambda p, f: _slice_step(p, index) if f else p, params,
                                  per_step_mask)


def _per_step_flags(params: PyTree, per_step_mask: Optional[PyTree],
                    adapt_flags: list) -> Optional[list]:
    """Per-step flags of the frozen leaves (``None`` without per-step parameters)."""
    if per_step_mask is None:
        return None
    flags = jax.tree_util.tree_structure(params).flatten_up_to(per_step_mask)
    if any(f and a for f, a in zip(flags, adapt_flags)):
        raise ValueError("per_step_mask marks leaves that adapt_mask adapts; per-step parameters "
                         "are meta-learned only: set their adapt_mask entries to False.")
    return [bool(f) for f, a in zip(flags, adapt_flags) if not a]


def adapt(params: PyTree, task: Task, *, apply_fn: ApplyFn, loss_fn: LossFn,
          inner: InnerLoop, rates: Optional[PyTree] = None,
          adapt_mask: Optional[PyTree] = None, metric_fns: Optional[MetricFns] = None,
          track_query: bool = False,
          regularizer: Optional[Callable[[PyTree], jax.Array]] = None,
          per_step_mask: Optional[PyTree] = None) -> Adaptation:
    """Adapts ``params`` to ``task``'s support set with ``inner.steps`` optimizer steps.

    Args:
      params: initial parameters (a pytree).
      task: one :class:`~metajax.core.tasks.Task` (no task axis; ``vmap`` adds it).
      apply_fn: the model, ``apply_fn(params, inputs) -> predictions``.
      loss_fn: per-example task loss ``loss_fn(predictions, targets)``.
      inner: the static :class:`InnerLoop` settings.
      rates: optional learned inner learning rates (meta-parameters): a pytree with the
        structure of ``params`` whose leaves broadcast against the parameter leaves
        (scalars give per-tensor rates, full shapes per-parameter rates), with a leading
        ``steps`` axis when ``inner.rates_per_step``. They multiply the inner optimizer's updates.
      adapt_mask: optional pytree of Python bools with the structure of ``params``; leaves
        marked ``False`` are not adapted (and no inner gradient is computed for them).
      metric_fns: per-example metrics recorded on the query set when ``track_query``.
      track_query: also record the query loss/metrics after every step (needed for
        multi-step losses and per-step evaluation).
      regularizer: optional ``regularizer(adapted_params) -> scalar`` added to the support
        loss the inner loop minimises (iMAML's proximal term ``lambda/2 ||phi - theta||^2``).
      per_step_mask: optional pytree of Python bools over ``params``; ``True`` leaves are
        *per-step* parameters with a leading axis ``L`` (MAML++'s per-step batch-norm
        weights): the model sees slice ``min(i, L - 1)`` in the support forward pass of
        update ``i + 1`` and for the query after it (slice 0 before any update). They are
        never adapted (their ``adapt_mask`` entries must be ``False`` or absent).

    Returns:
      An :class:`Adaptation`.
    """
    learned = rates is not None
    opt = inner.transformation(learned)
    if per_step_mask is not None and adapt_mask is None:
        adapt_mask = jax.tree_util.tree_map(lambda f: not f, per_step_mask)
    adapted, frozen, flags, merge_all = _split_by_mask(params, adapt_mask)
    per_step = _per_step_flags(params, per_step_mask, flags)

    def merge(adapted_leaves, frozen_leaves, index=0):
        """Full params; per-step leaves sliced at ``index`` (clamped to their length)."""
        if per_step is None:
            return merge_all(adapted_leaves, frozen_leaves)
        sliced = [_slice_step(leaf, index) if ps else leaf
                  for leaf, ps in zip(frozen_leaves, per_step)]
        return merge_all(adapted_leaves, sliced)
    if learned:
        rate_leaves = jax.tree_util.tree_structure(params).flatten_up_to(rates)
        rate_leaves = [r for r, f in zip(rate_leaves, flags) if f]
        if inner.rates_per_step:
            for r in rate_leaves:
                if jnp.ndim(r) == 0 or jnp.shape(r)[0] != inner.steps:
                    raise ValueError(
                        f"rates_per_step=True needs rate leaves with a leading axis of length "
                        f"steps={inner.steps}; got shape {jnp.shape(r)}.")

    def support_objective(adapted_leaves, index):
        full = merge(adapted_leaves, frozen, index)
        loss = task_loss_and_metrics(full, task.support_inputs, task.support_targets,
                                     task.support_mask, apply_fn=apply_fn, loss_fn=loss_fn)[0]
        return loss if regularizer is None else loss + regularizer(full)

    def query_eval(adapted_leaves, updates_done):
        return task_loss_and_metrics(
            merge(adapted_leaves, frozen, updates_done - 1), task.query_inputs,
            task.query_targets, task.query_mask, apply_fn=apply_fn, loss_fn=loss_fn,
            metric_fns=metric_fns)

    def step(carry, xs):
        index, step_rates = xs
        leaves, opt_state = carry
        loss, grads = jax.value_and_grad(support_objective)(leaves, index)
        if inner.first_order:
            grads = jax.lax.stop_gradient(grads)
        updates, opt_state = opt.update(grads, opt_state, leaves)
        if learned:
            updates = [u * r for u, r in zip(updates, step_rates)]
        leaves = optax.apply_updates(leaves, updates)
        outputs = {"support_loss": loss}
        if track_query:
            outputs["query"] = query_eval(carry[0], index)
        return (leaves, opt_state), outputs

    remat = resolve_remat(inner.remat, steps=inner.steps, first_order=inner.first_order)
    if remat == "full":
        step = jax.checkpoint(step)
    elif remat == "dots":
        step = jax.checkpoint(step, policy=dots_policy)

    if inner.steps == 0:
        final = adapted
        traj = {"support_loss": jnp.zeros((0,))}
        if track_query:
            traj["query"] = jax.tree_util.tree_map(lambda x: x[None][:0], query_eval(adapted, 0))
    else:
        indices = jnp.arange(inner.steps)
        if learned and inner.rates_per_step:
            body, xs = step, (indices, rate_leaves)
        else:
            body, xs = (lambda carry, i: step(carry, (i, rate_leaves if learned else None))), indices
        (final, _), traj = jax.lax.scan(body, (adapted, opt.init(adapted)), xs,
                                        length=inner.steps,
                                        unroll=resolve_unroll(inner.unroll, steps=inner.steps))

    query_loss = query_metrics = None
    if track_query:
        last_loss, last_metrics = query_eval(final, inner.steps)
        hist_loss, hist_metrics = traj["query"]
        query_loss = jnp.concatenate([hist_loss, last_loss[None]])
        query_metrics = {k: jnp.concatenate([hist_metrics[k], last_metrics[k][None]])
                         for k in last_metrics}
    # Per-step leaves come back stacked, as given (the structure of ``params``).
    return Adaptation(params=merge_all(final, frozen), support_loss=traj["support_loss"],
                      query_loss=query_loss, query_metrics=query_metrics)
