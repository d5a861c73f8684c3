"""Omniglot load times and on-device episode sampling throughput.

Measures
  * cold load: decode both Omniglot zips into a fresh cache (``load_omniglot``);
  * cached load: the same call again, reading the ``.npz`` cache;
  * sampler tasks/s for meta-batches of 5-way 1-shot 15-query and 20-way
    5-shot 15-query tasks (meta-batch 32) drawn from the 964 background
    characters x 4 rotations (3856 classes, the workload of learn2learn's
    anchor in ``../shared/bench/README.md``), rotations applied on device.

Each sampler figure is the median over rounds of back-to-back ``sampler(key)``
calls (async dispatch, one ``block_until_ready`` per round), after compiling.
The reference numbers are learn2learn 0.2.0 ``TaskDataset`` meta-batches of 32
on this 2-core machine (``Episode sampling anchor`` in ../shared/bench/README.md).

Usage:
  python benchmarks/sampler.py [--data-dir ../shared/data] [--rounds 7] [--round-seconds 1]
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


def time_sampler(sampler: EpisodeSampler, rounds: int, round_seconds: float) -> dict:
    key = jax.random.key(0)
    start = time.perf_counter()
    jax.block_until_ready(sampler(key))
    compile_s = time.perf_counter() - start
    # calls per round, from a short calibration
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        jax.block_until_ready(sampler(jax.random.fold_in(key, calls)))
        calls += 1
    per_round = max(1, int(calls / (time.perf_counter() - start) * round_seconds))
    rates = []
    for r in range(rounds):
        keys = [jax.random.fold_in(key, 1_000_000 * (r + 1) + i) for i in range(per_round)]
        jax.block_until_ready(keys)
        start = time.perf_counter()
        for k in keys:
            batch = sampler(k)
        jax.block_until_ready(batch)
        rates.append(per_round * sampler.spec.meta_batch_size / (time.perf_counter() - start))
    return {"compile_s": compile_s, "tasks_per_s": statistics.median(rates),
            "min": min(rates), "max": max(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_root = os.environ.get("METAJAX_DATA") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--data-dir", default=default_root)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--skip-load", action="store_true", help="skip the cold/cached timing")
    args = parser.parse_args()

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes skew timings)")
    if not args.skip_load:
        cold, cached = time_loads(Path(args.data_dir))
        print(f"omniglot full (1623 classes x 20, 28x28): cold load {cold:.1f} s, "
              f"cached load {cached:.2f} s")

    with tempfile.TemporaryDirectory(prefix="metajax-bench-cache-") as cache:
        full = load_omniglot(args.data_dir, cache_dir=cache)
    train = omniglot_split(full, "lake", "train", rotations=True)
    print(f"sampling from {train.num_classes} classes (964 background x 4 rotations, on device)")
    for name, (n, k, q) in CONFIGS.items():
        sampler = EpisodeSampler(train, n, k, q, args.meta_batch)
        res = time_sampler(sampler, args.rounds, args.round_seconds)
        ref = L2L_TASKS_PER_S[name]
        print(f"{name} meta-batch {args.meta_batch}: {res['tasks_per_s']:,.0f} tasks/s "
              f"(rounds {res['min']:,.0f}-{res['max']:,.0f}; "
              f"{1e3 * args.meta_batch / res['tasks_per_s']:.2f} ms/meta-batch; "
              f"compile {res['compile_s']:.1f} s) = {res['tasks_per_s'] / ref:.1f}x "
              f"learn2learn's {ref:,.0f} tasks/s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
