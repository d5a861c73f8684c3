"""The experiment scripts run end to end on small settings and write what they promise."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"experiments_{name}"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_sinusoid_experiment_writes_metrics_and_plot(tmp_path):
    sinusoid = _load("sinusoid")
    out = tmp_path / "run"
    metrics = sinusoid.main(["--iterations", "1500", "--steps-per-call", "500", "--eval-tasks", "200",
                             "--pretrain-lrs", "0.005", "0.01", "--out", str(out), "--no-progress"])
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["experiment"] == "sinusoid"
    assert on_disk["config"]["iterations"] == 1500
    assert (out / "adaptation.png").stat().st_size > 10_000
    assert json.loads((out / "config.json").read_text())["steps_per_call"] == 500
    for name in ("maml", "pretrain"):
        assert set(on_disk["results"][name]["mse"]) == {"0", "1", "5", "10"}
        assert set(on_disk["results"][name]["ci95"]) == {"0", "1", "5", "10"}
    maml = metrics["results"]["maml"]["mse"]
    # Even a short meta-training run makes one inner step cut the error a lot.
    assert maml["1"] < 0.6 * maml["0"], maml
    assert maml["10"] < metrics["results"]["pretrain"]["mse"]["10"]


def test_iterations_must_divide_into_calls(tmp_path):
    sinusoid = _load("sinusoid")
    with pytest.raises(ValueError, match="not a multiple of steps_per_call"):
        sinusoid.main(["--iterations", "1500", "--steps-per-call", "1000", "--out", str(tmp_path),
                       "--no-progress"])


def test_omniglot_experiment_trains_checkpoints_and_resumes(tmp_path, omniglot_root, omniglot_full,
                                                            omniglot_cache_dir):
    omniglot = _load("omniglot")
    out = tmp_path / "omni"
    common = ["--algo", "fomaml", "--ways", "5", "--shots", "1", "--query", "2", "--meta-batch", "2",
              "--eval-tasks", "20", "--eval-batch", "10", "--val-tasks", "10", "--eval-every", "2",
              "--checkpoint-every", "2", "--split", "lake", "--data-dir", str(omniglot_root),
              "--cache-dir", str(omniglot_cache_dir), "--out", str(out), "--no-progress",
              "--no-tensorboard", "--low-memory-compile"]  # the other runs use XLA's defaults
    first = omniglot.main(common + ["--iterations", "2"])
    assert first["config"]["low_memory_compile"] is True
    assert first["training"]["iterations_done"] == 2
    resumed = omniglot.main(common + ["--iterations", "4", "--resume"])
    assert resumed["training"]["resumed_from"] == 2
    assert resumed["training"]["iterations_done"] == 4
    assert resumed["training"]["curve"]["step"] == [2, 4]
    result = resumed["results"]["fomaml"]
    assert set(result["accuracy"]) == {"0", "1", "2", "3"}  # per inner step at test (3 steps)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["test_ci95"] > 0
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["experiment"] == "omniglot" and (out / "learning_curve.png").exists()


def test_omniglot_on_two_cpu_devices_shards_tasks_and_resumes(tmp_path, omniglot_root,
                                                             omniglot_cache_dir):
    """--cpu-devices 2 (a fresh process): task_map auto shards the tasks over both devices,
    and a run resumed from its checkpoint (arrays restored onto device 0) goes on."""
    import subprocess
    out = tmp_path / "omni2"
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    common = [sys.executable, os.path.join(ROOT, "experiments", "omniglot.py"), "--algo", "fomaml",
              "--ways", "5", "--shots", "1", "--query", "2", "--meta-batch", "4",
              "--eval-tasks", "20", "--eval-batch", "10", "--val-tasks", "10",
              "--eval-every", "2", "--checkpoint-every", "2", "--split", "lake",
              "--data-dir", str(omniglot_root), "--cache-dir", str(omniglot_cache_dir),
              "--out", str(out), "--no-progress", "--no-tensorboard", "--cpu-devices", "2"]
    for extra in (["--iterations", "2"], ["--iterations", "4", "--resume"]):
        proc = subprocess.run(common + extra, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["resumed_from"] == 2
    assert metrics["training"]["iterations_done"] == 4
    assert metrics["config"]["cpu_devices"] == "2"
    assert "resuming from iteration 2" in proc.stdout


SMALL_RUN = ["--shots", "1", "--query", "2", "--meta-batch", "2", "--eval-tasks", "20",
             "--eval-batch", "10", "--val-tasks", "10", "--eval-every", "2"]


def _lake_data_flags(root, cache_dir) -> list:
    return ["--data-dir", str(root), "--cache-dir", str(cache_dir), "--split", "lake",
            "--no-progress", "--no-tensorboard"]


def test_omniglot_protonet_init_from_and_distillation(
        tmp_path, omniglot_root, omniglot_full, omniglot_cache_dir):
    omniglot = _load("omniglot")
    data = _lake_data_flags(omniglot_root, omniglot_cache_dir)
    small = SMALL_RUN
    metrics = omniglot.main(
        ["--algo", "protonet", "--ways", "5", "--train-ways", "10", "--iterations", "2",
         "--checkpoint-every", "2", "--out", str(tmp_path / "proto")] + small + data)
    result = metrics["results"]["protonet"]
    assert set(result["accuracy"]) == {"0"}  # no inner loop: one column
    assert result["test_accuracy"] > 0.2  # even 2 steps of training beat 5-way chance on Omniglot
    with pytest.raises(ValueError, match="only embedding learners"):
        omniglot.main(["--algo", "maml", "--ways", "5", "--train-ways", "10", "--out", str(tmp_path / "x")]
                      + data)

    # The same network evaluated at 20 ways, without training.
    twenty = omniglot.main(["--algo", "protonet", "--ways", "20", "--iterations", "0",
                            "--init-from", str(tmp_path / "proto"), "--checkpoint-every", "0",
                            "--out", str(tmp_path / "proto20")] + small + data)
    assert twenty["training"]["iterations_done"] == 0
    assert 0.05 < twenty["results"]["protonet"]["test_accuracy"] < result["test_accuracy"]
    with pytest.raises(FileNotFoundError, match="no checkpoints folder"):
        omniglot.main(["--algo", "protonet", "--init-from", str(tmp_path / "nowhere"),
                       "--out", str(tmp_path / "y")] + data)

    # Distillation of the ProtoNet into a 16-filter student.
    distill = _load("distill")
    out = distill.main(["--teacher", str(tmp_path / "proto"), "--ways", "5", "--train-ways", "10",
                        "--iterations", "2", "--checkpoint-every", "0",
                        "--out", str(tmp_path / "distill")] + small + data)
    assert out["parameters"]["student"] < out["parameters"]["teacher"] / 8
    assert out["results"]["teacher"]["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert 0.0 < out["results"]["student"]["test_accuracy"] <= 1.0


def test_omniglot_baseline_plus_plus_and_distillation_needs_an_embedding_learner(
        tmp_path, omniglot_root, omniglot_full, omniglot_cache_dir):
    omniglot, distill = _load("omniglot"), _load("distill")
    data = _lake_data_flags(omniglot_root, omniglot_cache_dir)
    small = SMALL_RUN
    # Baseline++: classifier over all training classes, a cosine head fitted per test task.
    plus = omniglot.main(["--algo", "baselinepp", "--ways", "5", "--train-ways", "16",
                          "--iterations", "2", "--eval-inner-steps", "5", "--inner-lr", "0.1",
                          "--checkpoint-every", "0", "--out", str(tmp_path / "bpp")] + small + data)
    assert set(plus["results"]["baselinepp"]["accuracy"]) == {str(s) for s in range(6)}
    assert plus["results"]["baselinepp"]["test_accuracy"] > 0.2
    with pytest.raises(ValueError, match="distillation here takes an embedding learner"):
        distill.main(["--teacher", str(tmp_path / "bpp"), "--out", str(tmp_path / "z")] + data)


def test_omniglot_eval_query_and_meta_lr_schedules(omniglot_full):
    omniglot = _load("omniglot")
    parse = lambda *flags: omniglot.parse_config(omniglot.OmniglotConfig, list(flags))
    config = parse("--algo", "protonet", "--ways", "20", "--train-ways", "60", "--query", "2",
                   "--eval-query", "5")
    samplers = omniglot.build_samplers(config, omniglot_full)
    assert (samplers["train"].spec.n_way, samplers["train"].spec.n_query) == (60, 2)
    for role in ("val", "test"):
        assert (samplers[role].spec.n_way, samplers[role].spec.n_query) == (20, 5)
    no_eval_query = omniglot.build_samplers(parse("--query", "3"), omniglot_full)
    assert no_eval_query["test"].spec.n_query == 3

    cosine = omniglot.meta_lr_schedule(parse("--lr-schedule", "cosine", "--iterations", "100"))
    linear = omniglot.meta_lr_schedule(parse("--lr-schedule", "linear", "--iterations", "100"))
    step = omniglot.meta_lr_schedule(parse("--lr-halve-every", "40"))
    assert [round(float(cosine(i)), 7) for i in (0, 50, 100)] == [1e-3, 5e-4, 0.0]
    assert [round(float(linear(i)), 7) for i in (0, 25, 100)] == [1e-3, 7.5e-4, 0.0]
    assert [round(float(step(i)), 7) for i in (0, 39, 40, 80)] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    with pytest.raises(ValueError, match="Drop one"):
        omniglot.meta_lr_schedule(parse("--lr-schedule", "cosine", "--lr-halve-every", "10"))


def test_omniglot_mamlpp_with_per_step_running_statistics(tmp_path, omniglot_root, omniglot_full,
                                                          omniglot_cache_dir):
    omniglot = _load("omniglot")
    data = ["--data-dir", str(omniglot_root), "--cache-dir", str(omniglot_cache_dir), "--split", "lake",
            "--no-progress", "--no-tensorboard", "--checkpoint-every", "0"]
    small = ["--shots", "1", "--query", "2", "--meta-batch", "2", "--eval-tasks", "20",
             "--eval-batch", "10", "--val-tasks", "10", "--eval-every", "2", "--iterations", "2",
             "--inner-steps", "1", "--eval-inner-steps", "2", "--hidden", "16"]
    metrics = omniglot.main(["--algo", "mamlpp", "--per-step-bn", "--bn-running-stats",
                             "--eval-bn", "running", "--out", str(tmp_path / "mpp")] + small + data)
    result = metrics["results"]["mamlpp"]
    assert set(result["accuracy"]) == {"0", "1", "2"}
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert metrics["config"]["bn_running_stats"] and metrics["config"]["eval_bn"] == "running"
    with pytest.raises(ValueError, match="--bn-running-stats is MAML"):
        omniglot.main(["--algo", "maml", "--bn-running-stats", "--out", str(tmp_path / "x")]
                      + small + data)
    with pytest.raises(ValueError, match="needs --split vinyals"):
        omniglot.main(["--algo", "protonet", "--train-subset", "trainval",
                       "--out", str(tmp_path / "y")] + small + data)


def test_results_table_rows_commands_and_readme_block(tmp_path):
    table = _load("results_table")
    config = {"algo": "protonet", "ways": 20, "shots": 1, "train_ways": 60, "split": "vinyals",
              "rotations": True, "budget_minutes": 30.0, "out": "runs/p", "data_dir": "/somewhere"}
    metrics = {"experiment": "omniglot", "config": config,
               "results": {"protonet": {"test_accuracy": 0.9612, "test_ci95": 0.0031}},
               "training": {"iterations_done": 6000, "train_seconds": 1800.0}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    body = table.main([str(path), "--readme", str(readme)])
    row = body.splitlines()[2]
    assert "| ProtoNet | Omniglot 20-way 1-shot | vinyals + rot | 96.12 ± 0.31 | 96.0 (Snell" in row
    assert "6,000 it, 30 min" in row
    # Flags that differ from the defaults, and not the machine-specific data path.
    assert ("python experiments/omniglot.py --algo protonet --ways 20 --train-ways 60 "
            "--budget-minutes 30.0 --out runs/p`") in row and "somewhere" not in row
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:start -->\n| method") and "old" not in text
    assert text.endswith("<!-- results:end -->\ntail\n")
    with pytest.raises(FileNotFoundError, match="no such metrics.json"):
        table.main([str(tmp_path / "missing.json")])


@pytest.mark.parametrize("name", ["sinusoid", "omniglot", "distill"])
def test_experiment_help_renders(name, capsys):
    """``--help`` prints every flag (argparse formats help strings with %, so a stray % breaks it)."""
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(["--help"])
    assert exit_info.value.code == 0
    assert "--seed" in capsys.readouterr().out


def test_omniglot_rejects_bad_malloc_settings(tmp_path):
    omniglot = _load("omniglot")
    with pytest.raises(ValueError, match=r"\(--malloc-arenas\) must be 0"):
        omniglot.main(["--malloc-arenas", "-1", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match=r"\(--malloc-mmap-threshold-mib\) must be 0"):
        omniglot.main(["--malloc-mmap-threshold-mib", "64", "--out", str(tmp_path / "x")])
