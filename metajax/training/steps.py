"""Jit-compiled meta-training and evaluation steps.

A *meta-loss* is any function ``meta_loss(params, batch, rng) -> (loss, metrics)``
(every algorithm's ``.meta_loss`` has this form). The outer update is any optax
optimizer. The steps below are pure functions of the :class:`TrainState`, so a
notebook can call them in a loop:

  >>> import jax, optax
  >>> import metajax as mj
  >>> model, params = mj.models.init_mlp(jax.random.key(0), input_dim=1, output_dim=1)
  >>> maml = mj.MAML(apply_fn=model, loss_fn=mj.mse)
  >>> optimizer = optax.adam(1e-3)
  >>> state = mj.create_train_state(maml.init(params), optimizer, jax.random.key(1))
  >>> train_step = mj.make_train_step(maml.meta_loss, optimizer)
  >>> batch = mj.data.sample_sinusoid_tasks(jax.random.key(2), 25, 10, 10)
  >>> state, metrics = train_step(state, batch)
  >>> int(state.step)
  1
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from metajax.core.state_updates import STATE_UPDATES, apply_state_updates
from metajax.core.tasks import TaskBatch
from metajax.training.train_state import TrainState

PyTree = Any
MetaLoss = Callable[[PyTree, TaskBatch, jax.Array], tuple[jax.Array, dict]]
TaskSampler = Callable[[jax.Array], TaskBatch]


def takes_step(meta_loss: Callable) -> bool:
    """Whether ``meta_loss`` accepts a ``step`` keyword (schedules such as MAML++'s annealing)."""
    try:
        return "step" in inspect.signature(meta_loss).parameters
    except (TypeError, ValueError):
        return False


def meta_update(state: TrainState, batch: TaskBatch, *, meta_loss: MetaLoss,
                optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One outer update (not jitted): meta-gradient of ``meta_loss`` and an optimizer step.

    A meta-loss that accepts a ``step`` keyword receives ``state.step`` (a traced int), so
    step-dependent schedules run inside one compiled program.
    """
    rng, loss_rng = jax.random.split(state.rng)
    extra = {"step": state.step} if takes_step(meta_loss) else {}
    (loss, metrics), grads = jax.value_and_grad(meta_loss, has_aux=True)(
        state.params, batch, loss_rng, **extra)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    params = apply_state_updates(params, metrics.pop(STATE_UPDATES, None))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def low_memory_compile_options(backend: Optional[str] = None) -> dict[str, Any]:
    """XLA compile options that trade some step speed for a much lower compile-time peak.

    For the ``compiler_options`` of :func:`make_train_step`, :func:`make_train_loop`,
    :func:`make_eval_step` and ``runner.evaluate_many``. On CPU they switch off XLA's MLIR
    fusion emitters, whose compile of a Conv4 MAML step holds about 200 MiB more at its
    peak; the element-wise and reduction kernels XLA's older emitters produce instead run
    somewhat slower (about 8-9% on the Conv4 step; ``benchmarks/maml_step.py
    --low-memory-compile``, README "Compile-time memory").
    Other backends get ``{}`` (no change). ``backend`` defaults to ``jax.default_backend()``.

      >>> import metajax as mj
      >>> mj.low_memory_compile_options("cpu")
      {'xla_cpu_use_fusion_emitters': False}
      >>> mj.low_memory_compile_options("gpu")
      {}
    """
    backend = backend or jax.default_backend()
    return {"xla_cpu_use_fusion_emitters": False} if backend == "cpu" else {}


def make_train_step(meta_loss: MetaLoss, optimizer: optax.GradientTransformation, *,
                    donate: bool = True, compiler_options: Optional[dict[str, Any]] = None
                    ) -> Callable[[TrainState, TaskBatch], tuple[TrainState, dict]]:
    """A jit-compiled ``(state, batch) -> (state, metrics)`` meta-training step.

    The input state's buffers are donated (``donate=True``): do not reuse a state after
    passing it in. ``compiler_options`` go to ``jax.jit`` (XLA debug options for this
    executable only, e.g. :func:`low_memory_compile_options`).
    """
    def step(state, batch):
        return meta_update(state, batch, meta_loss=meta_loss, optimizer=optimizer)

    return jax.jit(step, donate_argnums=(0,) if donate else (),
                   compiler_options=compiler_options or None)


def make_train_loop(meta_loss: MetaLoss, optimizer: optax.GradientTransformation,
                    sample_tasks: TaskSampler, steps_per_call: int, *,
                    donate: bool = True, compiler_options: Optional[dict[str, Any]] = None
                    ) -> Callable[[TrainState], tuple[TrainState, dict]]:
    """``steps_per_call`` meta-steps fused into one compiled call (``lax.scan`` over steps).

    Tasks are sampled on device from ``sample_tasks(key)`` with a key split off
    ``state.rng``, so the run is deterministic given the initial state. For small models
    the per-call dispatch dominates; fusing many steps removes it. Metrics come back
    stacked with a leading ``steps_per_call`` axis. ``compiler_options``: as in
    :func:`make_train_step`.
    """
    if not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be a positive int, got {steps_per_call!r}.")

    def one(state, _):
        rng, sample_rng = jax.random.split(state.rng)
        batch = sample_tasks(sample_rng)
        return meta_update(state.replace(rng=rng), batch, meta_loss=meta_loss,
                           optimizer=optimizer)

    def loop(state):
        return jax.lax.scan(one, state, None, length=steps_per_call)

    return jax.jit(loop, donate_argnums=(0,) if donate else (),
                   compiler_options=compiler_options or None)


def make_eval_step(evaluate: Callable[[PyTree, TaskBatch], dict], *,
                   compiler_options: Optional[dict[str, Any]] = None
                   ) -> Callable[[PyTree, TaskBatch], dict]:
    """Jit-compiles an algorithm's ``evaluate(params, batch)`` (e.g. ``maml.evaluate``).

    Returns per-task arrays ``(tasks, steps + 1)``; see :func:`mean_and_ci95`.
    ``compiler_options``: as in :func:`make_train_step`.
    """
    return jax.jit(evaluate, compiler_options=compiler_options or None)


def mean_and_ci95(values) -> tuple[float, float]:
    """Mean and 95% confidence half-width (normal approximation) over axis 0."""
    values = jnp.asarray(values, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    n = values.shape[0]
    mean = jnp.mean(values, axis=0)
    std = jnp.std(values, axis=0, ddof=1) if n > 1 else jnp.zeros_like(mean)
    return mean, 1.96 * std / jnp.sqrt(n)
