"""Batch norm synchronised across processes (``torch.distributed``): every process normalises with the
statistics of the whole global batch, as ``torch.nn.SyncBatchNorm`` does, on the CPU (gloo) and CUDA (NCCL).

Forward, per process (ops.cpp lists the ops; common/batch_norm.h holds their math):
    1. all-gather a small header (channels, dtype, values per channel): the ranks check that they agree,
       so a mismatch raises the same error on every rank instead of hanging in the next collective;
    2. ``batch_norm_stats``: this process's mean and biased variance per channel, with our kernel;
    3. all-gather them; ``batch_norm_merge_stats`` merges the ranks' (count, mean, M2 = var * count) in rank
       order with Chan's formula, so counts may differ and a rank may hold no values;
    4. ``batch_norm_forward_eval`` normalises with the global mean and variance.
Backward: ``batch_norm_backward_reduce`` (sum dy and sum dy (x - mean) over this process's values), one
all-gather of both (summed in rank order), and ``batch_norm_backward_elemt`` (d_input from the global sums
and count). d_weight and d_bias are this process's share; DistributedDataParallel sums them across
processes, as with torch's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as _TorchDDP

from . import functional as F  # loads the extension and its fake kernels

ops = torch.ops.torch_cs231n

__all__ = ["sync_batch_norm", "DistributedDataParallel"]

# The dtypes a header can name (its dtype field is an index here; -1: any other, which the kernels then
# refuse with their own message, on every rank alike).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _dtype_code(dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _all_gather(tensor: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """Every rank's `tensor` (all of one shape), stacked in rank order: (world_size, *tensor.shape)."""
    if tensor.device.type == "cpu" or dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor, group=group)
        return torch.stack(parts)
    out = tensor.new_empty((world_size, *tensor.shape))
    dist.all_gather_into_tensor(out, tensor, group=group)
    return out


def _check_backend(group, device: torch.device) -> None:
    """A process group whose backend cannot carry tensors of this device (NCCL and CPU tensors, say)
    fails here, the same way on every rank, before any collective is started."""
    try:
        group._get_backend(device)
    except RuntimeError as err:
        raise RuntimeError(
            f"SyncBatchNorm: expected a process group whose backend can carry {device.type} tensors, but its "
            f"backend is {dist.get_backend(group)!r} ({err}); use gloo for CPU tensors and nccl for CUDA ones"
        ) from None


def _exchange_header(input: torch.Tensor, group, world_size: int) -> list[int]:
    """The values per channel of every rank, after checking that all ranks hold the same number of channels
    and the same dtype (each rank raises the same ValueError otherwise)."""
    count = input.numel() // input.size(1) if input.size(1) else 0
    mine = torch.tensor([input.size(1), _dtype_code(input.dtype), count], dtype=torch.int64, device=input.device)
    rows = _all_gather(mine, group, world_size).tolist()
    channels = [r[0] for r in rows]
    dtypes = [_DTYPES[r[1]] if r[1] >= 0 else "an unsupported dtype" for r in rows]
    if len(set(channels)) > 1 or len(set(dtypes)) > 1:
        per_rank = ", ".join(f"rank {r}: {c} channels, {d}" for r, (c, d) in enumerate(zip(channels, dtypes)))
        raise ValueError(f"SyncBatchNorm: expected every rank's input to have the same channels and dtype, but got "
                         f"{per_rank}")
    return [r[2] for r in rows]


class _SyncBatchNorm(torch.autograd.Function):
    """Training batch norm over the union of every rank's batch; see the module docstring for the passes."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, group, world_size):
        counts = _exchange_header(input, group, world_size)
        total = sum(counts)
        if total == 1:  # torch's rule, for the global batch: a single value has no variance
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()} "
                             f"on this rank and {total} value per channel over all ranks")
        mean, var = ops.batch_norm_stats(input)
        gathered = _all_gather(torch.stack([mean, var]), group, world_size)  # (world_size, 2, C)
        mean, var, invstd = ops.batch_norm_merge_stats(
            torch.tensor(counts, dtype=mean.dtype, device=mean.device), gathered[:, 0], gathered[:, 1], eps)
        # The running statistics are the global batch's: its mean, and its variance unbiased by the global
        # count.
        F._update_running_stats(running_mean, running_var, mean, var, total, momentum)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.group, ctx.total = group, total
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return ops.batch_norm_forward_eval(input, mean, var, weight, bias, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(grad_output, input, mean)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Every rank reaches this collective: needs_input_grad is the same on all of them (one model).
            # An all-gather summed here in rank order, rather than an all-reduce: the same bits on every
            # rank, and on gloo half the latency (0.5 ms against 1 ms for 128 floats, docs/batch_norm.md).
            sums = _all_gather(torch.stack([sum_dy, sum_dy_xmu]), ctx.group, dist.get_world_size(ctx.group)).sum(0)
            grad_input = ops.batch_norm_backward_elemt(grad_output, input, weight, mean, invstd, sums[0], sums[1],
                                                       ctx.total)
        # This rank's share: dgamma = invstd * sum dy (x - mean), dbeta = sum dy (common/batch_norm.h).
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = F._as_param(sum_dy_xmu * invstd, weight)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = F._as_param(sum_dy, ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def sync_batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, momentum: float = 0.1,
                    eps: float = 1e-5, process_group=None) -> torch.Tensor:
    """Training batch norm over the global batch of ``process_group`` (default: the whole world).

    Every rank must call it, in the same order, even a rank whose batch is empty. The running statistics,
    when given, are updated with the global batch's mean and unbiased variance. Outside an initialised
    process group, or with one process, it is :func:`torch_cs231n.functional.batch_norm` in training.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"sync_batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    group = process_group if process_group is not None else (dist.group.WORLD if dist.is_initialized() else None)
    world_size = dist.get_world_size(group) if group is not None else 1
    if world_size == 1:
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    _check_backend(group, input.device)
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var, eps, momentum, group, world_size)


class DistributedDataParallel(_TorchDDP):
    """``torch.nn.parallel.DistributedDataParallel``, which also takes our SyncBatchNorm on the CPU.

    torch's refuses any module holding a ``SyncBatchNorm`` whose parameters are on the CPU ("SyncBatchNorm
    layers only work with GPU modules"), because torch's own runs on GPUs only. Ours runs on CPU tensors
    over gloo, so this class keeps that refusal for torch's layers alone; everything else is torch's. On
    CUDA, torch's DistributedDataParallel takes our layers as they are.
    """

    def _passing_sync_batchnorm_handle(self, module):
        from .modules import SyncBatchNorm

        if any(isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm) for m in module.modules()):
            super()._passing_sync_batchnorm_handle(module)
