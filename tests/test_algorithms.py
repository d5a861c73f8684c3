"""The gradient-based family on the one inner loop: MAML++, Meta-SGD, ANIL, Reptile, iMAML."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj


def _mlp_apply(params, x):
    h = jnp.tanh(x @ params["Dense_0"]["w"] + params["Dense_0"]["b"])
    return h @ params["Dense_1"]["w"] + params["Dense_1"]["b"]


def _params(key, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return {"Dense_0": {"w": jax.random.normal(k1, (1, 8), dtype), "b": jnp.zeros((8,), dtype)},
            "Dense_1": {"w": jax.random.normal(k2, (8, 1), dtype) / 3, "b": jnp.zeros((1,), dtype)}}


def _batch(key, dtype=jnp.float32, tasks=3):
    batch = mj.data.sample_sinusoid_tasks(key, tasks, 6, 8)
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), batch)


def _grad(alg, meta_params, batch, **kw):
    return jax.grad(lambda p: alg.meta_loss(p, batch, **kw)[0])(meta_params)


def test_maml_plus_plus_with_constant_lslr_and_no_msl_equals_maml():
    params, batch = _params(jax.random.key(0)), _batch(jax.random.key(1))
    inner = mj.InnerLoop(steps=3, learning_rate=0.05)
    maml = mj.MAML(_mlp_apply, mj.mse, inner=inner)
    mpp = mj.MAMLPlusPlus(_mlp_apply, mj.mse, inner=inner, msl_anneal_steps=None)
    meta = mpp.init(params)
    assert jax.tree_util.tree_leaves(meta["inner_rates"])[0].shape == (3,)
    np.testing.assert_array_equal(mpp.meta_loss(meta, batch, step=7)[0],
                                  maml.meta_loss(maml.init(params), batch)[0])
    g_mpp = _grad(mpp, meta, batch, step=7)["model"]
    g_maml = _grad(maml, maml.init(params), batch)["model"]
    chex.assert_trees_all_close(g_mpp, g_maml, rtol=1e-6, atol=1e-7)


def _bn_mlp_apply(params, x):
    """An MLP with a batch-norm-like affine layer (scale/shift named like Conv4's)."""
    h = x @ params["Dense_0"]["w"] + params["Dense_0"]["b"]
    h = jnp.tanh(h * params["bn0_scale"] + params["bn0_bias"])
    return h @ params["Dense_1"]["w"] + params["Dense_1"]["b"]


def _bn_params(key):
    return {**_params(key), "bn0_scale": jnp.linspace(0.5, 1.5, 8), "bn0_bias": jnp.zeros((8,))}


def test_maml_plus_plus_per_step_bn_weights():
    params, batch = _bn_params(jax.random.key(0)), _batch(jax.random.key(1))
    inner = mj.InnerLoop(steps=2, learning_rate=0.05)
    mpp = mj.MAMLPlusPlus(_bn_mlp_apply, mj.mse, inner=inner, msl_anneal_steps=None,
                          learn_inner_rates=None, per_step_bn=True)
    meta = mpp.init(params)
    assert meta["model"]["bn0_scale"].shape == (2, 8) and meta["model"]["Dense_0"]["w"].shape == (1, 8)
    # Identical copies: exactly MAML with batch norm frozen in the inner loop.
    frozen_bn = mj.mask_by_path(params, lambda path: "bn" not in path[0])
    maml = mj.MAML(_bn_mlp_apply, mj.mse, inner=inner, adapt_mask=frozen_bn)
    np.testing.assert_allclose(mpp.meta_loss(meta, batch)[0], maml.meta_loss({"model": params}, batch)[0],
                               rtol=1e-6)
    g = _grad(mpp, meta, batch)["model"]
    g_maml = _grad(maml, {"model": params}, batch)["model"]
    # Each step's copy gets its own meta-gradient; together they are the shared leaf's.
    chex.assert_trees_all_close(g["bn0_scale"].sum(0), g_maml["bn0_scale"], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g["bn0_scale"][0]).sum()) > 0 and float(jnp.abs(g["bn0_scale"][1]).sum()) > 0
    assert not np.allclose(g["bn0_scale"][0], g["bn0_scale"][1])
    # First order: copy 0 only shapes the support gradient of step 1, which is not differentiated.
    fo = mj.MAMLPlusPlus(_bn_mlp_apply, mj.mse, inner=dataclasses.replace(inner, first_order=True),
                         msl_anneal_steps=None, learn_inner_rates=None, per_step_bn=True)
    np.testing.assert_array_equal(_grad(fo, meta, batch)["model"]["bn0_scale"][0], 0.0)
    # Evaluating with more steps than trained reuses the last copy.
    out = mpp.evaluate(meta, batch, steps=4)
    assert out["loss"].shape == (3, 5) and bool(jnp.all(jnp.isfinite(out["loss"])))
    with pytest.raises(ValueError, match="no parameter path matches"):
        mj.MAMLPlusPlus(_mlp_apply, mj.mse, inner=inner, per_step_bn=True).init(_params(jax.random.key(0)))


