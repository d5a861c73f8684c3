"""Behaviour of the functional core: meta-gradients, first order, closed forms, errors."""

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj
from metajax.core.tasks import Task


def _mlp_apply(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _small_mlp_params(key, dtype):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (1, 6), dtype),
        "b1": 0.1 * jax.random.normal(k3, (6,), dtype),
        "w2": jax.random.normal(k2, (6, 1), dtype) / 3,
        "b2": jnp.zeros((1,), dtype),
    }


def _flatten(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.concatenate([leaf.ravel() for leaf in leaves])


def _central_differences(fn, params, eps):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    grads = []
    for i in range(flat.shape[0]):
        e = jnp.zeros_like(flat).at[i].set(eps)
        grads.append((fn(unravel(flat + e)) - fn(unravel(flat - e))) / (2 * eps))
    return unravel(jnp.stack(grads))


def _sinusoid_batch(key, dtype, tasks=3, support=5, query=7):
    batch = mj.data.sample_sinusoid_tasks(key, tasks, support, query)
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), batch)





@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    with jax.enable_x64(True):
        params = _small_mlp_params(jax.random.key(0), jnp.float64)
        batch = _sinusoid_batch(jax.random.key(1), jnp.float64)
        maml = mj.MAML(apply_fn=_mlp_apply, loss_fn=mj.mse,
                       inner=mj.InnerLoop(steps=steps, learning_rate=0.05))
        loss = jax.jit(lambda p: maml.meta_loss({"model": p}, batch)[0])
        analytic = jax.grad(loss)(params)
        numeric = _central_differences(loss, params, 1e-6)
        chex.assert_trees_all_close(analytic, numeric, rtol=1e-6, atol=1e-8)
        # The second-order terms matter here: first order is measurably different.
        fo = mj.MAML(apply_fn=_mlp_apply, loss_fn=mj.mse,
                     inner=mj.InnerLoop(steps=steps, learning_rate=0.05, first_order=True))
        fo_grad = jax.grad(lambda p: fo.meta_loss({"model": p}, batch)[0])(params)
        assert float(jnp.max(jnp.abs(_flatten(fo_grad) - _flatten(analytic)))) > 1e-4


def test_first_order_equals_gradient_at_adapted_parameters():
    """FOMAML's meta-gradient is the query gradient evaluated at the adapted parameters."""
    with jax.enable_x64(True):
        params = _small_mlp_params(jax.random.key(2), jnp.float64)
        batch = _sinusoid_batch(jax.random.key(3), jnp.float64, tasks=4)
        lr, steps = 0.03, 2
        maml = mj.MAML(apply_fn=_mlp_apply, loss_fn=mj.mse,
                       inner=mj.InnerLoop(steps=steps, learning_rate=lr, first_order=True))
        got = jax.grad(lambda p: maml.meta_loss({"model": p}, batch)[0])(params)

        def sq_loss(p, x, y):
            return jnp.mean((_mlp_apply(p, x) - y) ** 2)

        expected = jax.tree_util.tree_map(jnp.zeros_like, params)
        for t in range(batch.num_tasks):
            p = params
            for _ in range(steps):  # plain gradient descent, written independently
                g = jax.grad(sq_loss)(p, batch.support_inputs[t], batch.support_targets[t])
                p = jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)
            g_query = jax.grad(sq_loss)(p, batch.query_inputs[t], batch.query_targets[t])
            expected = jax.tree_util.tree_map(lambda a, b: a + b / batch.num_tasks,
                                              expected, g_query)
        chex.assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)


def test_linear_regression_one_step_closed_form():
    """For f(x) = x w and MSE, w' = A w + b is affine, so the meta-gradient is A^T grad L_q(w')."""
    with jax.enable_x64(True):
        key = jax.random.split(jax.random.key(4), 5)
        d, n, m, alpha = 3, 6, 8, 0.07
        xs, xq = jax.random.normal(key[0], (n, d)), jax.random.normal(key[1], (m, d))
        ys, yq = jax.random.normal(key[2], (n, 1)), jax.random.normal(key[3], (m, 1))
        w = jax.random.normal(key[4], (d, 1))
        batch = mj.TaskBatch(xs[None], ys[None], xq[None], yq[None])
        maml = mj.MAML(apply_fn=lambda p, x: x @ p, loss_fn=mj.mse,
                       inner=mj.InnerLoop(steps=1, learning_rate=alpha))
        got = jax.grad(lambda p: maml.meta_loss({"model": p}, batch)[0])(w)

        a = jnp.eye(d) - 2 * alpha / n * xs.T @ xs
        w_adapted = a @ w + 2 * alpha / n * xs.T @ ys
        expected = a.T @ (2 / m * xq.T @ (xq @ w_adapted - yq))
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def _train_setup(steps_per_call=5):
    model, params = mj.models.init_mlp(jax.random.key(0))
    maml = mj.MAML(apply_fn=model, loss_fn=mj.mse, inner=mj.InnerLoop(steps=1, learning_rate=0.01))
    optimizer = optax.adam(1e-3)
    state = mj.create_train_state(maml.init(params), optimizer, jax.random.key(7))
    sample = lambda k: mj.data.sample_sinusoid_tasks(k, 5, 10, 10)
    return maml, optimizer, state, sample


