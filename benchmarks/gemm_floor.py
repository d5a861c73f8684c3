"""How fast a Conv4 MAML meta-step could be if everything but its GEMMs were free.

Compiles the same step as ``benchmarks/maml_step.py`` (configs a-d), reads every matrix
product (``dot``, also those inside fusions) from the optimised HLO, counts how often each
runs per meta-step (from a ``jax.profiler`` trace: the count, not the traced duration, which
the profiler inflates), and times each distinct product on its own, with XLA's own GEMM
kernels and its thread pool (small products several to a call, so dispatch does not count).
The sum of count x time is the *GEMM floor*: no schedule of
the remaining element-wise, reduction and im2col work can make the step faster with these
kernels. It prints a table per product shape, the floor, the measured step, and the ceiling
in tasks/s, and, given ``--reference-tasks-per-s`` (for example learn2learn's from
``../shared/bench``), the best ratio the floor allows.

Usage:
  python benchmarks/gemm_floor.py --config a
  python benchmarks/gemm_floor.py --config d --reference-tasks-per-s 6.4
  python benchmarks/gemm_floor.py --config a --json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_step import add_step_arguments, compile_step  # noqa: E402

_SHAPE = re.compile(r"^(\w+)\[([\d,]*)\](?:\{([\d,]*)\})?")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*?)\)(.*)$")


def _parse_shape(text: str):
    """``("f32", (980, 576), (1, 0))`` from ``f32[980,576]{1,0}``; None for tuples/tokens."""
    m = _SHAPE.match(text)
    if not m:
        return None
    dims = tuple(int(d) for d in m.group(2).split(",") if d)
    layout = tuple(int(d) for d in m.group(3).split(",")) if m.group(3) else None
    return m.group(1), dims, layout


def _dims_attr(rest: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", rest)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def dot_specs(hlo_text: str) -> dict[str, tuple]:
    """``{op name: spec}`` for every op of the optimised HLO that runs a matrix product.

    An op is a top-level ``dot`` or a fusion whose computation holds one; its spec is
    ``(dtype, lhs dims, lhs layout, rhs dims, rhs layout, lhs contracting, rhs contracting,
    lhs batch, rhs batch)``, the product as XLA runs it (operand layouts included, because a
    column-major operand is a different GEMM).
    """
    shapes: dict[str, tuple] = {}
    dots_in: dict[str, tuple] = {}
    calls: dict[str, str] = {}
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", line)
        if header:
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, operands, rest = m.groups()
        parsed = _parse_shape(shape)
        if parsed:
            shapes[name] = parsed
        if opcode == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            if called:
                calls[name] = called.group(1)
        if opcode == "dot":
            names = [o.strip().lstrip("%") for o in operands.split(",")]
            dots_in.setdefault(computation, ())
            dots_in[computation] += ((name, names, rest),)

    def spec(names, rest):
        lhs, rhs = (shapes.get(n) for n in names[:2])
        if lhs is None or rhs is None:
            return None
        return (lhs[0], lhs[1], lhs[2], rhs[1], rhs[2],
                _dims_attr(rest, "lhs_contracting_dims"), _dims_attr(rest, "rhs_contracting_dims"),
                _dims_attr(rest, "lhs_batch_dims"), _dims_attr(rest, "rhs_batch_dims"))

    specs = {}
    for dots in dots_in.values():
        for name, names, rest in dots:
            s = spec(names, rest)
            if s:
                specs[name] = s
    for fusion, called in calls.items():
        inner = dots_in.get(called, ())
        if len(inner) == 1 and inner[0][0] in specs:
            specs[fusion] = specs[inner[0][0]]
    return specs


def spec_flops(spec) -> float:
    _, lhs, _, rhs, _, lc, rc, lb, rb = spec
    contracted = 1
    for d in lc:
        contracted *= lhs[d]
    out = 1
    for i, d in enumerate(lhs):
        if i not in lc:
            out *= d
    for i, d in enumerate(rhs):
        if i not in rc and i not in rb:
            out *= d
    return 2.0 * out * contracted


def describe(spec) -> str:
    dtype, lhs, ll, rhs, rl, lc, rc, lb, rb = spec
    def form(dims, layout, contracting):
        col_major = layout is not None and len(layout) == 2 and layout == (0, 1)
        return f"{'x'.join(map(str, dims))}{'^cm' if col_major else ''}/c{','.join(map(str, contracting))}"
    batch = f" batch{lb}" if lb else ""
    return f"{form(lhs, ll, lc)} . {form(rhs, rl, rc)}{batch}"


def _median_call_s(fn, args, trials: int) -> float:
    import jax
    import numpy as np
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def dispatch_s(trials: int = 200) -> float:
    """Seconds of one call of a jitted function that does (almost) nothing."""
    import jax
    import jax.numpy as jnp
    return _median_call_s(jax.jit(lambda x: x + 1.0), (jnp.zeros((8,), jnp.float32),), trials)


def time_spec(spec, overhead_s: float, trials: int = 30, target_s: float = 2e-3) -> float:
    """Seconds per product with the operand shapes and layouts of ``spec``.

    Small products are timed ``copies`` at a time (independent operand pairs in one jitted
    call, as many as make the call last about ``target_s``), so dispatch does not dominate;
    XLA may overlap independent products, which errs on the fast side, as a floor should.
    Median over ``trials`` calls, less ``overhead_s`` (the dispatch of an empty call), per
    product."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    dtype, lhs, ll, rhs, rl, lc, rc, lb, rb = spec

    def physical(dims, layout):
        # A column-major 2-D operand is built transposed and transposed back in the jit;
        # XLA folds the transpose into the operand layout of the dot.
        if layout is not None and len(dims) == 2 and layout == (0, 1):
            return dims[::-1], True
        return dims, False

    lp, lt = physical(lhs, ll)
    rp, rt = physical(rhs, rl)
    real = jnp.dtype(np.dtype({"f32": "float32", "f64": "float64"}[dtype]))

    def measure(copies: int) -> float:
        key = jax.random.PRNGKey(copies)
        a = [jax.random.normal(jax.random.fold_in(key, 2 * i), lp, real) for i in range(copies)]
        b = [jax.random.normal(jax.random.fold_in(key, 2 * i + 1), rp, real)
             for i in range(copies)]

        @jax.jit
        def run(xs, ys):
            outs = []
            for x, y in zip(xs, ys):
                x = x.T if lt else x
                y = y.T if rt else y
                outs.append(lax.dot_general(x, y, ((lc, rc), (lb, rb))))
            return outs

        raw = _median_call_s(run, (a, b), trials)
        return max(raw - overhead_s, 0.5 * raw) / copies

    single = measure(1)
    copies = int(min(32, max(1, round(target_s / max(single, 1e-7)))))
    return single if copies == 1 else min(single, measure(copies))


