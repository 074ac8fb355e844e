"""The machine's measured float32 FMA peak (GFLOP/s), for the benchmark tables.

`peak_gflops(threads)` compiles benchmarks/peak_fma.cpp with the system's g++ for the widest vectors this
CPU reports (AVX-512, else AVX2+FMA) and runs it: independent FMA chains in registers on every thread, the
best of 5 rounds. Returns None where it cannot (no g++, no AVX2): the tables then leave the peak out.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def peak_gflops(threads: int) -> tuple[float, str] | None:
    """(GFLOP/s over `threads` threads, the instruction set), or None."""
    flags = _cpu_flags()
    if {"avx512f"} <= flags:
        isa, arch = "AVX-512", ["-mavx512f", "-mfma"]
    elif {"avx2", "fma"} <= flags:
        isa, arch = "AVX2+FMA", ["-mavx2", "-mfma"]
    else:
        return None
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "peak_fma")
        built = subprocess.run([compiler, "-O2", "-fopenmp", *arch, os.path.join(HERE, "peak_fma.cpp"), "-o", binary],
                               capture_output=True, text=True)
        if built.returncode != 0:
            return None
        ran = subprocess.run([binary, str(threads)], capture_output=True, text=True, timeout=120)
        if ran.returncode != 0:
            return None
        return float(ran.stdout.strip()), isa
