"""The GPU suite: GPU-sized shapes (batch >= 64, so that kernels outweigh launches), timed by
`bench --device cuda` (and `make gpu-check`). Targets are those of the CUDA issue, forward+backward:
dense conv <= 1.5 of cuDNN at matched precision (the harness times CUDA with TF32 off on both sides:
our CUDA conv computes in float32), depthwise and 1x1 <= 1.2, max-pool, batch norm and ReLU <= 1.1,
batch norm at the CPU suite's small shapes <= 1.5.
"""
import torch
import torch.nn.functional as F

import torch_cs231n.functional as ours

from .cases_batch_norm import _inputs as _bn_inputs
from .cases_batch_norm import _with_running_stats
from .suite import Case

# name: (input shape, out_channels, kernel, stride, padding, groups, target)
_CONV = {
    "conv3x3": ((128, 64, 56, 56), 64, 3, 1, 1, 1, 1.5),
    "conv3x3_deep": ((128, 256, 14, 14), 256, 3, 1, 1, 1, 1.5),
    "stem": ((128, 3, 224, 224), 64, 7, 2, 3, 1, 1.5),
    "depthwise": ((128, 128, 56, 56), 128, 3, 1, 1, 128, 1.2),
    "pointwise": ((128, 256, 28, 28), 128, 1, 1, 0, 1, 1.2),
}
_POOL_SHAPE = (128, 64, 112, 112)
_BN_SHAPES = {"bn_large": (128, 64, 112, 112), "bn_cs231n": (50, 32, 32, 32), "bn_deep": (32, 256, 14, 14)}


def _conv_cases():
    for name, (shape, f, k, stride, padding, groups, target) in _CONV.items():
        def make_inputs(device, dtype, shape=shape, f=f, k=k, groups=groups):
            x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
            w = (torch.randn(f, shape[1] // groups, k, k, device=device, dtype=dtype) * 0.1).requires_grad_()
            b = torch.randn(f, device=device, dtype=dtype, requires_grad=True)
            return x, w, b

        kwargs = dict(stride=stride, padding=padding, groups=groups)
        yield Case(op="conv2d", name=name, describe=f"{shape} {f}x{k}x{k} s{stride} p{padding} g{groups}",
                   make_inputs=make_inputs, ours=lambda x, w, b, kwargs=kwargs: ours.conv2d(x, w, b, **kwargs),
                   reference=lambda x, w, b, kwargs=kwargs: F.conv2d(x, w, b, **kwargs), target=target,
                   suite="gpu")


def cases():
    yield from _conv_cases()

    def pool_input(device, dtype):
        return (torch.randn(_POOL_SHAPE, device=device, dtype=dtype, requires_grad=True),)

    yield Case(op="max_pool2d", name="pool2x2", describe=f"{_POOL_SHAPE} k2 s2", make_inputs=pool_input,
               ours=lambda x: ours.max_pool2d(x, 2, 2), reference=lambda x: F.max_pool2d(x, 2, 2), target=1.1,
               suite="gpu")
    yield Case(op="max_pool2d", name="pool3x3", describe=f"{_POOL_SHAPE} k3 s2 p1", make_inputs=pool_input,
               ours=lambda x: ours.max_pool2d(x, 3, 2, 1), reference=lambda x: F.max_pool2d(x, 3, 2, 1),
               target=1.1, suite="gpu")
    for name, shape in _BN_SHAPES.items():
        yield Case(op="batch_norm", name=name, describe=f"{shape} training",
                   make_inputs=lambda device, dtype, shape=shape: _bn_inputs(device, dtype, shape),
                   ours=_with_running_stats(ours.batch_norm), reference=_with_running_stats(F.batch_norm),
                   target=1.1 if name == "bn_large" else 1.5, suite="gpu")
    yield Case(op="relu", name="relu", describe=f"{_POOL_SHAPE}", make_inputs=pool_input, ours=ours.relu,
               reference=F.relu, target=1.1, suite="gpu")
