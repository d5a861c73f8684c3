"""Conv4 backbones and the fast convolution paths: shapes, parameter counts, and that every
path gives the same (second-order) MAML meta-gradient, which also matches finite differences."""

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import metajax as mj
from metajax.models.conv4 import (Conv4, init_conv4, init_miniimagenet_conv4,
                                  init_omniglot_conv4, with_conv_impl)
from metajax.models.layers import (batch_norm, conv2d, conv_bn_relu, extract_patches,
                                   resolve_conv_impl)


def _count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def _batch(key, tasks, ways, shots, query, size, channels=1, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return mj.TaskBatch(
        support_inputs=jax.random.uniform(k1, (tasks, ways * shots, size, size, channels), dtype),
        support_targets=jnp.tile(jnp.arange(ways), (tasks, shots)),
        query_inputs=jax.random.uniform(k2, (tasks, ways * query, size, size, channels), dtype),
        query_targets=jnp.tile(jnp.arange(ways), (tasks, query)))


def _max_abs(tree):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(tree))


def _max_diff(a, b):
    return _max_abs(jax.tree_util.tree_map(lambda x, y: x - y, a, b))


def test_omniglot_conv4_param_count_and_shapes():
    apply_fn, params = init_omniglot_conv4(jax.random.key(0), ways=5)
    assert _count(params) == 112_261  # learn2learn OmniglotCNN, ../shared/bench/README.md
    assert params["conv0_kernel"].shape == (3, 3, 1, 64)
    assert params["conv3_kernel"].shape == (3, 3, 64, 64)
    assert params["head_kernel"].shape == (64, 5)
    assert jax.eval_shape(apply_fn, params, jnp.zeros((7, 28, 28, 1))).shape == (7, 5)
    assert jax.eval_shape(apply_fn, params, jnp.zeros((7, 28, 28))).shape == (7, 5)  # adds C
    _, params20 = init_omniglot_conv4(jax.random.key(0), ways=20)
    assert _count(params20) == 112_261 + 15 * 65


def test_omniglot_conv4_init_distribution():
    _, params = init_omniglot_conv4(jax.random.key(0), ways=5)
    bound = np.sqrt(6.0 / (9 * 64 + 9 * 64))  # xavier-uniform on 3x3x64x64
    k = params["conv1_kernel"]
    assert float(jnp.max(jnp.abs(k))) <= bound and float(jnp.std(k)) > 0.8 * bound / np.sqrt(3)
    assert float(jnp.min(params["bn0_scale"])) >= 0 and float(jnp.max(params["bn0_scale"])) <= 1
    assert float(jnp.max(jnp.abs(params["bn0_bias"]))) == 0
    assert float(jnp.max(jnp.abs(params["conv0_bias"]))) == 0
    assert 0.7 < float(jnp.std(params["head_kernel"])) < 1.3


