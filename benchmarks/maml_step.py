"""One MAML meta-training step on an Omniglot-shaped Conv4: speed, compile time, memory.

Configurations (the same as ``../shared/bench`` runs with learn2learn and torch.func):

  a: 5-way 1-shot 15-query, 1 inner step,  meta-batch 32, second order
  b: 5-way 1-shot 15-query, 1 inner step,  meta-batch 32, first order
  c: 5-way 1-shot 15-query, 5 inner steps, meta-batch 32, second order
  d: 20-way 1-shot 5-query, 5 inner steps, meta-batch 16, second order

Inner SGD learning rate 0.4, Adam(1e-3) outer optimizer, random data shaped like Omniglot
(``(T, N, 28, 28, 1)``), learn2learn's OmniglotCNN init. One meta-step is one call of the
jitted ``mj.make_train_step`` (meta-gradient over the batch + Adam update). By default the
CPU is split into one JAX device per core (``mj.configure_cpu_devices``) and ``task_map="auto"``
shards the tasks over them; ``--cpu-devices 1`` is the one-device step.

Each configuration runs in a fresh subprocess so its peak RSS is its own, and then once more
in another one that loads the step from the persistent compilation cache the first wrote, as
a rerun of a training script does (``compile_s_warm_cache``, ``peak_rss_warm_cache_mb``,
``tasks_per_s_warm_cache``; ``--no-warm-cache`` skips it). Reported per configuration:
tasks/s, seconds per meta-step (median over ``--steps`` timed steps after ``--warmup``),
compile time (lower + compile), peak RSS (whole process, imports, compile and timed steps
included; taken before the FLOP count and the matmul-peak measurement, which are not part of
the workload: ``peak_rss_incl_matmul_peak_mb`` has the figure with them),
XLA cost-analysis FLOPs per step, achieved GFLOP/s (both the XLA count and the useful
conv/matmul FLOPs that ``../shared/bench`` uses, for a like-for-like ratio) and % of a
matmul peak measured in the same run (float32 4096^3 ``jnp.matmul``).

Usage:
  python benchmarks/maml_step.py                     # configs a-d, defaults (conv_impl auto)
  python benchmarks/maml_step.py --configs a --json  # one JSON object per config
  python benchmarks/maml_step.py --conv-impl patches --task-map map
  python benchmarks/maml_step.py --low-memory-compile  # mj.low_memory_compile_options()
  python benchmarks/maml_step.py --low-memory-compile --malloc-arenas 1  # + one malloc arena
  python benchmarks/maml_step.py --low-memory-compile --malloc-arenas 1 --malloc-mmap-threshold-mib 1
  python benchmarks/maml_step.py --cpu-devices 1       # one CPU device: every op on all cores
  python benchmarks/maml_step.py --configs a --child '{"config": "a", ...}'  # internal
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "a": dict(ways=5, shots=1, query=15, inner_steps=1, meta_batch=32, first_order=False),
    "b": dict(ways=5, shots=1, query=15, inner_steps=1, meta_batch=32, first_order=True),
    "c": dict(ways=5, shots=1, query=15, inner_steps=5, meta_batch=32, first_order=False),
    "d": dict(ways=20, shots=1, query=5, inner_steps=5, meta_batch=16, first_order=False),
}
# Useful (conv + matmul) FLOPs per meta-step, counted by ../shared/bench with torch's
# FlopCounterMode on the per-task autograd path; the same count for every framework. (d) is
# not in ../shared/bench/README.md's table (its 41.2 GFLOP row is 20-way with 1 inner step):
# `torch_maml_bench.py --variant loop --ways 20 --query 5 --inner-steps 5 --meta-batch 16
# --flops` counted 105.1 GFLOP (2026-12-01), as the analytic count predicts.
USEFUL_GFLOP = {"a": 45.7, "b": 40.2, "c": 77.7, "d": 105.1}
INNER_LR = 0.4


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    """Median float32 ``n^3`` matmul GFLOP/s of this JAX backend."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / float(np.median(times)) / 1e9


