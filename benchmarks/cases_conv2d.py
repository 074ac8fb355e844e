"""Conv2d cases: the issues' shapes. Targets (forward+backward, ours/torch where torch uses oneDNN):
<= 1.25 on the dense shapes, NCHW and channels_last, and <= 1.0 on depthwise (the CPU-convolution
issue; its forward-alone target, <= 1.2 on the dense shapes, is read off the same table)."""
import torch
import torch.nn.functional as F

import torch_cs231n.functional as ours

from .suite import Case

# name: (input shape, out_channels, kernel, stride, padding, groups, channels_last, target)
CONV_CASES = {
    "cs231n": ((50, 3, 32, 32), 32, 7, 1, 3, 1, False, 1.25),
    "resnet": ((32, 64, 56, 56), 64, 3, 1, 1, 1, False, 1.25),
    "deep": ((32, 256, 14, 14), 256, 3, 1, 1, 1, False, 1.25),
    "strided": ((32, 128, 28, 28), 256, 3, 2, 1, 1, False, 1.25),
    "pointwise": ((32, 256, 28, 28), 128, 1, 1, 0, 1, False, 1.25),
    "stem": ((32, 3, 224, 224), 64, 7, 2, 3, 1, False, 1.25),
    "depthwise": ((32, 128, 56, 56), 128, 3, 1, 1, 128, False, 1.0),
    "resnet_cl": ((32, 64, 56, 56), 64, 3, 1, 1, 1, True, 1.25),
    "pointwise_cl": ((32, 256, 28, 28), 128, 1, 1, 0, 1, True, 1.25),
    "strided_cl": ((32, 128, 28, 28), 256, 3, 2, 1, 1, True, 1.25),
    # ResNeXt-50 32x4d's second stage: 32 groups of 8 channels (cpu/conv2d_grouped.h)
    "grouped": ((32, 256, 28, 28), 256, 3, 1, 1, 32, False, 1.25),
    "grouped_cl": ((32, 256, 28, 28), 256, 3, 1, 1, 32, True, 1.25),
}


def cases():
    for name, (shape, f, k, stride, padding, groups, channels_last, target) in CONV_CASES.items():
        def make_inputs(device, dtype, shape=shape, f=f, k=k, groups=groups, channels_last=channels_last):
            g = torch.Generator().manual_seed(0)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
            w = (torch.randn(f, shape[1] // groups, k, k, generator=g) * 0.1).to(device, dtype)
            w = w.contiguous(memory_format=fmt).requires_grad_()
            b = torch.randn(f, generator=g).to(device, dtype).requires_grad_()
            return x, w, b

        kwargs = dict(stride=stride, padding=padding, groups=groups)
        n, c, h, w = shape
        oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
        flops = 2 * n * f * (c // groups) * k * k * oh * ow  # forward; d_x and d_W cost as much each
        yield Case(
            op="conv2d",
            name=name,
            describe=f"{shape} {f}x{k}x{k} s{stride} p{padding}" + (f" g{groups}" if groups > 1 else "")
            + (" channels_last" if channels_last else ""),
            make_inputs=make_inputs,
            ours=lambda x, w, b, kwargs=kwargs: ours.conv2d(x, w, b, **kwargs),
            reference=lambda x, w, b, kwargs=kwargs: F.conv2d(x, w, b, **kwargs),
            target=target,
            quick=name in ("cs231n", "resnet", "depthwise"),
            extra={"flops_fwd": flops, "flops_fwd_bwd": 3 * flops},
        )
