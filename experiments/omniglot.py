"""Few-shot Omniglot with MAML and the gradient-based family (Finn et al. 2017 protocol).

Paper presets (``--preset``): 5-way (inner rate 0.4, 1 step at training, 3 at
test, meta-batch 32) and 20-way (rate 0.1, 5 steps, meta-batch 16), 60,000
iterations, rotation augmentation, 28x28. ``--budget-minutes`` stops training
cleanly on time (for CPU machines); evaluation then runs on ``--eval-tasks``
tasks from the held-out classes and reports accuracy after every inner step with
95% confidence intervals.

  METAJAX_DATA=../shared/data python experiments/omniglot.py --preset 5way --shots 1 --budget-minutes 30
  python experiments/omniglot.py --algo fomaml --ways 5 --shots 1 --iterations 200 --data-dir ../shared/data
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax as mj
from metajax.algorithms import algorithm_names, make_algorithm
from metajax.core.task_map import resolve_task_map
from metajax.data import EpisodeSampler, load_omniglot, normalize_images, omniglot_split
from metajax.models.conv4 import init_omniglot_conv4
from metajax.training.checkpoint import Checkpointer
from metajax.training import sharding
from metajax.training.compile_cache import configure_compilation_cache
from metajax.training.config import (field, parse_config, parse_unroll, save_config,
                                     write_json_atomic)
from metajax.training.metrics_log import MetricsLogger, read_jsonl
from metajax.training.runner import evaluate_many, summarize_steps

PRESETS = {
    "5way": dict(ways=5, inner_lr=0.4, inner_steps=1, eval_inner_steps=3, meta_batch=32),
    "20way": dict(ways=20, inner_lr=0.1, inner_steps=5, eval_inner_steps=5, meta_batch=16),
}


@dataclasses.dataclass(frozen=True)
class OmniglotConfig:
    """N-way K-shot Omniglot meta-learning with a Conv4 backbone."""

    algo: str = field("maml", "algorithm", choices=algorithm_names())
    preset: Optional[str] = field(None, "paper settings: 5way or 20way (override the flags they set)",
                                  choices=(None, *PRESETS))
    ways: int = field(5, "N: classes per task")
    train_ways: Optional[int] = field(None, "classes per meta-training task for protonet/matchingnet "
                                      "(e.g. 60, as in the ProtoNet paper; default: --ways); for "
                                      "baseline/baselinepp the classes per training group, each "
                                      "with 2 examples (default 64)")
    embedding_dim: int = field(0, "protonet/matchingnet: 0 embeds with the Conv4 features (64, no "
                               "head, as in the papers); D > 0 adds a linear layer to D")
    pool: str = field("mean", "how the last 2x2x64 feature map becomes the features: mean "
                      "(64, the MAML network) or flatten (256, keeps the spatial layout; "
                      "no better for 20-way ProtoNet in a short A/B, see README)",
                      choices=("mean", "flatten"))
    full_context: bool = field(False, "matchingnet: full context embeddings (LSTMs)")
    embed_jointly: bool = field(False, "protonet/matchingnet: embed support and query in one "
                                "batch (batch norm then uses the whole episode's statistics, "
                                "as in the ProtoNet authors' code)")
    attention_scale: float = field(1.0, "matchingnet: scale of the cosine similarities before the "
                                   "attention softmax (1 in the paper; ReLU features keep cosines "
                                   "in [0, 1], so a larger scale sharpens the attention)")
    shots: int = field(1, "K: support examples per class")
    query: int = field(15, "query examples per class (training and test)")
    eval_query: Optional[int] = field(None, "query examples per class of validation and test "
                                      "tasks (default: --query), e.g. a cheap --query 2 for "
                                      "training and the usual 5 or 15 for the test")
    inner_steps: int = field(1, "inner steps at meta-training")
    eval_inner_steps: int = field(3, "inner steps at meta-test")
    inner_lr: float = field(0.4, "inner step size")
    meta_batch: int = field(32, "tasks per meta-batch")
    meta_lr: float = field(1e-3, "Adam step size of the outer loop")
    lr_halve_every: int = field(0, "halve the outer step size every N iterations (the ProtoNet "
                                "paper: 2000); 0 keeps it constant")
    lr_schedule: str = field("step", "outer step size: step (--lr-halve-every), or cosine / "
                             "linear decay from --meta-lr to 0 over --iterations (for a "
                             "time budget, set --iterations to what fits in it)",
                             choices=("step", "cosine", "linear"))
    init_from: Optional[str] = field(None, "start from the newest checkpoint of another run directory "
                                     "(same algorithm and network); with --iterations 0 this "
                                     "only evaluates it, e.g. a 60-way ProtoNet at 20 ways")
    iterations: int = field(60_000, "meta-training iterations (upper bound with --budget-minutes)")
    budget_minutes: Optional[float] = field(None, "stop training after this many minutes")
    low_memory_compile: bool = field(False, "compile with mj.low_memory_compile_options(): about "
                                     "200 MiB lower peak memory on CPU, a slightly slower step")
    malloc_arenas: int = field(0, "cap glibc's malloc arenas (mj.limit_malloc_arenas; 0: glibc's "
                               "default): 1 lowers the peak memory by 50-110 MiB on CPU")
    malloc_mmap_threshold_mib: int = field(0, "fix glibc's mmap threshold at this many MiB, 1-32 "
                                           "(mj.fix_malloc_mmap_threshold; 0: glibc's dynamic "
                                           "default): the peak memory stops creeping up over steps")
    split: str = field("vinyals", "class split: vinyals (1028/172/423), lake (964/659) or maml",
                       choices=("vinyals", "lake", "maml"))
    train_subset: str = field("train", "vinyals: the classes meta-training samples from: train (1028) "
                              "or trainval (1028 + 172 = 1200, the ProtoNet paper's protocol; the "
                              "validation curve then runs on classes seen in training)",
                              choices=("train", "trainval"))
    rotations: bool = field(True, "rotations by 90/180/270 degrees as new classes")
    image_size: int = field(28, "image side in pixels")
    hidden: int = field(64, "conv filters per Conv4 layer (64 in the papers)")
    data_dir: Optional[str] = field(None, "Omniglot folder or data root (default: $METAJAX_DATA)")
    cache_dir: Optional[str] = field(None, "where the decoded-image cache lives (default: see load_omniglot)")
    compile_cache: str = field("default", "persistent XLA compilation cache folder: a rerun loads "
                               "the compiled steps instead of compiling them (faster start, no "
                               "compile-time memory peak); off disables it; default: "
                               "$METAJAX_COMPILE_CACHE or ~/.cache/metajax/xla")
    eval_tasks: int = field(600, "meta-test tasks")
    eval_batch: int = field(50, "tasks per evaluation call")
    eval_every: int = field(250, "iterations between validation points of the learning curve")
    val_tasks: int = field(100, "tasks per validation point")
    conv_impl: str = field("auto", "convolution implementation: auto (fused on CPU, lax on "
                           "accelerators), fused, patches or lax",
                           choices=("auto", "fused", "patches", "lax"))
    task_map: str = field("auto", "tasks in a meta-batch: vmap, map, accumulate (map with each "
                          "task's gradient taken inside the loop), a chunk size, "
                          "sharded[:STRATEGY[:N]] (tasks split over N devices), or auto "
                          "(accumulate on CPU, sharded over the CPU devices when there are "
                          "several and they divide --meta-batch and --eval-batch; vmap on "
                          "accelerators)")
    cpu_devices: str = field("auto", "JAX CPU devices (metajax.configure_cpu_devices): auto "
                             "(one per core, unless JAX already runs in this process) or a "
                             "count; 1: every op on all cores")
    remat: str = field("auto", "what second-order MAML keeps of each inner step: none (all "
                       "intermediates), full (nothing: flat memory in the number of steps), "
                       "dots (matmul outputs except input-gradient products, plus named "
                       "values), auto (dots on CPU for several second-order steps, else none)", choices=("auto", "none", "full", "dots"))
    unroll: str = field("1", "inner steps per iteration of the inner scan: a number, or all "
                        "(fully unrolled: a few percent faster for second-order loops on large "
                        "support sets, more memory)")
    first_order_steps: int = field(0, "mamlpp: derivative-order annealing, first order for the "
                                   "first N iterations, then second order (same compiled step)")
    msl_anneal_steps: int = field(1000, "mamlpp: iterations over which the multi-step loss "
                                  "weights anneal towards the last step (0: at once)")
    per_step_bn: bool = field(False, "mamlpp: per-step batch-norm weights and biases (BNWB)")
    bn_running_stats: bool = field(False, "mamlpp: per-step batch-norm running statistics (BNRS)")
    eval_bn: str = field("batch", "mamlpp with --bn-running-stats: meta-test batch norm with "
                         "batch statistics (transductive, as in training) or the per-step "
                         "running statistics", choices=("batch", "running"))
    out: str = field("runs/omniglot", "run directory")
    checkpoint_every: int = field(500, "checkpoint every N iterations (0: never)")
    keep_checkpoints: int = field(3, "how many recent checkpoints to keep")
    resume: bool = field(False, "continue from the newest good checkpoint in OUT/checkpoints")
    tensorboard: bool = field(True, "also write TensorBoard event files to OUT/tb")
    seed: int = field(0, "random seed")
    progress: bool = field(True, "show a progress bar")


def resolve(config: OmniglotConfig) -> OmniglotConfig:
    if config.preset is None:
        return config
    return dataclasses.replace(config, **PRESETS[config.preset])


def build_samplers(config: OmniglotConfig, dataset) -> dict:
    if config.train_subset != "train" and config.split != "vinyals":
        raise ValueError(f"--train-subset {config.train_subset} needs --split vinyals (the only split "
                         f"with a validation subset); {config.split!r} trains on 'train'.")
    held_out = "val" if config.split == "vinyals" else "test"
    subsets = {"train": config.train_subset, "val": held_out, "test": "test"}
    samplers = {}
    for role, subset in subsets.items():
        classes = omniglot_split(dataset, config.split, subset, rotations=config.rotations,
                                 seed=config.seed)
        batch = config.meta_batch if role == "train" else config.eval_batch
        ways = config.train_ways if role == "train" and config.train_ways else config.ways
        query = config.query if role == "train" or config.eval_query is None else config.eval_query
        shape = dict(k_shot=config.shots, n_query=query)
        if role == "train" and config.algo in algorithm_names("classifier"):
            # Supervised batches over all training classes, labelled with the class ids.
            ways = config.train_ways or 64
            shape = dict(k_shot=1, n_query=1, labels="dataset")
        # Raw uint8 pixels: a quarter of the bytes to write; the model scales them in-step.
        samplers[role] = EpisodeSampler(classes, n_way=ways, meta_batch_size=batch,
                                        output_dtype="uint8", **shape)
    return samplers


def _mamlpp_options(config: OmniglotConfig) -> dict:
    """MAML++'s options from the flags (only passed to mamlpp, which alone has them)."""
    if config.first_order_steps < 0 or config.msl_anneal_steps < 0:
        raise ValueError("--first-order-steps and --msl-anneal-steps must be >= 0.")
    if config.algo != "mamlpp":
        return {}
    options = {"first_order_steps": config.first_order_steps,
               "msl_anneal_steps": config.msl_anneal_steps}
    if config.bn_running_stats:
        options.update(bn_running_stats=True, eval_bn_mode=config.eval_bn)
    return options


