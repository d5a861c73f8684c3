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

:class:`ShardedTasks` splits the task axis over several local devices (``shard_map``), each
running one of the strategies above on its share. On CPU, with the cores split into as many
JAX devices (:func:`metajax.configure_cpu_devices`), each core then runs its own tasks'
small GEMMs one after another instead of every GEMM being split across all cores, which
synchronise at every op: ``benchmarks/maml_step.py --cpu-devices 1`` vs ``2`` (README).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

PyTree = Any
STRATEGIES = ("vmap", "map", "accumulate")
TASK_DEVICE_AXIS = "tasks"


@dataclasses.dataclass(frozen=True)
class ShardedTasks:
    """A task-map strategy: the task axis split evenly over local devices (``shard_map``).

    Each device runs ``strategy`` (``"vmap"``, ``"map"``, ``"accumulate"`` or a chunk size)
    over its share of the tasks; the mean loss and its gradient are those of the whole
    meta-batch (the per-device gradients are summed by ``shard_map``'s transpose), so
    results agree with the unsharded strategy to float tolerance. The number of tasks must
    be a multiple of the number of devices.

    Args:
      strategy: what each device does with its tasks.
      devices: how many of ``jax.local_devices()`` to use (0: all).

    Example:
      >>> ShardedTasks("accumulate")
      ShardedTasks(strategy='accumulate', devices=0)
      >>> str(ShardedTasks("map", devices=2))      # the flag form, see resolve_task_map
      'sharded:map:2'
    """
    strategy: Union[str, int] = "accumulate"
    devices: int = 0

    def __post_init__(self):
        if isinstance(self.strategy, ShardedTasks) or not _is_plain_strategy(self.strategy):
            raise ValueError(f"ShardedTasks.strategy must be 'vmap', 'map', 'accumulate' or a "
                             f"positive int chunk size; got {self.strategy!r}.")
        if (not isinstance(self.devices, int) or isinstance(self.devices, bool)
                or self.devices < 0):
            raise ValueError(f"ShardedTasks.devices must be an int >= 0 (0: all local "
                             f"devices); got {self.devices!r}.")

    def __str__(self) -> str:
        return f"sharded:{self.strategy}" + (f":{self.devices}" if self.devices else "")

    def mesh(self) -> Mesh:
        """A 1-D mesh (axis ``"tasks"``) over the first ``devices`` local devices."""
        available = jax.local_devices()
        n = self.devices or len(available)
        if n > len(available):
            raise ValueError(
                f"ShardedTasks asks for {n} devices but only {len(available)} exist; on CPU "
                f"call metajax.configure_cpu_devices({n}) before JAX's first computation.")
        return Mesh(np.asarray(available[:n]), (TASK_DEVICE_AXIS,))


TaskMap = Union[str, int, ShardedTasks]  # "vmap", "map", "accumulate", a chunk size, sharded


def _is_plain_strategy(value: Any) -> bool:
    return value in STRATEGIES or (isinstance(value, int) and not isinstance(value, bool)
                                   and value > 0)


def _shard_over_devices(local_fn: Callable, strategy: ShardedTasks, shared: PyTree,
                        tasks: PyTree):
    """``shard_map`` of ``local_fn(shared, local_tasks)``: ``shared`` replicated, ``tasks``
    split along their leading axis, outputs concatenated along theirs."""
    mesh = strategy.mesh()
    n = mesh.devices.size
    num_tasks = jax.tree_util.tree_leaves(tasks)[0].shape[0]
    if num_tasks % n:
        raise ValueError(f"{strategy} splits the tasks over {n} devices, but the meta-batch "
                         f"has {num_tasks} tasks: use a multiple of {n} tasks (or "
                         f"ShardedTasks(devices=k) for a k that divides {num_tasks}).")
    spec = PartitionSpec(TASK_DEVICE_AXIS)
    # check_vma=False: the custom VJPs inside (the fused conv block, "accumulate") build
    # their cotangents without shard_map's device-variance types. The transpose then sums
    # the replicated inputs' cotangents over the devices, which is the gradient wanted.
    return jax.shard_map(local_fn, mesh=mesh, in_specs=(PartitionSpec(), spec),
                         out_specs=spec, check_vma=False)(shared, tasks)


