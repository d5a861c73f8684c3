"""Where the time of one Conv4 MAML meta-step goes on this backend: an op-level profile.

Builds the same step as ``benchmarks/maml_step.py`` (configs a-d), runs it under
``jax.profiler.trace`` and sums the duration of every XLA op (thunk) over the traced steps.
Each op is put in a category from the optimised HLO (``compiled.as_text()``): ``dot`` (GEMMs),
``concatenate`` (im2col's column writes), ``copy``/``transpose`` (layout changes), ``reduce``,
other fusions (element-wise), and the rest. Prints the categories and the slowest ops, in ms
per meta-step.

Usage:
  python benchmarks/profile_step.py --config a
  python benchmarks/profile_step.py --config d --top 40 --remat none
  python benchmarks/profile_step.py --config a --dump-hlo /tmp/a.hlo   # look the ops up there
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def op_categories(hlo_text: str) -> dict[str, str]:
    """``{instruction name: category}`` from optimised HLO text.

    A fusion is named after what its fused computation does: a dot inside makes it ``dot``,
    else a concatenate, a reduce, a transpose/copy, else ``elementwise``.
    """
    computations: dict[str, str] = {}
    current, body = None, []
    for line in hlo_text.splitlines():
        header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", line)
        if header:
            current, body = header.group(1), []
            continue
        if current is not None:
            if line.strip() == "}":
                computations[current] = "\n".join(body)
                current = None
            else:
                body.append(line)

    def kind_of(text: str) -> str:
        for op, name in (("dot(", "dot"), ("convolution(", "convolution"),
                         ("custom-call(", "custom-call"), ("concatenate(", "concatenate"),
                         ("reduce(", "reduce"), ("reduce-window(", "reduce"),
                         ("transpose(", "transpose/copy"), ("copy(", "transpose/copy"),
                         ("dynamic-update-slice(", "dynamic-update-slice")):
            if f" {op}" in text:
                return name
        return "elementwise"

    categories = {}
    # The shape is one token, or a parenthesised tuple (multi-output ops) with spaces inside.
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\((.*)$")
    for text in computations.values():
        for line in text.splitlines():
            m = pattern.match(line)
            if not m:
                continue
            name, opcode, rest = m.groups()
            if opcode == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", rest)
                categories[name] = kind_of(computations.get(called.group(1), "")) if called else "fusion"
            elif opcode in ("dot", "convolution", "concatenate", "reduce", "copy", "transpose",
                            "custom-call", "dynamic-update-slice"):
                categories[name] = kind_of(f" {opcode}(")
            else:
                categories[name] = opcode
    return categories


def trace_events(trace_dir: str) -> list[dict]:
    """Every complete ("X") event of the perfetto trace written under ``trace_dir``."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"no perfetto trace written under {trace_dir}")
    with gzip.open(files[0], "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def busy_and_span_us(events: list[dict]) -> tuple[float, float]:
    """(time covered by at least one op, first op start to last op end), in microseconds.

    The difference is time no op event covers: dispatch gaps, and the asynchronous Eigen dot
    thunks (the transposed-LHS weight-gradient GEMMs), whose events end when the work is
    handed to the thread pool, so their compute shows up here rather than under ``dot``.
    """
    intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    busy, start, end = 0.0, None, None
    for s, e in intervals:
        if end is None or s > end:
            busy += 0.0 if end is None else end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy, intervals[-1][1] - intervals[0][0]


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that pick the step (shared with ``gemm_floor.py``)."""
    parser.add_argument("--config", default="a", choices=["a", "b", "c", "d"])
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--task-map", default="auto")
    parser.add_argument("--remat", default="auto")


def compile_step(args):
    """``(config, compiled step, state, batch)`` for the flags of :func:`add_step_arguments`."""
    from maml_step import CONFIGS, build_step, make_batch, parse_task_map
    cfg = CONFIGS[args.config]
    step, state = build_step(cfg, args.conv_impl, parse_task_map(args.task_map), args.remat)
    batch = make_batch(cfg, 0)
    return cfg, step.lower(state, batch).compile(), state, batch


def traced_events(compiled, state, batch, steps: int) -> list[dict]:
    """The op events of ``steps`` meta-steps run under ``jax.profiler.trace``."""
    import jax
    with tempfile.TemporaryDirectory(prefix="profile_step_") as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                state, _ = compiled(state, batch)
            jax.block_until_ready(state)
        return trace_events(trace_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="meta-steps traced")
    parser.add_argument("--top", type=int, default=25, help="slowest ops listed")
    parser.add_argument("--dump-hlo", metavar="PATH",
                        help="also write the optimised HLO text there (to look up the ops listed)")
    args = parser.parse_args(argv)

    import jax
    cfg, compiled, state, batch = compile_step(args)
    hlo_text = compiled.as_text()
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(hlo_text)
    categories = op_categories(hlo_text)
    for _ in range(2):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    events = [e for e in traced_events(compiled, state, batch, args.steps)
              if e.get("name") in categories]
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        totals[event["name"]] += float(event["dur"])
    busy, span = busy_and_span_us(events)

    per_step = {name: us / 1e3 / args.steps for name, us in totals.items()}
    by_category: dict[str, float] = collections.defaultdict(float)
    for name, ms in per_step.items():
        by_category[categories[name]] += ms
    total = sum(by_category.values())
    print(f"config ({args.config}) {cfg}: {total:.1f} ms of XLA ops per meta-step "
          f"({len(per_step)} distinct ops); span {span / 1e3 / args.steps:.1f} ms per step, "
          f"{(span - busy) / 1e3 / args.steps:.1f} ms of it covered by no op event (dispatch "
          f"gaps and asynchronous Eigen dots)")
    for cat, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:22s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    print(f"slowest {args.top} ops (ms per meta-step):")
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {ms:8.2f}  {categories[name]:14s} {name}")


if __name__ == "__main__":
    main()
