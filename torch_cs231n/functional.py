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


# -------------------------------------------------------------------------------------------- MaxPool2d
__all__ += ["max_pool2d"]


def _pool_pair(value, name: str) -> list[int]:
    """An int or a pair of ints, as F.max_pool2d takes them, as [height, width]."""
    if isinstance(value, (list, tuple, torch.Size)):
        if len(value) == 1:  # torch accepts a 1-tuple as "the same in both dimensions"
            value = (value[0], value[0])
        if len(value) != 2:
            raise ValueError(f"max_pool2d(): {name} must be an int or a pair of ints, but got {tuple(value)}")
        return [int(v) for v in value]
    return [int(value), int(value)]


class _MaxPool2d(torch.autograd.Function):
    """y[o] = max of the window of o, index[o] = its flat argmax h*W + w; dx[i] = sum_{index[o]=i} dy[o].

    Saves the indices (and the input, for its shape and memory format, as torch does).
    """

    @staticmethod
    def forward(ctx, input, kernel_size, stride, padding, dilation, ceil_mode):
        output, indices = ops.max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(input, indices)
        ctx.geometry = (kernel_size, stride, padding, dilation, ceil_mode)
        ctx.mark_non_differentiable(indices)
        # Otherwise autograd fills a tensor of zeros for the indices' (never used) gradient on every
        # backward, which costs as much as the backward itself.
        ctx.set_materialize_grads(False)
        return output, indices

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:
            return None, None, None, None, None, None
        input, indices = ctx.saved_tensors
        grad_input = _MaxPool2dBackward.apply(grad_output, input, indices, *ctx.geometry)
        return grad_input, None, None, None, None, None


class _MaxPool2dBackward(torch.autograd.Function):
    """dx = scatter of dy to the saved indices; itself differentiable, so double backward is right.

    It is linear in dy, and its adjoint is the gather ddy[o] = ddx[index[o]]: the derivative of the
    pooled value with respect to its winner is 1 and to everything else 0. Its derivative with respect
    to the input is zero almost everywhere (the indices are piecewise constant), as in torch.
    """

    @staticmethod
    def forward(ctx, grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
        ctx.save_for_backward(indices)
        return ops.max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation,
                                       ceil_mode)

    @staticmethod
    def backward(ctx, grad_grad_input):
        (indices,) = ctx.saved_tensors
        # Gather within each plane: flatten (H, W) of ddx and (OH, OW) of the indices. Plain torch ops,
        # so that this step is itself differentiable (its adjoint is the scatter above).
        flat = grad_grad_input.flatten(-2)
        grad_grad_output = flat.gather(-1, indices.flatten(-2)).view(indices.shape)
        return grad_grad_output, None, None, None, None, None, None, None


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Like ``torch.nn.functional.max_pool2d``: the maximum of each window, over (N, C, H, W) or (C, H, W).

    Padding counts as -inf and may be at most half the effective kernel ``dilation*(kernel_size-1)+1``;
    ``stride`` defaults to ``kernel_size``. Ties go to the first maximum in row-major scan order, NaN
    propagates. With ``return_indices`` it also returns the int64 flat index ``h*W + w`` of each maximum
    within its plane (usable by ``nn.MaxUnpool2d``). The output has torch's memory format (channels_last
    stays channels_last).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"max_pool2d(): argument 'input' must be Tensor, not {type(input).__name__}")
    kernel = _pool_pair(kernel_size, "kernel_size")
    strides = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else \
        _pool_pair(stride, "stride")
    output, indices = _MaxPool2d.apply(input, kernel, strides, _pool_pair(padding, "padding"),
                                       _pool_pair(dilation, "dilation"), bool(ceil_mode))
    return (output, indices) if return_indices else output
