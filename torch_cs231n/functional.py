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


# --------------------------------------------------------------------------------------------- batch norm
__all__.append("batch_norm")


class _BatchNormTrain(torch.autograd.Function):
    """Training: normalise with the batch's statistics, which depend on x (so dx has three terms).

    Returns (output, mean, invstd, var); only the output is differentiable. The backward is our kernel's
    closed form, not a graph of differentiable ops, hence once_differentiable: a double backward raises
    torch's clear error instead of giving a silently wrong answer.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, eps):
        output, mean, invstd, var = ops.batch_norm_forward_train(input, weight, bias, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(mean, invstd, var)
        return output, mean, invstd, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, _mean, _invstd, _var):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dx, dw, db = ops.batch_norm_backward(grad_output, input, weight, mean, invstd, True, mask)
        return dx, _as_param(dw, weight), _as_param(db, ctx.bias_dtype), None


class _BatchNormEval(torch.autograd.Function):
    """Eval: normalise with the running statistics, constants for autograd: dx = gamma * invstd * dy."""

    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, eps):
        ctx.save_for_backward(input, weight, running_mean, running_var)
        ctx.eps = eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return ops.batch_norm_forward_eval(input, running_mean, running_var, weight, bias, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, weight, running_mean, running_var = ctx.saved_tensors
        invstd = torch.rsqrt(running_var + ctx.eps)  # C values: the kernel computes it the same way
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        dx, dw, db = ops.batch_norm_backward(grad_output, input, weight, running_mean, invstd, False, mask)
        return dx, None, None, _as_param(dw, weight), _as_param(db, ctx.bias_dtype), None


def _as_param(grad, like):
    """The kernels give dgamma/dbeta in the statistics dtype (float for a half input); the parameter's own
    dtype is what autograd expects (`like`: the parameter, or its dtype)."""
    dtype = like.dtype if isinstance(like, torch.Tensor) else like
    return grad if grad is None or dtype is None or grad.dtype == dtype else grad.to(dtype)


def _values_per_channel(size) -> int:
    n = size[0]
    for s in size[2:]:
        n *= s
    return n


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Like ``torch.nn.functional.batch_norm``: per-channel normalisation over dim 0 and dims 2.. .

    Training normalises with the batch's biased variance and, when running statistics are given, updates
    them in place (running_mean <- (1 - momentum) running_mean + momentum mean; running_var likewise with
    the unbiased variance var * M / (M - 1), M = values per channel). Eval normalises with the running
    statistics. Input of 2 or more dims, (N, C, ...), as F.batch_norm; the output has the input's
    suggested memory format (channels_last stays channels_last).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}")
    # F.batch_norm's own checks, with its messages and exception types.
    if training:
        size = input.size()
        if input.dim() >= 2 and _values_per_channel(size) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")

    if not training:
        if running_mean is None or running_var is None:
            raise RuntimeError("running_mean must be defined in evaluation mode" if running_mean is None
                               else "running_var must be defined in evaluation mode")
        return _BatchNormEval.apply(input, running_mean, running_var, weight, bias, eps)

    output, mean, _invstd, var = _BatchNormTrain.apply(input, weight, bias, eps)
    if (running_mean is not None or running_var is not None) and input.numel() > 0:
        # An empty batch leaves the running statistics alone, as torch does.
        m = _values_per_channel(input.size())
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                unbiased = var * (m / (m - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return output
