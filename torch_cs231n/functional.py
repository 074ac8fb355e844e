"""The functional API, with the signatures of ``torch.nn.functional``.

Each layer is a ``torch.autograd.Function`` whose forward and backward call our ops
(``torch.ops.torch_cs231n.*``). What backward needs is saved in forward: for ReLU, the output.
"""
from __future__ import annotations

import torch

from . import _extension

_extension.load()
from . import _fake  # noqa: E402,F401  (fake kernels need the ops registered first)

ops = torch.ops.torch_cs231n

__all__ = ["relu"]


# --------------------------------------------------------------------------------------------------- ReLU
class _ReLU(torch.autograd.Function):
    """y = max(x, 0); dx = dy * [y > 0]."""

    @staticmethod
    def forward(ctx, input, inplace):
        if inplace:
            ops.relu_forward_(input)
            ctx.mark_dirty(input)
            output = input
        else:
            output = ops.relu_forward(input)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        return _ReLUBackward.apply(grad_output, output), None


class _ReLUBackward(torch.autograd.Function):
    """dx = dy * [y > 0], itself differentiable so that double backward is right.

    d(dx)/d(dy) is the same mask; d(dx)/dy is zero almost everywhere (the mask is a step), as in torch.
    """

    @staticmethod
    def forward(ctx, grad_output, output):
        ctx.save_for_backward(output)
        return ops.relu_backward(grad_output, output)

    @staticmethod
    def backward(ctx, grad_grad_input):
        (output,) = ctx.saved_tensors
        return _ReLUBackward.apply(grad_grad_input, output), None


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Like ``torch.nn.functional.relu``: max(input, 0) elementwise; NaN stays NaN.

    The output has the input's memory format (channels_last stays channels_last).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"relu(): argument 'input' must be Tensor, not {type(input).__name__}")
    return _ReLU.apply(input, bool(inplace))
