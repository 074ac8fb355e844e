"""MaxPool2d cases: the issue's shapes. Target: ours/torch <= 0.5 for forward+backward (stretch 0.25).

2x2 stride 2 at the CS231n shape, and ResNet's stem pool (3x3 stride 2 padding 1, overlapping windows)
at (32, 64, 56, 56) and (32, 64, 112, 112). NCHW float32, as the rest of the suite; the same shapes in
channels_last are timed too, without a target (torch's own channels_last kernel is much faster than its
NCHW one on the CPU, so the ratio there is against a stronger reference).
"""
import torch
import torch.nn.functional as F

import torch_cs231n.functional as ours

from .suite import SHAPES, Case

# (shape name, kernel, stride, padding)
_CASES = [("cs231n", 2, 2, 0), ("resnet", 3, 2, 1), ("pool", 3, 2, 1)]


def cases():
    for name, k, s, p in _CASES:
        shape = SHAPES[name]
        yield Case(
            op="max_pool2d",
            name=name,
            describe=f"{tuple(shape)} k{k} s{s} p{p}",
            make_inputs=lambda device, dtype, shape=shape: (
                torch.randn(shape, device=device, dtype=dtype, requires_grad=True),
            ),
            ours=lambda x, k=k, s=s, p=p: ours.max_pool2d(x, k, s, p),
            reference=lambda x, k=k, s=s, p=p: F.max_pool2d(x, k, s, p),
            target=0.5,
            quick=name in ("cs231n", "resnet"),
        )
    # channels_last: informative (no target), not part of --quick.
    for name, k, s, p in _CASES:
        shape = SHAPES[name]
        yield Case(
            op="max_pool2d",
            name=name + "_cl",
            describe=f"{tuple(shape)} k{k} s{s} p{p} channels_last",
            make_inputs=lambda device, dtype, shape=shape: (
                torch.randn(shape, device=device, dtype=dtype)
                .contiguous(memory_format=torch.channels_last)
                .requires_grad_(),
            ),
            ours=lambda x, k=k, s=s, p=p: ours.max_pool2d(x, k, s, p),
            reference=lambda x, k=k, s=s, p=p: F.max_pool2d(x, k, s, p),
            target=None,
            quick=False,
        )
