"""metajax: functional meta-learning in JAX.

The inner loop (:func:`adapt`) and the meta-objective are pure functions over
pytrees; algorithms (:class:`MAML`, ...) are thin layers over them; training
steps are single ``jax.jit`` calls.
"""

from metajax import algorithms, core, data, models, training
from metajax.algorithms import (ANIL, IMAML, ClassifierBaseline, MAML, MAMLPlusPlus, MatchingNet, MetaSGD,
                                MultiTaskPretrain, ProtoNet, Reptile, cosine_adam)
from metajax.core.masks import last_module_mask, mask_by_path
from metajax.core import (Adaptation, InnerLoop, Task, TaskBatch, TaskBatchError, accuracy, adapt,
                          adapted_task_loss, cross_entropy, evaluate_adaptation, map_over_tasks,
                          masked_mean, meta_batch_loss, mse, task_at, task_loss_and_metrics,
                          ShardedTasks, validate_task_batch)
from metajax.training.sharding import configure_cpu_devices
from metajax.training.allocator import (configure_malloc, fix_malloc_mmap_threshold,
                                        limit_malloc_arenas)
from metajax.training import (TrainState, create_train_state, enable_compilation_cache,
                              low_memory_compile_options, make_eval_step, make_train_loop,
                              make_train_step, mean_and_ci95, meta_update)

__version__ = "0.1.0"
