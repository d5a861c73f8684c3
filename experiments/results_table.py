"""The README results table, generated from the ``metrics.json`` of finished runs.

One row per (run, algorithm): our test accuracy with its 95% CI (or MSE for
sinusoid), the published number for the same setting, the training budget that
produced ours, and the command that reproduces the run (rebuilt from the run's
saved config: every flag that differs from the experiment's default).

  python experiments/results_table.py runs/*/metrics.json                  # print the table
  python experiments/results_table.py runs/*/metrics.json --readme README.md  # rewrite it in place

``--readme`` replaces the text between ``<!-- results:start -->`` and
``<!-- results:end -->`` (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import sys
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
START, END = "<!-- results:start -->", "<!-- results:end -->"

# Published Omniglot test accuracies (%), keyed by (algorithm, ways, shots).
PAPER = {
    "maml": ("Finn et al. 2017", {(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9}),
    "fomaml": ("Finn et al. 2017", {(5, 1): 98.3, (5, 5): 99.2, (20, 1): 89.4, (20, 5): 97.9}),
    "protonet": ("Snell et al. 2017", {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9}),
    "matchingnet": ("Vinyals et al. 2016", {(5, 1): 98.1, (5, 5): 98.9, (20, 1): 93.8,
                                            (20, 5): 98.5}),
    "metasgd": ("Li et al. 2017", {(5, 1): 99.53, (5, 5): 99.93, (20, 1): 95.93, (20, 5): 98.97}),
    "mamlpp": ("Antoniou et al. 2019", {(5, 1): 99.47, (5, 5): 99.93, (20, 1): 97.65,
                                        (20, 5): 99.33}),
    "reptile": ("Nichol et al. 2018", {(5, 1): 97.68, (5, 5): 99.48, (20, 1): 89.43,
                                       (20, 5): 97.12}),
    "imaml": ("Rajeswaran et al. 2019", {(5, 1): 99.16, (5, 5): 99.67, (20, 1): 94.46,
                                         (20, 5): 98.69}),
}
# Published sinusoid (K=10) mean squared errors after one inner step, keyed by algorithm.
SINUSOID_PAPER = {"maml": "0.77 after 1 step (Li et al. 2017)",
                  "metasgd": "0.53 after 1 step (Li et al. 2017)"}
NAMES = {"maml": "MAML", "fomaml": "FOMAML", "protonet": "ProtoNet", "matchingnet": "Matching Net",
         "metasgd": "Meta-SGD", "mamlpp": "MAML++", "reptile": "Reptile", "imaml": "iMAML",
         "anil": "ANIL", "pretrain": "Pretrain + fine-tune", "baseline": "Baseline (Chen)",
         "baselinepp": "Baseline++ (Chen)"}


def load_experiment(name: str):
    """The experiment module ``experiments/<name>.py`` (for its config dataclass)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


CONFIG_CLASSES = {"omniglot": "OmniglotConfig", "distill": "DistillConfig",
                  "sinusoid": "SinusoidConfig"}


def command(experiment: str, config: dict) -> str:
    """``python experiments/<experiment>.py`` with every flag whose value is not the default."""
    cls = getattr(load_experiment(experiment), CONFIG_CLASSES[experiment])
    flags = []
    for f in dataclasses.fields(cls):
        saved = config.get(f.name)
        if isinstance(saved, list):  # JSON turns the config's tuples into lists
            saved = tuple(saved)
        if f.name not in config or saved == f.default or f.name in ("data_dir", "progress"):
            continue
        value, flag = config[f.name], "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            flags += [flag] + [str(v) for v in value]
        else:
            flags += [flag, str(value)]
    prefix = "METAJAX_DATA=../shared/data " if experiment != "sinusoid" else ""
    return prefix + f"python experiments/{experiment}.py " + shlex.join(flags)


def _budget(training: dict) -> str:
    minutes = training.get("train_seconds", 0.0) / 60
    its = training.get("iterations_done", 0)
    return f"{its:,} it, {minutes:.0f} min"


