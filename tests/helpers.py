"""Helpers for the tests: memory layouts to try, dtypes per device, tolerances, the CPU's ISA cap."""
import contextlib

import pytest
import torch

LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]


def dtypes_for(device):
    """Every floating dtype torch's layers take, on every device: float32, float64, float16, bfloat16."""
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as the 4-D tensor `x`, held in memory in the given way."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # a view whose last two dims are swapped in memory
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # a view with gaps: every other column of a wider tensor
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(layout)


def assert_same_layout(actual: torch.Tensor, expected: torch.Tensor):
    """Same strides wherever strides mean something: dims of size > 1 of a non-empty tensor."""
    if actual.numel() == 0:
        return
    a = [s for s, n in zip(actual.stride(), actual.shape) if n > 1]
    e = [s for s, n in zip(expected.stride(), expected.shape) if n > 1]
    assert a == e, f"strides {actual.stride()} differ from torch's {expected.stride()} for shape {tuple(actual.shape)}"


def assert_same_output_and_grads(out_compiled, compiled_model, out_eager, eager_model):
    """Equal outputs, and equal gradients of their sums with respect to each model's parameters."""
    torch.testing.assert_close(out_compiled, out_eager)
    grads_eager = torch.autograd.grad(out_eager.sum(), list(eager_model.parameters()))
    grads_compiled = torch.autograd.grad(out_compiled.sum(), list(compiled_model.parameters()))
    assert len(grads_compiled) == len(grads_eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor):
    """torch.compile(fullgraph=True) of `model` gives eager mode's output and parameter gradients."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_output_and_grads(compiled(x), model, model(x), model)


@contextlib.contextmanager
def forced_isa(isa):
    """The CPU kernels capped at `isa` ("amx", "avx512", "avx2", "baseline") for the block; skips when this CPU
    cannot run it."""
    ops = torch.ops.torch_cs231n
    previous = ops.set_cpu_isa(isa)
    try:
        if ops.cpu_isa() != isa:
            pytest.skip(f"this CPU cannot run the {isa} path (it runs {ops.cpu_isa()})")
        yield
    finally:
        ops.set_cpu_isa(previous)