def op_counts(compiled, state, batch, names, steps: int) -> dict[str, float]:
    """How often each op in ``names`` runs per meta-step, from a profiler trace."""
    from profile_step import traced_events
    counts = collections.Counter(e["name"] for e in traced_events(compiled, state, batch, steps)
                                 if e.get("name") in names)
    return {name: c / steps for name, c in counts.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="meta-steps timed (median)")
    parser.add_argument("--reference-tasks-per-s", type=float,
                        help="a reference's tasks/s (e.g. learn2learn's) for the ratio the floor allows")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    cfg, compiled, state, batch = compile_step(args)
    specs = dot_specs(compiled.as_text())
    for _ in range(2):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - start)
    step_s = float(np.median(seconds))
    counts = op_counts(compiled, state, batch, set(specs), steps=2)

    per_spec: dict[tuple, float] = collections.defaultdict(float)
    for name, count in counts.items():
        per_spec[specs[name]] += count
    overhead_s = dispatch_s()
    rows = []
    for spec, count in per_spec.items():
        t = time_spec(spec, overhead_s)
        rows.append((spec, count, t))
    rows.sort(key=lambda r: -r[1] * r[2])
    floor_s = sum(count * t for _, count, t in rows)
    flops = sum(count * spec_flops(spec) for spec, count, _ in rows)
    print(f"config ({args.config}) {cfg}: {len(specs)} product ops, {len(rows)} distinct shapes")
    print(f"  {'product (dims^cm = column-major, /c = contracted dims)':58s} {'per step':>8s} "
          f"{'us each':>9s} {'GF/s':>7s} {'ms/step':>8s}")
    for spec, count, t in rows:
        print(f"  {describe(spec):58s} {count:8.1f} {t * 1e6:9.1f} "
              f"{spec_flops(spec) / t / 1e9:7.1f} {count * t * 1e3:8.1f}")
    tasks = cfg["meta_batch"]
    result = dict(config=dict(name=args.config, **cfg), step_s=step_s, tasks_per_s=tasks / step_s,
                  gemm_floor_s=floor_s, gemm_share_of_step=floor_s / step_s,
                  ceiling_tasks_per_s=tasks / floor_s, gemm_gflop_per_step=flops / 1e9,
                  gemm_gflops_per_s_isolated=flops / floor_s / 1e9)
    print(f"GEMMs: {flops / 1e9:.1f} GFLOP per step; floor {floor_s * 1e3:.0f} ms at "
          f"{flops / floor_s / 1e9:.0f} GFLOP/s (each product alone)")
    print(f"measured step {step_s * 1e3:.0f} ms = {tasks / step_s:.1f} tasks/s; the GEMM floor is "
          f"{100 * floor_s / step_s:.0f}% of it; ceiling {tasks / floor_s:.1f} tasks/s")
    if args.reference_tasks_per_s:
        result["reference_tasks_per_s"] = args.reference_tasks_per_s
        result["ratio_now"] = tasks / step_s / args.reference_tasks_per_s
        result["ratio_ceiling"] = tasks / floor_s / args.reference_tasks_per_s
        print(f"vs reference {args.reference_tasks_per_s:.2f} tasks/s: {result['ratio_now']:.2f}x "
              f"now, at most {result['ratio_ceiling']:.2f}x with these GEMM kernels")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