def build_algorithm(config: OmniglotConfig, key, num_train_classes: int):
    metric = config.algo in algorithm_names("metric")
    classifier = config.algo in algorithm_names("classifier")
    if config.train_ways and not (metric or classifier) and config.train_ways != config.ways:
        raise ValueError(f"--train-ways differs from --ways, which only embedding learners "
                         f"(protonet, matchingnet, baseline, baselinepp) allow; {config.algo} "
                         f"has a {config.ways}-way head.")
    if config.embedding_dim < 0:
        raise ValueError(f"--embedding-dim must be >= 0, got {config.embedding_dim}.")
    if classifier:
        outputs = None
    elif metric:
        outputs = config.embedding_dim or None
    else:
        outputs = config.ways
    if config.bn_running_stats and config.algo != "mamlpp":
        raise ValueError(f"--bn-running-stats is MAML++'s per-step running statistics; "
                         f"--algo {config.algo} normalises with batch statistics only.")
    conv4, params = init_omniglot_conv4(key, ways=outputs, hidden=config.hidden,
                                        conv_impl=config.conv_impl, image_size=config.image_size,
                                        running_stats=config.bn_running_stats, pool=config.pool)
    apply_fn = dataclasses.replace(conv4, preprocess=normalize_images)
    sample = jnp.zeros((2, config.image_size, config.image_size, 1), jnp.uint8)
    features = jax.eval_shape(apply_fn, params, sample).shape[-1]
    inner = mj.InnerLoop(steps=config.inner_steps, learning_rate=config.inner_lr,
                         remat=config.remat, unroll=parse_unroll(config.unroll))
    algorithm = make_algorithm(config.algo, apply_fn, mj.cross_entropy, params, inner,
                               metric_fns={"accuracy": mj.accuracy},
                               task_map=task_map_for(config),
                               full_context=config.full_context, num_classes=num_train_classes,
                               scale=config.attention_scale, per_step_bn=config.per_step_bn,
                               embed_jointly=config.embed_jointly,
                               **_mamlpp_options(config))
    init_key = jax.random.fold_in(key, 1)
    if config.algo == "matchingnet" and config.full_context:
        return algorithm, algorithm.init(params, embedding_dim=features, key=init_key)
    if classifier:
        return algorithm, algorithm.init(params, feature_dim=features, key=init_key)
    return algorithm, algorithm.init(params)


