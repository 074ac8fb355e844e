"""Command line: ``python -m torch_cs231n demo | bench``.

    demo   what is built (ops, CUDA or not, version) and ReLU on a sample
    bench  the benchmark suite, ours against torch (needs the source checkout's benchmarks/)
"""
from __future__ import annotations

import argparse
import os
import sys


def _demo(args) -> int:
    import torch

    import torch_cs231n

    info = torch_cs231n.build_info()
    ops = sorted(o.split("::")[1] for o in torch._C._dispatch_get_all_op_names() if o.startswith("torch_cs231n::"))
    print(f"torch_cs231n {info['version']} ({info['backend']} build, CUDA kernels: {'yes' if info['cuda'] else 'no'},"
          f" OpenMP: {'yes' if info['openmp'] else 'no'}) on torch {info['torch']}")
    print("ops:", ", ".join(ops))
    device = args.device
    x = torch.linspace(-2, 2, 9, device=device).reshape(1, 1, 3, 3).requires_grad_()
    y = torch_cs231n.ReLU()(x)
    y.sum().backward()
    print(f"ReLU on {device}:\n input  {x.detach().flatten().tolist()}\n output {y.detach().flatten().tolist()}"
          f"\n d/dx   {x.grad.flatten().tolist()}")
    return 0


def _bench(argv: list[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "harness.py")):
        print("torch_cs231n bench: the benchmarks/ folder of a source checkout is needed "
              f"(looked in {root})", file=sys.stderr)
        return 2
    sys.path.insert(0, root)
    from benchmarks import harness

    return harness.main(argv, reexec_argv=["-m", "torch_cs231n", "bench"] + argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":  # its options belong to the harness
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m torch_cs231n", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show the build and run the layers on a sample")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sub.add_parser("bench", help="time every op against torch (see `bench --help`)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
