"""The benchmark harness: ABBA order within rounds, and a quick run that writes its JSON."""
import json
import os
import subprocess
import sys

import torch

from benchmarks import harness
from benchmarks.suite import Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rounds_alternate_which_side_is_timed_first(monkeypatch):
    calls = []

    def logged(name):
        def fn(x):
            calls.append((name, torch.is_grad_enabled()))
            return x * 1.0
        return fn

    case = Case(op="t", name="t", describe="t", make_inputs=lambda device, dtype: (torch.ones(3, requires_grad=True),),
                ours=logged("ours"), reference=logged("torch"))
    times = {"ours": 2.0, "torch": 1.0}

    def fake_time(stmt_fn, threads, min_run_time):
        before = len(calls)
        stmt_fn()
        return times[calls[before][0]]

    monkeypatch.setattr(harness, "_time", fake_time)
    row = harness.measure(case, "cpu", threads=1, rounds=2, min_run_time=0.0)
    timed = [name for name, _ in calls[-8:]]  # after the warm-up calls: 2 rounds x (fwd, f+b) x 2 sides
    assert timed == ["ours", "torch", "ours", "torch", "torch", "ours", "torch", "ours"]
    assert [grad for _, grad in calls[-8:]] == [False, False, True, True, False, False, True, True]
    assert row["ratio_fwd"] == 2.0 and row["ratio_fwd_bwd"] == 2.0


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TORCH_CS231N_NO_REEXEC="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", "--quick", "--op", "relu", "--case", "cs231n",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "relu       cs231n" in proc.stdout
    (row,) = json.loads(out.read_text())["results"]
    assert (row["op"], row["case"]) == ("relu", "cs231n")
    assert row["fb_ours_s"] > 0 and row["fb_torch_s"] > 0 and row["ratio_fwd_bwd"] > 0


def test_grad_targets_replace_the_inputs_for_forward_backward(monkeypatch):
    """A model case differentiates each side's own parameters, not its inputs (which need no grad)."""
    params = {"ours": torch.ones(3, requires_grad=True), "torch": torch.full((3,), 2.0, requires_grad=True)}
    seen = []
    real_grad = torch.autograd.grad

    def grad(outputs, inputs, grad_outputs):
        seen.append([t is params["ours"] or t is params["torch"] for t in inputs])
        return real_grad(outputs, inputs, grad_outputs)

    case = Case(op="model", name="m", describe="m", make_inputs=lambda device, dtype: (torch.ones(3),),
                ours=lambda x: (x * params["ours"]).sum(), reference=lambda x: (x * params["torch"]).sum(),
                grad_targets=lambda who: [params[who]])
    monkeypatch.setattr(harness, "_time", lambda stmt_fn, threads, min_run_time: stmt_fn() or 1.0)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    harness.measure(case, "cpu", threads=1, rounds=1, min_run_time=0.0)
    assert seen and all(s == [True] for s in seen)


def test_gflops_table_uses_the_counted_flops(capsys):
    row = {"op": "conv2d", "case": "c", "flops_fwd": 2e9, "flops_fwd_bwd": 6e9, "fwd_ours_s": 0.01,
           "fwd_torch_s": 0.02, "fb_ours_s": 0.03, "fb_torch_s": 0.06}
    harness.print_gflops([row, {"op": "relu", "case": "r"}], (500.0, "AVX-512"))
    out = capsys.readouterr().out
    assert "conv2d     c                   200       100       200       100" in out
    assert "relu" not in out and "measured FMA peak: 500 GFLOP/s" in out