def test_train_step_traces_once():
    maml, optimizer, state, sample = _train_setup()
    traced_loss = chex.assert_max_traces(maml.meta_loss, n=1)
    step = mj.make_train_step(traced_loss, optimizer)
    for i in range(4):
        state, metrics = step(state, sample(jax.random.key(i)))
    assert int(state.step) == 4
    assert np.isfinite(float(metrics["loss"]))


def test_train_loop_traces_once_and_reruns_bit_identically():
    def run():
        chex.clear_trace_counter()
        maml, optimizer, state, sample = _train_setup()
        traced_loss = chex.assert_max_traces(maml.meta_loss, n=1)
        loop = mj.make_train_loop(traced_loss, optimizer, sample, steps_per_call=5)
        for _ in range(3):
            state, metrics = loop(state)
        return state, metrics

    state_a, metrics_a = run()
    state_b, metrics_b = run()
    assert int(state_a.step) == 15
    assert metrics_a["loss"].shape == (5,)
    for a, b in zip(jax.tree_util.tree_leaves(state_a.params),
                    jax.tree_util.tree_leaves(state_b.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A different seed gives different parameters (the check above can fail).
    maml, optimizer, state, sample = _train_setup()
    state = state.replace(rng=jax.random.key(8))
    state, _ = mj.make_train_loop(maml.meta_loss, optimizer, sample, 5)(state)
    diff = _flatten(state.params) - _flatten(state_a.params)
    assert float(jnp.max(jnp.abs(diff))) > 0


def test_train_step_matches_unfused_loop():
    """make_train_loop (scan over steps) equals calling make_train_step with the same batches."""
    maml, optimizer, state, sample = _train_setup()
    fused = mj.make_train_loop(maml.meta_loss, optimizer, sample, 3, donate=False)(state)[0]
    step = mj.make_train_step(maml.meta_loss, optimizer, donate=False)
    s = state
    for _ in range(3):
        rng, sample_rng = jax.random.split(s.rng)
        s, _ = step(s.replace(rng=rng), sample(sample_rng))
    chex.assert_trees_all_close(fused.params, s.params, rtol=1e-5, atol=1e-6)


def test_compiler_options_reach_xla_and_low_memory_options_keep_the_result():
    """make_train_step / make_train_loop / make_eval_step hand compiler_options to XLA (an
    unknown option is XLA's error), and low_memory_compile_options() changes no result
    beyond float32 rounding."""
    maml, optimizer, state, sample = _train_setup()
    batch = sample(jax.random.key(0))
    bogus = {"xla_no_such_option": True}
    with pytest.raises(Exception, match="xla_no_such_option"):
        mj.make_train_step(maml.meta_loss, optimizer, donate=False, compiler_options=bogus)(
            state, batch)
    with pytest.raises(Exception, match="xla_no_such_option"):
        mj.make_train_loop(maml.meta_loss, optimizer, sample, 2, donate=False,
                           compiler_options=bogus)(state)
    with pytest.raises(Exception, match="xla_no_such_option"):
        mj.make_eval_step(maml.evaluate, compiler_options=bogus)(state.params, batch)
    low = mj.low_memory_compile_options()
    assert low == ({"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu"
                   else {})
    want, want_metrics = mj.make_train_step(maml.meta_loss, optimizer, donate=False)(state, batch)
    got, got_metrics = mj.make_train_step(maml.meta_loss, optimizer, donate=False,
                                          compiler_options=low)(state, batch)
    chex.assert_trees_all_close(got.params, want.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-5)


def _good_batch(tasks=2, ns=3, nq=4):
    return mj.TaskBatch(jnp.zeros((tasks, ns, 1)), jnp.zeros((tasks, ns, 1)),
                        jnp.zeros((tasks, nq, 1)), jnp.zeros((tasks, nq, 1)))


@pytest.mark.parametrize("change, message", [
    (dict(support_targets=jnp.zeros((3, 3, 1))), r"support_targets has 3 tasks .* support_inputs has 2"),
    (dict(query_targets=jnp.zeros((2, 5, 1))), r"query_targets has shape \(2, 5, 1\); expected \(2, 4, 1\)"),
    (dict(query_inputs=jnp.zeros((2, 4, 2)), query_targets=jnp.zeros((2, 4, 1))),
     r"query_inputs has per-example shape \(2\) but support_inputs has \(1\)"),
    (dict(support_inputs=jnp.zeros((3,))), r"support_inputs has shape \(3\); expected at least 2 axes"),
    (dict(support_mask=jnp.ones((2, 4))), r"support_mask has shape \(2, 4\); expected \(2, 3\)"),
])
def test_malformed_batches_raise_clear_errors(change, message):
    batch = _good_batch().replace(**change)
    with pytest.raises(mj.TaskBatchError, match=message):
        batch.validate()
    maml = mj.MAML(apply_fn=lambda p, x: x * p, loss_fn=mj.mse)
    with pytest.raises(mj.TaskBatchError, match=message):
        jax.jit(maml.meta_loss)(maml.init(jnp.ones(())), batch)


def test_non_array_leaves_are_named():
    batch = _good_batch().replace(query_inputs=[[1.0]])
    with pytest.raises(mj.TaskBatchError, match=r"query_inputs\[0\]\[0\] is a float, not an array"):
        batch.validate()


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        mj.InnerLoop(steps=-1)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        mj.InnerLoop(learning_rate=0.0)
    with pytest.raises(ValueError, match="task_map must be"):
        mj.MAML(apply_fn=lambda p, x: x * p, loss_fn=mj.mse, task_map="pmap").meta_loss(
            {"model": jnp.ones(())}, _good_batch())
    with pytest.raises(ValueError, match="num_support must be a positive int"):
        mj.data.sample_sinusoid_tasks(jax.random.key(0), 2, 0, 3)


def test_custom_user_loss_trains():
    """A loss the library does not ship (log-cosh) plugs in and meta-training reduces it."""
    def log_cosh(predictions, targets):
        return jnp.log(jnp.cosh(predictions - targets))[..., 0]

    model, params = mj.models.init_mlp(jax.random.key(0))
    maml = mj.MAML(apply_fn=model, loss_fn=log_cosh, inner=mj.InnerLoop(steps=1, learning_rate=0.01))
    optimizer = optax.adam(3e-3)
    state = mj.create_train_state(maml.init(params), optimizer, jax.random.key(1))
    sample = lambda k: mj.data.sample_sinusoid_tasks(k, 10, 10, 10)
    held_out = sample(jax.random.key(99))
    before = float(maml.meta_loss(state.params, held_out)[0])
    state, _ = mj.make_train_loop(maml.meta_loss, optimizer, sample, 300)(state)
    after = float(maml.meta_loss(state.params, held_out)[0])
    assert after < 0.75 * before, (before, after)


def test_masked_examples_do_not_change_the_meta_gradient():
    """Padding examples with mask 0 (and garbage values) gives the gradient of the unpadded task."""
    with jax.enable_x64(True):
        params = _small_mlp_params(jax.random.key(5), jnp.float64)
        batch = _sinusoid_batch(jax.random.key(6), jnp.float64, tasks=2, support=4, query=5)
        pad = lambda x, n: jnp.concatenate([x, 1e3 * jnp.ones(x.shape[:1] + (n,) + x.shape[2:])], 1)
        padded = mj.TaskBatch(pad(batch.support_inputs, 2), pad(batch.support_targets, 2),
                              pad(batch.query_inputs, 3), pad(batch.query_targets, 3),
                              support_mask=jnp.concatenate([jnp.ones((2, 4)), jnp.zeros((2, 2))], 1),
                              query_mask=jnp.concatenate([jnp.ones((2, 5)), jnp.zeros((2, 3))], 1))
        maml = mj.MAML(apply_fn=_mlp_apply, loss_fn=mj.mse, inner=mj.InnerLoop(steps=2, learning_rate=0.05))
        g = jax.grad(lambda p: maml.meta_loss({"model": p}, batch)[0])(params)
        g_padded = jax.grad(lambda p: maml.meta_loss({"model": p}, padded)[0])(params)
        chex.assert_trees_all_close(g, g_padded, rtol=1e-10, atol=1e-12)


def test_scalar_rates_equal_default_sgd_and_receive_gradients():
    with jax.enable_x64(True):
        params = _small_mlp_params(jax.random.key(5), jnp.float64)
        batch = _sinusoid_batch(jax.random.key(6), jnp.float64)
        maml = mj.MAML(apply_fn=_mlp_apply, loss_fn=mj.mse, inner=mj.InnerLoop(steps=2, learning_rate=0.05))
        rates = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 0.05), params)
        plain = maml.meta_loss({"model": params}, batch)[0]
        with_rates = maml.meta_loss({"model": params, "inner_rates": rates}, batch)[0]
        np.testing.assert_allclose(plain, with_rates, rtol=1e-12)
        g = jax.grad(lambda r: maml.meta_loss({"model": params, "inner_rates": r}, batch)[0])(rates)
        assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree_util.tree_leaves(g))