def test_conv4_pool_flatten_keeps_the_spatial_layout():
    mean_fn, params = init_omniglot_conv4(jax.random.key(0), ways=None)
    flat_fn, flat_params = init_omniglot_conv4(jax.random.key(0), ways=None, pool="flatten")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, flat_params)  # same weights
    x = jax.random.uniform(jax.random.key(1), (6, 28, 28, 1))
    mean, flat = mean_fn(params, x), flat_fn(params, x)
    assert flat.shape == (6, 256)  # 2 x 2 x 64, channels minor
    np.testing.assert_allclose(flat.reshape(6, 4, 64).mean(axis=1), mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pool must be one of"):
        init_omniglot_conv4(jax.random.key(0), ways=None, pool="max")


def test_miniimagenet_conv4_shapes():
    apply_fn, params = init_miniimagenet_conv4(jax.random.key(0), ways=5)
    assert _count(params) == 32_901  # learn2learn MiniImagenetCNN(5): 4x32 filters, 800 -> 5
    assert jax.eval_shape(apply_fn, params, jnp.zeros((3, 84, 84, 3))).shape == (3, 5)


def test_resolve_conv_impl():
    assert resolve_conv_impl("auto", "cpu") == "fused"
    assert resolve_conv_impl("auto", "gpu") == "lax"
    assert resolve_conv_impl("auto", "tpu") == "lax"
    assert resolve_conv_impl("patches", "gpu") == "patches"
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("winograd")


@pytest.mark.parametrize("size,stride", [(28, 2), (7, 2), (4, 2), (9, 1)])
def test_conv_paths_agree_forward_and_backward(size, stride):
    kx, kw, kb, ks, kt, kg = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(kx, (6, size, size, 5))
    w = jax.random.normal(kw, (3, 3, 5, 8)) / 4
    b, scale, shift = (jax.random.normal(k, (8,)) for k in (kb, ks, kt))
    conv = jax.jit(conv2d, static_argnames=("stride", "padding", "impl"))
    ref = conv(x, w, b, stride=stride, padding=1, impl="lax")
    np.testing.assert_allclose(conv(x, w, b, stride=stride, padding=1, impl="patches"), ref,
                               atol=1e-4)
    assert extract_patches(x, 3, 3, stride, 1).shape[-1] == 45
    outs = {}
    for impl in ("lax", "patches", "fused"):
        @jax.jit
        def fwd_bwd(*args):
            fn = lambda *a: conv_bn_relu(*a, stride=stride, padding=1, impl=impl)
            y, vjp = jax.vjp(fn, *args)
            return y, vjp(jax.random.normal(kg, y.shape))
        outs[impl] = fwd_bwd(x, w, b, scale, shift)
    for impl in ("patches", "fused"):
        np.testing.assert_allclose(outs[impl][0], outs["lax"][0], atol=1e-4)
        for got, want in zip(outs[impl][1], outs["lax"][1]):
            np.testing.assert_allclose(got, want, atol=2e-4 * (1 + float(jnp.max(jnp.abs(want)))))


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (3, 7, 7, 4), (2, 5, 6, 3)])
def test_sub_pixel_col2im_is_the_transpose_of_im2col(shape):
    """The fused block's transpose of 3x3/2 im2col equals the autodiff transpose (odd sizes too)."""
    from metajax.models.layers import _col2im_3x3_stride2, _patches_3x3_stride2
    x = jax.random.normal(jax.random.key(0), shape)
    patches, autodiff_vjp = jax.vjp(lambda x: extract_patches(x, 3, 3, 2, 1), x)
    cotangent = jax.random.normal(jax.random.key(1), patches.shape)
    want = autodiff_vjp(cotangent)[0]
    np.testing.assert_allclose(_col2im_3x3_stride2(cotangent, shape), want, atol=1e-5)
    same, custom_vjp = jax.vjp(_patches_3x3_stride2, x)
    np.testing.assert_array_equal(same, patches)
    np.testing.assert_allclose(custom_vjp(cotangent)[0], want, atol=1e-5)


def test_batch_norm_uses_batch_statistics():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 5 + 3
    y = jax.jit(batch_norm)(x)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1, atol=1e-3)


def _meta_grad(apply_fn, params, batch, impl, task_map="vmap", steps=2, first_order=False):
    maml = mj.MAML(with_conv_impl(apply_fn, impl), mj.cross_entropy,
                   inner=mj.InnerLoop(steps, 0.4, first_order=first_order), task_map=task_map)
    return jax.jit(jax.grad(lambda p: maml.meta_loss(p, batch)[0]))(maml.init(params))


def _lax_vmap_reference():
    apply_fn, params = init_omniglot_conv4(jax.random.key(0), ways=5, hidden=16)
    batch = _batch(jax.random.key(1), tasks=3, ways=5, shots=1, query=2, size=28)
    ref = _meta_grad(apply_fn, params, batch, "lax")
    return apply_fn, params, batch, ref, _max_abs(ref)


def test_fast_path_meta_gradient_matches_lax_vmap():
    """Second-order Conv4 meta-gradient: the CPU default (fused convs, accumulated task map)
    vs plain lax.conv under vmap."""
    apply_fn, params, batch, ref, scale = _lax_vmap_reference()
    got = _meta_grad(apply_fn, params, batch, "fused", "accumulate")
    assert _max_diff(got, ref) <= 1e-3 * scale, (_max_diff(got, ref), scale)
    # The comparison is meaningful: first order differs by far more than the tolerance.
    fo = _meta_grad(apply_fn, params, batch, "fused", "accumulate", first_order=True)
    assert _max_diff(fo, ref) > 1e-2 * scale


