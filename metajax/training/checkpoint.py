"""Atomic, verified checkpoints of a whole :class:`TrainState` with orbax.

A checkpoint holds everything a run needs to continue exactly: the step, the
meta-parameters, the optimizer state and the PRNG key (saved as its raw key data
plus the key implementation's name; the fused loop splits its task-sampler keys
off this key, so the data stream resumes too), together with the run's config and
a SHA-256 digest of the saved arrays.

orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves no half-written checkpoint behind, only a
temporary directory that is ignored (and cleaned up). A finalized checkpoint that
is later damaged (a truncated or missing file, flipped bits) fails to restore or
fails its digest check; :meth:`Checkpointer.restore` then warns, moves it aside
(``corrupt-<step>``) and falls back to the previous good one. Each finalized checkpoint's
files are also recorded with their SHA-256 in ``.metajax-manifests/<step>.json``, so damage
to them is found before orbax reads anything (orbax's asynchronous reads of a damaged
checkpoint otherwise end in "Event loop is closed" noise on stderr).

Example:
  >>> import tempfile, jax, jax.numpy as jnp, optax
  >>> import metajax as mj
  >>> from metajax.training.checkpoint import Checkpointer
  >>> state = mj.create_train_state({"w": jnp.ones(3)}, optax.adam(1e-3), jax.random.key(0))
  >>> ckpt = Checkpointer(tempfile.mkdtemp(), max_to_keep=2)
  >>> ckpt.save(state, config={"lr": 1e-3})
  True
  >>> restored = ckpt.restore(state)
  >>> restored.step, restored.config
  (0, {'lr': 0.001})
  >>> bool((restored.state.params["w"] == state.params["w"]).all())
  True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from typing import Any, Optional

import jax
import numpy as np

from metajax.training.train_state import TrainState

PyTree = Any
log = logging.getLogger(__name__)
MANIFESTS = ".metajax-manifests"  # per-step file digests, beside the step directories


class CheckpointMismatchError(ValueError):
    """An intact checkpoint does not fit the template (other model or optimizer settings)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was unreadable or corrupt and an earlier one was used instead."""


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_to_tree(state: TrainState) -> dict:
    """The arrays of ``state`` as a plain dict (the typed PRNG key as its raw ``uint32`` data)."""
    rng = jax.random.key_data(state.rng) if _is_key(state.rng) else state.rng
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": rng}


def key_impl_name(state: TrainState) -> Optional[str]:
    """The PRNG implementation's name (e.g. ``"threefry2x32"``), or None for a raw ``uint32`` key."""
    return str(jax.random.key_impl(state.rng)) if _is_key(state.rng) else None


def state_from_tree(tree: dict, template: TrainState, key_impl: Optional[str]) -> TrainState:
    """Rebuilds a :class:`TrainState` shaped like ``template`` from :func:`state_to_tree`'s dict.

    Leaves are matched in flattening order, so containers that orbax restores as plain
    tuples or dicts (optax's named-tuple states) get their original types back.
    """
    template_tree = state_to_tree(template)
    leaves = jax.tree_util.tree_leaves(tree)
    treedef = jax.tree_util.tree_structure(template_tree)
    if len(leaves) != treedef.num_leaves:
        raise ValueError(f"checkpoint has {len(leaves)} arrays but the template state has "
                         f"{treedef.num_leaves}: was it written by a different model or optimizer?")
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    rng = rebuilt["rng"]
    if key_impl is not None:
        rng = jax.random.wrap_key_data(rng, impl=key_impl)
    return TrainState(step=rebuilt["step"], params=rebuilt["params"],
                      opt_state=rebuilt["opt_state"], rng=rng)


