"""Non-finite losses and gradients: detect them, stop with a clear report, or skip the update.

Two ways to deal with a NaN/Inf meta-loss or meta-gradient:

* **stop** (the default of :func:`metajax.training.runner.run_fused_training`): after each
  compiled call the per-step ``loss`` and ``grad_norm`` are checked on the host
  (:func:`find_nonfinite`); the first bad step is named in a :class:`NonFiniteError`, the
  last good checkpoint is kept and what was seen is written to ``nonfinite.json``
  (:func:`write_nonfinite_report`).
* **skip**: wrap the outer optimizer with :func:`skip_nonfinite` (``optax.apply_if_finite``):
  an update whose gradients are not all finite leaves parameters and optimizer moments
  unchanged; :func:`skipped_updates` reads how many were skipped.

Example:
  >>> import jax.numpy as jnp, optax
  >>> opt = skip_nonfinite(optax.sgd(0.1))
  >>> params = {"w": jnp.ones(2)}
  >>> state = opt.init(params)
  >>> updates, state = opt.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
  >>> updates["w"].tolist(), skipped_updates(state)
  ([0.0, 0.0], 1)
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
REPORT_NAME = "nonfinite.json"


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; ``.report`` says where and what."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report
        self.step = report.get("step")


def skip_nonfinite(optimizer: optax.GradientTransformation,
                   max_consecutive_errors: int = 100) -> optax.GradientTransformation:
    """``optimizer`` that skips (zeroes) an update whose gradients contain NaN or Inf.

    A thin wrapper over ``optax.apply_if_finite``: after ``max_consecutive_errors`` bad
    updates in a row it stops skipping (and the run's non-finite check then stops it).
    """
    return optax.apply_if_finite(optimizer, max_consecutive_errors)


def skipped_updates(opt_state: PyTree) -> int:
    """Total updates skipped by every :func:`skip_nonfinite` found in ``opt_state`` (0 if none)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)):
        if isinstance(leaf, optax.ApplyIfFiniteState):
            total += int(jax.device_get(leaf.total_notfinite))
    return total


@jax.jit
def tree_all_finite(tree: PyTree) -> jax.Array:
    """True iff every floating-point leaf of ``tree`` is finite (one device-side reduction)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def find_nonfinite(metrics: Mapping[str, Any], first_step: int,
                   keys: Sequence[str] = ("loss", "grad_norm")) -> Optional[dict]:
    """The first non-finite entry of the per-step ``metrics[keys]`` of one fused call, or None.

    ``metrics[k]`` has one value per meta-step (leading axis), the first of which is the
    update applied at ``state.step == first_step``. Returns ``{"step", "quantity", "value"}``
    for the earliest bad step (the loss is named before the gradient at the same step).

    Example:
      >>> find_nonfinite({"loss": [1.0, float("nan")], "grad_norm": [1.0, 2.0]}, first_step=10)
      {'step': 11, 'quantity': 'loss', 'value': 'nan'}
      >>> find_nonfinite({"loss": [1.0, 2.0]}, first_step=0) is None
      True
    """
    best = None
    for key in keys:
        if key not in metrics:
            continue
        values = np.asarray(metrics[key], dtype=np.float64).reshape(len(metrics[key]), -1)
        bad = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
        if bad.size and (best is None or bad[0] < best[0]):
            first_bad = values[bad[0]]
            value = first_bad[~np.isfinite(first_bad)][0]
            best = (int(bad[0]), key, _json_float(value))
    if best is None:
        return None
    return {"step": first_step + best[0], "quantity": best[1], "value": best[2]}


def _json_float(x: float) -> Any:
    """A float for strict JSON: non-finite values as the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def nonfinite_report(found: dict, metrics: Mapping[str, Any], first_step: int, *,
                     last_good_checkpoint: Optional[int], desc: str = "") -> dict:
    """A JSON-ready report: the bad step, and every per-step metric of the call it happened in."""
    per_step = {k: [_json_float(v) for v in np.asarray(m, np.float64).reshape(len(m), -1).mean(1)]
                for k, m in metrics.items() if np.ndim(m) >= 1}
    return {
        "error": "non-finite",
        "run": desc,
        "step": found["step"],
        "quantity": found["quantity"],
        "value": found["value"],
        "call_first_step": first_step,
        "last_good_checkpoint": last_good_checkpoint,
        "metrics_in_call": per_step,
    }


def nonfinite_message(report: dict, report_path: Optional[str]) -> str:
    """The one-line error message for a :func:`nonfinite_report`."""
    where = f"{report['run']}: " if report.get("run") else ""
    keep = (f"the last good checkpoint (step {report['last_good_checkpoint']}) is kept"
            if report.get("last_good_checkpoint") is not None else "no checkpoint was written")
    seen = f"; details in {report_path}" if report_path else ""
    return (f"{where}non-finite {report['quantity']} ({report['value']}) at meta-step "
            f"{report['step']} (the update from state.step={report['step']}); training stopped, "
            f"{keep}{seen}. Lower the learning rate, check the data, or wrap the optimizer "
            "with metajax.training.guards.skip_nonfinite to skip such updates.")


def write_nonfinite_report(directory: str, report: dict) -> str:
    """Writes ``report`` atomically to ``directory/nonfinite.json`` and returns the path."""
    from metajax.training.config import write_json_atomic

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, REPORT_NAME)
    write_json_atomic(path, report)
    return path
