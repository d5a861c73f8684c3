"""Sinusoid MAML meta-step throughput: one step per call vs. many steps fused per call.

The sinusoid MLP is tiny (2x40 hidden units), so per-call dispatch, not
arithmetic, bounds a Python loop over jitted steps. This prints steps/s and
compile time for ``make_train_step`` (one step per call, batch sampled in the
same call) and for ``make_train_loop`` with several fusion lengths.

  python benchmarks/sinusoid_step.py            # paper settings: K=10, 1 inner step, meta-batch 25
  python benchmarks/sinusoid_step.py --json     # one JSON object per variant
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import optax

import metajax as mj


def _setup(first_order: bool):
    model, params = mj.models.init_mlp(jax.random.key(0))
    maml = mj.MAML(apply_fn=model, loss_fn=mj.mse,
                   inner=mj.InnerLoop(steps=1, learning_rate=0.01, first_order=first_order))
    optimizer = optax.adam(1e-3)
    state = mj.create_train_state(maml.init(params), optimizer, jax.random.key(1))
    sample = lambda key: mj.data.sample_sinusoid_tasks(key, 25, 10, 10)
    return maml, optimizer, state, sample


def bench_unfused(first_order: bool, steps: int) -> dict:
    maml, optimizer, state, sample = _setup(first_order)

    def step_with_sampling(state):
        rng, key = jax.random.split(state.rng)
        return mj.meta_update(state.replace(rng=rng), sample(key), meta_loss=maml.meta_loss,
                              optimizer=optimizer)

    step = jax.jit(step_with_sampling, donate_argnums=0)
    t0 = time.perf_counter()
    state, m = step(state)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / steps)
    return {"variant": "one step per call", "steps_per_call": 1, "compile_s": compile_s,
            "steps_per_s": 1.0 / float(np.median(times))}


def bench_fused(first_order: bool, steps_per_call: int, calls: int) -> dict:
    maml, optimizer, state, sample = _setup(first_order)
    loop = mj.make_train_loop(maml.meta_loss, optimizer, sample, steps_per_call)
    t0 = time.perf_counter()
    compiled = loop.lower(state).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        state, m = compiled(state)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / steps_per_call)
    return {"variant": f"fused x{steps_per_call}", "steps_per_call": steps_per_call,
            "compile_s": compile_s, "steps_per_s": 1.0 / float(np.median(times))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant")
    parser.add_argument("--first-order", action="store_true", help="FOMAML instead of MAML")
    parser.add_argument("--fusion", type=int, nargs="+", default=[10, 100, 1000],
                        help="steps per call for the fused variants")
    args = parser.parse_args()

    rows = [bench_unfused(args.first_order, steps=200)]
    rows += [bench_fused(args.first_order, n, calls=max(3, 3000 // n)) for n in args.fusion]
    env = {"backend": jax.default_backend(), "jax": jax.__version__, "cpus": os.cpu_count(),
           "first_order": args.first_order}
    for row in rows:
        row.update(env)
        row["seconds_for_70k"] = 70_000 / row["steps_per_s"]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"sinusoid MAML meta-step (K=10, 1 inner step, meta-batch 25, "
          f"{'first' if args.first_order else 'second'} order) on {env['backend']}, "
          f"jax {env['jax']}, {env['cpus']} CPUs")
    print(f"{'variant':<20} {'steps/s':>9} {'compile s':>10} {'70k steps, s':>13}")
    for row in rows:
        print(f"{row['variant']:<20} {row['steps_per_s']:>9.0f} {row['compile_s']:>10.2f} "
              f"{row['seconds_for_70k']:>13.0f}")


if __name__ == "__main__":
    main()
