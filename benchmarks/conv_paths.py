"""Compares convolution paths x task maps for one MAML configuration, interleaved in one process.

Every variant is compiled first; then the timed steps of all variants are interleaved
round-robin, so background load on a shared machine hits them alike and the ratios stay
meaningful. Each variant is ``conv_impl:task_map``:

  conv_impl  lax      lax.conv_general_dilated (autodiff derivatives)
             patches  im2col (strided slices + concat) + matmul (autodiff derivatives)
             fused    patches forward + hand-written conv/batch-norm/ReLU backward (custom_vjp)
  task_map   vmap | map | accumulate | <int chunk size>
  options    optional third field for fused: +NAME / -NAME switches a key of
             layers.FUSED_OPTIONS on / off (materialize, phase_dx, phase_col2im,
             native_patches, gram_bn, native_weight_grad, native_conv_vjp), joined by ":"

Usage:
  python benchmarks/conv_paths.py                                  # config a, CPU candidates
  python benchmarks/conv_paths.py --config a --variants fused:vmap,fused:map,patches:vmap
  python benchmarks/conv_paths.py --variants lax:vmap,lax:map --rounds 3   # slow on CPU
  python benchmarks/conv_paths.py --json

This is the benchmark behind ``conv_impl="auto"`` (see ``metajax/models/layers.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from maml_step import CONFIGS, USEFUL_GFLOP, build_step, make_batch, parse_task_map  # noqa: E402

DEFAULT_VARIANTS = "fused:accumulate,fused:map,fused:vmap,fused:8,patches:accumulate"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="a", choices=sorted(CONFIGS))
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    cfg = CONFIGS[args.config]
    batch = make_batch(cfg, 0)
    variants = {}
    from metajax.models import layers
    defaults = dict(layers.FUSED_OPTIONS)
    for v in args.variants.split(","):
        impl, tm, *opts = v.split(":")
        layers.FUSED_OPTIONS.update(defaults)
        for o in opts:
            if o[:1] not in ("+", "-") or o[1:] not in defaults:
                parser.error(f"bad option {o!r} in variant {v!r}: +NAME or -NAME with NAME "
                             f"one of {sorted(defaults)}")
            layers.FUSED_OPTIONS[o[1:]] = o[0] == "+"
        step, state = build_step(cfg, impl, parse_task_map(tm))
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()  # options are read while tracing
        compile_s = time.perf_counter() - t0
        state, _ = compiled(state, batch)  # the train step donates its input state
        jax.block_until_ready(state)
        variants[v] = dict(compiled=compiled, state=state, compile_s=compile_s, times=[], cpu=[])
        print(f"compiled {v} in {compile_s:.1f} s", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for v, d in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            d["state"], _ = d["compiled"](d["state"], batch)
            jax.block_until_ready(d["state"])
            d["times"].append(time.perf_counter() - t0)
            d["cpu"].append(time.process_time() - c0)
    first = None
    for v, d in variants.items():
        med = float(np.median(d["times"]))
        first = first or med
        res = dict(config=args.config, variant=v, tasks_per_s=cfg["meta_batch"] / med,
                   seconds_per_step=med, seconds_min=float(np.min(d["times"])),
                   compile_s=d["compile_s"], speedup_vs_first=first / med,
                   cpu_seconds_per_step=float(np.median(d["cpu"])),
                   useful_gflops_per_s=USEFUL_GFLOP[args.config] / med,
                   loadavg_1m=os.getloadavg()[0])
        if args.json:
            print(json.dumps(res))
        else:
            print(f"{v:16s} {res['tasks_per_s']:7.1f} tasks/s  {med:.3f} s/step "
                  f"(min {res['seconds_min']:.3f}, cpu {res['cpu_seconds_per_step']:.3f})  compile {d['compile_s']:.1f} s  "
                  f"x{res['speedup_vs_first']:.2f} vs {args.variants.split(',')[0]}")


if __name__ == "__main__":
    main()