def test_per_step_rates_and_adapt_mask():
    params = _small_mlp_params(jax.random.key(5), jnp.float32)
    task = mj.task_at(_sinusoid_batch(jax.random.key(6), jnp.float32), 0)
    per_step = jax.tree_util.tree_map(lambda p: jnp.array([0.0, 0.1, 0.0]), params)
    inner = mj.InnerLoop(steps=3, rates_per_step=True)
    out = mj.adapt(params, task, apply_fn=_mlp_apply, loss_fn=mj.mse, inner=inner, rates=per_step)
    one_step = mj.adapt(params, task, apply_fn=_mlp_apply, loss_fn=mj.mse,
                        inner=mj.InnerLoop(steps=1, learning_rate=0.1))
    chex.assert_trees_all_close(out.params, one_step.params, rtol=1e-6)
    # Only the head adapts: the body leaves stay exactly at their initial values.
    mask = {"w1": False, "b1": False, "w2": True, "b2": True}
    head_only = mj.adapt(params, task, apply_fn=_mlp_apply, loss_fn=mj.mse,
                         inner=mj.InnerLoop(steps=2, learning_rate=0.1), adapt_mask=mask)
    np.testing.assert_array_equal(head_only.params["w1"], params["w1"])
    assert float(jnp.max(jnp.abs(head_only.params["w2"] - params["w2"]))) > 0
    with pytest.raises(ValueError, match="leading axis of length steps=3"):
        mj.adapt(params, task, apply_fn=_mlp_apply, loss_fn=mj.mse, inner=inner,
                 rates=jax.tree_util.tree_map(lambda p: jnp.ones(2), params))


