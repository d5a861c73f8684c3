"""MAML++ per-step batch-norm running statistics (BNRS) and the outer step's state updates."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import metajax as mj
from metajax.models.conv4 import Conv4, init_conv4, with_bn_mode
from metajax.core.state_updates import apply_state_updates


SIZE, LAYERS = 16, 2  # 16 -> 8 -> 4: small and quick to compile, stride-2 convs as in Omniglot


def _batch(tasks=3, ways=5, shots=1, query=2, seed=0):
    rng = np.random.default_rng(seed)
    return mj.TaskBatch(
        jnp.asarray(rng.random((tasks, ways * shots, SIZE, SIZE, 1), np.float32)),
        jnp.tile(jnp.arange(ways), (tasks, shots)),
        jnp.asarray(rng.random((tasks, ways * query, SIZE, SIZE, 1), np.float32)),
        jnp.tile(jnp.arange(ways), (tasks, query)))


def _model(running_stats=True):
    module = Conv4(ways=5, hidden=8, layers=LAYERS, conv_impl="patches",
                   running_stats=running_stats)
    return init_conv4(module, jax.random.key(0), (SIZE, SIZE, 1))


def _mpp(apply_fn, steps=1, **kw):
    return mj.MAMLPlusPlus(apply_fn, mj.cross_entropy, inner=mj.InnerLoop(steps, 0.4),
                           metric_fns={"accuracy": mj.accuracy}, **kw)


def _layer0_stats(kernel, bias, x):
    """Mean and unbiased variance of the first conv's output, written with lax directly."""
    z = lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    n = z.size // z.shape[-1]
    return z.mean((0, 1, 2)), z.var((0, 1, 2)) * n / (n - 1)


