"""Scalars to JSONL and TensorBoard, resume truncation, learning-curve PNGs, experiment resume."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import struct
import sys

import pytest

from metajax.training.metrics_log import MetricsLogger, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}",
                                                  os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"experiments_{name}"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars in the TFRecord event files under ``log_dir`` (read with tensorboardX's protos)."""
    from tensorboardX.proto import event_pb2

    scalars: dict = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(str(tmp_path)) as logger:
        for step in (10, 20, 30):
            logger.log(step, {"loss": 1.0 / step, "acc": step / 100, "ignored": "text"})
        logger.log(40, {"loss": float("nan")})
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert records[1]["loss"] == pytest.approx(0.05) and "ignored" not in records[1]
    assert records[3]["loss"] != records[3]["loss"]  # NaN survives (as "nan" in strict JSON)
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[3])  # strict JSON
    tb = tensorboard_scalars(str(tmp_path / "tb"))
    assert [s for s, _ in tb["loss"]] == [10, 20, 30, 40]
    assert tb["acc"][2] == (30, pytest.approx(0.3))


def test_resume_drops_records_after_the_checkpoint_and_torn_lines(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    with MetricsLogger(str(tmp_path), tensorboard=False, resume_step=3) as logger:
        logger.log(4, {"loss": 40})
    assert [(r["step"], r["loss"]) for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [
        (1, 1), (2, 2), (3, 3), (4, 40)]


def test_plot_writes_learning_curves(tmp_path):
    plot = _load("plot")
    for run, scale in (("maml", 1.0), ("pretrain", 2.0)):
        with MetricsLogger(str(tmp_path / run), tensorboard=False) as logger:
            for step in range(0, 100, 10):
                logger.log(step, {"loss": scale / (step + 1), "grad_norm": scale})
    paths = plot.main([str(tmp_path), "--log-y"])
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["grad_norm.png", "learning_curves.png", "loss.png"]
    assert all(os.path.getsize(p) > 5_000 for p in paths)
    assert set(plot.group_series(plot.find_logs(str(tmp_path)))["loss"]) == {"maml", "pretrain"}


def test_sinusoid_logs_checkpoints_and_resumes_exactly(tmp_path):
    sinusoid = _load("sinusoid")
    flags = ["--iterations", "40", "--steps-per-call", "20", "--checkpoint-every", "20",
             "--eval-tasks", "100", "--pretrain-lrs", "0.01", "--no-progress"]
    first = sinusoid.main(flags + ["--out", str(tmp_path / "a")])
    for phase in ("maml", "pretrain"):
        assert sorted(os.listdir(tmp_path / "a" / "checkpoints" / phase)) == [
            ".metajax-manifests", "20", "40"]
        assert [r["step"] for r in read_jsonl(str(tmp_path / "a" / phase / "metrics.jsonl"))] == [20, 40]
        assert glob.glob(str(tmp_path / "a" / phase / "tb" / "events.out.tfevents.*"))
    # As if killed after step 20: drop the last checkpoints, then --resume.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for phase in ("maml", "pretrain"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / phase / "40")
    resumed = sinusoid.main(flags + ["--out", str(tmp_path / "b"), "--resume"])
    assert resumed["training"]["maml"]["start_step"] == 20
    assert resumed["results"] == first["results"]  # exact: same floats
    with pytest.raises(ValueError, match="different settings"):
        sinusoid.main(flags + ["--out", str(tmp_path / "b"), "--resume", "--meta-lr", "0.01"])
