"""Knowledge distillation on Omniglot: a meta-trained teacher into a smaller student backbone.

The teacher is a finished ``experiments/omniglot.py`` run of an embedding learner
(``protonet`` or ``matchingnet``; its ``config.json`` and checkpoints). The student is
the same learner on a narrower Conv4 (``--hidden``, default 16 filters per layer
instead of 64: about 16x fewer conv weights), trained on the same kind of episodes
with :func:`metajax.algorithms.distillation_loss` (Hinton et al. 2015) as its task
loss: each query's target carries the hard label and the teacher's logits on the
same episode, ``{"labels", "teacher_logits"}``. ``--alpha 0`` trains the student on
the labels alone (the no-distillation control). Both networks are then evaluated on
the same ``--eval-tasks`` held-out tasks; ``metrics.json`` has the usual shape with
``results.teacher`` and ``results.student``.

  METAJAX_DATA=../shared/data python experiments/omniglot.py --algo protonet --train-ways 60 --query 5 \\
      --meta-batch 1 --budget-minutes 30 --out runs/protonet_5w1s
  METAJAX_DATA=../shared/data python experiments/distill.py --teacher runs/protonet_5w1s \\
      --budget-minutes 10 --out runs/distill_protonet
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import optax

import metajax as mj
from metajax.algorithms import algorithm_names, distillation_accuracy, distillation_loss
from metajax.core.tasks import TaskBatch, as_tasks
from metajax.training.config import field, parse_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from omniglot import (OmniglotConfig, build_algorithm, configure_devices,  # noqa: E402
                      meta_lr_schedule, params_from_run, prepare_run, resolve, test, train,
                      write_run)


@dataclasses.dataclass(frozen=True)
class DistillConfig(OmniglotConfig):
    """Distil a trained embedding learner (the teacher run) into a narrower Conv4."""

    teacher: str = field("", "run directory of the teacher (an experiments/omniglot.py protonet or "
                         "matchingnet run with checkpoints)")
    hidden: int = field(16, "student conv filters per layer (the teacher's are in its config)")
    temperature: float = field(4.0, "softening temperature T of both distributions")
    alpha: float = field(0.9, "weight of the soft (teacher) term; 1 - alpha on the hard labels; "
                         "0 trains on labels alone (the control)")
    out: str = field("runs/distill", "run directory")


def load_teacher_config(run_dir: str) -> OmniglotConfig:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--teacher {run_dir!r}: no config.json there; give the --out "
                                f"directory of a finished experiments/omniglot.py run.")
    with open(path) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(OmniglotConfig)}
    teacher = OmniglotConfig(**{k: v for k, v in saved.items() if k in known})
    if teacher.algo not in algorithm_names("metric"):
        raise ValueError(f"--teacher {run_dir!r} trained {teacher.algo!r}; distillation here takes "
                         f"an embedding learner ({', '.join(algorithm_names('metric'))}).")
    return resolve(teacher)


def with_teacher_targets(sample, teacher_algo, teacher_params):
    """``sample(key)`` with targets ``{"labels", "teacher_logits"}``: the teacher's logits on
    the same episode (for support examples too, classified against the support set)."""
    def teacher_logits(batch: TaskBatch):
        def per_task(task):
            on_support = dataclasses.replace(task, query_inputs=task.support_inputs)
            return (teacher_algo.task_logits(teacher_params, on_support),
                    teacher_algo.task_logits(teacher_params, task))
        support, query = jax.vmap(per_task)(as_tasks(batch))
        return dataclasses.replace(
            batch, support_targets={"labels": batch.support_targets, "teacher_logits": support},
            query_targets={"labels": batch.query_targets, "teacher_logits": query})
    label = jax.jit(teacher_logits)
    return lambda key: label(sample(key))


def count_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def main(argv=None) -> dict:
    config = parse_config(DistillConfig, argv)
    configure_devices(config)  # first: resolve() may start JAX
    config = resolve(config)
    if not config.teacher:
        raise ValueError("--teacher is required: the run directory of a trained protonet or "
                         "matchingnet (experiments/omniglot.py --out DIR).")
    teacher_config = load_teacher_config(config.teacher)
    config = dataclasses.replace(config, algo=teacher_config.algo,
                                 embedding_dim=teacher_config.embedding_dim,
                                 full_context=teacher_config.full_context)
    samplers, load_s = prepare_run(config)
    num_classes = samplers["train"].dataset.num_classes

    teacher_algo, teacher_template = build_algorithm(teacher_config, jax.random.key(0), num_classes)
    template = mj.create_train_state(teacher_template, optax.adam(meta_lr_schedule(teacher_config)),
                                     jax.random.key(0))
    teacher_params = params_from_run(config.teacher, template)

    student_algo, student_params = build_algorithm(config, jax.random.key(config.seed), num_classes)
    student_algo = dataclasses.replace(
        student_algo, loss_fn=distillation_loss(config.temperature, config.alpha),
        accuracy_fn=distillation_accuracy)
    labelled = {role: with_teacher_targets(s, teacher_algo, teacher_params)
                for role, s in samplers.items()}
    state, curve, info = train(config, student_algo, student_params, labelled)
    results = {"student": test(config, student_algo, state.params, labelled["test"]),
               "teacher": test(config, teacher_algo, teacher_params, samplers["test"])}
    sizes = {"teacher": count_params(teacher_params), "student": count_params(state.params)}
    name = f"{config.ways}-way {config.shots}-shot {config.algo} distillation"
    print(f"\n{name}: teacher ({sizes['teacher']:,} parameters, hidden {teacher_config.hidden}) -> "
          f"student ({sizes['student']:,}, hidden {config.hidden}), T={config.temperature}, "
          f"alpha={config.alpha}, {info['iterations_done']} iterations in "
          f"{info['train_seconds'] / 60:.1f} min; test accuracy over {config.eval_tasks} tasks:")
    for who in ("teacher", "student"):
        r = results[who]
        print(f"  {who}: {100 * r['test_accuracy']:.2f} +- {100 * r['test_ci95']:.2f} %")
    return write_run("distill", config, results, info, curve, load_s, name,
                     teacher_config=dataclasses.asdict(teacher_config), parameters=sizes)


if __name__ == "__main__":
    main(sys.argv[1:])