@pytest.mark.parametrize("strategy", ["map", 2, "accumulate"])
def test_task_map_strategies_agree_with_vmap(strategy):
    params = _small_mlp_params(jax.random.key(5), jnp.float32)
    batch = _sinusoid_batch(jax.random.key(6), jnp.float32, tasks=4)
    grads, values = {}, {}
    for s in ("vmap", strategy):
        # learned per-parameter inner rates (Meta-SGD): the gradient reaches both meta-parameters
        maml = mj.MAML(apply_fn=_mlp_apply, loss_fn=mj.mse, task_map=s, learn_inner_rates="per_parameter",
                       inner=mj.InnerLoop(steps=2, learning_rate=0.05))
        meta = maml.init(params)
        values[s], grads[s] = jax.jit(jax.value_and_grad(lambda p: maml.meta_loss(p, batch), has_aux=True))(meta)
    chex.assert_trees_all_close(grads["vmap"], grads[strategy], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(values["vmap"], values[strategy], rtol=1e-5, atol=1e-6)
    assert float(_flatten(grads[strategy]["inner_rates"]).std()) > 0


def test_accumulate_strategy_scales_by_the_outer_cotangent_and_zeroes_task_data():
    from metajax.core.task_map import mean_loss_over_tasks
    fn = lambda w, task: (jnp.sum((w * task["x"]) ** 2) + task["k"], {"k": task["k"]})
    tasks = {"x": jnp.arange(6.0).reshape(3, 2), "k": jnp.arange(3)}
    outer = lambda s: lambda w, t: 3.0 * mean_loss_over_tasks(fn, w, t, s)[0]
    want = jax.grad(outer("vmap"), argnums=(0, 1), allow_int=True)(1.5, tasks)
    got = jax.grad(outer("accumulate"), argnums=(0, 1), allow_int=True)(1.5, tasks)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)  # 3 * mean_i 2 w |x_i|^2
    np.testing.assert_allclose(got[0], 3.0 * 2 * 1.5 * float(jnp.sum(tasks["x"] ** 2)) / 3, rtol=1e-6)
    assert float(jnp.max(jnp.abs(got[1]["x"]))) == 0.0  # documented: no gradient to task data
    assert got[1]["k"].dtype == jax.dtypes.float0


