"""Data parallelism over tasks: the meta-batch's task axis sharded over all devices.

A 1-D :class:`jax.sharding.Mesh` with one axis, ``"tasks"``, spans every device
(``jax.devices()``: all local devices, or every host's devices after
:func:`initialize_distributed`). The train state (parameters, optimizer state,
step, key) is *replicated*; every array of a :class:`TaskBatch` is split along its
leading (task) axis. XLA then runs each device's share of the per-task inner loops
and reduces the meta-gradient across devices; the update is computed identically
everywhere. Nothing changes in user code but the ``mesh=`` argument:

  >>> import jax, optax
  >>> import metajax as mj
  >>> from metajax.training import sharding
  >>> model, params = mj.models.init_mlp(jax.random.key(0))
  >>> maml = mj.MAML(apply_fn=model, loss_fn=mj.mse)
  >>> opt = optax.adam(1e-3)
  >>> mesh = sharding.task_mesh()                     # all devices (here: however many exist)
  >>> state = sharding.replicate(mj.create_train_state(maml.init(params), opt, jax.random.key(1)), mesh)
  >>> step = sharding.make_train_step(maml.meta_loss, opt, mesh=mesh)
  >>> batch = mj.data.sample_sinusoid_tasks(jax.random.key(2), 4 * len(jax.devices()), 10, 10)
  >>> state, metrics = step(state, batch)             # batch is sharded over tasks on the way in
  >>> int(state.step)
  1

Multi-host: start the same program on every host with :func:`initialize_distributed`
(``jax.distributed.initialize``) before anything else touches JAX; the mesh then spans
all hosts' devices and the fused loop (:func:`make_train_loop`) samples each host's
tasks on its own devices from the replicated key, so no data crosses hosts.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from metajax.core.tasks import TaskBatch
from metajax.training import steps
from metajax.training.train_state import TrainState

PyTree = Any
TASK_AXIS = "tasks"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _device_count_from_environment() -> Optional[int]:
    """A CPU device count set outside Python: ``JAX_NUM_CPU_DEVICES`` or ``XLA_FLAGS``'s
    ``--xla_force_host_platform_device_count``."""
    if jax.config.jax_num_cpu_devices > 0:
        return int(jax.config.jax_num_cpu_devices)
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_force_host_platform_device_count="):
            return int(flag.split("=", 1)[1])
    return None


def configure_cpu_devices(count: Optional[int] = None) -> int:
    """Splits the CPU into ``count`` JAX devices; call before JAX's first computation.

    With several CPU devices, ``task_map="auto"`` (:func:`metajax.core.resolve_task_map`)
    shards each meta-batch's tasks over them (:class:`metajax.core.ShardedTasks`): every
    core then works through its own tasks, where with one device all cores split every
    small op and wait for each other at each one (README "One JAX device per core": Conv4
    MAML 1.2-1.4x faster on 2 cores). The devices share the machine's memory; arrays not
    sharded stay on device 0, and a step over several devices needs its state on all of
    them (:func:`replicate`; a restored checkpoint sits on device 0).

    Args:
      count: devices to create; ``None``: one per available core, unless a count was
        already set in the environment (``JAX_NUM_CPU_DEVICES`` or
        ``XLA_FLAGS=--xla_force_host_platform_device_count=N``) or JAX is already running,
        whose count is then kept.

    Returns:
      The number of CPU devices JAX will have.

    Raises:
      ValueError: ``count`` is not a positive int.
      RuntimeError: an explicit ``count`` while JAX's backends already run with another.

    Example (a fresh process)::

        import metajax as mj
        mj.configure_cpu_devices()        # e.g. 2 on a 2-core machine
        # ... build and run train steps as usual
    """
    from jax._src import xla_bridge  # no public "are the backends up?" query

    if count is None:
        if xla_bridge.backends_are_initialized():
            return len(jax.devices("cpu"))
        count = _device_count_from_environment() or available_cores()
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"configure_cpu_devices needs a positive int count, got {count!r}.")
    if xla_bridge.backends_are_initialized():
        current = len(jax.devices("cpu"))
        if current != count:
            raise RuntimeError(
                f"JAX's CPU backend is already running with {current} device(s), so it cannot "
                f"be split into {count}: call metajax.configure_cpu_devices({count}) before "
                "any JAX computation (right after the imports), or set "
                f"JAX_NUM_CPU_DEVICES={count} in the environment.")
        return count
    jax.config.update("jax_num_cpu_devices", count)
    return count


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None) -> None:
    """``jax.distributed.initialize`` for a multi-host run (call first, on every host).

    On CPU, cross-process collectives use gloo. With all arguments None, JAX detects the
    cluster (SLURM, Cloud TPU, ...). Example for two processes on one machine::

        initialize_distributed("127.0.0.1:12345", num_processes=2, process_id=0)  # host 0
        initialize_distributed("127.0.0.1:12345", num_processes=2, process_id=1)  # host 1
    """
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # noqa: BLE001 - option renamed/removed in some versions
            pass
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)


def task_mesh(devices: Optional[Sequence[jax.Device] | int] = None) -> Mesh:
    """A 1-D mesh with axis ``"tasks"`` over ``devices`` (default: all of ``jax.devices()``).

    An int ``n`` takes the first ``n`` devices (``0`` or None: all of them).
    """
    if devices is None or isinstance(devices, int):
        available = jax.devices()
        n = devices or len(available)
        if n > len(available):
            raise ValueError(f"asked for {n} devices but only {len(available)} exist; on CPU, "
                             "set XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                             "importing jax to fake N devices.")
        devices = available[:n]
    return Mesh(np.asarray(devices), (TASK_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value held whole on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def task_sharded(mesh: Mesh) -> NamedSharding:
    """The sharding of an array split along its leading (task) axis over ``mesh``."""
    return NamedSharding(mesh, P(TASK_AXIS))


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put_replicated(x: Any, mesh: Mesh) -> jax.Array:
    sharding = replicated(mesh)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if _is_key(x):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_put_replicated(jax.random.key_data(x), mesh), impl=impl)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Multi-host: every process holds the same value; build the global array from it.
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index],
                                        dtype=host.dtype)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` (e.g. a :class:`TrainState`) replicated on every device of ``mesh``.

    Already-replicated arrays are returned as they are. PRNG keys keep their type.
    """
    return jax.tree_util.tree_map(lambda x: _put_replicated(x, mesh), tree)


