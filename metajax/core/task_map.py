"""Running a per-task function over the task axis of a meta-batch.

``vmap`` is the default. On some backends a sequential ``lax.map`` or a chunked
map (``vmap`` over chunks of tasks, ``lax.map`` over chunks) is faster, e.g.
XLA:CPU lowers vmapped per-task convolution weights to slow grouped
convolutions. The strategy is a static setting; results agree to float
tolerance whichever is chosen.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax

PyTree = Any
TaskMap = Union[str, int]  # "vmap", "map", or a chunk size


def map_over_tasks(fn: Callable[..., PyTree], shared: PyTree, tasks: PyTree,
                   strategy: TaskMap = "vmap") -> PyTree:
    """Computes ``fn(shared, task_i)`` for every task ``i`` (leading axis of ``tasks``).

    Args:
      fn: per-task function ``fn(shared, task) -> pytree``.
      shared: arguments shared by all tasks (e.g. meta-parameters), not mapped.
      tasks: pytree whose leaves have a leading task axis.
      strategy: ``"vmap"``, ``"map"`` (sequential ``lax.map``) or an int chunk size
        (``lax.map`` with ``batch_size``, i.e. ``vmap`` inside chunks).
    """
    per_task = lambda task: fn(shared, task)
    if strategy == "vmap":
        return jax.vmap(fn, in_axes=(None, 0))(shared, tasks)
    if strategy == "map":
        return jax.lax.map(per_task, tasks)
    if isinstance(strategy, int) and not isinstance(strategy, bool) and strategy > 0:
        return jax.lax.map(per_task, tasks, batch_size=strategy)
    raise ValueError(
        f"task_map must be 'vmap', 'map' or a positive int chunk size; got {strategy!r}.")


def resolve_task_map(value: Union[str, int], backend: str | None = None) -> TaskMap:
    """A strategy from a flag value: ``"vmap"``, ``"map"``, an int (or digit string) chunk
    size, or ``"auto"``: ``"map"`` on CPU, where it measured fastest for MAML's per-task
    conv weights (``benchmarks/maml_step.py``), ``"vmap"`` on accelerators.

    Example:
      >>> resolve_task_map("auto", backend="cpu"), resolve_task_map("8"), resolve_task_map("vmap")
      ('map', 8, 'vmap')
    """
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value == "auto":
        return "map" if (backend or jax.default_backend()) == "cpu" else "vmap"
    if value in ("vmap", "map") or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f"task_map must be 'auto', 'vmap', 'map' or a positive chunk size; got {value!r}.")
