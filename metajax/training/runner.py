"""Driving compiled steps from Python: progress bars and many-task evaluation."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from metajax.core.tasks import TaskBatch
from metajax.training.steps import mean_and_ci95
from metajax.training.train_state import TrainState

PyTree = Any


def run_fused_training(train_loop: Callable[[TrainState], tuple[TrainState, dict]],
                       state: TrainState, iterations: int, steps_per_call: int, *,
                       desc: str = "meta-train", progress: bool = True,
                       log_fn: Optional[Callable[[int, dict], None]] = None
                       ) -> tuple[TrainState, dict]:
    """Calls a fused ``train_loop`` (see :func:`make_train_loop`) until ``iterations`` steps.

    ``iterations`` must be a multiple of ``steps_per_call`` (so every step runs the same
    compiled program: no silent truncation, no recompile for a remainder).

    Returns:
      The final state and a dict with ``loss_curve`` (mean loss of each call), the
      ``compile_s`` of the first call and ``steps_per_s`` after it.
    """
    if iterations % steps_per_call:
        raise ValueError(
            f"iterations={iterations} is not a multiple of steps_per_call={steps_per_call}; "
            "pick a steps_per_call that divides it.")
    from tqdm.auto import tqdm

    calls = iterations // steps_per_call
    curve, steps_done = [], []
    bar = tqdm(total=iterations, desc=desc, unit="it", disable=not progress, smoothing=0.1)
    t0 = time.perf_counter()
    first_call_s = 0.0
    for call in range(calls):
        state, metrics = train_loop(state)
        loss = float(np.mean(jax.device_get(metrics["loss"])))  # syncs: cheap, once per call
        if call == 0:
            first_call_s = time.perf_counter() - t0
            t_after_first = time.perf_counter()
        curve.append(loss)
        steps_done.append((call + 1) * steps_per_call)
        bar.update(steps_per_call)
        bar.set_postfix(loss=f"{loss:.4f}")
        if log_fn is not None:
            log_fn(int(steps_done[-1]), jax.tree_util.tree_map(lambda x: float(np.mean(x)), metrics))
    bar.close()
    rest = time.perf_counter() - t_after_first if calls > 1 else float("nan")
    return state, {
        "loss_curve": curve,
        "curve_steps": steps_done,
        "first_call_s": first_call_s,
        "steps_per_s": (iterations - steps_per_call) / rest if calls > 1 else float("nan"),
        "wall_s": time.perf_counter() - t0,
    }


def evaluate_many(evaluate: Callable[[PyTree, TaskBatch], dict], params: PyTree,
                  sample_tasks: Callable[[jax.Array], TaskBatch], key: jax.Array,
                  num_tasks: int, batch_size: int) -> dict:
    """Runs a jitted per-task ``evaluate`` over ``num_tasks`` fresh tasks.

    ``num_tasks`` must be a multiple of ``batch_size``. Returns numpy arrays of shape
    ``(num_tasks, steps + 1)`` per metric.
    """
    if num_tasks % batch_size:
        raise ValueError(f"num_tasks={num_tasks} is not a multiple of batch_size={batch_size}.")
    evaluate = jax.jit(evaluate)
    chunks = []
    for k in jax.random.split(key, num_tasks // batch_size):
        chunks.append(jax.device_get(evaluate(params, sample_tasks(k))))
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def summarize_steps(per_task: np.ndarray, steps: tuple[int, ...]) -> tuple[dict, dict]:
    """Mean and 95% CI half-width after each of ``steps`` inner steps (string keys, as in JSON)."""
    mean, ci = mean_and_ci95(per_task)
    return ({str(s): float(mean[s]) for s in steps}, {str(s): float(ci[s]) for s in steps})