CURVE_KEYS = ("train_loss", "train_accuracy", "val_accuracy", "seconds")


def curve_from_log(run_dir: str) -> dict:
    """The learning curve recorded so far (for a resumed run)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    curve = {"step": [], **{k: [] for k in CURVE_KEYS}}
    for record in read_jsonl(path) if os.path.exists(path) else []:
        if "val_accuracy" in record:
            curve["step"].append(record["step"])
            for k in CURVE_KEYS:
                curve[k].append(record.get(k, float("nan")))
    return curve


def meta_lr_schedule(config: OmniglotConfig):
    if config.lr_schedule != "step":
        if config.lr_halve_every:
            raise ValueError(f"--lr-halve-every is the step schedule's; --lr-schedule "
                             f"{config.lr_schedule} decays over --iterations instead. Drop one.")
        horizon = max(config.iterations, 1)  # --iterations 0 only evaluates
        if config.lr_schedule == "cosine":
            return optax.cosine_decay_schedule(config.meta_lr, horizon)
        return optax.linear_schedule(config.meta_lr, 0.0, horizon)
    if config.lr_halve_every < 0:
        raise ValueError(f"--lr-halve-every must be >= 0, got {config.lr_halve_every}.")
    if config.lr_halve_every == 0:
        return config.meta_lr
    return optax.exponential_decay(config.meta_lr, config.lr_halve_every, 0.5, staircase=True)


def params_from_run(run_dir: str, template) -> dict:
    """The parameters of the newest good checkpoint in ``run_dir/checkpoints``."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--init-from {run_dir}: no checkpoints folder {directory}; give "
                                f"the --out directory of a finished run with checkpoints.")
    checkpointer = Checkpointer(directory)
    try:
        restored = checkpointer.restore(template)
    except Exception as err:  # orbax reports a structure mismatch in its own terms
        raise ValueError(f"--init-from {run_dir}: its checkpoint does not fit this network "
                         f"({type(err).__name__}: {err}); use the same --algo, --embedding-dim, "
                         f"--hidden and --lr-halve-every as that run.") from err
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"--init-from {run_dir}: no usable checkpoint in {directory}.")
    print(f"initialised from {directory} (iteration {restored.step})", flush=True)
    return restored.state.params


