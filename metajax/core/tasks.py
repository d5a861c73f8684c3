"""The task-batch type: support and query sets of a meta-batch of tasks.

Every array carries a leading *task* axis ``T`` and an *example* axis ``N``:

=================  ===========================  ==========================
field              shape                        meaning
=================  ===========================  ==========================
support_inputs     ``(T, N_s, *input_shape)``   inputs the learner adapts on
support_targets    ``(T, N_s, *target_shape)``  their labels / regression targets
query_inputs       ``(T, N_q, *input_shape)``   inputs the adapted learner is scored on
query_targets      ``(T, N_q, *target_shape)``  their targets
support_mask       ``(T, N_s)`` or ``None``     1 for real examples, 0 for padding
query_mask         ``(T, N_q)`` or ``None``     likewise for the query set
=================  ===========================  ==========================

Masks let a batch hold *imbalanced* tasks (different shot counts per class)
at a fixed shape: losses, accuracies and prototypes weight examples by the
mask. ``None`` means every example is real.

Targets may be a pytree (e.g. ``{"labels": ..., "teacher_logits": ...}`` for
distillation); every leaf must have the ``(T, N)`` leading axes.

Example:
  >>> import jax.numpy as jnp
  >>> from metajax import TaskBatch
  >>> batch = TaskBatch(
  ...     support_inputs=jnp.zeros((4, 10, 1)), support_targets=jnp.zeros((4, 10, 1)),
  ...     query_inputs=jnp.zeros((4, 20, 1)), query_targets=jnp.zeros((4, 20, 1)))
  >>> batch.validate().num_tasks
  4
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


class TaskBatchError(ValueError):
    """A task batch has the wrong structure or shapes."""


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


@struct.dataclass
class Task:
    """One task (no task axis): what the inner loop adapts on and is scored on."""

    support_inputs: PyTree
    support_targets: PyTree
    query_inputs: PyTree
    query_targets: PyTree
    support_mask: Optional[jax.Array] = None
    query_mask: Optional[jax.Array] = None


@struct.dataclass
class TaskBatch:
    """A meta-batch of tasks with a leading task axis (see the module docstring)."""

    support_inputs: PyTree
    support_targets: PyTree
    query_inputs: PyTree
    query_targets: PyTree
    support_mask: Optional[jax.Array] = None
    query_mask: Optional[jax.Array] = None

    @property
    def num_tasks(self) -> int:
        return jax.tree_util.tree_leaves(self.support_inputs)[0].shape[0]

    @property
    def num_support(self) -> int:
        return jax.tree_util.tree_leaves(self.support_inputs)[0].shape[1]

    @property
    def num_query(self) -> int:
        return jax.tree_util.tree_leaves(self.query_inputs)[0].shape[1]

    def validate(self) -> "TaskBatch":
        """Checks shapes (works on tracers too) and returns ``self``.

        Raises:
          TaskBatchError: naming the offending array with expected and actual shape.
        """
        validate_task_batch(self)
        return self


def _leaves(name: str, tree: PyTree) -> list[tuple[str, Any]]:
    """Named leaves of ``tree``, e.g. ``query_targets['labels']``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        raise TaskBatchError(f"{name} is empty (None or an empty pytree); it must hold arrays.")
    out = []
    for path, leaf in flat:
        if not hasattr(leaf, "shape"):
            raise TaskBatchError(
                f"{name}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array; "
                "convert it with jnp.asarray.")
        out.append((name + jax.tree_util.keystr(path), leaf))
    return out