def _pct(mean: float, ci: float) -> str:
    return f"{100 * mean:.2f} ± {100 * ci:.2f}"


def _paper(algo: str, ways: int, shots: int) -> str:
    source, table = PAPER.get(algo, (None, {}))
    value = table.get((ways, shots))
    return f"{value} ({source})" if value is not None else "n/a"


def rows_for(path: str) -> list[dict]:
    with open(path) as f:
        m = json.load(f)
    cfg, training, experiment = m["config"], m.get("training", {}), m["experiment"]
    cmd = command(experiment, cfg)
    trained_on = " (train+val)" if cfg.get("train_subset", "train") == "trainval" else ""
    split = f"{cfg.get('split', '')}{trained_on}{' + rot' if cfg.get('rotations') else ''}"
    budget = (f"eval of `{cfg['init_from']}`" if cfg.get("init_from") and not cfg.get("iterations")
              else _budget(training))
    rows = []
    if experiment == "omniglot":
        for algo, r in m["results"].items():
            rows.append({"method": NAMES.get(algo, algo),
                         "setting": f"Omniglot {cfg['ways']}-way {cfg['shots']}-shot", "split": split,
                         "ours": _pct(r["test_accuracy"], r["test_ci95"]),
                         "paper": _paper(algo, cfg["ways"], cfg["shots"]),
                         "budget": budget, "command": cmd})
    elif experiment == "distill":
        t, s = m["results"]["teacher"], m["results"]["student"]
        sizes = m.get("parameters", {})
        setting = f"Omniglot {cfg['ways']}-way {cfg['shots']}-shot"
        rows.append({"method": f"{NAMES.get(cfg['algo'], cfg['algo'])} teacher "
                               f"({sizes.get('teacher', 0):,} params)",
                     "setting": setting, "split": split,
                     "ours": _pct(t["test_accuracy"], t["test_ci95"]), "paper": "n/a",
                     "budget": f"teacher run `{cfg['teacher']}`", "command": cmd})
        rows.append({"method": f"distilled student, {cfg['hidden']} filters "
                               f"({sizes.get('student', 0):,} params, T={cfg['temperature']}, "
                               f"alpha={cfg['alpha']})",
                     "setting": setting, "split": split,
                     "ours": _pct(s["test_accuracy"], s["test_ci95"]), "paper": "n/a",
                     "budget": budget, "command": cmd})
    elif experiment == "sinusoid":
        for algo, r in m["results"].items():
            mse = r["mse"]
            rows.append({"method": NAMES.get(algo, algo), "setting": f"sinusoid K={cfg.get('shots', 10)}",
                         "split": "", "ours": "MSE " + " / ".join(
                             f"{mse[s]:.3f}" for s in ("1", "5", "10") if s in mse) + " (1/5/10 steps)",
                         "paper": (SINUSOID_PAPER.get(algo, "n/a") if cfg.get("shots", 10) == 10
                                   else "n/a"),
                         "budget": f"{cfg.get('iterations', 0):,} it",
                         "command": cmd})
    return rows


def table(paths: list[str]) -> str:
    lines = ["| method | setting | split | ours: test accuracy % (95% CI) | paper | our training "
             "| command |", "|---|---|---|---|---|---|---|"]
    for path in paths:
        for r in rows_for(path):
            lines.append(f"| {r['method']} | {r['setting']} | {r['split']} | {r['ours']} | "
                         f"{r['paper']} | {r['budget']} | `{r['command']}` |")
    return "\n".join(lines)


def replace_between_markers(text: str, body: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"the README has no {START} ... {END} block to replace.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", help="metrics.json files of finished runs")
    parser.add_argument("--readme", help="rewrite the results block of this file")
    args = parser.parse_args(argv)
    missing = [p for p in args.metrics if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"no such metrics.json: {', '.join(missing)}")
    body = table(args.metrics)
    if args.readme:
        with open(args.readme) as f:
            text = replace_between_markers(f.read(), body)
        tmp = args.readme + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.readme)
    print(body)
    return body


if __name__ == "__main__":
    main(sys.argv[1:])
