"""XLA:CPU compile options for the MAML meta-step: is the default dot library the fastest?

jaxlib 0.10's XLA:CPU can run the step's matmuls through several libraries, picked by
per-compilation debug options: YNNPACK fusions (the default here), Eigen (YNNPACK fusion
off), XNNPACK fusions or oneDNN; YNNPACK can also take over the element-wise and reduction
ops around the dots, and XLA has a concurrency-optimised scheduler. None of that needs
``XLA_FLAGS``: ``jax.jit(f).lower(...).compile(compiler_options={...})`` sets them for one
executable, so this script compiles the same step (a ``benchmarks/maml_step.py``
configuration) once per option set in one process and times the executables in
interleaved rounds (the machine's speed drifts minute to minute; alternating keeps the
comparison fair). It also reports how far each option set's loss after the timed steps is
from the first set's: another GEMM library rounds differently, and Adam's early updates
(about ``lr * sign(g)``) turn rounding-sized differences of near-zero gradients into
visible ones within a few steps (about 1e-2 on config (a) after 5 steps).

An option this jaxlib does not know is reported as unavailable, not an error, so the
script runs on other jax versions; ``--options`` takes your own sets as JSON.

Usage:
  python benchmarks/xla_cpu_options.py                      # config a, the built-in sets
  python benchmarks/xla_cpu_options.py --configs a,d --rounds 6
  python benchmarks/xla_cpu_options.py --options '{"xnn": {"xla_cpu_use_xnnpack": true}}'
  python benchmarks/xla_cpu_options.py --json               # one JSON object per config
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

YNN_ALL = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
OPTION_SETS = {
    "default (YNNPACK dots)": {},
    "Eigen dots (YNNPACK off)": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "XNNPACK dots": {"xla_cpu_experimental_ynn_fusion_type": "",
                     "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "YNNPACK dots+eltwise+reduce": {"xla_cpu_experimental_ynn_fusion_type": YNN_ALL},
    "oneDNN": {"xla_cpu_use_onednn": True},
    "concurrency scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
}


def compile_variants(lowered, option_sets: dict) -> tuple[dict, dict]:
    """``({name: executable}, {name: compile seconds or the reason it is unavailable})``."""
    compiled, info = {}, {}
    for name, options in option_sets.items():
        t0 = time.perf_counter()
        try:
            compiled[name] = lowered.compile(compiler_options=options or None)
            info[name] = time.perf_counter() - t0
        except Exception as err:  # an option this jaxlib does not have
            info[name] = f"unavailable: {str(err).splitlines()[0][:120]}"
    return compiled, info


def time_interleaved(compiled: dict, state, batches, rounds: int, steps: int) -> dict:
    """Per variant: the median seconds per step of each round and the last loss.

    Every round restarts each variant from a copy of the same state (the step donates its
    input) and runs one untimed step, then ``steps`` timed ones.
    """
    import jax
    import numpy as np
    out = {name: {"round_seconds": [], "loss": None} for name in compiled}
    for _ in range(rounds):
        for name, step in compiled.items():
            s = jax.tree_util.tree_map(lambda x: x.copy(), state)
            s, metrics = step(s, batches[0])
            jax.block_until_ready(s)
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                s, metrics = step(s, batches[(i + 1) % len(batches)])
                jax.block_until_ready(s)
                times.append(time.perf_counter() - t0)
            out[name]["round_seconds"].append(float(np.median(times)))
            out[name]["loss"] = float(metrics["loss"])
    return out


def run_config(name: str, option_sets: dict, rounds: int, steps: int) -> dict:
    import numpy as np
    import maml_step
    cfg = maml_step.CONFIGS[name]
    step, state = maml_step.build_step(cfg, "auto", maml_step.parse_task_map("auto"))
    batches = [maml_step.make_batch(cfg, seed) for seed in range(4)]
    compiled, info = compile_variants(step.lower(state, batches[0]), option_sets)
    timings = time_interleaved(compiled, state, batches, rounds, steps)
    base_loss = next(iter(timings.values()))["loss"] if timings else None
    variants = {}
    for option_name, options in option_sets.items():
        entry = {"options": options}
        if option_name not in timings:
            entry["unavailable"] = info[option_name]
        else:
            rs = timings[option_name]["round_seconds"]
            entry.update(compile_s=info[option_name],
                         tasks_per_s=cfg["meta_batch"] / float(np.median(rs)),
                         tasks_per_s_rounds=[cfg["meta_batch"] / r for r in rs],
                         loss=timings[option_name]["loss"],
                         loss_diff_vs_first=abs(timings[option_name]["loss"] - base_loss))
        variants[option_name] = entry
    return {"config": dict(name=name, **cfg), "rounds": rounds, "steps_per_round": steps,
            "variants": variants}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="a", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--options", help="JSON {name: {option: value}} replacing the built-in "
                        "sets (the first set is the reference for the loss difference)")
    parser.add_argument("--json", action="store_true", help="one JSON object per config")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    try:
        option_sets = json.loads(args.options) if args.options else OPTION_SETS
    except json.JSONDecodeError as err:
        parser.error(f"--options is not valid JSON ({err}); expected e.g. "
                     "'{\"xnn\": {\"xla_cpu_use_xnnpack\": true}}'")
    if not isinstance(option_sets, dict) or not all(isinstance(v, dict)
                                                    for v in option_sets.values()):
        parser.error("--options must be a JSON object of {name: {option: value}} objects")
    import maml_step
    for name in args.configs.split(","):
        if name not in maml_step.CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {sorted(maml_step.CONFIGS)}")
        result = run_config(name, option_sets, args.rounds, args.steps)
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        c = result["config"]
        print(f"({name}) {c['ways']}-way {c['shots']}-shot k={c['inner_steps']} "
              f"T={c['meta_batch']} {'1st' if c['first_order'] else '2nd'} order, "
              f"{args.rounds} interleaved rounds x {args.steps} steps:")
        for option_name, v in result["variants"].items():
            if "unavailable" in v:
                print(f"  {option_name:30s} {v['unavailable']}")
                continue
            rounds = " ".join(f"{r:.1f}" for r in v["tasks_per_s_rounds"])
            print(f"  {option_name:30s} {v['tasks_per_s']:6.2f} tasks/s (rounds {rounds}), "
                  f"compile {v['compile_s']:.1f} s, |loss - first| {v['loss_diff_vs_first']:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
