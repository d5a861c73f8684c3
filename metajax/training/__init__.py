"""Train state and jit-compiled meta-training / evaluation steps."""

from metajax.training.steps import (low_memory_compile_options, make_eval_step, make_train_loop,
                                    make_train_step, mean_and_ci95, meta_update)
from metajax.training.train_state import TrainState, create_train_state
from metajax.training.checkpoint import Checkpointer, CheckpointMismatchError, CheckpointWarning, Restored
from metajax.training.guards import NonFiniteError, skip_nonfinite, skipped_updates
from metajax.training.sharding import replicate, shard_tasks, task_mesh
from metajax.training.allocator import (configure_malloc, fix_malloc_mmap_threshold,
                                        limit_malloc_arenas)
from metajax.training.metrics_log import MetricsLogger, read_jsonl
from metajax.training.compile_cache import (configure_compilation_cache, disable_compilation_cache,
                                            enable_compilation_cache)