def make_batch(cfg: dict, seed: int):
    import jax.numpy as jnp
    import numpy as np
    import metajax as mj
    rng = np.random.default_rng(seed)
    t, w = cfg["meta_batch"], cfg["ways"]
    ns, nq = w * cfg["shots"], w * cfg["query"]
    return mj.TaskBatch(
        support_inputs=jnp.asarray(rng.random((t, ns, 28, 28, 1), np.float32)),
        support_targets=jnp.asarray(np.tile(np.arange(w), (t, cfg["shots"]))),
        query_inputs=jnp.asarray(rng.random((t, nq, 28, 28, 1), np.float32)),
        query_targets=jnp.asarray(np.tile(np.arange(w), (t, cfg["query"]))))


def place_batch(batch, task_map):
    """``batch`` laid out where the step reads it: split over the task devices for a
    ``ShardedTasks`` map (as a training input pipeline would), else unchanged. Without this
    every call would first copy the batch from device 0 to the task devices."""
    import metajax as mj
    from metajax.training import sharding
    if isinstance(task_map, mj.ShardedTasks):
        return sharding.shard_tasks(batch, task_map.mesh())
    return batch


def parse_task_map(value: str):
    """``"auto"`` is ``"accumulate"`` on CPU (fastest in benchmarks/conv_paths.py), ``"vmap"`` elsewhere."""
    from metajax.core.task_map import resolve_task_map
    return resolve_task_map(value)


def build_step(cfg: dict, conv_impl: str, task_map, remat="auto", unroll=1,
               compiler_options=None):
    """``(train_step, state)`` for one configuration (``compiler_options``: XLA's, for the step)."""
    import jax
    import optax
    import metajax as mj
    from metajax.models.conv4 import init_omniglot_conv4
    apply_fn, params = init_omniglot_conv4(jax.random.key(0), ways=cfg["ways"],
                                           conv_impl=conv_impl)
    maml = mj.MAML(apply_fn, mj.cross_entropy,
                   inner=mj.InnerLoop(cfg["inner_steps"], INNER_LR,
                                      first_order=cfg["first_order"], remat=remat,
                                      unroll=unroll),
                   metric_fns={"accuracy": mj.accuracy}, task_map=task_map)
    optimizer = optax.adam(1e-3)
    state = mj.create_train_state(maml.init(params), optimizer, jax.random.key(1))
    return mj.make_train_step(maml.meta_loss, optimizer, compiler_options=compiler_options), state