def tree_digest(tree: PyTree) -> Optional[str]:
    """SHA-256 over the bytes, dtypes and shapes of ``tree``'s leaves (None if not all local).

    Example:
      >>> import numpy as np
      >>> tree_digest({"a": np.zeros(2)}) == tree_digest({"a": np.zeros(2)})
      True
      >>> tree_digest({"a": np.zeros(2)}) == tree_digest({"a": np.ones(2)})
      False
    """
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_replicated and not leaf.is_fully_addressable:
            return None  # sharded across hosts: no single process sees every byte
        array = np.asarray(jax.device_get(leaf))
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def file_digests(directory: str) -> dict[str, str]:
    """``{path relative to directory: SHA-256 of its bytes}`` for every file under it."""
    digests = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digests[os.path.relpath(path, directory)] = h.hexdigest()
    return digests


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: the state, its step and the config saved with it."""

    state: TrainState
    step: int
    config: Optional[dict]


class Checkpointer:
    """Periodic, atomic checkpoints of a :class:`TrainState` in ``directory``, keeping the last N.

    Args:
      directory: where step directories (``<step>/``) are written; created if missing.
      max_to_keep: how many of the most recent checkpoints to keep (older ones are deleted).
      async_save: let orbax finish writing in a background thread (``save`` returns once the
        arrays are copied to host memory). Off by default: a save of a small state takes
        ~0.1 s and synchronous saves are simpler to reason about.
    """

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self._manager = self._new_manager()

    def _new_manager(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep, enable_async_checkpointing=self.async_save,
            cleanup_tmp_directories=True, create=True)
        return ocp.CheckpointManager(self.directory, options=options)

    # --- queries ---------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest finalized checkpoint's step (not verified; see :meth:`restore`)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # --- save / restore --------------------------------------------------------------------
    def save(self, state: TrainState, *, config: Optional[dict] = None,
             extra: Optional[dict] = None) -> bool:
        """Saves ``state`` under its own step (``int(state.step)``); returns True if written.

        An existing checkpoint at the same step is left alone (returns False).
        """
        import orbax.checkpoint as ocp

        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        tree = state_to_tree(state)
        meta = {"step": step, "key_impl": key_impl_name(state), "digest": tree_digest(tree),
                "config": config, "extra": extra or {}}
        self._record_files()  # a previous asynchronous save finalized since
        saved = self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
        if not self.async_save:
            self._manager.wait_until_finished()
            self._record_files()
        return bool(saved)

    def wait(self) -> None:
        """Blocks until a pending asynchronous save is finalized."""
        self._manager.wait_until_finished()
        self._record_files()

    # --- file manifests --------------------------------------------------------------------
    def _manifest(self, step: int) -> str:
        return os.path.join(self.directory, MANIFESTS, f"{step}.json")

    def _record_files(self) -> None:
        """Writes the file digests of finalized checkpoints that have none yet, and drops
        those of checkpoints orbax has deleted (``max_to_keep``)."""
        if jax.process_index() != 0:
            return
        from metajax.training.config import write_json_atomic

        steps = set(self._manager.all_steps())
        folder = os.path.join(self.directory, MANIFESTS)
        os.makedirs(folder, exist_ok=True)
        for s in steps:
            if not os.path.exists(self._manifest(s)):
                write_json_atomic(self._manifest(s),
                                  file_digests(os.path.join(self.directory, str(s))))
        for name in os.listdir(folder):
            stem = name[:-len(".json")] if name.endswith(".json") else ""
            if stem.isdigit() and int(stem) not in steps:
                os.remove(os.path.join(folder, name))

    def _check_files(self, step: int) -> None:
        """Raises ValueError naming a file of checkpoint ``step`` that is missing or changed
        since it was saved. Without a readable manifest (older checkpoints, a damaged
        manifest) there is nothing to check here; orbax's read and the digest still are."""
        try:
            with open(self._manifest(step)) as f:
                expected = json.load(f)
        except (OSError, ValueError):
            return
        actual = file_digests(os.path.join(self.directory, str(step)))
        for path, digest in sorted(expected.items()):
            if path not in actual:
                raise ValueError(f"file {path} of the checkpoint is missing")
            if actual[path] != digest:
                raise ValueError(f"file {path} changed after the checkpoint was saved")

    def restore(self, template: TrainState, step: Optional[int] = None) -> Optional[Restored]:
        """Restores the newest good checkpoint (or exactly ``step``) into ``template``'s structure.

        ``template`` is a state of the same model and optimizer (e.g. a fresh one from
        :func:`create_train_state`); its arrays' shardings are used for the restored ones.
        A checkpoint that cannot be read or fails its digest check is reported with a
        :class:`CheckpointWarning`, moved aside to ``corrupt-<step>`` and the previous one is
        tried. Returns None if there is no (good) checkpoint.
        """
        candidates = [step] if step is not None else list(reversed(self.all_steps()))
        for s in candidates:
            try:
                return self._restore_step(template, s)
            except Exception as err:  # noqa: BLE001 - any failure means: not usable
                if self._is_intact(s):
                    # A good checkpoint of another structure: the caller's mistake (other
                    # model or optimizer settings), not damage. Never move it aside.
                    raise CheckpointMismatchError(
                        f"checkpoint {self.directory}/{s} is intact but does not fit the state "
                        f"being restored ({type(err).__name__}: {str(err)[:300]}); restore it "
                        f"with the model and optimizer settings it was saved with.") from err
                warnings.warn(
                    f"checkpoint {self.directory}/{s} is unreadable or corrupt "
                    f"({type(err).__name__}: {str(err)[:300]}); "
                    + ("falling back to the previous checkpoint." if step is None else
                       "not restoring it."), CheckpointWarning, stacklevel=2)
                self._quarantine(s)
        return None

    def _restore_step(self, template: TrainState, step: int) -> Restored:
        import orbax.checkpoint as ocp

        self._check_files(step)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_to_tree(template))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        if meta.get("step") != step:
            raise ValueError(f"metadata names step {meta.get('step')}, directory says {step}")
        digest = tree_digest(restored["state"])
        if meta.get("digest") is not None and digest is not None and digest != meta["digest"]:
            raise ValueError("digest mismatch: the saved arrays changed after they were written")
        state = state_from_tree(restored["state"], template, meta.get("key_impl"))
        if int(jax.device_get(state.step)) != step:
            raise ValueError(f"restored state.step={int(state.step)} but checkpoint step is {step}")
        return Restored(state=state, step=step, config=meta.get("config"))

    def _is_intact(self, step: int) -> bool:
        """Whether checkpoint ``step`` reads back as saved (its digest matches), template-free."""
        import orbax.checkpoint as ocp

        try:
            self._check_files(step)
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
            expected = restored["meta"].get("digest")
            return expected is not None and tree_digest(restored["state"]) == expected
        except Exception:  # noqa: BLE001 - unreadable means not intact
            return False

    def _quarantine(self, step: int) -> None:
        """Moves a bad step directory aside so that it is neither restored nor overwritten."""
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            if os.path.isdir(src):
                dst = os.path.join(self.directory, f"corrupt-{step}")
                n = 0
                while os.path.exists(dst):
                    n += 1
                    dst = os.path.join(self.directory, f"corrupt-{step}.{n}")
                os.replace(src, dst)
            if os.path.exists(self._manifest(step)):
                os.remove(self._manifest(step))
        self._manager.close()
        self._manager = self._new_manager()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self._manager.wait_until_finished()
        self._record_files()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
