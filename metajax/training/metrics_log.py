"""Scalar metrics to JSON Lines and TensorBoard event files, in one run directory.

``metrics.jsonl`` holds one JSON object per logged step (``{"step": 1000, "time": ...,
"maml/loss": 0.41, ...}``), flushed line by line: easy to read with pandas or
:func:`read_jsonl`, and :mod:`experiments.plot` turns it into learning-curve PNGs.
The same scalars go to TensorBoard event files under ``tb/`` (tensorboardX), so
``tensorboard --logdir RUN_DIR`` shows the curves live.

On resume, pass ``resume_step``: lines logged after that step (by the run that was
killed after its last checkpoint) are dropped from the JSONL file and TensorBoard is
told to purge them, so the curves show each step once.

Example:
  >>> import tempfile
  >>> run_dir = tempfile.mkdtemp()
  >>> with MetricsLogger(run_dir, tensorboard=False) as logger:
  ...     logger.log(10, {"loss": 0.5})
  ...     log_fn = logger.log_fn(prefix="maml/")
  ...     log_fn(20, {"loss": 0.25})
  >>> [(r["step"], r.get("loss"), r.get("maml/loss")) for r in read_jsonl(f"{run_dir}/metrics.jsonl")]
  [(10, 0.5, None), (20, None, 0.25)]
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tb"


def _scalar(value: Any) -> Optional[float]:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x


def _json_value(x: float) -> Any:
    return x if math.isfinite(x) else str(x)  # strict JSON: "nan", "inf"


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics JSONL file; a torn last line (a killed writer) is skipped.

    ``"nan"``/``"inf"`` strings come back as floats.
    """
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # partial line written when the process was killed
            records.append({k: (float(v) if v in ("nan", "inf", "-inf") else v)
                            for k, v in record.items()})
    return records


def truncate_jsonl(path: str, after_step: int) -> int:
    """Atomically drops records with ``step > after_step`` (and torn lines); returns how many remain."""
    if not os.path.exists(path):
        return 0
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= after_step]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for record in keep:
            f.write(json.dumps({k: _json_value(v) if isinstance(v, float) else v
                                for k, v in record.items()}) + "\n")
    os.replace(tmp, path)
    return len(keep)


def iter_series(records: list[dict]) -> Iterator[tuple[str, list[int], list[float]]]:
    """``(name, steps, values)`` for every scalar name in ``records`` (sorted by name)."""
    names = sorted({k for r in records for k in r if k not in ("step", "time")})
    for name in names:
        points = [(r["step"], r[name]) for r in records if name in r]
        yield name, [p[0] for p in points], [p[1] for p in points]


class MetricsLogger:
    """Writes scalars to ``run_dir/metrics.jsonl`` and (optionally) TensorBoard ``run_dir/tb``.

    Only process 0 writes in a multi-host run. Use as a context manager or call
    :meth:`close`.

    Args:
      run_dir: the run directory (created if missing).
      tensorboard: also write TensorBoard event files (needs ``tensorboardX``).
      resume_step: continue a run from this step: later records are dropped (see module doc).
    """

    def __init__(self, run_dir: str, *, tensorboard: bool = True, resume_step: Optional[int] = None):
        import jax

        self.run_dir = run_dir
        self.active = jax.process_index() == 0
        self.path = os.path.join(run_dir, JSONL_NAME)
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        elif os.path.exists(self.path):
            os.replace(self.path, self.path + ".previous")  # a fresh run starts a fresh log
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, TB_DIR),
                                     purge_step=None if resume_step is None else resume_step + 1,
                                     flush_secs=10)

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs the scalar entries of ``scalars`` at ``step`` (non-scalars are ignored)."""
        if not self.active:
            return
        values = {k: x for k, v in scalars.items() if (x := _scalar(v)) is not None}
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _json_value(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=int(step))

    def log_fn(self, prefix: str = "") -> Callable[[int, Mapping[str, Any]], None]:
        """A ``log_fn(step, metrics)`` for :func:`run_fused_training` that prefixes every name."""
        return lambda step, metrics: self.log(step, {prefix + k: v for k, v in metrics.items()})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
