"""Omniglot load times and on-device episode sampling throughput.

Measures
  * cold load: decode both Omniglot zips into a fresh cache (``load_omniglot``);
  * cached load: the same call again, reading the ``.npz`` cache;
  * sampler tasks/s for meta-batches of 5-way 1-shot 15-query and 20-way
    5-shot 15-query tasks (meta-batch 32) drawn from the 964 background
    characters x 4 rotations (3856 classes, the workload of learn2learn's
    anchor in ``../shared/bench/README.md``), rotations applied on device.

Output modes (``MODES``): ``float32`` (the default, normalised inputs), ``uint8``
(raw pixels; the model applies ``normalize_images`` inside its jitted step),
``uint8`` with rotations applied on the fly instead of stored rotated on the
device, ``uint8`` with ``auto_layout=True`` (XLA picks the output layout, which
saves XLA's CPU backend a copy of every meta-batch), and ``uint8`` with
``sample_many(key, 4)`` (4 meta-batches per call), also with ``auto_layout``.
Each figure is the median over rounds of back-to-back calls (async dispatch, one
``block_until_ready`` per round, i.e. every meta-batch of 32 tasks fully
written to device memory), after compiling; the modes' rounds are interleaved.
The reference numbers are learn2learn 0.2.0 ``TaskDataset`` meta-batches of 32
on this 2-core machine (``Episode sampling anchor`` in ../shared/bench/README.md).

Usage:
  python benchmarks/sampler.py [--data-dir ../shared/data] [--cache-dir DIR] [--skip-load]
      [--rounds 7] [--round-seconds 1] [--modes float32,uint8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax

from metajax.data import EpisodeSampler, load_omniglot, omniglot_split

L2L_TASKS_PER_S = {"5w1s15q": 1550.0, "20w5s15q": 240.0}  # meta-batch of 32, README anchor
CONFIGS = {"5w1s15q": (5, 1, 15), "20w5s15q": (20, 5, 15)}


def time_loads(data_dir: Path) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="metajax-bench-cache-") as cache:
        start = time.perf_counter()
        load_omniglot(data_dir, cache_dir=cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        load_omniglot(data_dir, cache_dir=cache)
        cached = time.perf_counter() - start
    return cold, cached


MODES = {  # name -> (EpisodeSampler kwargs, meta-batches per call)
    "float32": ({}, 1),
    "uint8": ({"output_dtype": "uint8"}, 1),
    "uint8 rotate-on-the-fly": ({"output_dtype": "uint8", "materialize_rotations": False}, 1),
    "uint8 auto_layout": ({"output_dtype": "uint8", "auto_layout": True}, 1),
    "uint8 sample_many(4)": ({"output_dtype": "uint8"}, 4),
    "uint8 auto_layout sample_many(4)": ({"output_dtype": "uint8", "auto_layout": True}, 4),
}


def _call(sampler: EpisodeSampler, per_call: int):
    if per_call == 1:
        return sampler
    return lambda key: sampler.sample_many(key, per_call)


def time_samplers(samplers: dict, rounds: int, round_seconds: float) -> dict:
    """Interleaved rounds (mode A, B, C, A, B, C, ...) so load changes hit every mode alike."""
    key = jax.random.key(0)
    out = {}
    for name, (sampler, per_call) in samplers.items():
        fn = _call(sampler, per_call)
        start = time.perf_counter()
        jax.block_until_ready(fn(key))
        compile_s = time.perf_counter() - start
        start, calls = time.perf_counter(), 0  # calls per round, from a short calibration
        while time.perf_counter() - start < 0.2:
            jax.block_until_ready(fn(jax.random.fold_in(key, calls)))
            calls += 1
        per_round = max(1, int(calls / (time.perf_counter() - start) * round_seconds))
        out[name] = {"fn": fn, "per_round": per_round, "compile_s": compile_s, "wall": [],
                     "cpu": [], "tasks_per_call": per_call * sampler.spec.meta_batch_size}
    for r in range(rounds):
        for name, res in out.items():
            keys = [jax.random.fold_in(key, 1_000_000 * (r + 1) + i) for i in range(res["per_round"])]
            jax.block_until_ready(keys)
            start, cpu = time.perf_counter(), time.process_time()
            for k in keys:
                batch = res["fn"](k)
            jax.block_until_ready(batch)
            tasks = res["per_round"] * res["tasks_per_call"]
            res["wall"].append(tasks / (time.perf_counter() - start))
            res["cpu"].append(tasks / (time.process_time() - cpu))
    for res in out.values():
        res["tasks_per_s"] = statistics.median(res["wall"])
        res["cpu_tasks_per_s"] = statistics.median(res["cpu"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_root = os.environ.get("METAJAX_DATA") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--data-dir", default=default_root)
    parser.add_argument("--cache-dir", default=None,
                        help="omniglot cache to reuse (default: a fresh temporary one)")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {list(MODES)}")
    parser.add_argument("--skip-load", action="store_true", help="skip the cold/cached timing")
    args = parser.parse_args()

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print(f"load average before: {os.getloadavg()} (other processes skew timings; "
          f"{os.cpu_count()} CPUs)")
    if not args.skip_load:
        cold, cached = time_loads(Path(args.data_dir))
        print(f"omniglot full (1623 classes x 20, 28x28): cold load {cold:.1f} s, "
              f"cached load {cached:.2f} s")

    with tempfile.TemporaryDirectory(prefix="metajax-bench-cache-") as cache:
        full = load_omniglot(args.data_dir, cache_dir=args.cache_dir or cache)
    train = omniglot_split(full, "lake", "train", rotations=True)
    print(f"sampling from {train.num_classes} classes (964 background x 4 rotations, on device)")
    print("tasks/s = median over interleaved rounds of wall-clock rate; cpu = the same from this "
          "process's CPU time (less sensitive to other processes' load); ratios vs learn2learn use "
          "wall-clock")
    modes = [m.strip() for m in args.modes.split(",")]
    for name, (n, k, q) in CONFIGS.items():
        samplers = {m: (EpisodeSampler(train, n, k, q, args.meta_batch, **MODES[m][0]), MODES[m][1])
                    for m in modes}
        results = time_samplers(samplers, args.rounds, args.round_seconds)
        ref = L2L_TASKS_PER_S[name]
        print(f"{name}, meta-batch {args.meta_batch} (learn2learn {ref:,.0f} tasks/s, "
              f"50x = {50 * ref:,.0f}); load average {os.getloadavg()[0]:.2f}")
        for mode, res in results.items():
            rate = res["tasks_per_s"]
            print(f"  {mode:26s} {rate:9,.0f} tasks/s = {rate / ref:5.1f}x learn2learn "
                  f"({1e3 * args.meta_batch / rate:.3f} ms/meta-batch; rounds "
                  f"{min(res['wall']):,.0f}-{max(res['wall']):,.0f}; cpu {res['cpu_tasks_per_s']:,.0f}"
                  f" tasks/s = {res['cpu_tasks_per_s'] / ref:.1f}x; compile {res['compile_s']:.1f} s)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