def test_multi_step_loss_weights_anneal_towards_the_last_step():
    start = mj.algorithms.multi_step_loss_weights(0, 5, 100)
    middle = mj.algorithms.multi_step_loss_weights(50, 5, 100)
    end = mj.algorithms.multi_step_loss_weights(100, 5, 100)
    for w in (start, middle, end):
        np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)
        assert float(w[0]) == 0.0
    np.testing.assert_allclose(start[1:], 0.2, rtol=1e-6)
    assert float(start[-1]) < float(middle[-1]) < float(end[-1])
    np.testing.assert_allclose(end[1:-1], 0.03 / 5, rtol=1e-5)


def test_maml_plus_plus_msl_uses_every_step():
    params, batch = _params(jax.random.key(0)), _batch(jax.random.key(1))
    inner = mj.InnerLoop(steps=3, learning_rate=0.05)
    mpp = mj.MAMLPlusPlus(_mlp_apply, mj.mse, inner=inner, msl_anneal_steps=100)
    meta = mpp.init(params)
    out = jax.vmap(lambda t: mpp.adapt(meta, t, track_query=True).query_loss)(
        mj.core.tasks.as_tasks(batch))
    weights = mj.algorithms.multi_step_loss_weights(0, 3, 100)
    expected = jnp.mean(jnp.sum(out * weights, axis=1))
    np.testing.assert_allclose(mpp.meta_loss(meta, batch, step=0)[0], expected, rtol=1e-6)


def test_derivative_order_annealing_switches_inside_one_program():
    with jax.enable_x64(True):
        params, batch = _params(jax.random.key(2), jnp.float64), _batch(jax.random.key(3), jnp.float64)
        inner = mj.InnerLoop(steps=2, learning_rate=0.05)
        doa = mj.MAMLPlusPlus(_mlp_apply, mj.mse, inner=inner, msl_anneal_steps=None,
                              first_order_steps=10)
        meta = doa.init(params)
        grad_at = jax.jit(lambda step: _grad(doa, meta, batch, step=step))
        first = mj.MAMLPlusPlus(_mlp_apply, mj.mse, msl_anneal_steps=None,
                                inner=mj.InnerLoop(steps=2, learning_rate=0.05, first_order=True))
        second = mj.MAMLPlusPlus(_mlp_apply, mj.mse, inner=inner, msl_anneal_steps=None)
        chex.assert_trees_all_close(grad_at(jnp.int32(3)), _grad(first, meta, batch), rtol=1e-10)
        chex.assert_trees_all_close(grad_at(jnp.int32(10)), _grad(second, meta, batch), rtol=1e-10)
        assert grad_at._cache_size() == 1


def test_cosine_adam_anneals_the_meta_learning_rate():
    params = {"w": jnp.zeros(())}
    opt = mj.cosine_adam(1e-3, total_steps=100, min_learning_rate=1e-5)
    state = opt.init(params)
    steps = []
    for _ in range(100):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        steps.append(-float(updates["w"]))
    assert steps[0] == pytest.approx(1e-3, rel=1e-2) and steps[-1] < 2e-5