def validate_task_batch(batch: TaskBatch) -> None:
    """Raises :class:`TaskBatchError` unless ``batch`` is a well-formed task batch."""
    if not isinstance(batch, TaskBatch):
        raise TaskBatchError(f"expected a metajax.TaskBatch, got {type(batch).__name__}.")

    named = {
        field: _leaves(field, getattr(batch, field))
        for field in ("support_inputs", "support_targets", "query_inputs", "query_targets")
    }
    for field, leaves in named.items():
        for name, leaf in leaves:
            if leaf.ndim < 2:
                raise TaskBatchError(
                    f"{name} has shape {_shape_str(leaf.shape)}; expected at least 2 axes "
                    "(tasks, examples, ...). Add the task axis, e.g. x[None] for a single task.")

    first_name, first = named["support_inputs"][0]
    num_tasks = first.shape[0]
    for field, leaves in named.items():
        for name, leaf in leaves:
            if leaf.shape[0] != num_tasks:
                raise TaskBatchError(
                    f"{name} has {leaf.shape[0]} tasks (shape {_shape_str(leaf.shape)}) but "
                    f"{first_name} has {num_tasks} (shape {_shape_str(first.shape)}); "
                    "every array needs the same leading task axis.")

    for split in ("support", "query"):
        inputs = named[f"{split}_inputs"]
        ref_name, ref = inputs[0]
        num_examples = ref.shape[1]
        for name, leaf in inputs + named[f"{split}_targets"]:
            if leaf.shape[1] != num_examples:
                raise TaskBatchError(
                    f"{name} has shape {_shape_str(leaf.shape)}; expected "
                    f"{_shape_str((num_tasks, num_examples) + leaf.shape[2:])}: its example axis "
                    f"(axis 1) must match {ref_name}, which has {num_examples} examples.")
        mask = getattr(batch, f"{split}_mask")
        if mask is not None:
            expected = (num_tasks, num_examples)
            if tuple(mask.shape) != expected:
                raise TaskBatchError(
                    f"{split}_mask has shape {_shape_str(mask.shape)}; expected "
                    f"{_shape_str(expected)} (tasks, {split} examples).")

    for (s_name, s_leaf), (q_name, q_leaf) in zip(named["support_inputs"], named["query_inputs"]):
        if s_leaf.shape[2:] != q_leaf.shape[2:]:
            raise TaskBatchError(
                f"{q_name} has per-example shape {_shape_str(q_leaf.shape[2:])} but {s_name} has "
                f"{_shape_str(s_leaf.shape[2:])}; support and query inputs must have the same "
                "per-example shape.")
    s_struct = jax.tree_util.tree_structure(batch.support_targets)
    q_struct = jax.tree_util.tree_structure(batch.query_targets)
    if s_struct != q_struct:
        raise TaskBatchError(
            f"support_targets has structure {s_struct} but query_targets has {q_struct}; "
            "they must be the same pytree.")


def task_at(batch: TaskBatch, index: int) -> Task:
    """The ``index``-th task of a batch (handy in notebooks and tests)."""
    return jax.tree_util.tree_map(lambda x: x[index], as_tasks(batch))


def as_tasks(batch: TaskBatch) -> Task:
    """Views a batch as a :class:`Task` whose leaves keep the task axis (for ``vmap``)."""
    return Task(
        support_inputs=batch.support_inputs,
        support_targets=batch.support_targets,
        query_inputs=batch.query_inputs,
        query_targets=batch.query_targets,
        support_mask=batch.support_mask,
        query_mask=batch.query_mask,
    )


def merged_task_examples(task: Task) -> tuple[PyTree, PyTree, Optional[jax.Array]]:
    """Support and query examples of one task concatenated (for joint-training baselines)."""
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)
    inputs = jax.tree_util.tree_map(cat, task.support_inputs, task.query_inputs)
    targets = jax.tree_util.tree_map(cat, task.support_targets, task.query_targets)
    if task.support_mask is None and task.query_mask is None:
        return inputs, targets, None
    n_s = jax.tree_util.tree_leaves(task.support_inputs)[0].shape[0]
    n_q = jax.tree_util.tree_leaves(task.query_inputs)[0].shape[0]
    s_mask = jnp.ones((n_s,)) if task.support_mask is None else task.support_mask
    q_mask = jnp.ones((n_q,)) if task.query_mask is None else task.query_mask
    return inputs, targets, jnp.concatenate([s_mask, q_mask])
