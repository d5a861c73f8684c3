"""The GEMM-floor benchmark's reading of optimised HLO (``benchmarks/gemm_floor.py``)."""

import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gemm_floor  # noqa: E402


def test_dot_specs_finds_every_product_with_its_shapes_and_flops():
    def f(a, b, c, d):
        nn = a @ b                                                    # (96, 40) @ (40, 24)
        tn = lax.dot_general(a, d, (((0,), (0,)), ((), ())))          # a^T d: (40, 16)
        batched = jnp.einsum("bij,bjk->bik", c, c)                    # 3 x (8, 8) @ (8, 8)
        return jnp.tanh(nn).sum() + tn.sum() + batched.sum()

    args = (jnp.ones((96, 40)), jnp.ones((40, 24)), jnp.ones((3, 8, 8)), jnp.ones((96, 16)))
    hlo = jax.jit(f).lower(*args).compile().as_text()
    specs = gemm_floor.dot_specs(hlo)
    flops = sorted(gemm_floor.spec_flops(s) for s in set(specs.values()))
    assert flops == sorted([2.0 * 96 * 40 * 24, 2.0 * 40 * 96 * 16, 2.0 * 3 * 8 * 8 * 8]), specs
    by_flops = {gemm_floor.spec_flops(s): s for s in specs.values()}
    tn = by_flops[2.0 * 40 * 96 * 16]
    assert tn[1] == (96, 40) and tn[3] == (96, 16) and tn[5] == (0,) and tn[6] == (0,)
    batched = by_flops[2.0 * 3 * 8 * 8 * 8]
    assert batched[7] == (0,) and batched[8] == (0,)
    # The ops the profiler names are the entry computation's: a fusion that wraps a product
    # must carry its spec, or its executions would not be counted.
    entry = hlo[hlo.index("ENTRY"):]
    assert len([name for name in specs if f"%{name} = " in entry]) == 3, specs


def test_time_spec_measures_a_product_in_plausible_time():
    spec = ("f32", (64, 32), (1, 0), (32, 16), (1, 0), (1,), (0,), (), ())
    seconds = gemm_floor.time_spec(spec, gemm_floor.dispatch_s(trials=20), trials=5)
    assert 0.0 < seconds < 0.05
