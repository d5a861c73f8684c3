"""The functional core: task batches, the inner loop, the meta-objective."""

from metajax.core.inner_loop import (Adaptation, InnerLoop, adapt, resolve_remat,
                                     resolve_unroll, task_loss_and_metrics)
from metajax.core.remat import REMAT_SAVE_NAME, dots_policy
from metajax.core.losses import accuracy, cross_entropy, masked_mean, mse
from metajax.core.meta_objective import adapted_task_loss, evaluate_adaptation, meta_batch_loss
from metajax.core.task_map import ShardedTasks, map_over_tasks, resolve_task_map
from metajax.core.tasks import Task, TaskBatch, TaskBatchError, task_at, validate_task_batch