def test_unrolled_inner_loop_gives_the_same_meta_gradient():
    """InnerLoop.unroll changes how the scan is compiled, never the result."""
    params = _small_mlp_params(jax.random.key(3), jnp.float32)
    batch = _sinusoid_batch(jax.random.key(4), jnp.float32, support=16)

    def meta_grad(unroll, remat="none"):
        maml = mj.MAML(apply_fn=_mlp_apply, loss_fn=mj.mse,
                       inner=mj.InnerLoop(steps=3, learning_rate=0.05, unroll=unroll, remat=remat))
        return jax.jit(jax.grad(lambda p: maml.meta_loss({"model": p}, batch)[0]))(params)

    ref = meta_grad(1)
    for unroll, remat in ((True, "none"), (2, "none"), (True, "dots")):
        chex.assert_trees_all_close(meta_grad(unroll, remat), ref, rtol=1e-5, atol=1e-6)


def test_evaluate_tracks_every_step_and_remat_matches():
    params = _small_mlp_params(jax.random.key(5), jnp.float32)
    batch = _sinusoid_batch(jax.random.key(6), jnp.float32, tasks=3)
    maml = mj.MAML(apply_fn=_mlp_apply, loss_fn=mj.mse, metric_fns={"abs_err": lambda p, t: jnp.abs(p - t)[:, 0]},
                   inner=mj.InnerLoop(steps=4, learning_rate=0.05))
    result = mj.make_eval_step(maml.evaluate)({"model": params}, batch)
    chex.assert_shape([result["loss"], result["abs_err"]], (3, 5))
    # Step 4 of evaluation equals the query loss after a 4-step adaptation.
    final = maml.meta_loss({"model": params}, batch)[1]["query_loss"]
    np.testing.assert_allclose(result["loss"][:, -1].mean(), final, rtol=1e-5)
    # Step 0 is the unadapted model.
    unadapted = jnp.mean((_mlp_apply(params, batch.query_inputs) - batch.query_targets) ** 2, axis=(1, 2))
    np.testing.assert_allclose(result["loss"][:, 0], unadapted, rtol=1e-5)
    remat = mj.MAML(apply_fn=_mlp_apply, loss_fn=mj.mse,
                    inner=mj.InnerLoop(steps=4, learning_rate=0.05, remat=True))
    g = jax.grad(lambda p: maml.meta_loss({"model": p}, batch)[0])(params)
    g_remat = jax.grad(lambda p: remat.meta_loss({"model": p}, batch)[0])(params)
    chex.assert_trees_all_close(g, g_remat, rtol=1e-5, atol=1e-6)


def test_inner_adam_optimizer_plugs_in():
    params = _small_mlp_params(jax.random.key(5), jnp.float32)
    task = mj.task_at(_sinusoid_batch(jax.random.key(6), jnp.float32, support=20), 0)
    out = mj.adapt(params, task, apply_fn=_mlp_apply, loss_fn=mj.mse,
                   inner=mj.InnerLoop(steps=20, optimizer=optax.adam(0.05)))
    assert float(out.support_loss[-1]) < 0.5 * float(out.support_loss[0])


def test_flax_nnx_module_adapts():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(1, 16, rngs=rngs), nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    apply_fn, params = mj.models.from_nnx(Net(nnx.Rngs(0)))
    maml = mj.MAML(apply_fn=apply_fn, loss_fn=mj.mse, inner=mj.InnerLoop(steps=1, learning_rate=0.01))
    batch = _sinusoid_batch(jax.random.key(6), jnp.float32)
    loss, grads = jax.value_and_grad(lambda p: maml.meta_loss({"model": p}, batch)[0])(params)
    assert np.isfinite(float(loss))
    assert float(_flatten(grads).std()) > 0