def test_running_statistics_are_the_per_step_batch_statistics():
    apply_fn, params = _model()
    batch = _batch()
    mpp = _mpp(apply_fn, steps=1, bn_running_stats=True, bn_momentum=1.0)
    meta = mpp.init(params)
    assert meta["model"]["bn0_mean"].shape == (1, 8)  # one copy per inner step
    optimizer = optax.adam(1e-3)
    state = mj.create_train_state(meta, optimizer, jax.random.key(1))
    new_state, metrics = mj.make_train_step(mpp.meta_loss, optimizer, donate=False)(state, batch)
    assert "state_updates" not in metrics

    # By hand: copy 0 = mean over tasks of (support stats at theta + query stats at phi_1) / 2,
    # phi_1 from plain MAML's inner loop (the running statistics are not used in training).
    maml = mj.MAML(apply_fn, mj.cross_entropy, inner=mj.InnerLoop(1, 0.4))
    tasks = mj.core.tasks.as_tasks(batch)
    means, variances = [], []
    adapt = jax.jit(lambda theta, task: maml.adapt({"model": theta}, task).params)
    for t in range(3):
        task = jax.tree_util.tree_map(lambda x: x[t], tasks)
        theta = jax.tree_util.tree_map(lambda x: x[0] if x.ndim == 2 and x.shape[0] == 1
                                       else x, meta["model"])
        phi = adapt(theta, task)
        ms, vs = _layer0_stats(theta["conv0_kernel"], theta["conv0_bias"], task.support_inputs)
        mq, vq = _layer0_stats(phi["conv0_kernel"], phi["conv0_bias"], task.query_inputs)
        means.append((ms + mq) / 2)
        variances.append((vs + vq) / 2)
    chex.assert_trees_all_close(new_state.params["model"]["bn0_mean"][0], np.mean(means, 0),
                                atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(new_state.params["model"]["bn0_var"][0], np.mean(variances, 0),
                                atol=1e-5, rtol=1e-4)


def test_running_statistics_average_with_momentum_and_differ_per_step():
    apply_fn, params = _model()
    batch = _batch()
    exact = _mpp(apply_fn, steps=2, bn_running_stats=True, bn_momentum=1.0)
    meta = exact.init(params)
    batch_stats = jax.jit(exact.running_statistics)(meta, batch)
    assert batch_stats["model/bn1_mean"].shape == (2, 8)
    # Step 1 sees adapted weights, so its statistics are not step 0's.
    assert float(jnp.max(jnp.abs(batch_stats["model/bn1_mean"][1]
                                 - batch_stats["model/bn1_mean"][0]))) > 1e-4
    mpp = _mpp(apply_fn, steps=2, bn_running_stats=True, bn_momentum=0.1)
    _, metrics = jax.jit(mpp.meta_loss)(meta, batch)
    updates = metrics["state_updates"]
    for name, value in batch_stats.items():
        leaf = name.split("/")[1]
        chex.assert_trees_all_close(updates[name], 0.9 * meta["model"][leaf] + 0.1 * value,
                                    atol=1e-6)


def test_running_statistics_change_no_loss_and_get_no_gradient():
    with_stats, params = _model(running_stats=True)
    without, _ = _model(running_stats=False)
    plain_params = {k: v for k, v in params.items() if not k.endswith(("_mean", "_var"))}
    batch = _batch()
    a = _mpp(with_stats, steps=1, bn_running_stats=True)
    b = _mpp(without, steps=1)
    meta_a, meta_b = a.init(params), b.init(plain_params)
    grad = lambda algo: jax.jit(jax.value_and_grad(algo.meta_loss, has_aux=True))
    (loss_a, _), grads_a = grad(a)(meta_a, batch)
    (loss_b, _), grads_b = grad(b)(meta_b, batch)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for name, g in grads_b["model"].items():
        chex.assert_trees_all_close(grads_a["model"][name], g, atol=1e-6, rtol=1e-5)
    for i in range(LAYERS):
        assert not np.any(np.asarray(grads_a["model"][f"bn{i}_mean"]))
        assert not np.any(np.asarray(grads_a["model"][f"bn{i}_var"]))


def test_running_mode_with_a_batchs_own_statistics_equals_batch_mode():
    apply_fn, params = _model()
    x = jax.random.uniform(jax.random.key(3), (12, SIZE, SIZE, 1))
    stats = with_bn_mode(apply_fn, "collect")(params, x)
    n = {0: 12 * 8 * 8, 1: 12 * 4 * 4}
    own = dict(params)
    for i in range(LAYERS):
        mean, var = stats[f"bn{i}"]
        own[f"bn{i}_mean"], own[f"bn{i}_var"] = mean, var * (n[i] - 1) / n[i]  # biased
    running = with_bn_mode(apply_fn, "running")(own, x)
    chex.assert_trees_all_close(running, apply_fn(params, x), atol=1e-4, rtol=1e-4)
    # ... and with other statistics the output differs (the running path is really used).
    assert float(jnp.max(jnp.abs(with_bn_mode(apply_fn, "running")(params, x)
                                 - apply_fn(params, x)))) > 1e-2


@pytest.mark.slow  # the experiment test runs --eval-bn running end to end in the default suite
def test_non_transductive_evaluation_runs_per_step_and_beyond_trained_steps():
    apply_fn, params = _model()
    batch = _batch()
    mpp = _mpp(apply_fn, steps=1, bn_running_stats=True, eval_bn_mode="running")
    meta = mpp.init(params)
    meta["model"].update({k.split("/")[1]: v for k, v in
                          jax.jit(mpp.running_statistics)(meta, batch).items()})
    out = jax.jit(lambda p, b: mpp.evaluate(p, b, steps=3))(meta, batch)
    assert out["accuracy"].shape == (3, 4)
    assert np.all(np.isfinite(np.asarray(out["loss"])))
    transductive = jax.jit(lambda p, b: _mpp(apply_fn, steps=1, bn_running_stats=True).evaluate(
        p, b, steps=3))(meta, batch)
    assert not np.allclose(out["loss"], transductive["loss"])


def test_bad_running_statistics_settings_raise_named_errors():
    apply_fn, params = _model(running_stats=False)
    with pytest.raises(ValueError, match="running_stats=True"):
        _mpp(apply_fn, bn_running_stats=True).init(params)
    with pytest.raises(ValueError, match="eval_bn_mode='running' needs bn_running_stats"):
        _mpp(apply_fn, eval_bn_mode="running")
    with pytest.raises(ValueError, match="bn_momentum"):
        _mpp(apply_fn, bn_running_stats=True, bn_momentum=0.0)
    module = Conv4(ways=5, hidden=8, bn_mode="running")
    with pytest.raises(ValueError, match="needs running_stats=True"):
        module.init(jax.random.key(0), jnp.zeros((2, SIZE, SIZE, 1)))
    with pytest.raises(KeyError, match="do not have"):
        apply_state_updates({"model": {"w": jnp.zeros(2)}}, {"model/v": jnp.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        apply_state_updates({"model": {"w": jnp.zeros(2)}}, {"model/w": jnp.zeros(3)})
