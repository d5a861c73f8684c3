"""Running a per-task function over the task axis of a meta-batch.

``vmap`` is the default. On some backends a sequential ``lax.map`` or a chunked
map (``vmap`` over chunks of tasks, ``lax.map`` over chunks) is faster, e.g.
XLA:CPU lowers vmapped per-task convolution weights to slow grouped
convolutions. The strategy is a static setting; results agree to float
tolerance whichever is chosen.

``"accumulate"`` is ``"map"`` with the gradient taken inside the loop: for the mean
task loss of :func:`mean_loss_over_tasks`, each task's forward and backward pass run
back to back and the gradients are summed in the loop carry. ``jax.grad`` of a plain
``lax.map`` instead runs every task's forward first, keeps all their residuals (memory
grows with the number of tasks), and runs the backward passes afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
TaskMap = Union[str, int]  # "vmap", "map", "accumulate", or a chunk size
STRATEGIES = ("vmap", "map", "accumulate")


def map_over_tasks(fn: Callable[..., PyTree], shared: PyTree, tasks: PyTree,
                   strategy: TaskMap = "vmap") -> PyTree:
    """Computes ``fn(shared, task_i)`` for every task ``i`` (leading axis of ``tasks``).

    Args:
      fn: per-task function ``fn(shared, task) -> pytree``.
      shared: arguments shared by all tasks (e.g. meta-parameters), not mapped.
      tasks: pytree whose leaves have a leading task axis.
      strategy: ``"vmap"``, ``"map"`` (sequential ``lax.map``; ``"accumulate"`` runs as
        ``"map"`` here) or an int chunk size (``lax.map`` with ``batch_size``, i.e. ``vmap``
        inside chunks).
    """
    per_task = lambda task: fn(shared, task)
    if strategy == "vmap":
        return jax.vmap(fn, in_axes=(None, 0))(shared, tasks)
    if strategy in ("map", "accumulate"):
        return jax.lax.map(per_task, tasks)
    if isinstance(strategy, int) and not isinstance(strategy, bool) and strategy > 0:
        return jax.lax.map(per_task, tasks, batch_size=strategy)
    raise ValueError(
        f"task_map must be 'vmap', 'map', 'accumulate' or a positive int chunk size; "
        f"got {strategy!r}.")


def mean_loss_over_tasks(fn: Callable[[PyTree, PyTree], tuple[jax.Array, PyTree]],
                         shared: PyTree, tasks: PyTree,
                         strategy: TaskMap = "vmap") -> tuple[jax.Array, PyTree]:
    """``(mean_i loss_i, aux stacked over tasks)`` for ``fn(shared, task_i) -> (loss_i, aux_i)``.

    With ``strategy="accumulate"`` the gradient with respect to ``shared`` is computed
    task by task inside the loop (a ``jax.custom_vjp``): memory stays that of one task,
    and each task's backward pass runs while its activations are still in cache. What
    that strategy gives up: gradients flow to ``shared`` through the mean loss only (not
    through ``aux``, which is treated as constant, nor to the task data, whose cotangent
    is zero), and forward-mode differentiation (``jax.jvp``) of the result is not
    defined. Every other strategy is plain differentiable JAX.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> fn = lambda w, x: (jnp.sum((w * x) ** 2), {"x": x[0]})
      >>> xs = jnp.arange(6.0).reshape(3, 2)
      >>> g_acc = jax.grad(lambda w: mean_loss_over_tasks(fn, w, xs, "accumulate")[0])(1.0)
      >>> g_vmap = jax.grad(lambda w: mean_loss_over_tasks(fn, w, xs, "vmap")[0])(1.0)
      >>> bool(jnp.allclose(g_acc, g_vmap))
      True
    """
    if strategy != "accumulate":
        losses, aux = map_over_tasks(fn, shared, tasks, strategy)
        return jnp.mean(losses), aux
    num_tasks = jax.tree_util.tree_leaves(tasks)[0].shape[0]
    task_structs = jax.tree_util.tree_map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype), tasks)

    def zero_cotangent(struct):
        if jnp.issubdtype(struct.dtype, jnp.inexact):
            return jnp.zeros(struct.shape, struct.dtype)
        return np.zeros(struct.shape, jax.dtypes.float0)  # integer data has no tangent space

    @jax.custom_vjp
    def mean_loss(shared, tasks):
        losses, aux = map_over_tasks(fn, shared, tasks, "map")
        return jnp.mean(losses), aux

    def mean_loss_fwd(shared, tasks):
        value_and_grad = jax.value_and_grad(fn, has_aux=True)

        def one_task(grad_sum, task):
            (loss, aux), grad = value_and_grad(shared, task)
            return jax.tree_util.tree_map(jnp.add, grad_sum, grad), (loss, aux)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, shared)
        grad_sum, (losses, aux) = jax.lax.scan(one_task, zeros, tasks)
        return (jnp.mean(losses), aux), grad_sum

    def mean_loss_bwd(grad_sum, cotangents):
        mean_cotangent = cotangents[0] / num_tasks
        shared_cotangent = jax.tree_util.tree_map(lambda g: (mean_cotangent * g).astype(g.dtype),
                                                  grad_sum)
        return shared_cotangent, jax.tree_util.tree_map(zero_cotangent, task_structs)

    mean_loss.defvjp(mean_loss_fwd, mean_loss_bwd)
    return mean_loss(shared, tasks)


def resolve_task_map(value: Union[str, int], backend: str | None = None) -> TaskMap:
    """A strategy from a flag value: ``"vmap"``, ``"map"``, ``"accumulate"``, an int (or digit
    string) chunk size, or ``"auto"``: ``"accumulate"`` on CPU, where it measured fastest for
    MAML's per-task conv weights (``benchmarks/conv_paths.py``: 1.39x ``"map"``, which was
    itself faster than ``vmap`` and chunked maps), ``"vmap"`` on accelerators.

    Example:
      >>> resolve_task_map("auto", backend="cpu"), resolve_task_map("8"), resolve_task_map("vmap")
      ('accumulate', 8, 'vmap')
    """
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value == "auto":
        return "accumulate" if (backend or jax.default_backend()) == "cpu" else "vmap"
    if value in STRATEGIES or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f"task_map must be 'auto', 'vmap', 'map', 'accumulate' or a positive chunk "
                     f"size; got {value!r}.")
