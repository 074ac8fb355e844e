"""Where the time of our layers goes on a GPU: each GPU-suite case (cases_gpu.py), forward+backward through
autograd, under torch.profiler, with the CUDA kernels it launched and their total time per step, beside
the step's wall time. Where the wall time is well above the kernels' (a launch-bound case, such as batch
norm at the suite's small shapes), the host is what to look at, and the ops that took its time are
listed too (self CPU time per step, from a second profile that records the CPU side).

    python -m benchmarks.profile_gpu [--case conv3x3 ...] [--tf32] [--steps 5]

For kernel work: the benchmark (`bench --device cuda`) says how far from torch a layer is, this says
which kernel, or which host-side op, to look at. `make gpu-check` writes its output to gpu-check/.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="only this GPU-suite case (repeatable)")
    parser.add_argument("--steps", type=int, default=5, help="profiled forward+backward steps per case")
    parser.add_argument("--tf32", action="store_true", help="torch.backends.cudnn.allow_tf32 on (it is off here "
                        "by default, as in the benchmark's float32 against float32)")
    parser.add_argument("--rows", type=int, default=12, help="kernels listed per case")
    parser.add_argument("--host-bound", type=float, default=1.5, help="list the host's ops where the wall time "
                        "per step is this many times the kernels' (default 1.5)")
    args = parser.parse_args(argv)

    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    import torch_cs231n  # noqa: F401  (loads the kernels)

    from .cases_gpu import cases

    if not torch.cuda.is_available():
        parser.error("no CUDA device is available")
    torch.backends.cudnn.allow_tf32 = args.tf32
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, TF32 {'on' if args.tf32 else 'off'}")
    for case in cases():
        if args.case and case.name not in args.case:
            continue
        inputs = case.make_inputs("cuda", torch.float32)
        targets = [t for t in inputs if t.requires_grad]
        for who, fn in (("ours", case.ours), ("torch", case.reference)):
            grad = torch.randn_like(fn(*inputs))

            def step(fn=fn, grad=grad, inputs=inputs, targets=targets):
                torch.autograd.grad(fn(*inputs), targets, grad)

            for _ in range(2):  # warm-up: allocator, cuBLAS heuristics, cuDNN's algorithm choice
                step()
            torch.cuda.synchronize()
            start = time.perf_counter()  # unprofiled, as the benchmark times it
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - start) / args.steps * 1e6
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            total_us = sum(e.device_time_total for e in events) / args.steps
            print(f"\n{case.op} {case.name} {case.describe}: {who}, {total_us / 1e3:.3f} ms of kernels per step, "
                  f"{wall_us / 1e3:.3f} ms wall")
            for e in sorted(events, key=lambda e: -e.device_time_total)[: args.rows]:
                per_step = e.device_time_total / args.steps
                print(f"  {per_step / 1e3:8.3f} ms  {100 * per_step / total_us:5.1f}%  x{e.count // args.steps:<3} "
                      f"{e.key[:110]}")
            if wall_us > args.host_bound * total_us:
                host_ops(step, args.steps, args.rows)
    return 0


def host_ops(step, steps: int, rows: int) -> None:
    """The ops that took the host's time in `steps` calls of step: self CPU time per step, with the
    launches (cudaLaunchKernel and the like) among them. Recording the CPU side slows every op down alike,
    so read the shares, not the sum."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events) / steps
    print(f"  host-bound: {total_us / 1e3:.3f} ms of self CPU time per step (profiled), by op:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        per_step = e.self_cpu_time_total / steps
        print(f"    {per_step:8.1f} us  {100 * per_step / total_us:5.1f}%  x{e.count // steps:<3} {e.key[:100]}")


if __name__ == "__main__":
    sys.exit(main())
