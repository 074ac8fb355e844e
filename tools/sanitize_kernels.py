"""The shared-memory CUDA kernels once each, on tiny inputs, for `compute-sanitizer --tool racecheck` in
`make gpu-check`.

The CPU emulation (tests/cuda_emulation/) runs a block's threads in one fixed order, so it cannot show a
shared-memory race; racecheck on a real GPU can, and tiny inputs keep its slow instrumented run short. Every
tile shape and arithmetic of the implicit GEMM (and its candidate with cp.async copies), the depthwise tiles
and tall tiles, both forms of the flat pool backward, the fused batch-norm update and batch norm's two
stages and one block per channel run here (each chosen by its variable, so that the run covers them
whatever the defaults). Exit status 0 when everything ran; the
sanitizer's own exit code reports the hazards it found. Run from anywhere:

    compute-sanitizer --tool racecheck --error-exitcode 1 python3 tools/sanitize_kernels.py
"""
import os
import sys

# Run as a script, Python puts tools/ on the path, not the checkout that holds the built torch_cs231n (the
# first H200 racecheck stopped there).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.update(TORCH_CS231N_CUDA_CONV="implicit", TORCH_CS231N_CUDA_DEPTHWISE="tiles",
                  TORCH_CS231N_CUDA_POOL_BACKWARD="flat", TORCH_CS231N_CUDA_BN_UPDATE="fused")

import torch  # noqa: E402

import torch_cs231n  # noqa: E402,F401  (loads the kernels)
from torch_cs231n import functional as ours  # noqa: E402


def conv(shape, weight, dtype, **kwargs):
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(weight, device="cuda", dtype=dtype, requires_grad=True)
    y = ours.conv2d(x, w, **kwargs)
    y.backward(torch.randn_like(y))


def main():
    cudnn = torch.backends.cudnn
    for loads in ("registers", "async"):  # the proven kernel, then the candidate with cp.async copies
        os.environ["TORCH_CS231N_CUDA_CONV_LOADS"] = loads
        for tf32 in (True, False):  # MmaTf32 and SimtFma
            cudnn.allow_tf32 = tf32
            conv((2, 40, 9, 9), (130, 40, 3, 3), torch.float32, padding=1)  # Square forward; d_weight Square
            conv((2, 64, 9, 9), (64, 64, 3, 3), torch.float32, padding=1, stride=2)  # Tall, d_input's division
            conv((1, 130, 6, 6), (40, 130, 1, 1), torch.float32)  # Wide d_weight (40 filters, 130 columns)
    conv((2, 40, 9, 9), (64, 40, 3, 3), torch.float16, padding=1)
    for depthwise in ("tiles", "tall"):  # the earlier tiles, then the tall tiles (the default)
        os.environ["TORCH_CS231N_CUDA_DEPTHWISE"] = depthwise
        conv((2, 32, 11, 13), (64, 1, 3, 3), torch.float32, padding=1, groups=32)  # multiplier 2
        conv((2, 8, 11, 13), (8, 1, 5, 5), torch.float64, padding=2, groups=8)
    for kwargs in (dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=1)):  # scatter, gather
        x = torch.randn(2, 3, 9, 10, device="cuda", requires_grad=True)
        y = ours.max_pool2d(x, **kwargs)
        y.backward(torch.randn_like(y))
    for kernels in ("stages", "channels"):  # the two stages, then one block per channel
        os.environ["TORCH_CS231N_CUDA_BN"] = kernels
        bn = torch_cs231n.BatchNorm2d(5).cuda()
        x = torch.randn(4, 5, 3, 3, device="cuda", requires_grad=True)
        bn(x).backward(torch.randn_like(x))
    torch.cuda.synchronize()
    print("sanitize_kernels: every shared-memory kernel ran")


if __name__ == "__main__":
    main()
