"""Training-step speed of the embedding learners (ProtoNet, MatchingNet, Baseline++) on Omniglot Conv4.

These share one set of weights across all tasks (nothing is adapted per task), so the
best convolution path can differ from MAML's (``benchmarks/maml_step.py``). Prints, per
learner and ``conv_impl``, episodes/s and images/s (median over timed rounds after
compiling) and the compile time, on random uint8 episodes of the given shape.

Usage:
  python benchmarks/metric_step.py [--ways 60] [--shots 1] [--query 5] [--impls lax,patches,fused]
      [--learners protonet,matchingnet,baselinepp] [--rounds 5] [--round-seconds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax as mj
from metajax.data import normalize_images
from metajax.models.conv4 import init_omniglot_conv4


def random_batch(key, ways: int, shots: int, query: int, num_classes: int = 0) -> mj.TaskBatch:
    k1, k2 = jax.random.split(key)
    images = lambda k, n: jax.random.randint(k, (1, n, 28, 28, 1), 0, 256).astype(jnp.uint8)
    labels = lambda n: jnp.repeat(jnp.arange(ways), n)[None]
    return mj.TaskBatch(images(k1, ways * shots), labels(shots), images(k2, ways * query),
                        labels(query))


def build(learner: str, impl: str, num_classes: int):
    conv4, body = init_omniglot_conv4(jax.random.key(0), ways=None, conv_impl=impl)
    embed = lambda p, x: conv4(p, normalize_images(x))
    if learner == "protonet":
        algo = mj.ProtoNet(embed)
        return algo, algo.init(body)
    if learner == "matchingnet":
        algo = mj.MatchingNet(embed, scale=10.0)
        return algo, algo.init(body)
    algo = mj.ClassifierBaseline(embed, num_classes=num_classes, classifier="cosine")
    return algo, algo.init(body, feature_dim=64, key=jax.random.key(1))


def time_step(learner: str, impl: str, args) -> dict:
    algo, meta = build(learner, impl, num_classes=4112)
    optimizer = optax.adam(1e-3)
    state = mj.create_train_state(meta, optimizer, jax.random.key(0))
    step = mj.make_train_step(algo.meta_loss, optimizer)
    batch = random_batch(jax.random.key(1), args.ways, args.shots, args.query)
    start = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, batch))
    compile_s = time.perf_counter() - start
    rounds = []
    for _ in range(args.rounds):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < args.round_seconds:
            state, metrics = step(state, batch)
            n += 1
        jax.block_until_ready(metrics)
        rounds.append(n / (time.perf_counter() - start))
    eps = statistics.median(rounds)
    images = args.ways * (args.shots + args.query)
    return {"learner": learner, "conv_impl": impl, "episodes_per_s": eps,
            "images_per_s": eps * images, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, default=60)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=5)
    parser.add_argument("--impls", default="lax,patches,fused")
    parser.add_argument("--learners", default="protonet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=2.0)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, {args.ways}-way {args.shots}-shot {args.query}-query "
          f"episodes ({args.ways * (args.shots + args.query)} images)")
    for learner in args.learners.split(","):
        for impl in args.impls.split(","):
            r = time_step(learner, impl, args)
            print(f"{learner:12s} {impl:8s} {r['episodes_per_s']:7.2f} episodes/s "
                  f"{r['images_per_s']:8.0f} images/s  compile {r['compile_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
