"""Sinusoid regression (MAML paper, section 5.1): MAML vs. a network pretrained on all tasks.

Runs with the paper's settings by default (K=10, one inner step, alpha=0.01,
meta-batch 25, Adam 1e-3, 70,000 iterations), then evaluates both models on
held-out tasks after 0, 1, 5 and 10 gradient steps and writes ``metrics.json``
and ``adaptation.png`` (the paper's Figure 2) to ``--out``.

  python experiments/sinusoid.py --out runs/sinusoid
  python experiments/sinusoid.py --iterations 2000 --out /tmp/quick   # a quick look
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax as mj
from metajax.training.config import field, parse_config, save_config, write_json_atomic
from metajax.training.runner import evaluate_many, run_fused_training, summarize_steps

EVAL_STEPS = (0, 1, 5, 10)


@dataclasses.dataclass(frozen=True)
class SinusoidConfig:
    """MAML and pretraining on sinusoid regression (Finn et al. 2017, section 5.1)."""

    out: str = field("runs/sinusoid", "run directory for metrics.json and adaptation.png")
    iterations: int = field(70_000, "meta-training iterations (both MAML and the baseline)")
    shots: int = field(10, "K: support points per task, at training and evaluation")
    query: int = field(10, "query points per task at training")
    inner_steps: int = field(1, "inner gradient steps at meta-training")
    inner_lr: float = field(0.01, "inner step size alpha (MAML's fine-tuning step size at test too)")
    pretrain_lrs: tuple[float, ...] = field(
        (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02),
        "fine-tuning step sizes tried for the pretrained baseline; the best on validation "
        "tasks is used (the paper's 'automatically tuned step size')")
    meta_batch: int = field(25, "tasks per meta-batch")
    meta_lr: float = field(1e-3, "Adam step size of the outer update")
    first_order: bool = field(False, "first-order MAML (stop gradients through the inner loop)")
    steps_per_call: int = field(1000, "meta-steps fused into one compiled call")
    eval_tasks: int = field(600, "held-out tasks for evaluation")
    eval_query: int = field(100, "query points per evaluation task")
    seed: int = field(0, "random seed")
    progress: bool = field(True, "show progress bars")


def build(config: SinusoidConfig):
    model, params = mj.models.init_mlp(jax.random.key(config.seed))
    inner = mj.InnerLoop(steps=config.inner_steps, learning_rate=config.inner_lr,
                         first_order=config.first_order)
    algorithms = {
        "maml": mj.MAML(apply_fn=model, loss_fn=mj.mse, inner=inner),
        "pretrain": mj.MultiTaskPretrain(apply_fn=model, loss_fn=mj.mse, inner=inner),
    }
    return model, params, algorithms


def train(config: SinusoidConfig, algorithm, params, seed_offset: int, name: str):
    optimizer = optax.adam(config.meta_lr)
    state = mj.create_train_state(algorithm.init(params), optimizer,
                                  jax.random.key(config.seed * 1000 + seed_offset))
    sample = lambda key: mj.data.sample_sinusoid_tasks(key, config.meta_batch, config.shots,
                                                       config.query)
    loop = mj.make_train_loop(algorithm.meta_loss, optimizer, sample, config.steps_per_call)
    return run_fused_training(loop, state, config.iterations, config.steps_per_call,
                              desc=name, progress=config.progress)


def make_evaluator(config: SinusoidConfig, algorithm):
    """Evaluation over held-out tasks with the fine-tuning step size as data (compiles once)."""
    sample = lambda key: mj.data.sample_sinusoid_tasks(key, 100, config.shots, config.eval_query)

    def evaluate_with_lr(lr_and_params, batch):
        learning_rate, params = lr_and_params
        rates = jax.tree_util.tree_map(lambda _: learning_rate, params)
        return algorithm.evaluate({"model": params, "inner_rates": rates}, batch,
                                  steps=max(EVAL_STEPS))

    evaluate_fn = jax.jit(evaluate_with_lr)

    def evaluate(meta_params, learning_rate: float, key_offset: int = 10_000,
                 num_tasks: int | None = None) -> dict:
        per_task = evaluate_many(evaluate_fn, (jnp.float32(learning_rate), meta_params["model"]),
                                 sample, jax.random.key(key_offset + config.seed),
                                 num_tasks or config.eval_tasks, batch_size=100)
        mse, ci = summarize_steps(per_task["loss"], EVAL_STEPS)
        return {"mse": mse, "ci95": ci, "fine_tune_lr": learning_rate}

    return evaluate


def tune_fine_tuning_lr(config: SinusoidConfig, evaluate, meta_params) -> float:
    """The step size with the lowest MSE after 10 steps on 200 validation tasks (not the test tasks)."""
    scores = {}
    for lr in config.pretrain_lrs:
        mse = evaluate(meta_params, lr, key_offset=30_000, num_tasks=200)["mse"]
        scores[lr] = mse[str(max(EVAL_STEPS))]
    return min(scores, key=lambda lr: scores[lr] if np.isfinite(scores[lr]) else np.inf)


def plot_adaptation(config, model, algorithms, trained, lrs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = jax.random.key(20_000 + config.seed)
    functions = mj.data.sample_sinusoid_params(key, 1)
    task = mj.task_at(mj.data.sinusoid_tasks_from_params(jax.random.fold_in(key, 1), functions,
                                                         config.shots, 1), 0)
    grid = jnp.linspace(-5, 5, 200)[:, None]
    truth = functions(grid[None])[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, name in zip(axes, ("maml", "pretrain")):
        algorithm, meta_params = algorithms[name], trained[name]
        ax.plot(grid, truth, color="red", label="ground truth")
        for steps, style in ((0, ":"), (1, "--"), (10, "-")):
            inner = algorithm.inner.with_overrides(steps=steps, learning_rate=lrs[name])
            adapted = mj.adapt(meta_params["model"], task, apply_fn=model, loss_fn=mj.mse, inner=inner)
            label = "pre-update" if steps == 0 else f"{steps} grad step{'s' * (steps > 1)}"
            ax.plot(grid, model(adapted.params, grid), style, color="green", label=label)
        ax.scatter(task.support_inputs[:, 0], task.support_targets[:, 0], marker="^", color="purple",
                   zorder=5, label=f"{config.shots} support points")
        ax.set_title({"maml": "MAML", "pretrain": "pretrained on all tasks"}[name] + f", K={config.shots}")
        ax.set_xlabel("x")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    config = parse_config(SinusoidConfig, argv)
    os.makedirs(config.out, exist_ok=True)
    save_config(config, config.out)
    model, params, algorithms = build(config)

    trained, training = {}, {}
    for offset, (name, algorithm) in enumerate(algorithms.items()):
        state, info = train(config, algorithm, params, offset, name)
        trained[name] = state.params
        training[name] = info
        print(f"{name}: {config.iterations} iterations in {info['wall_s']:.1f} s "
              f"(first call incl. compile {info['first_call_s']:.1f} s, "
              f"{info['steps_per_s']:.0f} it/s after)", flush=True)

    t0 = time.perf_counter()
    evaluators = {name: make_evaluator(config, algorithm) for name, algorithm in algorithms.items()}
    pretrain_lr = tune_fine_tuning_lr(config, evaluators["pretrain"], trained["pretrain"])
    results = {"maml": evaluators["maml"](trained["maml"], config.inner_lr),
               "pretrain": evaluators["pretrain"](trained["pretrain"], pretrain_lr)}
    eval_s = time.perf_counter() - t0

    print(f"\nMean squared error on {config.eval_tasks} held-out tasks, K={config.shots} "
          f"(mean +- 95% CI); fine-tuning with SGD, step size {config.inner_lr} (MAML) and "
          f"{pretrain_lr} (pretrained, tuned on validation tasks):")
    header = "| model    | " + " | ".join(f"{s:>2} step{'s' if s != 1 else ' '}      " for s in EVAL_STEPS) + " |"
    print(header)
    print("|" + "---|" * (len(EVAL_STEPS) + 1))
    for name, res in results.items():
        cells = " | ".join(f"{res['mse'][str(s)]:.3f} +- {res['ci95'][str(s)]:.3f}" for s in EVAL_STEPS)
        print(f"| {name:<8} | {cells} |")
    ratio = results["pretrain"]["mse"]["10"] / results["maml"]["mse"]["10"]
    print(f"\npretrain / MAML MSE after 10 steps: {ratio:.1f}x")

    metrics = {
        "experiment": "sinusoid",
        "config": dataclasses.asdict(config),
        "results": results,
        "training": {name: {k: v for k, v in info.items()} for name, info in training.items()},
        "eval_seconds": eval_s,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()]},
    }
    write_json_atomic(os.path.join(config.out, "metrics.json"), metrics)
    lrs = {name: res["fine_tune_lr"] for name, res in results.items()}
    plot_adaptation(config, model, algorithms, trained, lrs, os.path.join(config.out, "adaptation.png"))
    print(f"wrote {config.out}/metrics.json and {config.out}/adaptation.png")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