def on_task_devices(state, task_map):
    """``state`` replicated over the devices a ShardedTasks map runs on: arrays restored from
    a checkpoint sit on device 0, which a step spanning several devices does not accept."""
    if isinstance(task_map, mj.ShardedTasks):
        return sharding.replicate(state, task_map.mesh())
    return state


def train(config, algorithm, meta_params, samplers):
    from tqdm.auto import tqdm

    optimizer = optax.adam(meta_lr_schedule(config))
    state = mj.create_train_state(meta_params, optimizer, jax.random.key(config.seed))
    if config.init_from:
        state = state.replace(params=params_from_run(config.init_from, state))
    checkpointer = None
    if config.checkpoint_every > 0:
        checkpointer = Checkpointer(os.path.join(config.out, "checkpoints"),
                                    max_to_keep=config.keep_checkpoints)
    start = 0
    if config.resume and checkpointer is not None:
        restored = checkpointer.restore(state)
        if restored is not None:
            state, start = restored.state, restored.step
            print(f"resuming from iteration {start}", flush=True)
    state = on_task_devices(state, getattr(algorithm, "task_map", None))
    options = compiler_options(config)
    step = mj.make_train_step(algorithm.meta_loss, optimizer, compiler_options=options)
    def validate(params, batch):  # jitted by evaluate_many, with the run's compiler options
        return algorithm.evaluate(params, batch, steps=config.eval_inner_steps)
    curve = curve_from_log(config.out) if start else {"step": [], **{k: [] for k in CURVE_KEYS}}
    budget_s = None if config.budget_minutes is None else 60.0 * config.budget_minutes
    data_key = jax.random.key(config.seed + 1)  # batch i depends only on i: resumes exactly
    t0 = time.perf_counter()
    elapsed_before = curve["seconds"][-1] if curve["seconds"] else 0.0
    bar = tqdm(total=config.iterations, initial=start, desc=config.algo, unit="it",
               disable=not config.progress)
    recent, stopped_by_budget = [], False
    logger = MetricsLogger(config.out, tensorboard=config.tensorboard,
                           resume_step=start if config.resume else None)
    with logger:
        for it in range(start, config.iterations):
            state, metrics = step(state, samplers["train"](jax.random.fold_in(data_key, it)))
            recent.append(metrics)
            bar.update(1)
            done = it + 1
            if done % config.eval_every == 0 or done == config.iterations:
                m = jax.device_get(recent)
                recent = []
                val = evaluate_many(validate, state.params, samplers["val"],
                                    jax.random.key(50_000 + done), config.val_tasks,
                                    config.eval_batch, compiler_options=options)
                point = {"train_loss": float(np.mean([x["loss"] for x in m])),
                         "train_accuracy": float(np.mean([x.get("query_accuracy", x.get("train_accuracy", np.nan))
                                                          for x in m])),
                         "val_accuracy": float(val["accuracy"][:, -1].mean()),
                         "seconds": elapsed_before + time.perf_counter() - t0}
                curve["step"].append(done)
                for k, v in point.items():
                    curve[k].append(v)
                logger.log(done, point)
                bar.set_postfix(loss=f"{point['train_loss']:.3f}",
                                val_acc=f"{point['val_accuracy']:.3f}")
            if checkpointer is not None and done % config.checkpoint_every == 0:
                checkpointer.save(state, config=dataclasses.asdict(config))
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                stopped_by_budget = True
                break
    bar.close()
    jax.block_until_ready(state.params)
    if checkpointer is not None:
        checkpointer.save(state, config=dataclasses.asdict(config))  # the final state too
        checkpointer.close()
    return state, curve, {"iterations_done": int(state.step), "resumed_from": start,
                          "train_seconds": time.perf_counter() - t0,
                          "stopped_by_budget": stopped_by_budget}


