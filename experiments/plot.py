"""Learning curves from a run directory: one PNG per metric, one line per run/phase.

Reads every ``metrics.jsonl`` under ``RUN_DIR`` (written by
:class:`metajax.training.metrics_log.MetricsLogger`; e.g. ``RUN_DIR/maml/metrics.jsonl`` and
``RUN_DIR/pretrain/metrics.jsonl``), groups the scalars by metric name (a name such as
``maml/loss`` counts as metric ``loss`` of run ``maml``), and writes
``RUN_DIR/curves/<metric>.png``, one line per run, plus an overview
``RUN_DIR/curves/learning_curves.png``.

  python experiments/plot.py runs/sinusoid
  python experiments/plot.py runs/sinusoid --out /tmp/plots --log-y
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict

from metajax.training.metrics_log import JSONL_NAME, iter_series, read_jsonl


def find_logs(run_dir: str) -> dict[str, list[dict]]:
    """``{run: records}`` for every ``metrics.jsonl`` under ``run_dir`` (run: its relative folder)."""
    logs = {}
    for root, dirs, files in os.walk(run_dir):
        dirs.sort()
        if JSONL_NAME in files:
            rel = os.path.relpath(root, run_dir)
            logs["" if rel == "." else rel] = read_jsonl(os.path.join(root, JSONL_NAME))
    return logs


def group_series(logs: dict[str, list[dict]]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{metric: {run: (steps, values)}}``: ``"maml/loss"`` is metric ``loss`` of run ``maml``.

    Example:
      >>> group_series({"": [{"step": 1, "maml/loss": 2.0, "lr": 0.1}],
      ...               "pretrain": [{"step": 1, "loss": 3.0}]})
      {'loss': {'maml': ([1], [2.0]), 'pretrain': ([1], [3.0])}, 'lr': {'': ([1], [0.1])}}
    """
    grouped: dict = defaultdict(dict)
    for folder, records in logs.items():
        for name, steps, values in iter_series(records):
            prefix, _, metric = name.rpartition("/")
            run = "/".join(p for p in (folder, prefix) if p)
            grouped[metric][run] = (steps, values)
    return dict(sorted(grouped.items()))


def _draw(ax, runs, metric: str, log_y: bool) -> None:
    for run, (steps, values) in sorted(runs.items()):
        ax.plot(steps, values, label=run or metric)
    positive = all(v > 0 for _, values in runs.values() for v in values if math.isfinite(v))
    if log_y and positive:
        ax.set_yscale("log")
    ax.set_xlabel("meta-step")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    if len(runs) > 1 or next(iter(runs)):
        ax.legend(fontsize=8)


def plot_run(run_dir: str, out: str | None = None, log_y: bool = False) -> list[str]:
    """Writes the PNGs for ``run_dir`` and returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {run: records for run, records in find_logs(run_dir).items() if records}
    if not logs:
        raise FileNotFoundError(f"no {JSONL_NAME} with records under {run_dir}")
    grouped = group_series(logs)
    out = out or os.path.join(run_dir, "curves")
    os.makedirs(out, exist_ok=True)
    paths = []
    for metric, runs in grouped.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, runs, metric, log_y)
        fig.tight_layout()
        path = os.path.join(out, f"{metric.replace(os.sep, '_')}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    cols = min(3, len(grouped))
    rows = math.ceil(len(grouped) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (metric, runs) in zip(axes.flat, grouped.items()):
        _draw(ax, runs, metric, log_y)
    for ax in list(axes.flat)[len(grouped):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(out, "learning_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return paths + [path]


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl files")
    parser.add_argument("--out", default=None, help="where to write PNGs (default RUN_DIR/curves)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    args = parser.parse_args(argv)
    paths = plot_run(args.run_dir, args.out, args.log_y)
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
