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