@pytest.mark.slow  # ~20-40 s on 2 cores; the default-path test above runs in the default suite
def test_other_paths_meta_gradient_matches_lax_vmap():
    """The same check for the fused and patches convs under plain vmap."""
    apply_fn, params, batch, ref, scale = _lax_vmap_reference()
    for impl, task_map in (("fused", "vmap"), ("patches", "vmap")):
        got = _meta_grad(apply_fn, params, batch, impl, task_map)
        assert _max_diff(got, ref) <= 1e-3 * scale, (impl, task_map, _max_diff(got, ref), scale)


def test_low_memory_compile_gives_the_same_conv4_meta_step():
    """mj.low_memory_compile_options() (XLA:CPU's older fusion emitters) on the fused Conv4
    with batch norm: the same second-order meta-step to float32 rounding."""
    import optax
    apply_fn, params = init_conv4(Conv4(ways=3, hidden=8), jax.random.key(8), (12, 12, 1))
    batch = _batch(jax.random.key(9), tasks=2, ways=3, shots=1, query=2, size=12)
    maml = mj.MAML(apply_fn, mj.cross_entropy, inner=mj.InnerLoop(2, 0.4))
    optimizer = optax.sgd(1.0)  # the update is the meta-gradient itself
    state = mj.create_train_state(maml.init(params), optimizer, jax.random.key(10))

    def step(options):
        return mj.make_train_step(maml.meta_loss, optimizer, donate=False,
                                  compiler_options=options)(state, batch)[0].params

    want = step(None)
    got = step(mj.low_memory_compile_options())
    change = jax.tree_util.tree_map(lambda w, p: w - p, want, state.params)
    assert _max_diff(got, want) <= 1e-4 * _max_abs(change), (_max_diff(got, want), _max_abs(change))


def test_resolve_remat_and_bad_values():
    assert mj.core.resolve_remat(True, steps=2, first_order=False) == "full"
    assert mj.core.resolve_remat(False, steps=2, first_order=False) == "none"
    assert mj.core.resolve_remat("auto", steps=2, first_order=False, backend="cpu") == "dots"
    assert mj.core.resolve_remat("auto", steps=1, first_order=False, backend="cpu") == "none"
    assert mj.core.resolve_remat("auto", steps=2, first_order=False, backend="gpu") == "none"
    assert mj.core.resolve_remat("auto", steps=2, first_order=True, backend="cpu") == "none"
    with pytest.raises(ValueError, match="remat must be one of"):
        mj.InnerLoop(2, 0.4, remat="dot")
    with pytest.raises(ValueError, match="remat must be one of"):
        mj.InnerLoop(2, 0.4, remat=1)


def test_dots_policy_recomputes_transposed_weight_products_and_keeps_named_values(capsys):
    """remat="dots" keeps plain products and values named REMAT_SAVE_NAME, and recomputes
    ``a @ b.T`` products (the input gradients; in a conv the big patch cotangent)."""
    from jax import lax
    from jax.ad_checkpoint import checkpoint_name, print_saved_residuals

    def f(w, v, x):
        h = jnp.tanh(x @ w)                                        # (4, 7): kept
        nt = lax.dot_general(h, v, (((1,), (1,)), ((), ())))       # (4, 5): recomputed
        named = checkpoint_name(jnp.sin(nt).sum(0), mj.core.REMAT_SAVE_NAME)  # (5,): kept
        return jnp.sum(jnp.cos(named)) + jnp.sum(jnp.sin(nt))

    args = (jnp.ones((3, 7)) * 0.1, jnp.ones((5, 7)) * 0.2, jnp.ones((4, 3)))
    print_saved_residuals(jax.checkpoint(f, policy=mj.core.dots_policy), *args)
    saved = capsys.readouterr().out
    assert "f32[4,7] output of dot_general" in saved
    assert f"f32[5] named '{mj.core.REMAT_SAVE_NAME}'" in saved
    assert "f32[4,5]" not in saved, saved
    # The same gradient as without rematerialisation.
    chex.assert_trees_all_close(jax.grad(jax.checkpoint(f, policy=mj.core.dots_policy))(*args),
                                jax.grad(f)(*args), rtol=1e-6)


