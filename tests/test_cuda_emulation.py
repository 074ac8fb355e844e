"""The CUDA kernels written to be emulated, run on the CPU.

tests/cuda_emulation/ compiles csrc/cuda/conv2d_implicit_gemm.cuh, conv2d_winograd.cuh,
conv2d_few_channels.cuh, conv2d_depthwise.cuh and max_pool2d_backward.cuh as plain C++ with an emulation of the GPU (a block's threads as fibers, its
barriers, the warp's tensor-core MMA with the PTX ISA's fragment layout) and compares them with references
written out loop by loop: the convolution's forward, d_input and d_weight (TF32, float32, float64) with
float64, max-pool's backward with rule (3). So a wrong index, fragment layout or barrier shows here, on any machine; only
a real GPU can show the speed, and races that the emulation's fixed schedule hides. They are compiled with
AddressSanitizer and UndefinedBehaviorSanitizer, so a read past a buffer (the implicit GEMM clamps the
rows and columns past its matrix's end, which a GPU would read silently) or a 32-bit index that overflows
fails here too. int_divider_test proves common/int_divider.h, the fixed-point division the kernels decode
positions with.
"""

import os
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "tests", "cuda_emulation")


@pytest.mark.parametrize("program", ["conv2d_test", "max_pool2d_test", "int_divider_test"])
def test_kernels_agree_with_their_reference_under_emulation(tmp_path, program):
    """conv2d_test: the implicit GEMM, Winograd, the few channels' d_input and the depthwise tiles against
    float64; max_pool2d_test: the flat backward against rule (3); int_divider_test: the fixed-point
    quotients against `/`."""
    cxx = os.environ.get("CXX", "c++")
    assert shutil.which(cxx), f"no C++ compiler ({cxx}): the extension's build needs one too"
    exe = str(tmp_path / program)
    torch_include = torch.utils.cpp_extension.include_paths()[0]  # c10/macros only
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-Wall", "-Wno-unknown-pragmas",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-I", os.path.join(ROOT, "csrc"),
         "-I", torch_include, os.path.join(HERE, f"{program}.cpp"), "-o", exe],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    # conv2d_test ran 198 s on a 2-core CI-like machine (2026-12-01), whose speed swung by 2x within minutes
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "all cases agree" in run.stdout, run.stdout + run.stderr
