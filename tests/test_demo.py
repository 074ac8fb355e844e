"""The main job end to end: the demo trains our net beside torch's, and `check` proves a build."""
import argparse
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import torch_cs231n
from torch_cs231n import check, demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_args(tmp_path, **overrides):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path)])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_demo_fast_mode_learns_and_matches_torch(tmp_path):
    """One epoch on the digits: our net and torch's follow the same loss curve and both learn."""
    summary = demo.run(demo_args(tmp_path, epochs=1))
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == summary
    acc = summary["test_accuracy"]
    assert acc["torch_cs231n"] >= 0.85, acc  # one epoch reaches about 0.9; chance is 0.1
    assert abs(acc["torch_cs231n"] - acc["torch"]) <= 0.01, acc
    assert summary["loss_max_abs_diff_first_epoch"] <= 1e-3
    assert summary["device"] == "cpu" and summary["seconds"] > 0
    assert os.path.getsize(summary["plot"]) > 10_000  # a real PNG with two panels


def test_demo_amp_tracks_torch(tmp_path):
    """--amp: both nets under bfloat16 autocast on the CPU. The first steps agree to bfloat16 rounding;
    afterwards one-ulp differences grow through training (max-pool choices, the optimizer), as they would
    between any two bfloat16 implementations, so the curves are held to tracking each other."""
    summary = demo.run(demo_args(tmp_path, epochs=1, amp=True))
    assert summary["amp"] == "torch.bfloat16"
    acc = summary["test_accuracy"]
    assert acc["torch_cs231n"] >= 0.85 and abs(acc["torch_cs231n"] - acc["torch"]) <= 0.02, acc
    assert summary["loss_max_abs_diff_first_epoch"] <= 0.15  # observed 0.06; the losses start at 2.3


def fake_cifar(folder, per_batch=40):
    """CIFAR-10's pickle format, filled with random images."""
    rng = np.random.default_rng(0)
    for name in demo.CIFAR_FILES:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_demo_reads_cifar10_pickles(tmp_path):
    data = tmp_path / "cifar"
    data.mkdir()
    fake_cifar(data)
    summary = demo.run(demo_args(tmp_path / "out", epochs=1, dataset="cifar10", data_dir=str(data), batch_size=50))
    assert summary["train_size"] == 200 and summary["test_size"] == 40
    assert summary["loss_max_abs_diff_first_epoch"] <= 1e-3


def test_demo_cifar10_missing_files_is_a_clear_error(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"data_batch_2, .*test_batch are missing"):
        demo.load_cifar10(str(tmp_path))


def test_demo_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "torch_cs231n", "demo", "--epochs", "1", "--subset", "300",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "test accuracy: torch_cs231n" in run.stdout and (tmp_path / "demo.png").exists()
    assert "epoch 1/1" in run.stderr  # the tqdm progress bar


def test_demo_ddp_on_two_processes_takes_the_one_process_steps(tmp_path):
    """torchrun starts 2 processes (gloo on localhost); SyncBatchNorm and DDP make each global batch's step
    the one-process step: the same loss at every step, up to float32 rounding, and the same accuracy."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run(torchrun + ["-m", "torch_cs231n", "demo", "--ddp", "--epochs", "1", "--out",
                                     str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "with DistributedDataParallel over 2 processes" in run.stdout
    assert run.stdout.count("torch_cs231n 0.") == 1, "only rank 0 prints"
    with open(tmp_path / "ddp" / "summary.json") as f:
        ddp = json.load(f)
    one = demo.run(demo_args(tmp_path / "one", epochs=1))
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert len(ddp["losses"]) == len(one["losses"]) == 1347 // 32
    assert np.abs(np.array(ddp["losses"]) - np.array(one["losses"])).max() <= 1e-4
    assert abs(ddp["test_accuracy"]["torch_cs231n"] - one["test_accuracy"]["torch_cs231n"]) <= 0.01


def test_check_passes_on_this_build():
    out = io.StringIO()
    assert check.run("cpu", out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert "FAIL" not in text and f"{len(check.CHECKS)}/{len(check.CHECKS)} checks passed" in text
    for layer in ("relu", "conv2d", "max_pool2d", "batch_norm"):
        assert f"PASS  {layer}:" in text


def test_check_fails_when_a_kernel_is_wrong(monkeypatch):
    real = torch_cs231n.functional.relu
    monkeypatch.setattr(torch_cs231n.functional, "relu", lambda x, inplace=False: real(x) * 1.001)
    out = io.StringIO()
    assert check.run("cpu", out=out) == 1
    assert "FAIL  relu: vs F.relu" in out.getvalue()
    assert "PASS  conv2d:" in out.getvalue()  # the other layers are still judged on their own


def test_check_computes_references_without_tf32_and_restores_the_flags():
    """check's torch references are full float32 (cuDNN's TF32 is torch's default); the user's flags come back."""
    from torch_cs231n.check import full_float32_references

    cudnn = torch.backends.cudnn
    matmul_before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:  # cuDNN's flags through its context manager: torch's test utilities forbid setting them directly
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=True):
            with full_float32_references():
                assert not cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_before