def test_meta_sgd_rates_learn_and_equal_maml_when_frozen():
    with jax.enable_x64(True):
        params, batch = _params(jax.random.key(4), jnp.float64), _batch(jax.random.key(5), jnp.float64)
        inner = mj.InnerLoop(steps=2, learning_rate=0.05)
        meta_sgd = mj.MetaSGD(_mlp_apply, mj.mse, inner=inner)
        maml = mj.MAML(_mlp_apply, mj.mse, inner=inner)
        meta = meta_sgd.init(params)
        np.testing.assert_allclose(meta_sgd.meta_loss(meta, batch)[0],
                                   maml.meta_loss(maml.init(params), batch)[0], rtol=1e-12)
        grads = _grad(meta_sgd, meta, batch)
        chex.assert_trees_all_close(grads["model"], _grad(maml, maml.init(params), batch)["model"],
                                    rtol=1e-10)
        rate_grads = jax.tree_util.tree_leaves(grads["inner_rates"])
        assert all(leaf.shape == p.shape for leaf, p in zip(rate_grads, jax.tree_util.tree_leaves(params)))
        assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in rate_grads)


def test_anil_adapts_only_the_head_and_trains_the_body_in_the_outer_loop():
    params, batch = _params(jax.random.key(6)), _batch(jax.random.key(7))
    anil = mj.ANIL(_mlp_apply, mj.mse, params, inner=mj.InnerLoop(steps=3, learning_rate=0.1))
    assert anil.adapt_mask == {"Dense_0": {"w": False, "b": False}, "Dense_1": {"w": True, "b": True}}
    adapted = anil.adapt(anil.init(params), mj.task_at(batch, 0)).params
    np.testing.assert_array_equal(adapted["Dense_0"]["w"], params["Dense_0"]["w"])
    np.testing.assert_array_equal(adapted["Dense_0"]["b"], params["Dense_0"]["b"])
    assert float(jnp.max(jnp.abs(adapted["Dense_1"]["w"] - params["Dense_1"]["w"]))) > 1e-4
    body_grad = _grad(anil, anil.init(params), batch)["model"]["Dense_0"]["w"]
    assert float(jnp.max(jnp.abs(body_grad))) > 0


def test_reptile_update_is_the_mean_adapted_displacement():
    params, batch = _params(jax.random.key(8)), _batch(jax.random.key(9), tasks=4)
    lr, steps = 0.05, 3
    reptile = mj.Reptile(_mlp_apply, mj.mse, inner=mj.InnerLoop(steps=steps, learning_rate=lr))
    outer = optax.sgd(1.0)
    state = mj.create_train_state(reptile.init(params), outer, jax.random.key(0))
    new_state, _ = mj.make_train_step(reptile.meta_loss, outer, donate=False)(state, batch)

    def sq_loss(p, x, y):
        return jnp.mean((_mlp_apply(p, x) - y) ** 2)

    displacement = jax.tree_util.tree_map(jnp.zeros_like, params)
    for t in range(4):  # independent plain-Python SGD per task
        p = params
        for _ in range(steps):
            g = jax.grad(sq_loss)(p, batch.support_inputs[t], batch.support_targets[t])
            p = jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)
        displacement = jax.tree_util.tree_map(lambda d, a, b: d + (a - b) / 4, displacement, p, params)
    expected = jax.tree_util.tree_map(lambda a, d: a + d, params, displacement)
    chex.assert_trees_all_close(new_state.params["model"], expected, rtol=1e-5, atol=1e-6)


