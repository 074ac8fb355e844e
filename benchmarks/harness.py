"""Times every case of the suite, ours against torch's, and prints the ratio ours/torch.

    python -m benchmarks.harness [--quick] [--device cpu|cuda] [--op relu ...] [--json PATH]
    python -m torch_cs231n bench ...            (the same)

Method: torch.utils.benchmark.Timer with num_threads=2 (its default of 1 would override
torch.set_num_threads), the median of blocked_autorange, ours and torch's interleaved in one process over
several rounds, in ABBA order (the median of the rounds is reported, and their spread). Forward+backward is
``torch.autograd.grad(fn(*inputs), inputs, grad)``: no .grad accumulation is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

# glibc otherwise returns blocks over 32 MiB to the kernel after each use and page-faults them in again on
# the next call: large-shape timings then swing by 2x with heap history (docs/architecture.md, Benchmarks).
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def reexec_with_tunables(argv: list[str]) -> None:
    """Restart this process with GLIBC_TUNABLES set (it is read only when the process starts)."""
    if os.environ.get("GLIBC_TUNABLES") == GLIBC_TUNABLES or os.environ.get("TORCH_CS231N_NO_REEXEC"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + argv, env)


def _time(stmt_fn, threads: int, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": stmt_fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure(case, device: str, threads: int, rounds: int, min_run_time: float) -> dict:
    import torch

    inputs = case.make_inputs(device, case.dtype or torch.float32)
    grad_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with torch.no_grad():
        out_shape_ref = case.reference(*inputs)
    grad = torch.randn_like(out_shape_ref)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run

    def forward_backward(fn, who):
        targets = case.grad_targets(who) if case.grad_targets else grad_inputs
        def run():
            torch.autograd.grad(fn(*inputs), targets, grad)
        return run

    # Warm up: the first calls grow the heap (page faults) and fill caches; they are not what is measured.
    for who, fn in (("ours", case.ours), ("torch", case.reference)):
        for _ in range(2):
            forward(fn)()
            forward_backward(fn, who)()

    samples = {k: [] for k in ("fwd_ours", "fwd_torch", "fb_ours", "fb_torch")}
    timed = {"ours": case.ours, "torch": case.reference}
    for r in range(rounds):
        # Interleaved, so that drifts in machine load hit both alike, and in ABBA order (ours first in
        # even rounds, torch first in odd ones), so that neither always runs in the other's wake.
        order = ("ours", "torch") if r % 2 == 0 else ("torch", "ours")
        for who in order:
            samples[f"fwd_{who}"].append(_time(forward(timed[who]), threads, min_run_time))
        for who in order:
            samples[f"fb_{who}"].append(_time(forward_backward(timed[who], who), threads, min_run_time))
    med = {k: statistics.median(v) for k, v in samples.items()}
    spread = {k: (min(v), max(v)) for k, v in samples.items()}
    return {
        "op": case.op,
        "case": case.name,
        "describe": case.describe,
        "device": device,
        **{f"{k}_s": v for k, v in med.items()},
        "spread_s": spread,
        "ratio_fwd": med["fwd_ours"] / med["fwd_torch"],
        "ratio_fwd_bwd": med["fb_ours"] / med["fb_torch"],
        "target": case.target,
        **{k: v for k, v in case.extra.items() if k.startswith("flops_")},
    }


def _ms(s: float) -> str:
    return f"{s * 1e3:9.3f}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'op':<10} {'case':<11} {'shape / arguments':<44} {'fwd ours':>9} {'fwd torch':>9} {'ratio':>6}"
            f" {'f+b ours':>9} {'f+b torch':>9} {'ratio':>6} {'target':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']:.2f}"
        flag = "" if r["target"] is None or r["ratio_fwd_bwd"] <= r["target"] else "  MISSED"
        print(f"{r['op']:<10} {r['case']:<11} {r['describe'][:44]:<44} {_ms(r['fwd_ours_s'])} {_ms(r['fwd_torch_s'])}"
              f" {r['ratio_fwd']:6.2f} {_ms(r['fb_ours_s'])} {_ms(r['fb_torch_s'])} {r['ratio_fwd_bwd']:6.2f}"
              f" {target:>6}{flag}")
    print("times in ms (median of rounds of blocked_autorange medians); ratio = ours / torch")


def print_gflops(rows: list[dict], peak) -> None:
    """GFLOP/s of the cases that count their flops (the convolutions), beside the machine's FMA peak."""
    rows = [r for r in rows if "flops_fwd" in r]
    if not rows:
        return
    print()
    print(f"{'op':<10} {'case':<13} {'fwd ours':>9} {'fwd torch':>9} {'f+b ours':>9} {'f+b torch':>9}   GFLOP/s")
    for r in rows:
        cells = [r["flops_fwd"] / r["fwd_ours_s"], r["flops_fwd"] / r["fwd_torch_s"],
                 r["flops_fwd_bwd"] / r["fb_ours_s"], r["flops_fwd_bwd"] / r["fb_torch_s"]]
        print(f"{r['op']:<10} {r['case']:<13} " + " ".join(f"{c / 1e9:9.0f}" for c in cells))
    if peak is not None:
        print(f"measured FMA peak: {peak[0]:.0f} GFLOP/s float32 ({peak[1]}, benchmarks/peak_fma.cpp)")


