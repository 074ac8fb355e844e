"""Batch norm cases: training forward+backward at the issue's three shapes. Target: ratio <= 1.0.
The same shapes in channels_last are timed too, without a target.

Both sides get the same fresh parameters and their own running statistics (updated on every call, as in
a training step); the reference is F.batch_norm with training=True.
"""
import torch
import torch.nn.functional as F

import torch_cs231n.functional as ours

from .suite import SHAPES, Case


def _inputs(device, dtype, shape, channels_last=False):
    c = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (
        x.requires_grad_(),
        torch.rand(c, device=device, dtype=dtype).add_(0.5).requires_grad_(),
        torch.randn(c, device=device, dtype=dtype, requires_grad=True),
    )


def _with_running_stats(fn):
    stats = {}

    def run(x, weight, bias):
        if not stats:
            stats["mean"] = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
            stats["var"] = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
        return fn(x, stats["mean"], stats["var"], weight, bias, training=True, momentum=0.1, eps=1e-5)

    return run


def cases():
    for name in ("cs231n", "resnet", "deep"):
        shape = SHAPES[name]
        yield Case(
            op="batch_norm",
            name=name,
            describe=f"{tuple(shape)} training",
            make_inputs=lambda device, dtype, shape=shape: _inputs(device, dtype, shape),
            ours=_with_running_stats(ours.batch_norm),
            reference=_with_running_stats(F.batch_norm),
            target=1.0,
            quick=True,
        )
    # channels_last: informative (no target), not part of --quick.
    for name in ("cs231n", "resnet", "deep"):
        shape = SHAPES[name]
        yield Case(
            op="batch_norm",
            name=name + "_cl",
            describe=f"{tuple(shape)} training channels_last",
            make_inputs=lambda device, dtype, shape=shape: _inputs(device, dtype, shape, channels_last=True),
            ours=_with_running_stats(ours.batch_norm),
            reference=_with_running_stats(F.batch_norm),
            target=None,
            quick=False,
        )
