"""Sinusoid regression (MAML paper, section 5.1), sampled on device.

Each task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``. Everything is a pure function of
a ``jax.random`` key, so the same key always gives the same tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from metajax.core.tasks import TaskBatch

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, jnp.pi)
INPUT_RANGE = (-5.0, 5.0)


@struct.dataclass
class SinusoidParams:
    """Amplitude and phase of each task, shape ``(tasks,)``."""

    amplitude: jax.Array
    phase: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        """The true functions at ``x`` of shape ``(tasks, n, 1)``."""
        return self.amplitude[:, None, None] * jnp.sin(x - self.phase[:, None, None])


def sample_sinusoid_params(key: jax.Array, num_tasks: int) -> SinusoidParams:
    k_amp, k_phase = jax.random.split(key)
    amplitude = jax.random.uniform(k_amp, (num_tasks,), minval=AMPLITUDE_RANGE[0],
                                   maxval=AMPLITUDE_RANGE[1])
    phase = jax.random.uniform(k_phase, (num_tasks,), minval=PHASE_RANGE[0],
                               maxval=PHASE_RANGE[1])
    return SinusoidParams(amplitude=amplitude, phase=phase)


def sinusoid_tasks_from_params(key: jax.Array, functions: SinusoidParams, num_support: int,
                               num_query: int) -> TaskBatch:
    """Samples support/query inputs uniformly in [-5, 5] for given task functions."""
    num_tasks = functions.amplitude.shape[0]
    x = jax.random.uniform(key, (num_tasks, num_support + num_query, 1),
                           minval=INPUT_RANGE[0], maxval=INPUT_RANGE[1])
    y = functions(x)
    return TaskBatch(support_inputs=x[:, :num_support], support_targets=y[:, :num_support],
                     query_inputs=x[:, num_support:], query_targets=y[:, num_support:])


def sample_sinusoid_tasks(key: jax.Array, num_tasks: int, num_support: int,
                          num_query: int) -> TaskBatch:
    """A meta-batch of sinusoid regression tasks (K-shot support, ``num_query`` query points).

    Example:
      >>> import jax
      >>> batch = sample_sinusoid_tasks(jax.random.key(0), num_tasks=25, num_support=10, num_query=10)
      >>> batch.support_inputs.shape, batch.query_targets.shape
      ((25, 10, 1), (25, 10, 1))
    """
    for name, value in (("num_tasks", num_tasks), ("num_support", num_support),
                        ("num_query", num_query)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    k_fn, k_x = jax.random.split(key)
    return sinusoid_tasks_from_params(k_x, sample_sinusoid_params(k_fn, num_tasks),
                                      num_support, num_query)