def map_over_tasks(fn: Callable[..., PyTree], shared: PyTree, tasks: PyTree,
                   strategy: TaskMap = "vmap") -> PyTree:
    """Computes ``fn(shared, task_i)`` for every task ``i`` (leading axis of ``tasks``).

    Args:
      fn: per-task function ``fn(shared, task) -> pytree``.
      shared: arguments shared by all tasks (e.g. meta-parameters), not mapped.
      tasks: pytree whose leaves have a leading task axis.
      strategy: ``"vmap"``, ``"map"`` (sequential ``lax.map``; ``"accumulate"`` runs as
        ``"map"`` here), an int chunk size (``lax.map`` with ``batch_size``, i.e. ``vmap``
        inside chunks) or a :class:`ShardedTasks` (one of those on each device's share).
    """
    if isinstance(strategy, ShardedTasks):
        inner = strategy.strategy
        return _shard_over_devices(lambda s, t: map_over_tasks(fn, s, t, inner), strategy,
                                   shared, tasks)
    per_task = lambda task: fn(shared, task)
    if strategy == "vmap":
        return jax.vmap(fn, in_axes=(None, 0))(shared, tasks)
    if strategy in ("map", "accumulate"):
        return jax.lax.map(per_task, tasks)
    if isinstance(strategy, int) and not isinstance(strategy, bool) and strategy > 0:
        return jax.lax.map(per_task, tasks, batch_size=strategy)
    raise ValueError(
        f"task_map must be 'vmap', 'map', 'accumulate', a positive int chunk size or a "
        f"ShardedTasks; got {strategy!r}.")


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
    if isinstance(strategy, ShardedTasks):
        inner = strategy.strategy

        def local_mean(s, t):  # this device's tasks: their mean loss (as a 1-vector) and aux
            loss, aux = mean_loss_over_tasks(fn, s, t, inner)
            return loss[None], aux

        # Equal shares, so the mean of the per-device means is the mean over all tasks.
        device_losses, aux = _shard_over_devices(local_mean, strategy, shared, tasks)
        return jnp.mean(device_losses), aux
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


def resolve_task_map(value: Union[str, int, ShardedTasks], backend: str | None = None) -> TaskMap:
    """A strategy from a flag value.

    Accepted: ``"vmap"``, ``"map"``, ``"accumulate"``, an int (or digit string) chunk size,
    ``"sharded[:STRATEGY[:DEVICES]]"`` (a :class:`ShardedTasks`, default ``accumulate`` on
    all local devices), or ``"auto"``: on CPU ``"accumulate"``, where it measured fastest
    for MAML's per-task conv weights (``benchmarks/conv_paths.py``: 1.39x ``"map"``, which
    was itself faster than ``vmap`` and chunked maps), sharded over the CPU devices when
    there are several (:func:`metajax.configure_cpu_devices`; README "One JAX device per
    core"); ``"vmap"`` on accelerators.

    Example:
      >>> resolve_task_map("auto", backend="cpu"), resolve_task_map("8"), resolve_task_map("vmap")
      ('accumulate', 8, 'vmap')
      >>> resolve_task_map("sharded:map:2")
      ShardedTasks(strategy='map', devices=2)
    """
    if isinstance(value, ShardedTasks):
        return value
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value == "auto":
        if (backend or jax.default_backend()) != "cpu":
            return "vmap"
        cpu_devices = len(jax.local_devices(backend="cpu"))
        return ShardedTasks("accumulate") if cpu_devices > 1 else "accumulate"
    if _is_plain_strategy(value):
        return value
    if isinstance(value, str) and (value == "sharded" or value.startswith("sharded:")):
        parts = value.split(":")[1:]
        if len(parts) <= 2 and all(parts):
            inner = resolve_task_map(parts[0]) if parts else "accumulate"
            if _is_plain_strategy(inner) and (len(parts) < 2 or parts[1].isdigit()):
                return ShardedTasks(inner, int(parts[1]) if len(parts) == 2 else 0)
    raise ValueError(f"task_map must be 'auto', 'vmap', 'map', 'accumulate', a positive chunk "
                     f"size or 'sharded[:STRATEGY[:DEVICES]]' (e.g. 'sharded:accumulate:2'); "
                     f"got {value!r}.")
