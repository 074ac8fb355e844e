"""Command line: ``python -m torch_cs231n demo | bench | check``.

    demo   train a CS231n conv-net built from our layers beside the same net from torch.nn (demo.py)
    bench  the benchmark suite, ours against torch (needs the source checkout's benchmarks/)
    check  gradcheck and comparison with torch.nn.functional for every op; PASS/FAIL table, exit status
"""
from __future__ import annotations

import argparse
import os
import sys


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
    demo = sub.add_parser("demo", help="train a conv-net built from our layers beside torch.nn's (see --help)")
    from . import demo as demo_module

    demo_module.add_arguments(demo)
    sub.add_parser("bench", help="time every op against torch (see `bench --help`)")
    check = sub.add_parser("check", help="gradcheck and compare every op with torch.nn.functional here")
    check.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo_module.main(args)
    if args.command == "check":
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        from .check import run

        return run(args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
