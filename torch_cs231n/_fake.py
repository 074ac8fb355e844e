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
