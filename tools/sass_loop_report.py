"""What the GPU will execute, read without a GPU: each implicit-GEMM kernel's registers and the instructions
its main loop issues per stage.

    python tools/sass_loop_report.py [--arch 90] [--source csrc/cuda/conv2d_implicit_gemm.cu]

compiles the source to a cubin for one architecture (nvcc, the flags of the build), disassembles it
(nvdisasm: the CUDA toolkit's, or $NVDISASM; pip's nvidia-cuda-nvdisasm wheel carries one too), and prints
for every kernel with a loop of MMAs or FMAs: its registers and spills (ptxas), and the loop's
instructions by kind ("local": spilled registers, read or written inside the loop). A stage multiplies a
16-deep slice of the block's tiles; what is not an MMA, FMA or a load/store of the operands is the
loaders' index arithmetic and the loop's own bookkeeping, and on the tensor cores it is what the loop's
speed depends on (docs/conv2d.md). The counts are static: a branch inside the loop counts both sides.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from torch_cs231n import _build_config as cfg  # noqa: E402  (before torch: it sets CUDA_HOME)

KINDS = {"HMMA": "mma", "FFMA": "ffma", "LDS": "lds", "LDSM": "lds", "STS": "sts", "LDG": "ldg", "LD": "ldg",
         "LDL": "local", "STL": "local"}


def compile_cubin(source: str, arch: str, out: str) -> str:
    """The cubin at out, and ptxas's -v report."""
    home = cfg.configure_cuda_env()  # before cpp_extension reads CUDA_HOME
    if home is None:
        sys.exit("sass_loop_report: no CUDA toolkit (nvcc) found")
    import torch.utils.cpp_extension as ext
    includes = cfg.include_dirs(True) + ext.include_paths()
    cmd = [os.path.join(home, "bin", "nvcc"), "-cubin", "-o", out, f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-std=c++20", "-Xptxas", "-v", *cfg.nvcc_flags(), "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-DTORCH_EXTENSION_NAME=_C", *ext.COMMON_NVCC_FLAGS, *[f"-I{d}" for d in includes], source]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(run.stderr)
    return run.stderr


def find_nvdisasm() -> str:
    home = cfg.find_cuda_home()
    for candidate in (os.environ.get("NVDISASM"), home and os.path.join(home, "bin", "nvdisasm"),
                      shutil.which("nvdisasm")):
        if candidate and os.path.isfile(candidate):
            return candidate
    sys.exit("sass_loop_report: no nvdisasm: set NVDISASM, or pip download nvidia-cuda-nvdisasm and unpack it")


def registers(ptxas: str) -> dict[str, tuple[int, int]]:
    """kernel -> (registers, spill-store bytes), from ptxas -v."""
    out, kernel = {}, None
    for line in ptxas.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            spill = re.search(r"(\d+) bytes spill stores", ptxas[ptxas.index(kernel):])
            out[kernel] = (int(m.group(1)), int(spill.group(1)) if spill else 0)
    return out


def main_loops(sass: str) -> dict[str, list[str]]:
    """kernel -> the instructions of its longest backward-branching loop that holds MMAs or FMAs."""
    functions: dict[str, list[tuple[str, str]]] = collections.OrderedDict()
    current = None
    for line in sass.splitlines():
        m = re.match(r"^\s*\.text\.(\S+):", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            current.append(("label", m.group(1)))
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            current.append(("op", m.group(1).strip()))
    loops = {}
    for name, items in functions.items():
        labels, ops = {}, []
        for kind, text in items:
            if kind == "label":
                labels[text] = len(ops)
            else:
                ops.append(text)
        best = None
        for i, op in enumerate(ops):
            m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", op)
            start = labels.get(m.group(1)) if m else None
            if start is None or start > i:
                continue
            body = ops[start:i + 1]
            if any(("HMMA" in o or "FFMA" in o) for o in body) and (best is None or len(body) > len(best)):
                best = body
        if best:
            loops[name] = best
    return loops


def describe(kernel: str) -> str:
    """A short name for an implicit_gemm_kernel instantiation (its loaders say which product it is)."""
    tile = re.search(r"TileShapeILi(\d+)ELi(\d+)", kernel)
    if not tile:
        return kernel[:60]
    math = "tf32" if "MmaTf32" in kernel else "fma"
    dtype = "bf16" if "BFloat16" in kernel else "fp16" if "Half" in kernel else "fp32"
    product = ("d_weight" if "PlanesAlongK" in kernel or "FilterRunsAlongM" in kernel
               else "d_input/s" if "Lb1E" in kernel else "forward, d_input")
    kind = "async" if "async_kernel" in kernel else "nhwc" if "RunsAlong" in kernel else ""
    return f"{product:16s} {dtype} {math:4s} {tile.group(1)}x{tile.group(2):3s} {kind:5s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    parser.add_argument("--source", default=os.path.join(ROOT, "csrc", "cuda", "conv2d_implicit_gemm.cu"))
    args = parser.parse_args()
    nvdisasm = find_nvdisasm()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernels.cubin")
        ptxas = compile_cubin(args.source, args.arch, cubin)
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    regs = registers(ptxas)
    rows = []
    for kernel, loop in main_loops(sass).items():
        kinds = collections.Counter()
        for op in loop:
            opcode = re.sub(r"^@!?U?P\w+\s+", "", op).split()[0].split(".")[0]
            kinds[KINDS.get(opcode, "other")] += 1
        r, spill = regs.get(kernel, (0, 0))
        rows.append((describe(kernel), r, spill, len(loop), kinds))
    print(f"{'kernel':42s} {'regs':>4s} {'spill':>5s} {'loop':>5s}  mma/ffma   lds  sts  ldg  local  other")
    for name, r, spill, n, k in sorted(rows):
        print(f"{name:42s} {r:4d} {spill:5d} {n:5d}  {k['mma'] + k['ffma']:8d} {k['lds']:5d} {k['sts']:4d} "
              f"{k['ldg']:4d} {k['local']:6d} {k['other']:6d}")


if __name__ == "__main__":
    main()