def test_dots_policy_recomputes_short_contractions_with_large_outputs():
    """Products with at most SHORT_CONTRACTION multiply-adds per output and at least
    LARGE_OUTPUT outputs (the first Conv4 layer on 20 support images) are recomputed."""
    from jax import lax
    from metajax.core import remat
    policy = mj.core.dots_policy
    dims = (((1,), (0,)), ((), ()))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    rows = remat.LARGE_OUTPUT // 64
    assert not policy(lax.dot_general_p, f32(rows, 9), f32(9, 64), dimension_numbers=dims)
    assert policy(lax.dot_general_p, f32(rows // 4, 9), f32(9, 64), dimension_numbers=dims)
    assert policy(lax.dot_general_p, f32(rows, 17), f32(17, 64), dimension_numbers=dims)
    batched = (((2,), (1,)), ((0,), (0,)))  # a batch axis counts towards the output size
    assert not policy(lax.dot_general_p, f32(4, rows // 4, 9), f32(4, 9, 64),
                      dimension_numbers=batched)


def test_resolve_unroll_and_bad_values():
    resolve = mj.core.resolve_unroll
    assert resolve(True, steps=3) == 3 and resolve(False, steps=3) == 1
    assert resolve(2, steps=3) == 2 and mj.InnerLoop(2, 0.4).unroll == 1
    for bad in ("auto", 0, -1, 1.5):
        with pytest.raises(ValueError, match="InnerLoop.unroll must be"):
            mj.InnerLoop(2, 0.4, unroll=bad)


@pytest.mark.slow  # ~1 min on 2 cores; the float64 finite-difference test below runs "auto",
# i.e. "dots", on the same fused network in the default suite
def test_remat_modes_give_the_same_meta_gradient():
    """Keeping only the matmul outputs ("dots") recomputes, never changes, the fused Conv4
    meta-gradient ("full" is checked on an MLP in test_core)."""
    apply_fn, params = init_conv4(Conv4(ways=3, hidden=4), jax.random.key(6), (10, 10, 1))
    batch = _batch(jax.random.key(7), tasks=2, ways=3, shots=1, query=2, size=10)

    def meta_grad(remat):
        maml = mj.MAML(apply_fn, mj.cross_entropy, task_map="accumulate",
                       inner=mj.InnerLoop(2, 0.4, remat=remat))
        return jax.jit(jax.grad(lambda p: maml.meta_loss(p, batch)[0]))(maml.init(params))

    ref = meta_grad("none")
    assert _max_diff(meta_grad("dots"), ref) <= 1e-5 * _max_abs(ref)


@pytest.mark.slow  # ~1 min on 2 cores; the Omniglot Conv4 test covers the same conv paths
def test_maxpool_conv4_meta_gradient_paths_agree():
    apply_fn, params = init_conv4(Conv4(ways=3, hidden=8, max_pool=True), jax.random.key(2),
                                  (16, 16, 3))
    batch = _batch(jax.random.key(3), tasks=2, ways=3, shots=1, query=2, size=16, channels=3)
    ref = _meta_grad(apply_fn, params, batch, "lax", steps=1)
    got = _meta_grad(apply_fn, params, batch, "fused", steps=1)
    assert _max_diff(got, ref) <= 1e-3 * _max_abs(ref)


@pytest.mark.parametrize("impl", ["fused", pytest.param("patches", marks=pytest.mark.slow)])
def test_second_order_meta_gradient_matches_finite_differences_float64(impl):
    """The second-order meta-gradient through batch norm (per-task batch statistics) equals
    central finite differences in float64 (torch.func gets this wrong: ../shared/bench)."""
    with jax.enable_x64(True):
        apply_fn, params = init_conv4(Conv4(ways=3, hidden=4, conv_impl=impl),
                                      jax.random.key(4), (10, 10, 1))
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        # nonzero BN shifts and conv biases so every parameter matters
        params = jax.tree_util.tree_map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape, p.dtype), params)
        batch = _batch(jax.random.key(5), tasks=2, ways=3, shots=2, query=2, size=10,
                       dtype=jnp.float64)
        maml = mj.MAML(apply_fn, mj.cross_entropy, inner=mj.InnerLoop(2, 0.4))
        loss = jax.jit(lambda p: maml.meta_loss({"model": p}, batch)[0])
        grad = jax.jit(jax.grad(lambda p: maml.meta_loss({"model": p}, batch)[0]))(params)
        flat_g, unravel = jax.flatten_util.ravel_pytree(grad)
        flat_p, _ = jax.flatten_util.ravel_pytree(params)
        assert flat_g.dtype == jnp.float64
        eps = 1e-6
        for i in range(8):  # directional derivatives along random unit vectors
            v = jax.random.normal(jax.random.key(100 + i), flat_p.shape, jnp.float64)
            v = v / jnp.linalg.norm(v)
            fd = (loss(unravel(flat_p + eps * v)) - loss(unravel(flat_p - eps * v))) / (2 * eps)
            np.testing.assert_allclose(float(flat_g @ v), float(fd), rtol=1e-6, atol=1e-8)
        # the conv bias before batch norm has exactly zero effect
        assert _max_abs({k: v for k, v in grad.items() if k.endswith("conv0_bias")}) < 1e-10
        # FOMAML differs from the second-order gradient here (so the check has teeth)
        fo = mj.MAML(apply_fn, mj.cross_entropy, inner=mj.InnerLoop(2, 0.4, first_order=True))
        g_fo = jax.jit(jax.grad(lambda p: fo.meta_loss({"model": p}, batch)[0]))(params)
        assert _max_diff(g_fo, grad) > 1e-4


def test_covariance_form_of_the_fused_block_equals_the_direct_form_to_second_order():
    """Blocks with few patch features (the single-channel first layer) take their batch
    statistics from the patch covariance (layers._gram_fwd); values, all four cotangents
    (the input's too, used here by a 1x1 block in the middle of the network) and the
    second-order MAML meta-gradient equal the direct form in float64."""
    from metajax.models import layers
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(7), 8)
        params = {"k1": 0.3 * jax.random.normal(keys[0], (3, 3, 1, 40), jnp.float64),
                  "k2": 0.2 * jax.random.normal(keys[1], (1, 1, 40, 160), jnp.float64),
                  "s1": jax.random.uniform(keys[2], (40,), jnp.float64) + 0.5,
                  "t1": 0.1 * jax.random.normal(keys[3], (40,), jnp.float64),
                  "s2": jnp.ones(160, jnp.float64), "t2": jnp.zeros(160, jnp.float64)}
        assert layers._gram_bn_on(params["k1"]) and layers._gram_bn_on(params["k2"])
        assert not layers._gram_bn_on(jnp.zeros((3, 3, 64, 64)))
        support = jax.random.normal(keys[4], (4, 9, 9, 1), jnp.float64)
        query = jax.random.normal(keys[5], (6, 9, 9, 1), jnp.float64)

        def features(p, x):
            h = conv_bn_relu(x, p["k1"], jnp.zeros(40, jnp.float64), p["s1"], p["t1"],
                             stride=2, padding=1, impl="fused")
            h = conv_bn_relu(h, p["k2"], jnp.zeros(160, jnp.float64), p["s2"], p["t2"],
                             impl="fused")
            return jnp.mean(jnp.sin(h))

        def meta_loss(p):
            adapted = jax.tree.map(lambda w, g: w - 0.5 * g, p, jax.grad(features)(p, support))
            return features(adapted, query)

        def block_vjp(x, k, s, t):
            fn = lambda *a: conv_bn_relu(a[0], a[1], jnp.zeros(40, jnp.float64), a[2], a[3],
                                         stride=2, padding=1, impl="fused")
            y, vjp = jax.vjp(fn, x, k, s, t)
            return y, vjp(jnp.cos(y))

        block_args = (support, params["k1"], params["s1"], params["t1"])
        results = {}
        for gram in (True, False):
            layers.FUSED_OPTIONS["gram_bn"] = gram
            try:
                results[gram] = (jax.jit(block_vjp)(*block_args),
                                 jax.jit(jax.grad(meta_loss))(params))
            finally:
                layers.FUSED_OPTIONS["gram_bn"] = True
        chex.assert_trees_all_close(results[True], results[False], rtol=1e-9, atol=1e-12)
        assert _max_abs(results[True][0][1][0]) > 1e-3  # the input cotangent is not trivially 0
