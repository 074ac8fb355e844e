"""Conv2d cases: the issue's shapes. Targets (forward+backward, ours/torch where torch uses oneDNN):
<= 1.5 on the dense shapes, <= 1.0 on depthwise (oneDNN is far from peak there)."""
import torch
import torch.nn.functional as F

import torch_cs231n.functional as ours

from .suite import Case

# name: (input shape, out_channels, kernel, stride, padding, groups, target)
CONV_CASES = {
    "cs231n": ((50, 3, 32, 32), 32, 7, 1, 3, 1, 1.5),
    "resnet": ((32, 64, 56, 56), 64, 3, 1, 1, 1, 1.5),
    "deep": ((32, 256, 14, 14), 256, 3, 1, 1, 1, 1.5),
    "strided": ((32, 128, 28, 28), 256, 3, 2, 1, 1, 1.5),
    "pointwise": ((32, 256, 28, 28), 128, 1, 1, 0, 1, 1.5),
    "stem": ((32, 3, 224, 224), 64, 7, 2, 3, 1, 1.5),
    "depthwise": ((32, 128, 56, 56), 128, 3, 1, 1, 128, 1.0),
}


def cases():
    for name, (shape, f, k, stride, padding, groups, target) in CONV_CASES.items():
        def make_inputs(device, dtype, shape=shape, f=f, k=k, groups=groups):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
            w = (torch.randn(f, shape[1] // groups, k, k, generator=g) * 0.1).to(device, dtype).requires_grad_()
            b = torch.randn(f, generator=g).to(device, dtype).requires_grad_()
            return x, w, b

        kwargs = dict(stride=stride, padding=padding, groups=groups)
        yield Case(
            op="conv2d",
            name=name,
            describe=f"{shape} {f}x{k}x{k} s{stride} p{padding}" + (f" g{groups}" if groups > 1 else ""),
            make_inputs=make_inputs,
            ours=lambda x, w, b, kwargs=kwargs: ours.conv2d(x, w, b, **kwargs),
            reference=lambda x, w, b, kwargs=kwargs: F.conv2d(x, w, b, **kwargs),
            target=target,
            quick=name in ("cs231n", "resnet", "depthwise"),
        )
