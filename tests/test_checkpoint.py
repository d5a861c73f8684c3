"""Checkpoint/resume (exact, after SIGKILL), corrupt-checkpoint fallback, non-finite handling.

Run as a script, this file is the training worker the kill test starts:
  python tests/test_checkpoint.py CKPT_DIR OUT_NPZ ITERATIONS STEPS_PER_CALL [--resume]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj
from metajax.training.checkpoint import (MANIFESTS, Checkpointer, CheckpointMismatchError,
                                         CheckpointWarning)
from metajax.training.guards import NonFiniteError, skip_nonfinite, skipped_updates
from metajax.training.runner import run_fused_training

HERE = os.path.abspath(__file__)


# --- the worker ----------------------------------------------------------------------------
def _sinusoid_setup(steps_per_call: int):
    model, params = mj.models.init_mlp(jax.random.key(0))
    maml = mj.MAML(apply_fn=model, loss_fn=mj.mse, inner=mj.InnerLoop(steps=1, learning_rate=0.01))
    optimizer = optax.adam(1e-3)
    sample = lambda key: mj.data.sample_sinusoid_tasks(key, 5, 10, 10)
    loop = mj.make_train_loop(maml.meta_loss, optimizer, sample, steps_per_call)
    state = mj.create_train_state(maml.init(params), optimizer, jax.random.key(1))
    return loop, state


def worker(argv: list[str]) -> None:
    ckpt_dir, out, iterations, steps_per_call = argv[0], argv[1], int(argv[2]), int(argv[3])
    loop, state = _sinusoid_setup(steps_per_call)
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=3) if ckpt_dir != "-" else None
    if "--resume" in argv:
        restored = checkpointer.restore(state)
        assert restored is not None and restored.config == {"seed": 1}, restored
        state = restored.state
        print(f"resumed {restored.step}", flush=True)
    state, _ = run_fused_training(loop, state, iterations, steps_per_call, progress=False,
                                  checkpointer=checkpointer, config={"seed": 1},
                                  log_fn=lambda step, m: print(f"step {step}", flush=True))
    leaves = jax.tree_util.tree_leaves(jax.device_get((state.params, state.opt_state,
                                                       jax.random.key_data(state.rng))))
    np.savez(out, *leaves)


def _start(*args: str, cache: str) -> subprocess.Popen:
    # A shared persistent compilation cache: the resumed run reuses the first runs' programs.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen([sys.executable, HERE, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out


def _load(path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    iterations, steps_per_call, cache = 100, 5, str(tmp_path / "jax-cache")
    reference = _start("-", tmp_path / "ref.npz", iterations, steps_per_call, cache=cache)
    victim = _start(tmp_path / "ckpt", tmp_path / "victim.npz", iterations, steps_per_call,
                    cache=cache)
    killed_after = None
    for line in victim.stdout:  # kill it once a few checkpoints exist, well before the end
        if line.startswith("step ") and int(line.split()[1]) >= 30:
            victim.send_signal(signal.SIGKILL)
            killed_after = int(line.split()[1])
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read()[-3000:]
    assert not (tmp_path / "victim.npz").exists()
    saved = Checkpointer(str(tmp_path / "ckpt")).all_steps()
    assert saved and killed_after <= saved[-1] < iterations and len(saved) <= 3, saved

    resumed = _finish(_start(tmp_path / "ckpt", tmp_path / "resumed.npz", iterations, steps_per_call,
                             "--resume", cache=cache))
    assert resumed.splitlines()[0] == f"resumed {saved[-1]}"
    _finish(reference)
    ref, res = _load(tmp_path / "ref.npz"), _load(tmp_path / "resumed.npz")
    assert len(ref) == len(res)
    for a, b in zip(ref, res):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # bit-identical
    assert Checkpointer(str(tmp_path / "ckpt")).all_steps()[-1] == iterations


# --- corrupt and partial checkpoints ---------------------------------------------------------
def _small_state(step: int):
    params = {"w": jnp.arange(4.0) + step, "b": jnp.ones(()) * step}
    state = mj.create_train_state(params, optax.adam(1e-2), jax.random.key(7))
    return state.replace(step=jnp.asarray(step, jnp.int32), rng=jax.random.fold_in(state.rng, step))


# With file manifests the damage is found before orbax reads the arrays, so no orbax read
# fails asynchronously ("Event loop is closed" on stderr, an unraisable exception here).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage, found_as", [
    ("flip_bytes", "changed after the checkpoint was saved"),
    ("delete_data", "of the checkpoint is missing"),
    ("delete_metadata", "meta/metadata of the checkpoint is missing"),
    # A checkpoint without a manifest (older metajax): orbax's read or the digest finds it.
    pytest.param("flip_bytes_no_manifest", "", marks=pytest.mark.filterwarnings(
        "ignore::pytest.PytestUnraisableExceptionWarning")),
])
def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, damage, found_as):
    ckpt = Checkpointer(str(tmp_path), max_to_keep=5)
    for step in (1, 2, 3):
        ckpt.save(_small_state(step), config={"step_was": step})
    assert sorted(p.name for p in (tmp_path / MANIFESTS).iterdir()) == ["1.json", "2.json", "3.json"]
    if damage.endswith("_no_manifest"):
        (tmp_path / MANIFESTS / "3.json").unlink()
        damage = damage[:-len("_no_manifest")]
    latest = tmp_path / "3"
    data = sorted(p for p in latest.rglob("*") if p.is_file() and p.parent.name == "d")
    assert data, list(latest.rglob("*"))
    if damage == "flip_bytes":
        for path in data:
            raw = bytearray(path.read_bytes())
            for i in range(len(raw) // 2, len(raw)):
                raw[i] ^= 0xFF
            path.write_bytes(bytes(raw))
    elif damage == "delete_data":
        for path in data:
            path.unlink()
    else:
        (latest / "meta" / "metadata").unlink()
    # A partial save (killed before orbax renamed its temporary directory) is ignored too.
    (tmp_path / "4.orbax-checkpoint-tmp-1").mkdir()
    fresh = Checkpointer(str(tmp_path), max_to_keep=5)
    with pytest.warns(CheckpointWarning, match=f"{found_as}.*previous checkpoint"):
        restored = fresh.restore(_small_state(0))
    assert restored.step == 2 and restored.config == {"step_was": 2}
    expected = _small_state(2)
    np.testing.assert_array_equal(restored.state.params["w"], expected.params["w"])
    assert jnp.array_equal(jax.random.key_data(restored.state.rng), jax.random.key_data(expected.rng))
    assert (tmp_path / "corrupt-3").is_dir() and fresh.all_steps() == [1, 2]
    assert not (tmp_path / MANIFESTS / "3.json").exists()  # went with the quarantined step
    assert fresh.save(_small_state(3)) and fresh.all_steps() == [1, 2, 3]  # step 3 can be rewritten
    assert (tmp_path / MANIFESTS / "3.json").exists()


def test_checkpoint_of_another_structure_is_an_error_not_damage(tmp_path):
    ckpt = Checkpointer(str(tmp_path), max_to_keep=5)
    for step in (1, 2):
        ckpt.save(_small_state(step))
    other = mj.create_train_state({"w": jnp.zeros(4), "b": jnp.zeros(())},
                                  optax.sgd(1e-2, momentum=0.9), jax.random.key(7))
    with pytest.raises(CheckpointMismatchError, match="intact but does not fit"):
        Checkpointer(str(tmp_path), max_to_keep=5).restore(other)
    # Nothing was moved aside: the right template still restores the newest checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFESTS, "1", "2"]
    assert Checkpointer(str(tmp_path), max_to_keep=5).restore(_small_state(0)).step == 2


def test_keeps_last_n(tmp_path):
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
    for step in range(5):
        ckpt.save(_small_state(step))
    assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in (tmp_path / MANIFESTS).iterdir()) == ["3.json", "4.json"]
    assert Checkpointer(str(tmp_path / "empty")).restore(_small_state(0)) is None


# --- non-finite losses and gradients ---------------------------------------------------------
def _quadratic_loop(optimizer, steps_per_call, nan_rate=0.0):
    def meta_loss(params, batch, rng):
        loss = jnp.sum((params["w"] - 1.0) ** 2)
        poison = jnp.where(jax.random.uniform(rng) < nan_rate, jnp.nan, 1.0)
        return loss * poison, {}
    return mj.make_train_loop(meta_loss, optimizer, lambda key: jnp.zeros(()), steps_per_call)


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    # SGD with step 1.5 on (w-1)^2 doubles |w-1| every step: from 1e18, the gradient's norm
    # overflows float32 at step 4 (the loss would one step later).
    optimizer = optax.sgd(1.5)
    state = mj.create_train_state({"w": jnp.full((1,), 1e18)}, optimizer, jax.random.key(0))
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    with pytest.raises(NonFiniteError, match=r"non-finite grad_norm \(inf\) at meta-step 4") as err:
        run_fused_training(_quadratic_loop(optimizer, 2), state, 20, 2, progress=False,
                           checkpointer=ckpt)
    assert err.value.step == 4 and "last good checkpoint (step 4)" in str(err.value)
    assert ckpt.all_steps() == [2, 4]
    report = json.loads((tmp_path / "ckpt" / "nonfinite.json").read_text())
    assert report["step"] == 4 and report["quantity"] == "grad_norm"
    assert report["last_good_checkpoint"] == 4 and report["metrics_in_call"]["grad_norm"][0] == "inf"
    good = ckpt.restore(mj.create_train_state({"w": jnp.zeros(1)}, optimizer, jax.random.key(0)))
    assert good.step == 4 and bool(jnp.all(jnp.isfinite(good.state.params["w"])))


def test_guard_skips_nonfinite_updates():
    optimizer = skip_nonfinite(optax.sgd(0.25))
    state = mj.create_train_state({"w": jnp.zeros(3)}, optimizer, jax.random.key(3))
    loop = _quadratic_loop(optimizer, 10, nan_rate=0.3)
    state, info = run_fused_training(loop, state, 50, 10, progress=False, on_nonfinite="skip")
    assert 0 < info["nonfinite_steps"] == skipped_updates(state.opt_state) < 50
    np.testing.assert_allclose(state.params["w"], 1.0, atol=1e-4)  # still converged
    with pytest.raises(NonFiniteError):  # without the guard the same run stops
        plain = optax.sgd(0.1)
        run_fused_training(_quadratic_loop(plain, 10, nan_rate=0.3),
                           mj.create_train_state({"w": jnp.zeros(3)}, plain, jax.random.key(3)),
                           50, 10, progress=False)


if __name__ == "__main__":
    worker(sys.argv[1:])