def main(argv: list[str] | None = None, reexec_argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes, one short round each")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--op", action="append", help="only this layer (repeatable): relu, conv2d, ...")
    parser.add_argument("--case", action="append", help="only this shape name (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default="bench-results/bench.json", help="where to write the results")
    parser.add_argument("--suite", choices=["cpu", "gpu"], default=None,
                        help="the shape suite: cpu (the default on the CPU) or gpu (GPU-sized shapes, batch >= 64; "
                             "the default with --device cuda)")
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA: time with torch.backends.cudnn.allow_tf32 on, for torch's cuDNN and for our "
                             "convolution alike (TF32 against TF32); the default is float32 against float32")
    args = parser.parse_args(argv)
    suite = args.suite or ("gpu" if args.device == "cuda" else "cpu")

    reexec_with_tunables(reexec_argv if reexec_argv is not None else ["-m", "benchmarks.harness"] + sys.argv[1:])

    import torch

    import torch_cs231n

    from .suite import all_cases

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    min_run_time = 0.2 if args.quick else 0.5
    cases = [c for c in all_cases() if c.suite == suite and (not args.op or c.op in args.op)
             and (not args.case or c.name in args.case) and (c.quick or not args.quick)]
    info = torch_cs231n.build_info()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"torch_cs231n {info['version']} ({info['backend']}, cuda={info['cuda']}), torch {torch.__version__}, "
          f"device {args.device} ({device_name}), {args.threads} threads, {rounds} round(s)"
          + (", TF32 on both sides" if args.tf32 else ""))
    rows = []
    from torch_cs231n.check import full_float32_references

    def matched_precision():
        # float32 against float32 (TF32 off on both sides), or with --tf32 TF32 against TF32: our CUDA
        # convolution follows the same flag as cuDNN's (cuda/blas.cuh)
        if not args.tf32:
            return full_float32_references()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                           allow_tf32=True)

    for case in cases:
        with matched_precision():
            rows.append(measure(case, args.device, args.threads, rounds, min_run_time))
        print(f"  {case.op} {case.name}: fwd+bwd ratio {rows[-1]['ratio_fwd_bwd']:.2f}", flush=True)
    print()
    print_table(rows)
    peak = None
    if args.device == "cpu" and any("flops_fwd" in r for r in rows):
        from .peak import peak_gflops

        peak = peak_gflops(args.threads)
    print_gflops(rows, peak)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": device_name, "threads": args.threads,
                       "torch": torch.__version__, "build": info, "fma_peak_gflops": peak and peak[0],
                       "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
