"""Fake (meta) kernels: output shapes, dtypes and strides without computing, for torch.compile and opcheck.

Each must promise exactly what the real kernel returns; ``torch.library.opcheck`` checks that.
"""
import torch

_lib = "torch_cs231n::"


@torch.library.register_fake(_lib + "relu_forward")
def _relu_forward(input):
    return torch.empty_like(input)  # the kernels use at::empty_like too: same strides


@torch.library.register_fake(_lib + "relu_forward_")
def _relu_forward_(self):
    return None


@torch.library.register_fake(_lib + "relu_backward")
def _relu_backward(grad_output, output):
    torch._check(grad_output.shape == output.shape, lambda: "relu_backward: grad_output and output differ in shape")
    return torch.empty_like(output)


@torch.library.register_fake(_lib + "relu_forward_with_mask")
def _relu_forward_with_mask(input):
    output = torch.empty_like(input)
    mask = input.new_empty(((input.numel() + 31) // 32,), dtype=torch.int32)  # one int32 word per 32 elements
    return output, mask


@torch.library.register_fake(_lib + "relu_backward_with_mask")
def _relu_backward_with_mask(grad_output, output, mask):
    torch._check(grad_output.shape == output.shape,
                 lambda: "relu_backward_with_mask: grad_output and output differ in shape")
    words = (output.numel() + 31) // 32
    torch._check(mask.dtype == torch.int32 and mask.shape == (words,),
                 lambda: f"relu_backward_with_mask: expected an int32 mask of shape ({words},), got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    return torch.empty_like(output)


# ------------------------------------------------------------------------------------------------- Conv2d
def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_memory_format(input, weight):
    """csrc/common/conv2d.h's conv2d_memory_format (torch's rule): channels_last when the input or the
    weight suggests it; on CUDA, float64 stays contiguous (cuDNN has no NHWC double kernels)."""
    from torch._prims_common import suggest_memory_format

    if input.device.type == "cuda" and torch.float64 in (input.dtype, weight.dtype):
        return torch.contiguous_format
    cl = torch.channels_last
    return cl if cl in (suggest_memory_format(input), suggest_memory_format(weight)) else torch.contiguous_format


@torch.library.register_fake(_lib + "conv2d_forward")
def _conv2d_forward(input, weight, bias, stride, padding, dilation, groups):
    for name, t in (("weight", weight), ("bias", bias)):
        torch._check(t is None or t.device == input.device, lambda name=name, t=t: (
            f"conv2d_forward: expected all tensors to be on the same device, but input is on {input.device} "
            f"and {name} is on {t.device}"))
    torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "conv2d_forward: expected 4-D input and weight")
    torch._check(input.shape[1] == weight.shape[1] * groups, lambda: "conv2d_forward: channels do not match")
    n, _, h, w = input.shape
    f, _, kh, kw = weight.shape
    oh = _conv_out(h, kh, stride[0], padding[0], dilation[0])
    ow = _conv_out(w, kw, stride[1], padding[1], dilation[1])
    return input.new_empty((n, f, oh, ow)).contiguous(memory_format=_conv_memory_format(input, weight))


@torch.library.register_fake(_lib + "conv2d_backward")
def _conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    fmt = _conv_memory_format(input, weight)
    dx = input.new_empty(input.shape).contiguous(memory_format=fmt) if output_mask[0] else None
    dw = weight.new_empty(weight.shape).contiguous(memory_format=fmt) if output_mask[1] else None
    db = weight.new_empty((weight.shape[0],)) if output_mask[2] else None
    return dx, dw, db


# -------------------------------------------------------------------------------------------- MaxPool2d
def _pool_output_size(size, k, s, p, d, ceil_mode):
    """Rule (2) of csrc/common/max_pool2d.h: torch's pooling output size, the ceil_mode rule included."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_memory_format(input):
    """torch's (and our kernels') choice: a 4-D input's suggested memory format; 3-D is contiguous."""
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(input) if input.dim() == 4 else torch.contiguous_format


def _pool_output_shape(input, kernel_size, stride, padding, dilation, ceil_mode):
    torch._check(input.dim() in (3, 4), lambda: f"max_pool2d: expected a 3-D or 4-D input, got {input.dim()}-D")
    oh = _pool_output_size(input.shape[-2], kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = _pool_output_size(input.shape[-1], kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    torch._check(oh >= 1 and ow >= 1, lambda: "max_pool2d: output size is too small")
    return (*input.shape[:-2], oh, ow)


@torch.library.register_fake(_lib + "max_pool2d_forward")
def _max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    shape = _pool_output_shape(input, kernel_size, stride, padding, dilation, ceil_mode)
    fmt = _pool_memory_format(input)
    output = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    indices = torch.empty(shape, dtype=torch.int64, device=input.device, memory_format=fmt)
    return output, indices


@torch.library.register_fake(_lib + "max_pool2d_backward")
def _max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    shape = _pool_output_shape(input, kernel_size, stride, padding, dilation, ceil_mode)
    torch._check(tuple(grad_output.shape) == tuple(shape), lambda: "max_pool2d_backward: grad_output's shape")
    torch._check(tuple(indices.shape) == tuple(shape), lambda: "max_pool2d_backward: indices' shape")
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=_pool_memory_format(input))


# ------------------------------------------------------------------------------------------- batch norm
def _batch_norm_output(input):
    # The kernels' bn_empty_output: the input's suggested memory format (channels_last in, channels_last out).
    from torch._prims_common import suggest_memory_format

    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=suggest_memory_format(input))


def _batch_norm_stat_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32  # op math: float for half/bf16


def _check_batch_norm_channels(input, name, t):
    torch._check(input.dim() >= 2,
                 lambda: f"batch_norm: expected input to have 2 or more dimensions, got {input.dim()}")
    if t is not None:
        torch._check(t.dim() == 1 and t.shape[0] == input.shape[1],
                     lambda: f"batch_norm: expected {name} to have shape [{input.shape[1]}], but got {list(t.shape)}")


@torch.library.register_fake(_lib + "batch_norm_forward_train")
def _batch_norm_forward_train(input, weight, bias, eps):
    _check_batch_norm_channels(input, "weight", weight)
    _check_batch_norm_channels(input, "bias", bias)
    stat = input.new_empty((input.shape[1],), dtype=_batch_norm_stat_dtype(input))
    return _batch_norm_output(input), stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.register_fake(_lib + "batch_norm_forward_eval")
def _batch_norm_forward_eval(input, running_mean, running_var, weight, bias, eps):
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_batch_norm_channels(input, name, t)
    return _batch_norm_output(input)


@torch.library.register_fake(_lib + "batch_norm_backward")
def _batch_norm_backward(grad_output, input, weight, mean, invstd, training, output_mask):
    torch._check(grad_output.shape == input.shape, lambda: "batch_norm_backward: grad_output and input differ in shape")
    c = input.shape[1]
    stat = _batch_norm_stat_dtype(input)
    return (
        _batch_norm_output(input) if output_mask[0] else None,
        input.new_empty((c,), dtype=stat) if output_mask[1] else None,
        input.new_empty((c,), dtype=stat) if output_mask[2] else None,
    )


@torch.library.register_fake(_lib + "batch_norm_update_stats_")
def _batch_norm_update_stats_(running_mean, running_var, mean, var, momentum, count):
    torch._check(mean.dim() == 1 and var.shape == mean.shape,
                 lambda: "batch_norm_update_stats_: expected mean and var of one shape [C]")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            torch._check(t.shape == mean.shape, lambda name=name: f"batch_norm_update_stats_: {name} is not [C]")


# Synchronised batch norm's ops (torch_cs231n/distributed.py).
@torch.library.register_fake(_lib + "batch_norm_stats")
def _batch_norm_stats(input):
    _check_batch_norm_channels(input, "input", None)
    stat = input.new_empty((input.shape[1],), dtype=_batch_norm_stat_dtype(input))
    return stat, torch.empty_like(stat)


@torch.library.register_fake(_lib + "batch_norm_merge_stats")
def _batch_norm_merge_stats(counts, means, vars, eps):
    torch._check(counts.dim() == 1 and means.dim() == 2 and means.shape == vars.shape
                 and means.shape[0] == counts.shape[0],
                 lambda: "batch_norm_merge_stats: expected counts [P] and means, vars [P, C]")
    stat = means.new_empty((means.shape[1],))
    return stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.register_fake(_lib + "batch_norm_backward_reduce")
def _batch_norm_backward_reduce(grad_output, input, mean):
    torch._check(grad_output.shape == input.shape,
                 lambda: "batch_norm_backward_reduce: grad_output and input differ in shape")
    _check_batch_norm_channels(input, "mean", mean)
    stat = input.new_empty((input.shape[1],), dtype=_batch_norm_stat_dtype(input))
    return stat, torch.empty_like(stat)


@torch.library.register_fake(_lib + "batch_norm_backward_elemt")
def _batch_norm_backward_elemt(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count):
    torch._check(grad_output.shape == input.shape,
                 lambda: "batch_norm_backward_elemt: grad_output and input differ in shape")
    for name, t in (("weight", weight), ("mean", mean), ("invstd", invstd), ("sum_dy", sum_dy),
                    ("sum_dy_xmu", sum_dy_xmu)):
        _check_batch_norm_channels(input, name, t)
    return _batch_norm_output(input)


# The CPU convolution's GEMM, exposed for its tests (csrc/cpu/gemm.cpp): C = A B, contiguous.
@torch.library.register_fake(_lib + "gemm")
def _gemm(a, b):
    torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0],
                 lambda: "gemm: expected a (m, k) and b (k, n)")
    return a.new_empty((a.shape[0], b.shape[1]))