def _check_divisible(tree: PyTree, mesh: Mesh) -> None:
    n = mesh.devices.size
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n:
            raise ValueError(
                f"cannot shard {jax.tree_util.keystr(path)} with shape {np.shape(leaf)} over "
                f"{n} devices: the task axis (first) must be a multiple of {n}; pick a "
                "meta-batch size divisible by the number of devices.")


def shard_tasks(batch: TaskBatch | PyTree, mesh: Mesh) -> TaskBatch | PyTree:
    """``batch`` with every array split along its leading (task) axis over ``mesh``.

    On one host this is a ``jax.device_put``; with several hosts each process passes its
    *own* tasks and the global batch is their concatenation
    (``jax.make_array_from_process_local_data``).
    """
    sharding = task_sharded(mesh)
    leaves = jax.tree_util.tree_leaves(batch)
    if all(isinstance(x, jax.Array) and x.sharding == sharding for x in leaves):
        return batch  # already laid out (e.g. sharded by the caller, or a previous call)
    if jax.process_count() == 1:
        _check_divisible(batch, mesh)
        return jax.device_put(batch, sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def constrain_tasks(batch: PyTree, mesh: Mesh) -> PyTree:
    """Inside ``jit``: asks XLA to lay ``batch`` out split along its task axis."""
    return jax.lax.with_sharding_constraint(batch, task_sharded(mesh))


def make_train_step(meta_loss: steps.MetaLoss, optimizer: optax.GradientTransformation, *,
                    mesh: Optional[Mesh] = None, donate: bool = True,
                    compiler_options: Optional[dict] = None
                    ) -> Callable[[TrainState, TaskBatch], tuple[TrainState, dict]]:
    """:func:`metajax.make_train_step`, with the task axis sharded over ``mesh`` when given.

    The returned ``step(state, batch)`` replicates ``state`` and shards ``batch`` if they
    are not laid out so already (so a plain host batch works), and returns a replicated
    state and metrics. Without ``mesh`` it is exactly :func:`metajax.make_train_step`.
    """
    if mesh is None:
        return steps.make_train_step(meta_loss, optimizer, donate=donate,
                                     compiler_options=compiler_options)
    inner = steps.make_train_step(meta_loss, optimizer, donate=False)
    compiled = jax.jit(inner, in_shardings=(replicated(mesh), task_sharded(mesh)),
                       out_shardings=(replicated(mesh), replicated(mesh)),
                       donate_argnums=(0,) if donate else (),
                       compiler_options=compiler_options or None)

    def step(state: TrainState, batch: TaskBatch) -> tuple[TrainState, dict]:
        return compiled(replicate(state, mesh), shard_tasks(batch, mesh))

    return step


def make_train_loop(meta_loss: steps.MetaLoss, optimizer: optax.GradientTransformation,
                    sample_tasks: steps.TaskSampler, steps_per_call: int, *,
                    mesh: Optional[Mesh] = None, donate: bool = True,
                    compiler_options: Optional[dict] = None
                    ) -> Callable[[TrainState], tuple[TrainState, dict]]:
    """:func:`metajax.make_train_loop`, with each sampled meta-batch sharded over ``mesh``.

    Tasks are sampled inside the compiled loop from the replicated key and constrained to
    the task sharding, so each device computes only its share (and, JAX's PRNG being
    partitionable, the values equal the unsharded ones). Without ``mesh`` it is exactly
    :func:`metajax.make_train_loop`.
    """
    if mesh is None:
        return steps.make_train_loop(meta_loss, optimizer, sample_tasks, steps_per_call,
                                     donate=donate, compiler_options=compiler_options)

    def sharded_sample(key: jax.Array) -> TaskBatch:
        return constrain_tasks(sample_tasks(key), mesh)

    inner = steps.make_train_loop(meta_loss, optimizer, sharded_sample, steps_per_call,
                                  donate=False)
    compiled = jax.jit(inner, in_shardings=(replicated(mesh),),
                       out_shardings=(replicated(mesh), replicated(mesh)),
                       donate_argnums=(0,) if donate else (),
                       compiler_options=compiler_options or None)

    def loop(state: TrainState) -> tuple[TrainState, dict]:
        return compiled(replicate(state, mesh))

    return loop