def _flops(cost) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def run_child(spec: dict) -> dict:
    """Benchmarks one configuration in this process and returns the result dict."""
    from metajax.training.allocator import configure_malloc
    configure_malloc(spec.get("malloc_arenas", 0),  # before JAX starts its thread pools
                     spec.get("malloc_mmap_threshold_mib", 0))
    import jax
    import numpy as np
    from metajax.core.inner_loop import resolve_remat, resolve_unroll
    import jax.numpy as jnp
    from metajax.models import layers
    from metajax.models.layers import resolve_conv_impl
    import metajax as mj
    cpu_devices = spec.get("cpu_devices", "auto")  # before anything runs on JAX's backend
    mj.configure_cpu_devices(None if cpu_devices == "auto" else int(cpu_devices))
    name = spec["config"]
    cfg = CONFIGS[name]
    if spec.get("cache_dir"):
        from metajax.training.compile_cache import enable_compilation_cache
        enable_compilation_cache(spec["cache_dir"], min_compile_time_s=0.0)
    rss_imports = _peak_rss_mb()
    task_map = parse_task_map(spec["task_map"])
    options = mj.low_memory_compile_options() if spec.get("low_memory_compile") else None
    step, state = build_step(cfg, spec["conv_impl"], task_map, spec.get("remat", "auto"),
                             spec.get("unroll", 1), compiler_options=options)
    batches = [place_batch(make_batch(cfg, seed), task_map) for seed in range(4)]
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    rss_compiled = _peak_rss_mb()
    for i in range(spec["warmup"]):
        state, metrics = compiled(state, batches[i % 4])
    jax.block_until_ready(state)
    times, losses = [], []
    for i in range(spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batches[i % 4])
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    sec = float(np.median(times))
    rss_steps = _peak_rss_mb()  # the workload's peak, before the FLOP count and the matmul peak
    if not spec.get("count_flops", True):
        xla_flops = float("nan")
    elif task_map != "vmap":
        # XLA's cost analysis counts a while-loop body once, so count FLOPs on the vmap
        # lowering of the same step (pre-optimisation HLO; no second compile needed).
        vstep, vstate = build_step(cfg, spec["conv_impl"], "vmap", spec.get("remat", "auto"),
                                   spec.get("unroll", 1))
        xla_flops = _flops(vstep.lower(vstate, batches[0]).cost_analysis())
    else:
        xla_flops = _flops(compiled.cost_analysis())
    # NB: the inner loop is a lax.scan, also counted once: for inner_steps > 1 the XLA
    # count is a lower bound; useful_gflops_per_s (the ../shared/bench count) is exact.
    peak = matmul_peak_gflops() if spec.get("peak", True) else float("nan")
    useful = USEFUL_GFLOP[name]
    return {
        "config": dict(name=name, **cfg),
        "conv_impl": resolve_conv_impl(spec["conv_impl"]),
        # whether the fused block ran its im2col/col2im as the native C++ custom calls
        "native_patches": (resolve_conv_impl(spec["conv_impl"]) == "fused"
                           and layers.native_kernels_active(jnp.float32)),
        "task_map": task_map if isinstance(task_map, (str, int)) else str(task_map),
        "cpu_devices": len(jax.devices("cpu")),
        "remat": resolve_remat(spec.get("remat", "auto"), steps=cfg["inner_steps"],
                               first_order=cfg["first_order"]),
        "unroll": resolve_unroll(spec.get("unroll", 1), steps=cfg["inner_steps"]),
        "compiler_options": options or {},
        "malloc_arenas": spec.get("malloc_arenas", 0),
        "malloc_mmap_threshold_mib": spec.get("malloc_mmap_threshold_mib", 0),
        "tasks_per_s": cfg["meta_batch"] / sec,
        "seconds_per_step": sec,
        "seconds_min": float(np.min(times)),
        "seconds_max": float(np.max(times)),
        "compile_s": compile_s,
        "peak_rss_mb": rss_steps,
        "rss_after_imports_mb": rss_imports,
        "peak_rss_after_compile_mb": rss_compiled,
        "peak_rss_incl_matmul_peak_mb": _peak_rss_mb(),
        "xla_gflop_per_step": xla_flops / 1e9,
        "gflops_per_s": xla_flops / 1e9 / sec,
        "useful_gflop_per_step": useful,
        "useful_gflops_per_s": useful / sec,
        "matmul_peak_gflops": peak,
        "pct_of_peak_useful": 100.0 * useful / sec / peak,
        "pct_of_peak_xla": 100.0 * xla_flops / 1e9 / sec / peak,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps": spec["steps"],
        "loadavg_1m": os.getloadavg()[0],
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }


def _run_child_process(spec: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT_JSON ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"config {spec['config']} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT_JSON "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--conv-impl", default="auto", choices=["auto", "fused", "patches", "lax"])
    parser.add_argument("--task-map", default="auto",
                        help="vmap, map, accumulate, an int chunk size, sharded[:STRATEGY[:N]], or "
                        "auto (accumulate on CPU, sharded over the CPU devices when there are "
                        "several; vmap elsewhere)")
    parser.add_argument("--cpu-devices", default="auto",
                        help="JAX CPU devices (mj.configure_cpu_devices): auto = one per core, "
                        "or a count (1: all cores share every op)")
    parser.add_argument("--remat", default="auto", choices=["auto", "none", "full", "dots"],
                        help="what the second-order pass keeps of each inner step (InnerLoop.remat)")
    parser.add_argument("--unroll", default="1",
                        help="inner steps per scan iteration (InnerLoop.unroll): all or an int")
    parser.add_argument("--low-memory-compile", action="store_true",
                        help="compile with mj.low_memory_compile_options() (lower compile-time "
                        "peak memory, slower element-wise kernels)")
    parser.add_argument("--malloc-arenas", type=int, default=0,
                        help="cap glibc's malloc arenas (mj.limit_malloc_arenas; 0: glibc's "
                        "default): 1 lowers the peak RSS")
    parser.add_argument("--malloc-mmap-threshold-mib", type=int, default=0,
                        help="fix glibc's mmap threshold at this many MiB, 1-32 "
                        "(mj.fix_malloc_mmap_threshold; 0: glibc's dynamic default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="limit XLA:CPU intra-op threads (0: XLA's default)")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    parser.add_argument("--no-warm-cache", action="store_true",
                        help="skip the second run of each config that loads the step from the "
                        "persistent compilation cache the first run wrote")
    parser.add_argument("--json", action="store_true", help="one JSON object per config")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child:  # check the malloc flags here, before any child starts
        from metajax.training.allocator import configure_malloc
        try:
            configure_malloc(args.malloc_arenas, args.malloc_mmap_threshold_mib)
        except ValueError as err:
            parser.error(str(err))

    if args.child:
        print("RESULT_JSON " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return

    env = dict(os.environ)
    if args.threads:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}"
                            f" intra_op_parallelism_threads={args.threads}").strip()
    from metajax.training.config import parse_unroll
    for name in args.configs.split(","):
        spec = dict(config=name, conv_impl=args.conv_impl, task_map=args.task_map,
                    cpu_devices=args.cpu_devices,
                    remat=args.remat, steps=args.steps, warmup=args.warmup,
                    unroll=parse_unroll(args.unroll),
                    peak=not args.no_peak, low_memory_compile=args.low_memory_compile,
                    malloc_arenas=args.malloc_arenas,
                    malloc_mmap_threshold_mib=args.malloc_mmap_threshold_mib)
        if args.no_warm_cache:
            res = _run_child_process(spec, env)
        else:
            with tempfile.TemporaryDirectory(prefix="maml_step_cache_") as cache_dir:
                res = _run_child_process(dict(spec, cache_dir=cache_dir), env)  # compiles, stores
                warm = _run_child_process(dict(spec, cache_dir=cache_dir, peak=False,
                                               count_flops=False), env)  # loads from the cache
            res.update(compile_s_warm_cache=warm["compile_s"],
                       peak_rss_warm_cache_mb=warm["peak_rss_mb"],
                       tasks_per_s_warm_cache=warm["tasks_per_s"])
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            c = res["config"]
            cached = (f"from the compilation cache: load {res['compile_s_warm_cache']:.1f} s, "
                      f"peak RSS {res['peak_rss_warm_cache_mb']:.0f} MiB, "
                      if "peak_rss_warm_cache_mb" in res else "")
            print(f"({name}) {c['ways']}-way {c['shots']}-shot {c['query']}q k={c['inner_steps']} "
                  f"T={c['meta_batch']} {'1st' if c['first_order'] else '2nd'} order "
                  f"[{res['conv_impl']}{' + native im2col' if res['native_patches'] else ''}, "
                  f"{res['task_map']}, {res['cpu_devices']} CPU device(s), "
                  f"remat {res['remat']}, unroll {res['unroll']}"
                  f"{', low-memory compile' if res['compiler_options'] else ''}]: "
                  f"{res['tasks_per_s']:.1f} tasks/s, {res['seconds_per_step']:.3f} s/step "
                  f"(min {res['seconds_min']:.3f}), compile {res['compile_s']:.1f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MiB, {cached}"
                  f"XLA {res['xla_gflop_per_step']:.1f} GFLOP/step = {res['gflops_per_s']:.0f} GFLOP/s, "
                  f"useful {res['useful_gflops_per_s']:.0f} GFLOP/s = "
                  f"{res['pct_of_peak_useful']:.0f}% of {res['matmul_peak_gflops']:.0f} GFLOP/s peak, "
                  f"load {res['loadavg_1m']:.1f}", flush=True)


if __name__ == "__main__":
    main()
