"""Driving compiled steps from Python: progress bars and many-task evaluation."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import jax
import numpy as np

from metajax.core.tasks import TaskBatch
from metajax.training.steps import mean_and_ci95
from metajax.training.train_state import TrainState

if TYPE_CHECKING:
    from metajax.training.checkpoint import Checkpointer

PyTree = Any


def run_fused_training(train_loop: Callable[[TrainState], tuple[TrainState, dict]],
                       state: TrainState, iterations: int, steps_per_call: int, *,
                       desc: str = "meta-train", progress: bool = True,
                       log_fn: Optional[Callable[[int, dict], None]] = None,
                       checkpointer: Optional["Checkpointer"] = None,
                       checkpoint_every: Optional[int] = None,
                       config: Optional[dict] = None,
                       on_nonfinite: str = "raise",
                       report_dir: Optional[str] = None,
                       ) -> tuple[TrainState, dict]:
    """Calls a fused ``train_loop`` (see :func:`make_train_loop`) until ``iterations`` steps.

    ``iterations`` must be a multiple of ``steps_per_call`` (so every step runs the same
    compiled program: no silent truncation, no recompile for a remainder). Training starts
    from ``state.step``, so a state restored from a checkpoint continues where it stopped
    (and, the fused loop being deterministic given the state, bit-identically).

    Args:
      log_fn: called after every compiled call as ``log_fn(step, metrics)`` with the mean of
        each metric over the call (e.g. :meth:`MetricsLogger.log_fn`).
      checkpointer: a :class:`~metajax.training.checkpoint.Checkpointer`; the state is saved
        every ``checkpoint_every`` steps (a multiple of ``steps_per_call``; default: every
        call) and at the end, with ``config`` stored alongside.
      on_nonfinite: ``"raise"`` (default): a non-finite per-step ``loss`` or ``grad_norm``
        stops training with a :class:`~metajax.training.guards.NonFiniteError` naming the
        step; nothing after the last good checkpoint is saved and ``nonfinite.json`` is
        written to ``report_dir`` (default: the checkpoint directory). ``"skip"``: the
        optimizer skips such updates (:func:`~metajax.training.guards.skip_nonfinite`);
        they are counted, and training stops only if the parameters become non-finite.
        ``"ignore"``: no check.

    Returns:
      The final state and a dict with ``loss_curve`` (mean loss of each call), the
      ``first_call_s`` of the first call (incl. compilation), ``steps_per_s`` after it,
      ``start_step`` and ``nonfinite_steps`` (steps whose loss or gradient was non-finite).

    Example:
      >>> import jax, optax, metajax as mj
      >>> model, params = mj.models.init_mlp(jax.random.key(0))
      >>> maml = mj.MAML(apply_fn=model, loss_fn=mj.mse)
      >>> opt = optax.adam(1e-3)
      >>> loop = mj.make_train_loop(maml.meta_loss, opt,
      ...                           lambda k: mj.data.sample_sinusoid_tasks(k, 5, 10, 10), 10)
      >>> state = mj.create_train_state(maml.init(params), opt, jax.random.key(1))
      >>> state, info = run_fused_training(loop, state, 20, 10, progress=False)
      >>> int(state.step), len(info["loss_curve"])
      (20, 2)
    """
    from metajax.training import guards

    if iterations % steps_per_call:
        raise ValueError(
            f"iterations={iterations} is not a multiple of steps_per_call={steps_per_call}; "
            "pick a steps_per_call that divides it.")
    if on_nonfinite not in ("raise", "skip", "ignore"):
        raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'ignore', got {on_nonfinite!r}.")
    if checkpoint_every is not None and (checkpoint_every < 1 or checkpoint_every % steps_per_call):
        raise ValueError(f"checkpoint_every={checkpoint_every} must be a positive multiple of "
                         f"steps_per_call={steps_per_call}.")
    start = int(jax.device_get(state.step))
    if start > iterations or (iterations - start) % steps_per_call:
        raise ValueError(f"the state is at step {start}, which does not lead to iterations="
                         f"{iterations} in calls of {steps_per_call} steps.")
    from tqdm.auto import tqdm

    every = checkpoint_every or steps_per_call
    report_dir = report_dir or (checkpointer.directory if checkpointer is not None else None)
    last_saved = checkpointer.latest_step() if checkpointer is not None else None
    calls = (iterations - start) // steps_per_call
    curve, steps_done, nonfinite_steps = [], [], 0
    bar = tqdm(total=iterations, initial=start, desc=desc, unit="it", disable=not progress,
               smoothing=0.1)
    t0 = time.perf_counter()
    first_call_s, t_after_first = 0.0, t0
    try:
        for call in range(calls):
            call_start = start + call * steps_per_call
            state, metrics = train_loop(state)
            host = jax.device_get(metrics)  # syncs: cheap, once per call
            found = (guards.find_nonfinite(host, call_start) if on_nonfinite != "ignore" else None)
            if found is not None:
                bad = sum(1 for i in range(steps_per_call)
                          if not all(np.all(np.isfinite(np.asarray(host[k][i])))
                                     for k in ("loss", "grad_norm") if k in host))
                nonfinite_steps += bad
                if on_nonfinite == "raise" or not bool(guards.tree_all_finite(state.params)):
                    report = guards.nonfinite_report(found, host, call_start, desc=desc,
                                                     last_good_checkpoint=last_saved)
                    path = (guards.write_nonfinite_report(report_dir, report)
                            if report_dir is not None and jax.process_index() == 0 else None)
                    raise guards.NonFiniteError(guards.nonfinite_message(report, path), report)
            loss = float(np.nanmean(host["loss"])) if found is not None else float(np.mean(host["loss"]))
            if call == 0:
                first_call_s = time.perf_counter() - t0
                t_after_first = time.perf_counter()
            step_now = call_start + steps_per_call
            curve.append(loss)
            steps_done.append(step_now)
            if checkpointer is not None and (step_now % every == 0 or step_now == iterations):
                checkpointer.save(state, config=config)
                last_saved = step_now
            bar.update(steps_per_call)
            bar.set_postfix(loss=f"{loss:.4f}")
            if log_fn is not None:
                log_fn(int(step_now), {k: float(np.nanmean(v)) for k, v in host.items()})
    finally:
        bar.close()
    rest = time.perf_counter() - t_after_first if calls > 1 else float("nan")
    return state, {
        "loss_curve": curve,
        "curve_steps": steps_done,
        "first_call_s": first_call_s,
        "steps_per_s": (calls - 1) * steps_per_call / rest if calls > 1 else float("nan"),
        "wall_s": time.perf_counter() - t0,
        "start_step": start,
        "nonfinite_steps": nonfinite_steps,
    }


def evaluate_many(evaluate: Callable[[PyTree, TaskBatch], dict], params: PyTree,
                  sample_tasks: Callable[[jax.Array], TaskBatch], key: jax.Array,
                  num_tasks: int, batch_size: int,
                  compiler_options: Optional[dict] = None) -> dict:
    """Runs a per-task ``evaluate``, jitted here, over ``num_tasks`` fresh tasks.

    ``num_tasks`` must be a multiple of ``batch_size``. Returns numpy arrays of shape
    ``(num_tasks, steps + 1)`` per metric. ``compiler_options`` go to ``jax.jit`` (then
    ``evaluate`` must not be jitted already: JAX takes them only at the top level).
    """
    if num_tasks % batch_size:
        raise ValueError(f"num_tasks={num_tasks} is not a multiple of batch_size={batch_size}.")
    evaluate = jax.jit(evaluate, compiler_options=compiler_options or None)
    chunks = []
    for k in jax.random.split(key, num_tasks // batch_size):
        chunks.append(jax.device_get(evaluate(params, sample_tasks(k))))
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def summarize_steps(per_task: np.ndarray, steps: tuple[int, ...]) -> tuple[dict, dict]:
    """Mean and 95% CI half-width after each of ``steps`` inner steps (string keys, as in JSON)."""
    mean, ci = mean_and_ci95(per_task)
    return ({str(s): float(mean[s]) for s in steps}, {str(s): float(ci[s]) for s in steps})