def test_imaml_implicit_gradient_matches_unrolled_on_a_strongly_convex_inner_problem():
    """Ridge-regularised linear regression: the inner problem is strongly convex, the unrolled
    inner loop converges to its exact minimiser, and both meta-gradients are exact."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(10), 5)
        d, lam = 4, 2.0
        batch = mj.TaskBatch(jax.random.normal(keys[0], (2, 6, d)), jax.random.normal(keys[1], (2, 6, 1)),
                             jax.random.normal(keys[2], (2, 9, d)), jax.random.normal(keys[3], (2, 9, 1)))
        theta = jax.random.normal(keys[4], (d, 1))
        apply_fn = lambda w, x: x @ w
        inner = mj.InnerLoop(steps=400, learning_rate=0.1)
        imaml = mj.IMAML(apply_fn, mj.mse, inner=inner, lam=lam, cg_steps=20)
        implicit = jax.grad(lambda p: imaml.meta_loss(p, batch)[0])({"model": theta})["model"]

        def unrolled_loss(w):
            def per_task(task):
                prox = lambda phi: 0.5 * lam * jnp.sum((phi - w) ** 2)  # centre differentiable
                out = mj.adapt(w, task, apply_fn=apply_fn, loss_fn=mj.mse, inner=inner, regularizer=prox)
                return jnp.mean((apply_fn(out.params, task.query_inputs) - task.query_targets) ** 2)
            return jnp.mean(jax.vmap(per_task)(mj.core.tasks.as_tasks(batch)))

        unrolled = jax.grad(unrolled_loss)(theta)
        np.testing.assert_allclose(implicit, unrolled, rtol=1e-8, atol=1e-10)
        # The plain (unregularised) MAML gradient is different: the check above can fail.
        maml = jax.grad(lambda w: mj.MAML(apply_fn, mj.mse, inner=mj.InnerLoop(steps=1, learning_rate=0.1))
                        .meta_loss({"model": w}, batch)[0])(theta)
        assert float(jnp.max(jnp.abs(maml - unrolled))) > 1e-3


def test_imaml_differentiates_the_fused_conv_block():
    """iMAML through the fused conv -> BN -> ReLU block (a custom VJP, the CPU default) gives
    the implicit gradient of the same block written with plain ops."""
    from metajax.models.layers import conv_bn_relu

    def model(impl):
        def apply_fn(p, x):
            h = conv_bn_relu(x, p["k"], p["b"], p["s"], p["t"], stride=2, padding=1, impl=impl)
            return jnp.mean(h, axis=(1, 2)) @ p["head"]
        return apply_fn

    keys = jax.random.split(jax.random.key(13), 6)
    params = {"k": 0.5 * jax.random.normal(keys[0], (3, 3, 1, 4)), "b": jnp.zeros(4),
              "s": jnp.ones(4), "t": 0.1 * jax.random.normal(keys[1], (4,)),
              "head": jax.random.normal(keys[2], (4, 3))}
    labels = jnp.tile(jnp.arange(3), (2, 2))
    batch = mj.TaskBatch(jax.random.uniform(keys[3], (2, 6, 6, 6, 1)), labels,
                         jax.random.uniform(keys[4], (2, 6, 6, 6, 1)), labels)

    def implicit_grad(impl):
        imaml = mj.IMAML(model(impl), mj.cross_entropy, inner=mj.InnerLoop(2, 0.1), lam=1.0,
                         cg_steps=3)
        return jax.jit(jax.grad(lambda p: imaml.meta_loss(p, batch)[0]))({"model": params})

    fused, plain = implicit_grad("fused"), implicit_grad("patches")
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(plain)) > 1e-3
    chex.assert_trees_all_close(fused, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~1.5 min on 2 cores (two Conv4 compiles); the fused-block test above is fast
def test_imaml_runs_on_the_fused_cpu_conv4_and_matches_lax_conv():
    """iMAML on the fused Conv4 (custom VJPs, the CPU default) gives the lax.conv network's
    implicit gradient."""
    from metajax.models.conv4 import Conv4, init_conv4, with_conv_impl
    apply_fn, params = init_conv4(Conv4(ways=3, hidden=4, conv_impl="fused"), jax.random.key(11),
                                  (10, 10, 1))
    keys = jax.random.split(jax.random.key(12), 2)
    labels = jnp.tile(jnp.arange(3), (2, 2))
    batch = mj.TaskBatch(jax.random.uniform(keys[0], (2, 6, 10, 10, 1)), labels,
                         jax.random.uniform(keys[1], (2, 6, 10, 10, 1)), labels)

    def implicit_grad(model):
        imaml = mj.IMAML(model, mj.cross_entropy, inner=mj.InnerLoop(1, 0.1), lam=1.0, cg_steps=2)
        return jax.jit(jax.grad(lambda p: imaml.meta_loss(p, batch)[0]))(imaml.init(params))

    fused, lax_conv = implicit_grad(apply_fn), implicit_grad(with_conv_impl(apply_fn, "lax"))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(lax_conv))
    assert scale > 0
    chex.assert_trees_all_close(fused, lax_conv, atol=1e-4 * scale, rtol=0)


def test_imaml_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lam must be > 0"):
        mj.IMAML(_mlp_apply, mj.mse, lam=0.0)
    with pytest.raises(ValueError, match="cg_steps must be a positive int"):
        mj.IMAML(_mlp_apply, mj.mse, cg_steps=0)
    with pytest.raises(ValueError, match="learn_inner_rates must be one of"):
        mj.MAML(_mlp_apply, mj.mse, learn_inner_rates="per_layer")