def compiler_options(config) -> Optional[dict]:
    """XLA options for the run's compiled steps (``--low-memory-compile``)."""
    return mj.low_memory_compile_options() if config.low_memory_compile else None


def test(config, algorithm, params, sampler) -> dict:
    steps = config.eval_inner_steps

    def evaluate(params, batch):  # jitted by evaluate_many
        return algorithm.evaluate(params, batch, steps=steps)

    per_task = evaluate_many(evaluate, params, sampler, jax.random.key(90_000 + config.seed),
                             config.eval_tasks, config.eval_batch,
                             compiler_options=compiler_options(config))
    step_ids = tuple(range(per_task["accuracy"].shape[1]))  # metric learners: just step 0
    steps = step_ids[-1]
    accuracy, ci = summarize_steps(per_task["accuracy"], step_ids)
    loss, loss_ci = summarize_steps(per_task["loss"], step_ids)
    return {"test_accuracy": accuracy[str(steps)], "test_ci95": ci[str(steps)],
            "accuracy": accuracy, "ci95": ci, "loss": loss, "loss_ci95": loss_ci,
            "eval_tasks": config.eval_tasks}


def plot_curve(curve: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(curve["step"], curve["train_loss"])
    ax[0].set(xlabel="iteration", ylabel="meta-train query loss")
    ax[1].plot(curve["step"], curve["train_accuracy"], label="meta-train query")
    ax[1].plot(curve["step"], curve["val_accuracy"], label="held-out (after adaptation)")
    ax[1].set(xlabel="iteration", ylabel="accuracy")
    ax[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def configure_devices(config) -> int:
    """``--malloc-arenas``, ``--malloc-mmap-threshold-mib`` and ``--cpu-devices`` (how many JAX
    devices the CPU is split into), all before JAX runs."""
    mj.configure_malloc(config.malloc_arenas, config.malloc_mmap_threshold_mib)
    if config.cpu_devices == "auto":
        return mj.configure_cpu_devices()
    if not config.cpu_devices.isdigit() or int(config.cpu_devices) < 1:
        raise ValueError(f"--cpu-devices must be auto or a positive count, got "
                         f"{config.cpu_devices!r}.")
    return mj.configure_cpu_devices(int(config.cpu_devices))


def task_map_for(config):
    """``--task-map``, resolved; ``auto`` shards over as many CPU devices as divide both the
    training and the evaluation meta-batch (unsharded if none does)."""
    task_map = resolve_task_map(config.task_map)
    if config.task_map == "auto" and isinstance(task_map, mj.ShardedTasks):
        devices = max(d for d in range(1, len(jax.local_devices()) + 1)
                      if config.meta_batch % d == 0 and config.eval_batch % d == 0)
        task_map = task_map.strategy if devices == 1 else dataclasses.replace(task_map,
                                                                              devices=devices)
    return task_map


def prepare_run(config) -> tuple[dict, float]:
    """Checks the evaluation sizes, writes the config into the run directory, turns on the
    compilation cache, loads Omniglot (cached after the first load) and builds the samplers;
    returns them and the load seconds."""
    if config.eval_tasks % config.eval_batch or config.val_tasks % config.eval_batch:
        raise ValueError(f"--eval-tasks ({config.eval_tasks}) and --val-tasks ({config.val_tasks}) "
                         f"must be multiples of --eval-batch ({config.eval_batch}).")
    os.makedirs(config.out, exist_ok=True)
    save_config(config, config.out)
    configure_compilation_cache(config.compile_cache)
    t0 = time.perf_counter()
    dataset = load_omniglot(config.data_dir, image_size=config.image_size, cache_dir=config.cache_dir)
    return build_samplers(config, dataset), time.perf_counter() - t0


def main(argv=None) -> dict:
    config = parse_config(OmniglotConfig, argv)
    configure_devices(config)  # first: resolve() may start JAX
    config = resolve(config)
    samplers, load_s = prepare_run(config)
    algorithm, meta_params = build_algorithm(config, jax.random.key(config.seed),
                                             samplers["train"].dataset.num_classes)
    state, curve, info = train(config, algorithm, meta_params, samplers)
    results = test(config, algorithm, state.params, samplers["test"])
    name = f"{config.ways}-way {config.shots}-shot {config.algo}"
    print(f"\n{name}, {config.split} split{' + rotations' if config.rotations else ''}: "
          f"{info['iterations_done']} iterations in {info['train_seconds'] / 60:.1f} min; "
          f"test accuracy over {config.eval_tasks} tasks after each inner step:")
    for s, acc in results["accuracy"].items():
        print(f"  step {s}: {100 * acc:.2f} +- {100 * results['ci95'][s]:.2f} %")
    return write_run("omniglot", config, {config.algo: results}, info, curve, load_s, name)


def write_run(experiment: str, config, results: dict, info: dict, curve: dict, load_s: float,
              title: str, **extra) -> dict:
    """Writes ``metrics.json`` (the shared shape) and ``learning_curve.png``; returns the metrics."""
    metrics = {"experiment": experiment, "config": dataclasses.asdict(config), **extra,
               "results": results, "training": {**info, "curve": curve, "data_load_seconds": load_s},
               "environment": {"jax": jax.__version__, "backend": jax.default_backend()}}
    write_json_atomic(os.path.join(config.out, "metrics.json"), metrics)
    plot_curve(curve, os.path.join(config.out, "learning_curve.png"), title)
    print(f"wrote {config.out}/metrics.json and {config.out}/learning_curve.png")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
