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


# ------------------------------------------------------------------------------------------- batch norm
def _bn_output(input):
    # The kernels' bn_empty_output: the input's suggested memory format (channels_last in, channels_last out).
    from torch._prims_common import suggest_memory_format

    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=suggest_memory_format(input))


def _bn_stat_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32  # op math: float for half/bf16


def _bn_check_channels(input, name, t):
    torch._check(input.dim() >= 2, lambda: f"batch_norm: expected input to have 2 or more dimensions, got {input.dim()}")
    if t is not None:
        torch._check(t.dim() == 1 and t.shape[0] == input.shape[1],
                     lambda: f"batch_norm: expected {name} to have shape [{input.shape[1]}], but got {list(t.shape)}")


@torch.library.register_fake(_lib + "batch_norm_forward_train")
def _batch_norm_forward_train(input, weight, bias, eps):
    _bn_check_channels(input, "weight", weight)
    _bn_check_channels(input, "bias", bias)
    stat = input.new_empty((input.shape[1],), dtype=_bn_stat_dtype(input))
    return _bn_output(input), stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.register_fake(_lib + "batch_norm_forward_eval")
def _batch_norm_forward_eval(input, running_mean, running_var, weight, bias, eps):
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _bn_check_channels(input, name, t)
    return _bn_output(input)


@torch.library.register_fake(_lib + "batch_norm_backward")
def _batch_norm_backward(grad_output, input, weight, mean, invstd, training, output_mask):
    torch._check(grad_output.shape == input.shape, lambda: "batch_norm_backward: grad_output and input differ in shape")
    c = input.shape[1]
    stat = _bn_stat_dtype(input)
    return (
        _bn_output(input) if output_mask[0] else None,
        input.new_empty((c,), dtype=stat) if output_mask[1] else None,
        input.new_empty((c,), dtype=stat) if output_mask[2] else None,
    )
