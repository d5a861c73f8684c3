"""Sinusoid regression (MAML paper, section 5.1): MAML vs. a network pretrained on all tasks.

Runs with the paper's settings by default (K=10, one inner step, alpha=0.01,
meta-batch 25, Adam 1e-3, 70,000 iterations), then evaluates both models on
held-out tasks after 0, 1, 5 and 10 gradient steps and writes ``metrics.json``
and ``adaptation.png`` (the paper's Figure 2) to ``--out``.

Training checkpoints every ``--checkpoint-every`` steps into ``OUT/checkpoints/<phase>``
(orbax; the last ``--keep-checkpoints`` are kept) and logs scalars to
``OUT/<phase>/metrics.jsonl`` and TensorBoard files in ``OUT/<phase>/tb``.

  python experiments/sinusoid.py --out runs/sinusoid
  python experiments/sinusoid.py --out runs/sinusoid --resume          # continue a killed run
  python experiments/sinusoid.py --iterations 2000 --out /tmp/quick   # a quick look
  python experiments/sinusoid.py --devices 0 --meta-batch 24          # tasks over all devices
  python experiments/plot.py runs/sinusoid                            # learning curves
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax as mj
from metajax.algorithms import algorithm_names, make_algorithm
from metajax.training.config import field, parse_config, save_config, write_json_atomic
from metajax.training import sharding
from metajax.training.checkpoint import Checkpointer
from metajax.training.guards import skip_nonfinite
from metajax.training.metrics_log import MetricsLogger
from metajax.training.runner import evaluate_many, run_fused_training, summarize_steps

EVAL_STEPS = (0, 1, 5, 10)


@dataclasses.dataclass(frozen=True)
class SinusoidConfig:
    """MAML and pretraining on sinusoid regression (Finn et al. 2017, section 5.1)."""

    out: str = field("runs/sinusoid", "run directory for metrics.json and adaptation.png")
    algos: tuple[str, ...] = field(("maml", "pretrain"),
                                   f"algorithms to train and compare: {', '.join(algorithm_names('gradient'))}")
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
    resume: bool = field(False, "continue from the latest good checkpoint in OUT/checkpoints "
                         "(without it, old checkpoints there are removed)")
    checkpoint_every: int = field(10_000, "checkpoint every N meta-steps (rounded to whole "
                                  "compiled calls; 0: no checkpoints)")
    keep_checkpoints: int = field(3, "how many of the latest checkpoints to keep per phase")
    skip_nonfinite: bool = field(False, "skip updates with a non-finite gradient instead of "
                                 "stopping the run")
    tensorboard: bool = field(True, "also write TensorBoard event files (OUT/<phase>/tb)")
    devices: int = field(1, "shard each meta-batch's tasks over this many devices (0: all); "
                         "the meta-batch must be divisible by it")
    coordinator_address: Optional[str] = field(
        None, "multi-host: host:port of process 0, for jax.distributed.initialize")
    num_processes: Optional[int] = field(None, "multi-host: number of processes")
    process_id: Optional[int] = field(None, "multi-host: this process's index")


# Settings that may differ between a run and its --resume (they do not change the numerics).
RESUMABLE_CHANGES = {"out", "iterations", "progress", "resume", "checkpoint_every",
                     "keep_checkpoints", "tensorboard", "eval_tasks", "eval_query",
                     "pretrain_lrs", "devices", "coordinator_address", "num_processes",
                     "process_id"}


def build(config: SinusoidConfig):
    model, params = mj.models.init_mlp(jax.random.key(config.seed))
    inner = mj.InnerLoop(steps=config.inner_steps, learning_rate=config.inner_lr,
                         first_order=config.first_order)
    algorithms = {name: make_algorithm(name, model, mj.mse, params, inner) for name in config.algos}
    return model, params, algorithms


def checkpoint_interval(config: SinusoidConfig) -> Optional[int]:
    """``--checkpoint-every`` rounded to whole compiled calls (None: no checkpoints)."""
    if config.checkpoint_every <= 0:
        return None
    return max(1, round(config.checkpoint_every / config.steps_per_call)) * config.steps_per_call


def check_resumable(saved: Optional[dict], config: SinusoidConfig, where: str) -> None:
    """Raises if the checkpoint was written with settings that change the numerics."""
    if saved is None:
        return
    current = dataclasses.asdict(config)
    diff = {k: (saved.get(k), v) for k, v in current.items()
            if k not in RESUMABLE_CHANGES and k in saved and saved[k] != (list(v) if isinstance(v, tuple) else v)}
    if diff:
        raise ValueError(f"--resume: the checkpoint in {where} was written with different settings "
                         f"(saved, now): {diff}; use the same flags or a new --out.")


def train(config: SinusoidConfig, algorithm, params, seed_offset: int, name: str, mesh=None):
    optimizer = optax.adam(config.meta_lr)
    if config.skip_nonfinite:
        optimizer = skip_nonfinite(optimizer)
    state = mj.create_train_state(algorithm.init(params), optimizer,
                                  jax.random.key(config.seed * 1000 + seed_offset))
    sample = lambda key: mj.data.sample_sinusoid_tasks(key, config.meta_batch, config.shots,
                                                       config.query)
    if mesh is None:
        loop = mj.make_train_loop(algorithm.meta_loss, optimizer, sample, config.steps_per_call)
    else:
        loop = sharding.make_train_loop(algorithm.meta_loss, optimizer, sample,
                                        config.steps_per_call, mesh=mesh)
        state = sharding.replicate(state, mesh)
    every = checkpoint_interval(config)
    ckpt_dir = os.path.join(config.out, "checkpoints", name)
    checkpointer, start = None, None
    if every is not None:
        if not config.resume and os.path.isdir(ckpt_dir) and jax.process_index() == 0:
            print(f"{name}: removing old checkpoints in {ckpt_dir} (use --resume to continue them)")
            shutil.rmtree(ckpt_dir)
        checkpointer = Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints)
        if config.resume:
            restored = checkpointer.restore(state)
            if restored is not None:
                check_resumable(restored.config, config, ckpt_dir)
                state, start = restored.state, restored.step
                if mesh is not None:
                    state = sharding.replicate(state, mesh)
                print(f"{name}: resuming from step {start}", flush=True)
    with MetricsLogger(os.path.join(config.out, name), tensorboard=config.tensorboard,
                       resume_step=start if config.resume else None) as logger:
        state, info = run_fused_training(
            loop, state, config.iterations, config.steps_per_call, desc=name,
            progress=config.progress, log_fn=logger.log_fn(), checkpointer=checkpointer,
            checkpoint_every=every, config=dataclasses.asdict(config),
            on_nonfinite="skip" if config.skip_nonfinite else "raise",
            report_dir=os.path.join(config.out, name) if checkpointer is None else None)
    if checkpointer is not None:
        checkpointer.close()
    if mesh is not None:  # evaluation runs on one device, from host copies
        state = state.replace(params=jax.device_get(state.params))
    return state, info


def make_evaluator(config: SinusoidConfig, algorithm):
    """Evaluation over held-out tasks (compiles once).

    With a fixed step size, the step size is passed as data (so a sweep compiles once);
    algorithms that meta-learn their inner rates (Meta-SGD, MAML++) use their own.
    """
    sample = lambda key: mj.data.sample_sinusoid_tasks(key, 100, config.shots, config.eval_query)

    def evaluate_with_lr(lr_and_params, batch):
        learning_rate, meta_params = lr_and_params
        if "inner_rates" not in meta_params:
            rates = jax.tree_util.tree_map(lambda _: learning_rate, meta_params["model"])
            meta_params = {"model": meta_params["model"], "inner_rates": rates}
        return algorithm.evaluate(meta_params, batch, steps=max(EVAL_STEPS))

    evaluate_fn = jax.jit(evaluate_with_lr)

    def evaluate(meta_params, learning_rate: float, key_offset: int = 10_000,
                 num_tasks: int | None = None) -> dict:
        per_task = evaluate_many(evaluate_fn, (jnp.float32(learning_rate), meta_params),
                                 sample, jax.random.key(key_offset + config.seed),
                                 num_tasks or config.eval_tasks, batch_size=100)
        mse, ci = summarize_steps(per_task["loss"], EVAL_STEPS)
        learned = "inner_rates" in meta_params
        return {"mse": mse, "ci95": ci, "fine_tune_lr": "learned" if learned else learning_rate}

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
    shown = [n for n in ("maml", "pretrain") if n in algorithms]
    shown = (shown + [n for n in algorithms if n not in shown])[:2]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, shown):
        algorithm, meta_params = algorithms[name], trained[name]
        ax.plot(grid, truth, color="red", label="ground truth")
        for steps, style in ((0, ":"), (1, "--"), (10, "-")):
            lr = lrs[name] if isinstance(lrs[name], float) else None
            inner = algorithm.inner.with_overrides(steps=steps, learning_rate=lr)
            rates = meta_params.get("inner_rates")
            if rates is not None and inner.rates_per_step:
                rates = mj.algorithms.maml.resize_per_step_rates(rates, steps)
            adapted = mj.adapt(meta_params["model"], task, apply_fn=model, loss_fn=mj.mse,
                               inner=inner, rates=rates if steps else None)
            label = "pre-update" if steps == 0 else f"{steps} grad step{'s' * (steps > 1)}"
            ax.plot(grid, model(adapted.params, grid), style, color="green", label=label)
        ax.scatter(task.support_inputs[:, 0], task.support_targets[:, 0], marker="^", color="purple",
                   zorder=5, label=f"{config.shots} support points")
        ax.set_title({"maml": "MAML", "pretrain": "pretrained on all tasks"}.get(name, name)
                     + f", K={config.shots}")
        ax.set_xlabel("x")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_mesh(config: SinusoidConfig):
    """None for one device (the default), else a task mesh over ``--devices`` devices."""
    if config.coordinator_address is not None:
        sharding.initialize_distributed(config.coordinator_address, config.num_processes,
                                        config.process_id)
    if config.devices == 1 and jax.process_count() == 1:
        return None
    # Multi-host: the mesh spans every host's devices (--devices 1 then means all of them).
    devices = 0 if jax.process_count() > 1 and config.devices == 1 else config.devices
    mesh = sharding.task_mesh(devices or None)
    if config.meta_batch % mesh.devices.size:
        raise ValueError(f"--meta-batch {config.meta_batch} is not divisible by the "
                         f"{mesh.devices.size} devices it is sharded over.")
    return mesh


def main(argv=None) -> dict:
    config = parse_config(SinusoidConfig, argv)
    mesh = make_mesh(config)  # first: multi-host initialization precedes any computation
    os.makedirs(config.out, exist_ok=True)
    if jax.process_index() == 0:
        save_config(config, config.out)
    model, params, algorithms = build(config)

    trained, training = {}, {}
    for offset, (name, algorithm) in enumerate(algorithms.items()):
        state, info = train(config, algorithm, params, offset, name, mesh)
        trained[name] = state.params
        training[name] = info
        resumed = f" (resumed at step {info['start_step']})" if info["start_step"] else ""
        print(f"{name}: {config.iterations - info['start_step']} iterations{resumed} in {info['wall_s']:.1f} s "
              f"(first call incl. compile {info['first_call_s']:.1f} s, "
              f"{info['steps_per_s']:.0f} it/s after)", flush=True)

    t0 = time.perf_counter()
    evaluators = {name: make_evaluator(config, algorithm) for name, algorithm in algorithms.items()}
    results = {}
    for name in algorithms:
        lr = (tune_fine_tuning_lr(config, evaluators[name], trained[name]) if name == "pretrain"
              else config.inner_lr)
        results[name] = evaluators[name](trained[name], lr)
    eval_s = time.perf_counter() - t0

    steps_used = ", ".join(f"{n}: {r['fine_tune_lr']}" for n, r in results.items())
    print(f"\nMean squared error on {config.eval_tasks} held-out tasks, K={config.shots} "
          f"(mean +- 95% CI); fine-tuning step sizes ({steps_used}; pretrain's tuned on "
          f"validation tasks):")
    header = "| model    | " + " | ".join(f"{s:>2} step{'s' if s != 1 else ' '}      " for s in EVAL_STEPS) + " |"
    print(header)
    print("|" + "---|" * (len(EVAL_STEPS) + 1))
    for name, res in results.items():
        cells = " | ".join(f"{res['mse'][str(s)]:.3f} +- {res['ci95'][str(s)]:.3f}" for s in EVAL_STEPS)
        print(f"| {name:<8} | {cells} |")
    if "pretrain" in results and "maml" in results:
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
    if jax.process_index() != 0:
        return metrics
    write_json_atomic(os.path.join(config.out, "metrics.json"), metrics)
    lrs = {name: res["fine_tune_lr"] for name, res in results.items()}
    plot_adaptation(config, model, algorithms, trained, lrs, os.path.join(config.out, "adaptation.png"))
    print(f"wrote {config.out}/metrics.json and {config.out}/adaptation.png")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
