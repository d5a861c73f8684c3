"""The task axis sharded over devices gives the one-device result (4 fake CPU devices; 2 hosts;
ShardedTasks over 2 CPU devices from configure_cpu_devices).

Each test runs a subprocess (the device count is fixed when JAX starts). Run as a script,
this file is that worker:
  python tests/test_sharding.py local OUT_NPZ
  python tests/test_sharding.py host OUT_NPZ PORT PROCESS_ID
  python tests/test_sharding.py tasks OUT_NPZ
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
META_BATCH, STEPS = 8, 3


def _setup():
    import jax
    import optax

    import metajax as mj

    model, params = mj.models.init_mlp(jax.random.key(0))
    maml = mj.MAML(apply_fn=model, loss_fn=mj.mse, inner=mj.InnerLoop(steps=1, learning_rate=0.01))
    optimizer = optax.adam(1e-2)
    sample = lambda key: mj.data.sample_sinusoid_tasks(key, META_BATCH, 10, 10)
    fresh = lambda: mj.create_train_state(maml.init(params), optimizer, jax.random.key(1))
    return maml, optimizer, sample, fresh


def _leaves(state) -> list[np.ndarray]:
    import jax
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state.params))]


def run_variants(mesh, process_local_tasks=None,
                 layouts=("1dev", "sharded")) -> dict[str, list[np.ndarray]]:
    """Params after STEPS meta-steps: unsharded and/or sharded, step-by-step and fused."""
    import jax

    import metajax as mj
    from metajax.training import sharding

    maml, optimizer, sample, fresh = _setup()
    batches = [sample(jax.random.key(100 + i)) for i in range(STEPS)]
    out = {"init": _leaves(fresh())}
    if "1dev" in layouts:
        plain_step, state = mj.make_train_step(maml.meta_loss, optimizer), fresh()
        for b in batches:
            state, _ = plain_step(state, b)
        out["step_1dev"] = _leaves(state)
        state, _ = mj.make_train_loop(maml.meta_loss, optimizer, sample, STEPS)(fresh())
        out["loop_1dev"] = _leaves(state)
    if "sharded" in layouts:
        step, state = sharding.make_train_step(maml.meta_loss, optimizer, mesh=mesh), fresh()
        for b in batches:
            state, _ = step(state, process_local_tasks(b) if process_local_tasks else b)
        out["step_sharded"] = _leaves(state)
        loop = sharding.make_train_loop(maml.meta_loss, optimizer, sample, STEPS, mesh=mesh)
        state, metrics = loop(fresh())
        assert metrics["loss"].shape == (STEPS,)
        out["loop_sharded"] = _leaves(state)
    return out


def sharded_tasks_worker(out: str) -> None:
    """Second-order Conv4 MAML (fused blocks, batch norm) on 2 CPU devices: meta-gradients,
    per-task evaluation and a train step with ShardedTasks against the one-device maps."""
    import metajax as mj
    assert mj.configure_cpu_devices(2) == 2  # before any JAX computation
    import jax
    import optax
    from metajax.core.task_map import ShardedTasks, resolve_task_map
    from metajax.models.conv4 import init_omniglot_conv4

    assert len(jax.devices("cpu")) == 2
    assert resolve_task_map("auto") == ShardedTasks("accumulate")
    assert mj.configure_cpu_devices() == 2  # JAX is running now: its count is kept
    apply_fn, params = init_omniglot_conv4(jax.random.key(0), ways=3, conv_impl="fused")
    rng = np.random.default_rng(0)
    tasks, ways = 4, 3
    batch = mj.TaskBatch(
        support_inputs=jnp_array(rng.random((tasks, ways, 28, 28, 1), np.float32)),
        support_targets=jnp_array(np.tile(np.arange(ways), (tasks, 1))),
        query_inputs=jnp_array(rng.random((tasks, 2 * ways, 28, 28, 1), np.float32)),
        query_targets=jnp_array(np.tile(np.arange(ways), (tasks, 2))))
    results = {}
    for name, task_map in [("vmap", "vmap"), ("accumulate", "accumulate"),
                           ("sharded", ShardedTasks("accumulate")),
                           ("sharded_map", ShardedTasks("map", devices=2))]:
        maml = mj.MAML(apply_fn, mj.cross_entropy, inner=mj.InnerLoop(2, 0.4),
                       metric_fns={"accuracy": mj.accuracy}, task_map=task_map)
        meta_params = maml.init(params)
        (loss, metrics), grads = jax.jit(jax.value_and_grad(maml.meta_loss, has_aux=True))(
            meta_params, batch, jax.random.key(1))
        evaluation = jax.jit(maml.evaluate)(meta_params, batch)
        optimizer = optax.sgd(0.1)  # (Adam's first steps would magnify rounding differences)
        state = mj.create_train_state(meta_params, optimizer, jax.random.key(2))
        state, _ = mj.make_train_step(maml.meta_loss, optimizer)(state, batch)
        results[name] = [loss, metrics["query_accuracy"], evaluation["loss"],
                         *jax.tree_util.tree_leaves(grads),
                         *jax.tree_util.tree_leaves(state.params)]
    try:
        mj.MAML(apply_fn, mj.cross_entropy, task_map=ShardedTasks()).meta_loss(
            maml.init(params), jax.tree_util.tree_map(lambda x: x[:3], batch), jax.random.key(1))
        raise AssertionError("3 tasks over 2 devices did not raise")
    except ValueError as e:
        assert "multiple of 2" in str(e), e
    np.savez(out, **{f"{k}_{i}": np.asarray(v) for k, vs in results.items()
                     for i, v in enumerate(vs)})


def jnp_array(x):
    import jax.numpy as jnp
    return jnp.asarray(x)


def worker(argv: list[str]) -> None:
    mode, out = argv[0], argv[1]
    if mode == "tasks":
        return sharded_tasks_worker(out)
    if mode == "host":
        port, process_id = argv[2], int(argv[3])
        from metajax.training import sharding
        sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import jax

    from metajax.training import sharding
    mesh = sharding.task_mesh()
    local = None
    if mode == "host":
        assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
        half = META_BATCH // 2
        # Each host feeds its own half of the tasks; the global batch is their concatenation.
        local = lambda b: sharding.shard_tasks(
            jax.tree_util.tree_map(lambda x: np.asarray(x)[half * jax.process_index():][:half], b),
            mesh)
    else:
        assert jax.device_count() == 4
    # Hosts compute only the sharded variants; the test compares them with one device.
    result = run_variants(mesh, local, layouts=("sharded",) if mode == "host" else ("1dev", "sharded"))
    np.savez(out, **{f"{k}_{i}": v for k, leaves in result.items() for i, v in enumerate(leaves)})


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_NUM_CPU_DEVICES", None)  # (conftest's one device; it would win over XLA_FLAGS)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:  # the worker sets its own count
        env.pop("XLA_FLAGS", None)
    return env


def _run(args: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, HERE, *args], env=_env(devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, (out[-2000:], err[-4000:])


def _variants(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_sharded_matches_one_device(v: dict) -> None:
    for kind in ("step", "loop"):
        keys = sorted(k for k in v if k.startswith(f"{kind}_1dev_"))
        assert keys
        for key in keys:
            sharded = v[key.replace("_1dev_", "_sharded_")]
            np.testing.assert_allclose(sharded, v[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_four_devices_match_one(tmp_path):
    _wait(_run(["local", str(tmp_path / "local.npz")], devices=4))
    v = _variants(tmp_path / "local.npz")
    _assert_sharded_matches_one_device(v)
    for kind in ("step_1dev_0", "loop_1dev_0"):  # training moved them: not a vacuous comparison
        assert np.abs(v[kind] - v["init_0"]).max() > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_agree(tmp_path):
    port = str(_free_port())
    procs = [_run(["host", str(tmp_path / f"host{i}.npz"), port, str(i)], devices=2)
             for i in range(2)]
    one_device = run_variants(None, layouts=("1dev",))  # meanwhile, the reference, in-process
    for p in procs:
        _wait(p)
    hosts = [_variants(tmp_path / f"host{i}.npz") for i in range(2)]
    assert hosts[0].keys() == hosts[1].keys()
    for key in hosts[0]:
        np.testing.assert_array_equal(hosts[0][key], hosts[1][key], err_msg=key)  # hosts agree
    _assert_sharded_matches_one_device(
        {**hosts[0], **{f"{k}_{i}": v for k, leaves in one_device.items() for i, v in enumerate(leaves)}})


def test_sharded_tasks_on_two_cpu_devices_match_one_device(tmp_path):
    _wait(_run(["tasks", str(tmp_path / "tasks.npz")], devices=0))
    v = _variants(tmp_path / "tasks.npz")
    keys = sorted(k for k in v if k.startswith("vmap_"))
    assert len(keys) > 10
    for key in keys:
        for other in ("accumulate", "sharded", "sharded_map"):
            # float32 second-order gradients: differences of 1e-5 of the leaf's scale
            np.testing.assert_allclose(v[key.replace("vmap", other, 1)], v[key], rtol=2e-4,
                                       atol=1e-5 * np.abs(v[key]).max(),
                                       err_msg=f"{other} vs vmap, {key}")
    assert np.abs(v["vmap_3"]).max() > 1e-4  # a real gradient, not zeros


def test_task_map_flags_and_cpu_device_errors():
    import jax

    import metajax as mj
    from metajax.core.task_map import ShardedTasks, resolve_task_map

    assert resolve_task_map("sharded") == ShardedTasks("accumulate", 0)
    assert resolve_task_map("sharded:vmap") == ShardedTasks("vmap", 0)
    assert resolve_task_map("sharded:8:2") == ShardedTasks(8, 2)
    assert resolve_task_map(str(ShardedTasks("map", 2))) == ShardedTasks("map", 2)
    assert resolve_task_map("auto", backend="gpu") == "vmap"
    for bad in ("sharded:", "sharded:foo", "sharded:map:x", "sharded:map:2:3", "shard"):
        with pytest.raises(ValueError, match="sharded\\[:STRATEGY"):
            resolve_task_map(bad)
    with pytest.raises(ValueError, match="strategy must be"):
        ShardedTasks("sharded")
    with pytest.raises(ValueError, match="devices must be"):
        ShardedTasks("map", devices=-1)
    with pytest.raises(ValueError, match="only 1 exist"):
        ShardedTasks(devices=2).mesh()
    jax.devices()  # this process runs one CPU device
    assert mj.configure_cpu_devices() == 1 and mj.configure_cpu_devices(1) == 1
    with pytest.raises(RuntimeError, match="already running with 1 device"):
        mj.configure_cpu_devices(2)
    with pytest.raises(ValueError, match="positive int"):
        mj.configure_cpu_devices(0)


if __name__ == "__main__":
    worker(sys.argv[1:])
