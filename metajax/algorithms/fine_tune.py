"""Evaluation by fine-tuning with the core inner loop, shared by algorithms that meta-learn an
initialisation without a task-specific test procedure of their own (pretraining, Reptile, iMAML)."""

from __future__ import annotations

from typing import Optional

from metajax.core.meta_objective import evaluate_adaptation
from metajax.core.tasks import TaskBatch


class FineTuneEvaluation:
    """Mixin: ``evaluate`` fine-tunes ``meta_params["model"]`` with ``self.inner``.

    Expects ``apply_fn``, ``loss_fn``, ``inner``, ``metric_fns`` and ``task_map`` attributes.
    ``meta_params["inner_rates"]``, if present, sets the step sizes as data (so a sweep over
    step sizes compiles once).
    """

    def evaluate(self, meta_params: dict, batch: TaskBatch, *, steps: Optional[int] = None,
                 learning_rate: Optional[float] = None) -> dict:
        """Per-task query loss/metrics after 0..steps fine-tuning steps, arrays ``(tasks, steps+1)``."""
        inner = self.inner.with_overrides(steps=steps, learning_rate=learning_rate)
        return evaluate_adaptation(meta_params["model"], batch, apply_fn=self.apply_fn,
                                   loss_fn=self.loss_fn, inner=inner,
                                   rates=meta_params.get("inner_rates"),
                                   metric_fns=self.metric_fns, task_map=self.task_map)
