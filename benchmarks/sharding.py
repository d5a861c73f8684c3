"""Meta-step throughput with the task axis sharded over 1, 2 and 4 devices.

On CPU the devices are fake (``--xla_force_host_platform_device_count``, set here before
JAX starts): they share the same cores, so more devices is not a speed-up. What the numbers
show is that sharding costs little in time (and the tests show it costs nothing in
correctness). On a machine with several GPUs, pass ``--real`` to use the real devices.

  python benchmarks/sharding.py                      # 1, 2, 4 fake CPU devices
  python benchmarks/sharding.py --devices 1 2 --json # one JSON object per line
  python benchmarks/sharding.py --real               # the accelerators JAX finds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-batch "
                        "(a multiple of every device count)")
    parser.add_argument("--steps-per-call", type=int, default=100)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--real", action="store_true", help="use real devices, not fake CPU ones")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def bench(n_devices: int, meta_batch: int, steps_per_call: int, calls: int) -> dict:
    import jax
    import numpy as np
    import optax

    import metajax as mj
    from metajax.training import sharding

    model, params = mj.models.init_mlp(jax.random.key(0))
    maml = mj.MAML(apply_fn=model, loss_fn=mj.mse, inner=mj.InnerLoop(steps=1, learning_rate=0.01))
    optimizer = optax.adam(1e-3)
    sample = lambda key: mj.data.sample_sinusoid_tasks(key, meta_batch, 10, 10)
    mesh = sharding.task_mesh(n_devices)
    loop = sharding.make_train_loop(maml.meta_loss, optimizer, sample, steps_per_call, mesh=mesh)
    state = mj.create_train_state(maml.init(params), optimizer, jax.random.key(1))
    t0 = time.perf_counter()
    state, metrics = loop(state)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        state, metrics = loop(state)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"devices": n_devices, "platform": jax.devices()[0].platform, "meta_batch": meta_batch,
            "steps_per_call": steps_per_call, "first_call_s": round(compile_s, 2),
            "meta_steps_per_s": round(steps_per_call / float(np.median(times)), 1),
            "final_loss": float(np.mean(metrics["loss"]))}


def main(argv=None) -> list[dict]:
    args = _parse(argv)
    if not args.real:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(args.devices)}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    rows = []
    for n in args.devices:
        if n > len(jax.devices()):
            print(f"skipping {n} devices: only {len(jax.devices())} available", file=sys.stderr)
            continue
        row = bench(n, args.meta_batch, args.steps_per_call, args.calls)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"MAML sinusoid meta-steps/s, meta-batch {args.meta_batch}, "
              f"{args.steps_per_call} steps per call ({jax.devices()[0].platform}):")
        print("| devices | meta-steps/s | first call (compile) s |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['devices']} | {r['meta_steps_per_s']:.0f} | {r['first_call_s']:.1f} |")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
