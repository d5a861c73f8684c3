"""Meta-gradient memory as the number of inner steps grows (XLA's compiled memory analysis).

Two tables:

* **MAML with and without rematerialisation** on the Omniglot Conv4, 5-way 1-shot
  15-query, meta-batch 8, for 1, 5, 10 and 20 inner steps: ``InnerLoop(remat=...)``
  ``"none"`` (every intermediate kept), ``"dots"`` (matmul outputs kept, the CPU default
  for several second-order steps) and ``"full"`` (nothing kept).
* **iMAML vs. unrolled MAML** on the same network for 5 to 50 inner steps: iMAML does
  not differentiate through the inner loop, so its memory should stay flat.

Figures are the peak temporary buffer size XLA plans for one jitted meta-gradient
(``compiled.memory_analysis().temp_size_in_bytes``) plus arguments and outputs: the
memory the step needs, independent of allocator noise and of other processes. Only
compilation runs (no training), so the script takes about a minute per table on CPU.

  python benchmarks/memory.py                 # both tables
  python benchmarks/memory.py --json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import metajax as mj
from metajax.models.conv4 import init_omniglot_conv4


def _batch(meta_batch: int, ways: int = 5, shots: int = 1, query: int = 15) -> mj.TaskBatch:
    keys = jax.random.split(jax.random.key(0), 2)
    labels = lambda n: jnp.tile(jnp.repeat(jnp.arange(ways), n), (meta_batch, 1))
    return mj.TaskBatch(jax.random.uniform(keys[0], (meta_batch, ways * shots, 28, 28, 1)), labels(shots),
                        jax.random.uniform(keys[1], (meta_batch, ways * query, 28, 28, 1)), labels(query))


def planned_megabytes(algorithm, meta_params, batch) -> float:
    grad = jax.jit(jax.grad(lambda p: algorithm.meta_loss(p, batch)[0]))
    analysis = grad.lower(meta_params).compile().memory_analysis()
    total = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
             + analysis.output_size_in_bytes)
    return total / 2 ** 20


def remat_table(steps_list, meta_batch: int) -> list[dict]:
    apply_fn, params = init_omniglot_conv4(jax.random.key(0), ways=5)
    batch = _batch(meta_batch)
    rows = []
    for steps in steps_list:
        row = {"table": "maml_remat", "inner_steps": steps, "meta_batch": meta_batch}
        for remat, key in (("none", "plain_mb"), ("dots", "dots_mb"), ("full", "remat_mb")):
            maml = mj.MAML(apply_fn, mj.cross_entropy,
                           inner=mj.InnerLoop(steps=steps, learning_rate=0.4, remat=remat))
            row[key] = planned_megabytes(maml, maml.init(params), batch)
        rows.append(row)
    return rows


def imaml_table(steps_list, meta_batch: int) -> list[dict]:
    apply_fn, params = init_omniglot_conv4(jax.random.key(0), ways=5)
    batch = _batch(meta_batch)
    rows = []
    for steps in steps_list:
        inner = mj.InnerLoop(steps=steps, learning_rate=0.1, remat="none")
        imaml = mj.IMAML(apply_fn, mj.cross_entropy, inner=inner, lam=1.0, cg_steps=5)
        maml = mj.MAML(apply_fn, mj.cross_entropy, inner=inner)
        rows.append({"table": "imaml", "inner_steps": steps, "meta_batch": meta_batch,
                     "imaml_mb": planned_megabytes(imaml, imaml.init(params), batch),
                     "maml_unrolled_mb": planned_megabytes(maml, maml.init(params), batch)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--meta-batch", type=int, default=8)
    args = parser.parse_args()
    remat = remat_table((1, 5, 10, 20), args.meta_batch)
    imaml = imaml_table((5, 10, 25, 50), args.meta_batch)
    if args.json:
        for row in remat + imaml:
            print(json.dumps(row))
        return
    print(f"Planned memory of one meta-gradient, MiB (Conv4 5-way 1-shot 15-query, "
          f"meta-batch {args.meta_batch}, {jax.default_backend()}):")
    print(f"{'inner steps':>11} | {'MAML':>8} | {'remat dots':>10} | {'remat full':>10}")
    for r in remat:
        print(f"{r['inner_steps']:>11} | {r['plain_mb']:>8.1f} | {r['dots_mb']:>10.1f} | "
              f"{r['remat_mb']:>10.1f}")
    print(f"\n{'inner steps':>11} | {'iMAML':>8} | {'MAML (unrolled)':>15}")
    for r in imaml:
        print(f"{r['inner_steps']:>11} | {r['imaml_mb']:>8.1f} | {r['maml_unrolled_mb']:>15.1f}")


if __name__ == "__main__":
    main()
